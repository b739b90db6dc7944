"""Benchmark: the model on a GPU against the 2-core CPU it was built on, measured in one run
on the same machine.

Steps (each writes its results into ``--out`` as soon as it is done; a rerun skips the
steps already there, so a run cut short by its machine's time limit resumes):

* ``train``: training throughput (structures and epochs per second) of one member with the
  default model, ethanol and acetylacetone, 450 training structures: the CPU with
  ``--cpu-threads`` (2) threads at the default batch size, against the GPU at batch sizes
  ``--batches`` (the default first). Each point trains for ``--seconds`` of wall time.
* ``infer``: inference throughput (energies, forces, their epistemic and aleatoric
  uncertainties) of a 4-member ensemble, structures per second: CPU at 2 threads against
  the GPU at several prediction batch sizes.
* ``accuracy``: at an equal GPU budget (``--minutes``) the default 4-member ensemble
  (``bayesal train --device cuda``) against one NequIP 0.19 model (tutorial settings,
  benchmarks/_nequip_driver.py) on the same GPU: test force MAE and the ratio (target
  <= 1.0). Skipped, and said so, where nequip is not importable.
* ``label``: seconds per acetylacetone label at PBE-D3(BJ)/def2-SVP, PySCF on the CPU
  against gpu4pyscf. Skipped, and said so, where gpu4pyscf is not importable.

Targets (issue 17, one H200-class GPU): training >= 20x the 2-core CPU throughput;
inference >= 2,000 structures/s for the 4-member ensemble on 15-atom molecules.

    python benchmarks/gpu.py --out gpu.json                       # everything, ~8 min
    python benchmarks/gpu.py --out gpu.json --steps train infer   # throughput only
    python benchmarks/gpu.py --out gpu.json --report-only
benchmarks/gpu_check.sh runs it (with the gpu-marked tests) on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import shared_data
from training_curves import split

STEPS = ("train", "infer", "accuracy", "label")


def _save(path: Path, results: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float | None:
    """Peak GPU memory torch allocated since the last reset, MB (None on the CPU)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def train_point(molecule: str, device: str, batch: int, seconds: float, threads: int,
                kernels: str = "e3nn") -> dict:
    """One member (default model and loss) trained in whole epochs for about ``seconds``
    after a warm-up epoch: structures/s and epochs/s of the training steps (validation
    excluded)."""
    import torch

    from bayesal.bayes_model.device import resolve_device
    from bayesal.bayes_model.ensemble import prepare_data
    from bayesal.bayes_model.kernels import use_kernels
    from bayesal.bayes_model.model import ModelConfig
    from bayesal.bayes_model.train import TrainConfig, build_model, train_epoch

    torch.set_num_threads(threads)
    train, valid, _, _ = split(shared_data(), molecule, 450, 50, 0)
    config = ModelConfig()
    data = prepare_data(train, valid, config)
    where = resolve_device(device)
    model = build_model(config, data.species, data.shifts, data.train).to(where)
    use_kernels(model, kernels)
    cfg = TrainConfig(batch_size=batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, amsgrad=True)
    generator = torch.Generator().manual_seed(0)

    def epoch() -> list[float]:
        return train_epoch(model, data.train, optimizer, cfg, kind=cfg.loss,
                           generator=generator)[0]

    _reset_peak(where)
    epoch()  # warm-up: CUDA context, kernels, allocator
    _sync(where)
    t0, epochs, losses = time.perf_counter(), 0, []
    while epochs == 0 or time.perf_counter() - t0 < seconds:
        losses = epoch()
        epochs += 1
    _sync(where)
    train_s = time.perf_counter() - t0
    return {"device": str(where), "kernels": kernels, "batch_size": batch, "threads": threads,
            "epochs": epochs, "seconds": train_s, "epochs_per_s": epochs / train_s,
            "structures_per_s": epochs * len(data.train) / train_s,
            "peak_gpu_mb": _peak_mb(where),
            "last_loss": float(sum(losses) / max(len(losses), 1))}


