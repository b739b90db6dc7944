"""Benchmark: learning curves of one model under different training/model settings.

Trains one mean-variance model per (molecule, variant) on 450 training / 50 validation
frames (fixed random split of the shared data, isolated-atom energies given), records the
validation force/energy MAE after every epoch with the wall time, and evaluates the best
(EMA) weights on held-out test frames: accuracy, NLL and calibration (miscalibration area
before and after the validation variance scale). Used to choose the defaults of
bayes_model (docs/model.md, "Choosing settings").

    python benchmarks/training_curves.py --out /work/bench-curves \\
        --variant default= --variant mse=train.loss=mse --molecule ethanol --epochs 30
    python benchmarks/training_curves.py --out /work/bench-curves --report-only

A variant is NAME=KEY=VALUE[,KEY=VALUE...] with keys such as ``train.lr`` or
``model.channels`` (empty: the defaults). Every run writes ``<out>/<molecule>/<name>.json``
when it ends and is skipped when that file exists (resumable); runs execute ``--jobs`` at a
time, each with ``--threads`` torch threads (default: the cores given / jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ase.io
import numpy as np
from _common import add_nequip_option, run_nequip, shared_data

MOLECULES = {
    # molecule: (training file, test files)
    "ethanol": ("ethanol/train.xyz", ["ethanol/test_MD.xyz"]),
    "acac": ("acac/train_300K.xyz", ["acac/test_MD_300K.xyz", "acac/train_600K.xyz"]),
}


def split(data: Path, molecule: str, n_train: int, n_valid: int, n_test: int):
    train_file, test_files = MOLECULES[molecule]
    frames = ase.io.read(data / train_file, ":")
    order = np.random.default_rng(0).permutation(len(frames))
    train = [frames[i] for i in order[:n_train]]
    valid = [frames[i] for i in order[n_train:n_train + n_valid]]
    rng = np.random.default_rng(1)
    test = []
    for name in test_files:
        pool = ase.io.read(data / name, ":")
        per_file = n_test // len(test_files)
        test += [pool[i] for i in sorted(rng.permutation(len(pool))[:per_file])]
    return train, valid, test, data / molecule / "isolated_atoms.xyz"


def parse_variant(text: str) -> tuple[str, dict[str, dict[str, object]]]:
    name, _, rest = text.partition("=")
    updates: dict[str, dict[str, object]] = {"model": {}, "train": {}}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if section not in updates or not field:
            raise SystemExit(f"variant {name}: {key!r} is not model.FIELD or train.FIELD")
        updates[section][field] = json.loads(value) if value[:1] in "0123456789-[{tf" \
            and value not in ("true", "false") else {"true": True, "false": False}.get(
                value, value)
    return name, updates


def run_one(molecule: str, name: str, updates: dict, args: dict, out: str) -> str:
    import torch

    from bayesal.bayes_model.calibration import calibration_metrics, fit_recalibration
    from bayesal.bayes_model.ensemble import prepare_data
    from bayesal.bayes_model.metrics import accuracy_metrics
    from bayesal.bayes_model.model import ModelConfig
    from bayesal.bayes_model.posterior import EnsemblePosterior
    from bayesal.bayes_model.train import TrainConfig, build_model, train_model

    torch.set_num_threads(args["threads"])
    t0 = time.perf_counter()
    train, valid, test, isolated = split(shared_data(), molecule, args["n_train"],
                                         args["n_valid"], args["n_test"])
    model_cfg = ModelConfig(**updates["model"])
    train_cfg = TrainConfig(**{"max_epochs": args["epochs"], "patience": 10_000,
                               "max_minutes": args["minutes"], **updates["train"]})
    data = prepare_data(train, valid, model_cfg, isolated_atoms=isolated)
    model = build_model(model_cfg, data.species, data.shifts, data.train, seed=train_cfg.seed)
    start = time.perf_counter()
    curve = []

    def on_epoch(record):
        curve.append({"seconds": time.perf_counter() - start, **record})

    result = train_model(model, data.train, data.valid, train_cfg, on_epoch=on_epoch)
    train_s = time.perf_counter() - start
    post = EnsemblePosterior([result.model])
    pred_test, pred_valid = post.predict(test), post.predict(valid)
    recal = fit_recalibration(pred_valid, valid)
    summary = {"molecule": molecule, "variant": name, "updates": updates,
               "threads": args["threads"], "train_s": train_s,
               "total_s": time.perf_counter() - t0, "epochs": len(curve),
               "best_epoch": result.best_epoch, "stopped": result.stopped,
               "test": {**accuracy_metrics(pred_test, test),
                        **calibration_metrics(pred_test, test, recalibration=recal)},
               "curve": curve}
    path = Path(out) / molecule / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary))
    os.replace(tmp, path)
    return str(path)


def nequip(molecule: str, args: dict, out: str) -> str:
    """NequIP (benchmarks/_nequip_driver.py, tutorial settings) on the same split, for
    ``args["nequip_minutes"]`` of training with the same threads; same JSON as run_one."""
    import tempfile

    train, valid, test, _ = split(shared_data(), molecule, args["n_train"], args["n_valid"],
                                  args["n_test"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, images in (("train", train), ("val", valid), ("test", test)):
            ase.io.write(work / f"{name}.xyz", images, format="extxyz")
        res = run_nequip(args["nequip_python"], work, args["nequip_minutes"], args["threads"])
    curve = [{"seconds": t, "valid_force_mae": f, "valid_energy_mae": e}
             for t, f, e in res.pop("curve")]
    summary = {"molecule": molecule, "variant": "nequip", "threads": args["threads"],
               "train_s": res["train_s"], "total_s": res.pop("wall_s"), "epochs": len(curve),
               "best_epoch": int(np.argmin([c["valid_force_mae"] for c in curve])),
               "test": res, "curve": curve}
    path = Path(out) / molecule / "nequip.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))
    return str(path)


def report(out: Path) -> None:
    for mol_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        rows = [json.loads(p.read_text()) for p in sorted(mol_dir.glob("*.json"))]
        if not rows:
            continue
        print(f"\n{mol_dir.name}: validation force MAE (meV/Å) after epoch 5/10/20/30/best; "
              "test at the best epoch")
        print(f"{'variant':<22}{'ep':>4}{'s/ep':>6}{'v5':>6}{'v10':>6}{'v20':>6}{'v30':>6}"
              f"{'best':>6}{'F MAE':>7}{'E MAE':>7}{'F NLL':>7}{'Fmis':>6}{'Fmis*':>6}"
              f"{'Emis*':>6}")
        for r in rows:
            v = [c["valid_force_mae"] * 1e3 for c in r["curve"]]

            def at(k, v=v):
                return f"{v[k - 1]:6.0f}" if len(v) >= k else f"{'':>6}"

            t = r["test"]
            calib = "".join(f"{t[k]:6.3f}" if k in t else f"{'-':>6}" for k in (
                "force_miscal_area", "force_miscal_area_recal", "energy_miscal_area_recal"))
            print(f"{r['variant']:<22}{r['epochs']:>4}{r['train_s'] / max(r['epochs'], 1):>6.1f}"
                  f"{at(5)}{at(10)}{at(20)}{at(30)}{min(v):6.0f}"
                  f"{t['force_mae'] * 1e3:7.1f}{t['energy_mae'] * 1e3:7.1f}"
                  f"{t.get('force_nll', float('nan')):7.2f}{calib}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results folder (resumable)")
    ap.add_argument("--molecule", action="append", choices=sorted(MOLECULES))
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=KEY=VALUE[,KEY=VALUE...] (repeatable)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--minutes", type=float, default=None, help="wall budget per model")
    ap.add_argument("--n-train", type=int, default=450)
    ap.add_argument("--n-valid", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--nequip-minutes", type=float, default=None,
                    help="also train NequIP this long on each molecule")
    add_nequip_option(ap)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report_only:
        cores = len(os.sched_getaffinity(0))
        threads = args.threads or max(1, cores // args.jobs)
        common = {"threads": threads, "epochs": args.epochs, "minutes": args.minutes,
                  "n_train": args.n_train, "n_valid": args.n_valid, "n_test": args.n_test,
                  "nequip_minutes": args.nequip_minutes, "nequip_python": args.nequip_python}
        todo = [(m, *parse_variant(v)) for m in (args.molecule or ["ethanol"])
                for v in args.variant]
        todo = [t for t in todo if not (out / t[0] / f"{t[1]}.json").exists()]
        print(f"{len(todo)} runs, {args.jobs} at a time, {threads} thread(s) each")
        env_threads = str(threads)
        os.environ.update(OMP_NUM_THREADS=env_threads, MKL_NUM_THREADS=env_threads)
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_one, m, name, upd, common, str(out))
                       for m, name, upd in todo]
            if args.nequip_minutes:
                futures += [pool.submit(nequip, m, common, str(out))
                            for m in (args.molecule or ["ethanol"])
                            if not (out / m / "nequip.json").exists()]
            for fut in futures:
                print("done", fut.result(), flush=True)
    report(out)


if __name__ == "__main__":
    main()
