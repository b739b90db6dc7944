"""What the benchmarks share: finding the reference data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shared_data() -> Path:
    """The reference DFT data shipped with bayesal (``$BAYESAL_SHARED_DATA`` overrides)."""
    from bayesal.datasets import reference_dir

    try:
        return reference_dir()
    except FileNotFoundError as exc:
        sys.exit(str(exc))


def bayesal_train(work: Path, out: Path, minutes: float, threads: int, *extra: str,
                  isolated: Path | None = None) -> tuple[float, list[dict]]:
    """``bayesal train`` on ``work``/{train,val}.xyz into ``out`` as a whole command with
    ``threads`` threads and ``minutes`` of wall time: (wall seconds, the manifest's member
    records). ``extra``: more command-line arguments."""
    import subprocess
    import time

    from bayesal.bayes_model.checkpoint import read_manifest

    script = Path(sys.executable).with_name("bayesal")
    launcher = ([str(script)] if script.exists() else  # installed with --target: no script
                [sys.executable, "-c", "from bayesal.cli import main; main()"])
    cmd = [*launcher, "train",
           "--train", str(work / "train.xyz"), "--valid", str(work / "val.xyz"),
           "--isolated-atoms", str(isolated or work / "isolated.xyz"), "--out", str(out),
           "--max-minutes", str(minutes), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bayesal train {' '.join(extra)} failed: {proc.stderr[-2000:]}")
    return wall, read_manifest(out).members


def add_command_options(parser, minutes: float) -> None:
    """Options of the benchmarks that run whole commands side by side, resumably."""
    parser.add_argument("--out", required=True, help="results folder (resumable)")
    parser.add_argument("--minutes", type=float, default=minutes,
                        help="wall budget of each command")
    parser.add_argument("--threads", type=int, default=1, help="threads of each command")
    parser.add_argument("--jobs", type=int, default=None,
                        help="commands at once (default: cores // threads)")
    parser.add_argument("--report-only", action="store_true")


def run_commands(run, todo: list[tuple], args) -> None:
    """``run(*item, args)`` for every item of ``todo``, ``args.jobs`` at a time (default:
    as many as the cores allow at ``args.threads`` each), printing what finished."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    torch.set_num_threads(args.threads)  # evaluations beside the running commands
    jobs = args.jobs or max(1, len(os.sched_getaffinity(0)) // args.threads)
    print(f"{len(todo)} commands, {jobs} at a time, {args.minutes:g} min and "
          f"{args.threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        for done in pool.map(lambda item: run(*item, args), todo):
            print("done", done, flush=True)


def add_nequip_option(parser) -> None:
    parser.add_argument("--nequip-python", default=os.environ.get("BAYESAL_NEQUIP_PYTHON",
                                                                  sys.executable),
                        help="python with nequip 0.19.1 (default: this one)")


def run_nequip(python: str, work: Path, minutes: float, threads: int,
               accelerator: str = "cpu") -> dict:
    """Train and test NequIP (benchmarks/_nequip_driver.py) on ``work``/{train,val,test}.xyz
    for ``minutes`` with ``threads``: the driver's results plus ``wall_s`` and ``curve``,
    [[training seconds, validation force MAE, energy MAE], ...] per epoch (NequIP logs no
    per-epoch time: its training time is spread evenly over the epochs)."""
    import json
    import subprocess
    import time

    t0 = time.perf_counter()
    proc = subprocess.run([python, str(REPO / "benchmarks" / "_nequip_driver.py"), str(work),
                           str(minutes), str(threads), accelerator],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"NequIP failed: {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    res = json.loads(lines[-1])
    n = max(len(res["curve"]), 1)
    res["curve"] = [[res["train_s"] * (c["epoch"] + 1) / n, c["valid_force_mae"],
                     c["valid_energy_mae"]] for c in res["curve"]]
    return {**res, "wall_s": wall}
