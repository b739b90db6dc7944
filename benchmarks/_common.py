"""What the benchmarks share: finding the reference data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shared_data() -> Path:
    """``$BAYESAL_SHARED_DATA`` or ``../shared/data`` beside the checkout; exit if missing."""
    env = os.environ.get("BAYESAL_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        sys.exit(f"shared data not found at {path}; set BAYESAL_SHARED_DATA")
    return path


def add_nequip_option(parser) -> None:
    parser.add_argument("--nequip-python", default=os.environ.get("BAYESAL_NEQUIP_PYTHON",
                                                                  sys.executable),
                        help="python with nequip 0.19.1 (default: this one)")


def run_nequip(python: str, work: Path, minutes: float, threads: int) -> dict:
    """Train and test NequIP (benchmarks/_nequip_driver.py) on ``work``/{train,val,test}.xyz
    for ``minutes`` with ``threads``: the driver's results plus ``wall_s`` and ``curve``,
    [[training seconds, validation force MAE, energy MAE], ...] per epoch (NequIP logs no
    per-epoch time: its training time is spread evenly over the epochs)."""
    import json
    import subprocess
    import time

    t0 = time.perf_counter()
    proc = subprocess.run([python, str(REPO / "benchmarks" / "_nequip_driver.py"), str(work),
                           str(minutes), str(threads)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"NequIP failed: {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    res = json.loads(lines[-1])
    n = max(len(res["curve"]), 1)
    res["curve"] = [[res["train_s"] * (c["epoch"] + 1) / n, c["valid_force_mae"],
                     c["valid_energy_mae"]] for c in res["curve"]]
    return {**res, "wall_s": wall}
