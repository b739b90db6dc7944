"""Active learning on acetylacetone: BALD-EF against random and the committee baseline.

Pool = acac train_300K + train_600K (1000 frames) minus 200 600 K frames held out as a test
set; test = test_MD_300K (first --n-test frames) + the 200 held-out 600 K frames. Every
campaign starts from 20 random 300 K frames and runs --rounds rounds of --batch labels
through the real campaign flow (Prefect local API, SQLite, replay labeler serving the
reference PBE-D3(BJ)/def2-SVP labels), with a fixed training budget per round (a compute
budget that does not depend on how busy the machine is; --minutes adds a wall-time cap):
round 0 trains --epochs epochs from scratch, every later round fine-tunes the previous
round's members for --finetune-epochs epochs on all labels so far (the campaign's
``finetune`` warm start; --finetune-epochs 0 trains every round from scratch instead).

    python benchmarks/active_learning.py --out bench-al [--epochs 100] [--finetune-epochs 20]

Prints, per strategy, force/energy MAE on both test parts against the number of labels
(mean ± sd over seeds) and the share of 600 K frames among its picks; on the seeds both
finished, bald-ef against random (labels each needs to reach the other's final 600 K force MAE,
per seed and for the mean curves; random runs --random-extra more rounds so that the labels
it needs can be measured beyond bald-ef's last round) and against max-force-std at equal
labels; and the orchestration overhead (share of each round's wall time outside
train/evaluate/score/label).
Writes results.json and learning_curves.png (mean, band = min-max over seeds).
Rerunning with the same --out resumes unfinished campaigns.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
from _common import REPO, shared_data

STRATEGIES = {  # name -> (acquisition function, selection)
    "bald-ef": ("bald-ef", "top-k"),
    "bald-ef-diverse": ("bald-ef", "diverse"),
    "bald-e": ("bald-e", "top-k"),
    "bald-f": ("bald-f", "top-k"),
    "max-force-std": ("max-force-std", "top-k"),
    "random": ("random", "top-k"),
}


def prepare(out: Path, n_test: int) -> dict[str, Path]:
    import ase.io

    data = shared_data() / "acac"
    files = {k: out / f"{k}.xyz" for k in ("pool", "start", "test_300K", "test_600K")}
    if all(p.is_file() for p in files.values()):
        return files
    t300 = ase.io.read(data / "train_300K.xyz", ":")
    t600 = ase.io.read(data / "train_600K.xyz", ":")
    rng = np.random.default_rng(12345)
    held = set(rng.choice(len(t600), size=200, replace=False).tolist())
    ase.io.write(files["test_600K"], [a for i, a in enumerate(t600) if i in held])
    ase.io.write(files["pool"], t300 + [a for i, a in enumerate(t600) if i not in held])
    ase.io.write(files["test_300K"], ase.io.read(data / "test_MD_300K.xyz", f":{n_test}"))
    ase.io.write(files["start"], t300)  # initial draws come from the 300 K frames
    return files


def campaign_yaml(out: Path, files: dict[str, Path], strategy: str, seed: int,
                  args) -> Path:
    import ase.io
    import yaml

    function, selection = STRATEGIES[strategy]
    start = ase.io.read(files["start"], ":")
    picks = np.random.default_rng(seed).choice(len(start), size=args.initial, replace=False)
    init = out / f"initial-seed{seed}.xyz"
    if not init.is_file():
        ase.io.write(init, [start[i] for i in sorted(picks)])
    model = yaml.safe_load(Path(args.config).read_text())
    cfg = {"name": f"{strategy}-s{seed}", "seed": seed,
           "data": {"pool_files": [str(files["pool"])], "initial_files": [str(init)],
                    "test_files": [str(files["test_300K"]), str(files["test_600K"])]},
           "method": "ensemble", "members": args.members,
           "max_train_minutes": args.minutes, "model": model["model"],
           "train": {**model["train"], "max_epochs": args.epochs},
           **({"finetune": {"max_epochs": args.finetune_epochs}}
              if args.finetune_epochs else {}),
           "acquisition": {"function": function, "selection": selection,
                           "n_select": args.batch, "chunk_size": 250},
           "labeler": {"kind": "replay", "method": "pbe-d3bj", "basis": "def2-svp",
                       "replay_files": [str(files["pool"]), str(files["test_300K"]),
                                        str(files["test_600K"])], "workers": 2},
           "stop": {"max_rounds": args.rounds + (args.random_extra if strategy == "random"
                                                  else 0)}}
    path = out / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def curves(engine, name: str) -> list[dict]:
    from bayesal.db.rounds import round_history

    return [{"labels": r["metrics"]["n_train_labels"], **r["metrics"]}
            for r in round_history(engine, name) if r["status"] == "completed"]


def labels_to_reach(xs, ys, target: float) -> float:
    """Labels at which the curve (xs, ys) first reaches ``target`` (linear interpolation;
    inf: never)."""
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return float(xs[0])
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1))
    return float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--random-extra", type=int, default=4,
                   help="extra rounds of random, to measure how many labels it needs to reach "
                   "bald-ef's final error (the label saving); comparisons at equal labels use "
                   "the first --rounds")
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--initial", type=int, default=20)
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--config", default=str(REPO / "benchmarks" / "configs" / "acac_al.yaml"),
                   help="model: and train: sections of the campaigns (max_epochs is set)")
    p.add_argument("--epochs", type=int, default=100,
                   help="epochs of round 0 (from scratch)")
    p.add_argument("--finetune-epochs", type=int, default=20,
                   help="epochs of later rounds, warm-started from the previous round's "
                   "members (0: every round from scratch with --epochs)")
    p.add_argument("--minutes", type=float, default=None,
                   help="optional wall-time cap on training per round")
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--report-only", action="store_true",
                   help="report the campaigns of --out that finished --rounds rounds, run nothing")
    args = p.parse_args()
    # SIGTERM unwinds like Ctrl-C, so Prefect's temporary API server is stopped with us.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("BAYESAL_DATABASE_URL", f"sqlite:///{out / 'al.db'}")
    os.environ.setdefault("BAYESAL_DATA_DIR", str(out / "data"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from bayesal.db import make_engine
    from bayesal.flows.campaign import campaign

    files = prepare(out, args.n_test)
    engine = make_engine(os.environ["BAYESAL_DATABASE_URL"])
    results: dict[str, dict[int, list[dict]]] = {}
    for seed in args.seeds:  # seed-major: a partial run still compares every strategy
        for strategy in args.strategies:
            if args.report_only:
                curve = curves(engine, f"{strategy}-s{seed}")
                if len(curve) >= args.rounds:
                    results.setdefault(strategy, {})[seed] = curve
                continue
            config = campaign_yaml(out, files, strategy, seed, args)
            print(f"== {strategy} seed {seed}", flush=True)
            campaign(str(config), resume=True)
            results.setdefault(strategy, {})[seed] = curves(engine, f"{strategy}-s{seed}")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    report(results, out, args.rounds, engine)


def hot_share(engine, name: str) -> float:
    """Share of a campaign's round picks that are 600 K frames (``config_type`` of the pool)."""
    from sqlalchemy import select

    from bayesal.db import Campaign, Label, Structure

    with engine.connect() as conn:
        infos = conn.scalars(
            select(Structure.info).join(Label, Label.structure_id == Structure.id)
            .join(Campaign, Campaign.id == Structure.campaign_id)
            .where(Campaign.name == name, Label.round_id.is_not(None))).all()
    return float(np.mean([i.get("config_type") == "600K_MD" for i in infos])) if infos else 0.0