def infer_point(molecule: str, device: str, batch: int, n: int, threads: int,
                kernels: str = "e3nn") -> dict:
    """A 4-member ensemble (default model) predicting ``n`` structures: structures/s."""
    import torch

    from bayesal.bayes_model.device import resolve_device
    from bayesal.bayes_model.ensemble import prepare_data
    from bayesal.bayes_model.kernels import use_kernels
    from bayesal.bayes_model.model import ModelConfig
    from bayesal.bayes_model.predict import predict_members
    from bayesal.bayes_model.train import build_model

    torch.set_num_threads(threads)
    train, valid, test, _ = split(shared_data(), molecule, 50, 10, 400)
    config = ModelConfig()
    data = prepare_data(train, valid, config)
    where = resolve_device(device)
    models = [use_kernels(build_model(config, data.species, data.shifts, data.train, seed=k)
                          .to(where), kernels).eval() for k in range(4)]
    images = (test * (n // len(test) + 1))[:n]
    _reset_peak(where)
    predict_members(models, images[: min(n, 2 * batch)], batch_size=batch)  # warm-up
    _sync(where)
    t0 = time.perf_counter()
    pred = predict_members(models, images, batch_size=batch, max_atoms=batch * 64)
    _sync(where)
    seconds = time.perf_counter() - t0
    return {"device": str(where), "kernels": kernels, "batch_size": batch, "threads": threads,
            "structures": n,
            "atoms_per_structure": float(pred.n_atoms.mean()), "seconds": seconds,
            "structures_per_s": n / seconds, "peak_gpu_mb": _peak_mb(where)}


def accuracy_point(molecule: str, minutes: float, nequip: bool) -> dict:
    import ase.io
    from _common import bayesal_train, run_nequip

    from bayesal.bayes_model.metrics import accuracy_metrics
    from bayesal.bayes_model.posterior import load_posterior

    train, valid, test, isolated = split(shared_data(), molecule, 450, 50, 200)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, images in (("train", train), ("val", valid), ("test", test)):
            ase.io.write(work / f"{name}.xyz", images)
        wall, members = bayesal_train(work, work / "ours", minutes, 16, "--device", "cuda",
                                      isolated=isolated)
        pred = load_posterior(work / "ours", device="cuda").predict(test)
        out["bayesal"] = {"wall_s": wall, "epochs": [m["epochs"] + m.get("shared_epochs", 0)
                                                     for m in members],
                          "test": accuracy_metrics(pred, test)}
        if nequip:
            res = run_nequip(sys.executable, work, minutes, 16, "gpu")
            out["nequip"] = {k: v for k, v in res.items() if k != "curve"}
            out["force_mae_ratio"] = (out["bayesal"]["test"]["force_mae"]
                                      / res["force_mae"])
    return out


def label_point(n: int) -> dict:
    import ase.io

    from bayesal.labelers import PySCFLabeler

    frames = ase.io.read(shared_data() / "acac" / "test_MD_300K.xyz", f":{n}")
    out = {}
    for backend in ("cpu", "gpu"):
        labeler = PySCFLabeler("pbe", "def2-svp", dispersion="d3bj", backend=backend)
        labeler.label(frames[0])  # warm-up (GPU kernels compile on first use)
        t0 = time.perf_counter()
        results = [labeler.label(a) for a in frames]
        seconds = (time.perf_counter() - t0) / len(frames)
        out[backend] = {"seconds_per_label": seconds,
                        "ok": sum(r.ok for r in results)}
    out["speedup"] = out["cpu"]["seconds_per_label"] / out["gpu"]["seconds_per_label"]
    return out


def report(results: dict) -> None:
    for molecule, points in results.get("train", {}).items():
        cpu = points.get("cpu")
        if not cpu:
            continue
        print(f"train {molecule}: CPU {cpu['threads']} threads batch {cpu['batch_size']}: "
              f"{cpu['structures_per_s']:.1f} structures/s ({cpu['epochs_per_s']:.3f} "
              "epochs/s)")
        for key, p in points.items():
            if key != "cpu":
                print(f"  GPU batch {p['batch_size']:>3} {p.get('kernels', 'e3nn'):>4}: "
                      f"{p['structures_per_s']:8.1f} "
                      f"structures/s = {p['structures_per_s'] / cpu['structures_per_s']:.1f}x "
                      "the CPU (target >= 20x)")
    for molecule, points in results.get("infer", {}).items():
        cpu = points.get("cpu")
        for key, p in points.items():
            ratio = (f" = {p['structures_per_s'] / cpu['structures_per_s']:.1f}x the CPU"
                     if cpu and key != "cpu" else "")
            print(f"infer {molecule} {key:>9}: {p['structures_per_s']:9.1f} structures/s of "
                  f"{p['atoms_per_structure']:.0f} atoms, 4 members{ratio}"
                  + (" (target >= 2,000)" if key != "cpu" else ""))
    for molecule, acc in results.get("accuracy", {}).items():
        ours = acc["bayesal"]["test"]
        line = (f"accuracy {molecule}: bayesal ensemble force MAE {ours['force_mae']:.4f} "
                f"eV/Å, energy MAE {ours['energy_mae']:.4f} eV")
        if "nequip" in acc:
            line += (f"; NequIP {acc['nequip']['force_mae']:.4f} eV/Å: ratio "
                     f"{acc['force_mae_ratio']:.2f} (target <= 1.0)")
        else:
            line += "; NequIP not run (not importable)"
        print(line)
    if isinstance(results.get("cueq"), str):
        print(f"cueq: {results['cueq']}")
    if "label" in results:
        lab = results["label"]
        if "skipped" in lab:
            print(f"label: {lab['skipped']}")
        else:
            print(f"label acac PBE-D3(BJ)/def2-SVP: CPU {lab['cpu']['seconds_per_label']:.1f} "
                  f"s, GPU {lab['gpu']['seconds_per_label']:.2f} s per label "
                  f"({lab['speedup']:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON (resumable)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--molecules", nargs="+", default=["ethanol", "acac"])
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="training wall time per throughput point")
    parser.add_argument("--batches", type=int, nargs="+", default=[5, 16, 64])
    parser.add_argument("--infer-batches", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--infer-structures", type=int, default=4000)
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=2.0,
                        help="GPU budget of each accuracy contender")
    parser.add_argument("--labels", type=int, default=3)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.report_only:
        report(results)
        return
    import torch

    gpu_threads = torch.get_num_threads()
    try:  # the fused cuEquivariance kernels (kernels: cueq) where installed
        import cuequivariance_ops_torch  # noqa: F401
        kernel_sets = ["e3nn", "cueq"]
    except ImportError:
        kernel_sets = ["e3nn"]
        results["cueq"] = "not run: cuequivariance-ops-torch is not installed"
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (torch sees none)")
    results["gpu"] = torch.cuda.get_device_name(0)
    for molecule in args.molecules:
        if "train" in args.steps:
            points = results.setdefault("train", {}).setdefault(molecule, {})
            todo = [("cpu", "cpu", 5, args.cpu_threads, "e3nn")] + [
                (f"cuda-b{b}" + ("" if k == "e3nn" else f"-{k}"), "cuda", b, gpu_threads, k)
                for k in kernel_sets for b in args.batches]
            for key, device, batch, threads, kernels in todo:
                if key not in points:
                    points[key] = train_point(molecule, device, batch, args.seconds, threads,
                                              kernels)
                    _save(args.out, results)
                    print(molecule, key, points[key], flush=True)
        if "infer" in args.steps:
            points = results.setdefault("infer", {}).setdefault(molecule, {})
            todo = [("cpu", "cpu", 32, args.cpu_threads, 200, "e3nn")] + [
                (f"cuda-b{b}" + ("" if k == "e3nn" else f"-{k}"), "cuda", b, gpu_threads,
                 args.infer_structures, k) for k in kernel_sets for b in args.infer_batches]
            for key, device, batch, threads, n, kernels in todo:
                if key not in points:
                    points[key] = infer_point(molecule, device, batch, n, threads, kernels)
                    _save(args.out, results)
                    print(molecule, key, points[key], flush=True)
    if "accuracy" in args.steps:
        try:
            import nequip  # noqa: F401
            has_nequip = True
        except ImportError:
            has_nequip = False
        for molecule in args.molecules[:1]:
            acc = results.setdefault("accuracy", {})
            if molecule not in acc:
                acc[molecule] = accuracy_point(molecule, args.minutes, has_nequip)
                _save(args.out, results)
    if "label" in args.steps and "label" not in results:
        from bayesal.labelers import gpu_available

        results["label"] = (label_point(args.labels) if gpu_available()
                            else {"skipped": "gpu4pyscf is not importable: not run"})
        _save(args.out, results)
    report(results)


if __name__ == "__main__":
    main()
