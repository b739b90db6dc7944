"""The CPU share and the wall budget a command was given.

CPU share: the cores of the process's affinity mask, lowered by ``SLURM_CPUS_PER_TASK`` and
``OMP_NUM_THREADS``, whichever are set (``train.threads`` caps the threads per process).
Training never runs processes x threads above it.

Wall budget: a :class:`Deadline` taken when a command starts covers all of its work; each
part (members in waves, posterior fitting, calibration) gets a share and a reserve is kept
for the work after training.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["Deadline", "cpu_share", "plan_processes"]


# The limits as the process was started with them: Dask's nanny writes OMP_NUM_THREADS=1
# into this process's environment when it starts local workers (for the workers), which
# must not shrink the share of training later in the same process.
_LIMITS_AT_START = {name: os.environ.get(name, "")
                    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")}


def _env_int(name: str) -> int | None:
    value = _LIMITS_AT_START.get(name, "").strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 1 else None


def cpu_share() -> tuple[int, str]:
    """Cores this process may use and what limited it (for the progress output).

    torch's own thread count is not a limit here: with the OpenMP backend it is the calling
    thread's OpenMP setting, which any library may have lowered (PySCF sets it per
    calculation), and a campaign's training then ran its members one after the other."""
    limits = {"affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count() or 1}
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        if (n := _env_int(name)) is not None:
            limits[name] = n
    source = min(limits, key=lambda k: limits[k])
    return max(1, limits[source]), source


def plan_processes(jobs: int, processes: int | None = None, threads: int | None = None,
                   ) -> tuple[int, int]:
    """(processes, threads per process) for ``jobs`` independent trainings within the CPU
    share: processes <= jobs and processes x threads <= the share (at least 1 x 1).
    ``processes``/``threads`` are upper bounds the user asked for."""
    share, _ = cpu_share()
    procs = max(1, min(jobs, share, processes or share))
    per = max(1, share // procs)
    if threads:
        per = min(per, threads)
    return procs, per


@dataclass(frozen=True)
class Deadline:
    """An absolute wall-clock end (``time.time()`` seconds, valid across processes)."""

    end: float

    @classmethod
    def after(cls, minutes: float | None) -> Deadline | None:
        return None if minutes is None else cls(time.time() + 60.0 * minutes)

    def remaining(self) -> float:
        """Seconds left (negative when past)."""
        return self.end - time.time()

    def minus(self, seconds: float) -> Deadline:
        return Deadline(self.end - seconds)

    def slot(self, index: int, slots: int, start: float | None = None) -> Deadline:
        """The end of slot ``index`` of ``slots`` equal slots between ``start`` (now) and
        the end: members that train in waves get one slot each."""
        start = time.time() if start is None else start
        return Deadline(start + (self.end - start) * (index + 1) / slots)


def earliest(*deadlines: Deadline | None) -> Deadline | None:
    found = [d for d in deadlines if d is not None]
    return min(found, key=lambda d: d.end) if found else None