KEYS = {"F 300K": "test_test_300k_force_mae", "F 600K": "test_test_600k_force_mae",
        "E 300K": "test_test_300k_energy_mae", "E 600K": "test_test_600k_energy_mae"}


def _curve(runs: list[list[dict]], key: str,
           rounds: int | None = None) -> tuple[list[int], np.ndarray]:
    """Training labels and the (seeds, rounds) array of ``key`` in meV(/Å), over the first
    ``rounds`` rounds (all that every run has when None)."""
    n = min([len(r) for r in runs] + ([rounds] if rounds else []))
    return ([runs[0][i]["labels"] for i in range(n)],
            1000 * np.array([[r[i][KEYS[key]] for i in range(n)] for r in runs]))


def compare(results: dict, a: str, b: str, rounds: int) -> None:
    """Strategy ``a`` against ``b`` on the seeds both finished: at equal labels over the first
    ``rounds`` rounds; against random also the labels each needs to reach the other's final
    error (random's extra rounds, where run, extend its curve for that)."""
    seeds = sorted(set(results.get(a, {})) & set(results.get(b, {})))
    if not seeds:
        return
    labels, ya = _curve([results[a][s] for s in seeds], "F 600K", rounds)
    labels_b, yb_all = _curve([results[b][s] for s in seeds], "F 600K")  # random: extra rounds
    yb = yb_all[:, :len(labels)]
    print(f"\n{a} vs {b}, 600 K force MAE, seeds {' '.join(map(str, seeds))}:")
    # round 0 is the same model for every strategy of a seed (same initial data and split)
    print(f"  lower at equal labels in {int((ya[:, 1:] < yb[:, 1:]).sum())} of "
          f"{ya[:, 1:].size} (seed, round > 0) pairs; mean difference "
          f"{np.mean(ya[:, 1:] - yb[:, 1:]):+.1f} meV/Å; final "
          f"{ya[:, -1].mean():.1f} vs {yb[:, -1].mean():.1f} meV/Å")
    if b != "random":
        return

    def fmt(n: float, most: int) -> str:
        return f"{n:.0f} labels = {n / labels[-1]:.0%}" if np.isfinite(n) else f"> {most}"

    rows_of = [(f"seed {s}", [i]) for i, s in enumerate(seeds)]
    for tag, rows in rows_of + ([("mean", slice(None))] if len(seeds) > 1 else []):
        ca, cb, cb_all = ya[rows].mean(0), yb[rows].mean(0), yb_all[rows].mean(0)
        need_a = labels_to_reach(labels, ca, cb[-1])
        need_b = labels_to_reach(labels_b, cb_all, ca[-1])
        print(f"  {tag:7s} {a} reaches {b}'s final {cb[-1]:.1f} meV/Å with "
              f"{fmt(need_a, labels[-1])} (target <= 60 %); {b} reaches {a}'s final "
              f"{ca[-1]:.1f} with {fmt(need_b, labels_b[-1])} (label saving "
              + (f"{1 - labels[-1] / need_b:.0%})" if np.isfinite(need_b) else "not measured)"))


def report(results: dict, out: Path, rounds: int, engine=None) -> None:
    print("finished campaigns: " + ", ".join(f"{s} (seeds {' '.join(map(str, r))})"
                                             for s, r in results.items()))
    print("\nmean ± sd over seeds (meV/Å, meV) by training labels")
    stats = {}
    for strategy, by_seed in results.items():
        runs = list(by_seed.values())
        labels, _ = _curve(runs, "F 600K")
        stats[strategy] = {"labels": labels, **{k: _curve(runs, k)[1] for k in KEYS}}
        hot = "" if engine is None else "; 600 K share of picks {:.1%}".format(
            np.mean([hot_share(engine, f"{strategy}-s{s}") for s in by_seed]))
        print(f"{strategy} ({len(runs)} seed(s){hot})")
        print("  labels " + " ".join(f"{x:11d}" for x in labels))
        for k in KEYS:
            y = stats[strategy][k]
            print(f"  {k:6s} " + " ".join(f"{m:6.1f}±{d:4.1f}" for m, d in
                                          zip(y.mean(0), y.std(0), strict=True)))
    compare(results, "bald-ef", "random", rounds)
    compare(results, "bald-ef", "max-force-std", rounds)
    shares = [r["overhead_s"] / r["round_s"] for by_seed in results.values()
              for runs in by_seed.values() for r in runs if r.get("round_s")]
    if shares:
        print(f"\norchestration overhead: mean {np.mean(shares):.2%}, max {np.max(shares):.2%} "
              f"of round wall time over {len(shares)} rounds (target < 5 %)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("F 300K", "F 600K"), strict=True):
        for strategy, st in stats.items():
            y = st[key]
            line, = ax.plot(st["labels"], y.mean(0), marker="o",
                            label=f"{strategy} ({len(y)} seed{'s' * (len(y) > 1)})")
            if len(y) > 1:
                ax.fill_between(st["labels"], y.min(0), y.max(0), color=line.get_color(),
                                alpha=0.15)
        ax.set(xlabel="training labels", ylabel="force MAE (meV/Å)", yscale="log",
               title=f"test {key[2:]} (mean, band: min-max over seeds)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    print(f"plot: {out / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
