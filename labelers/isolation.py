"""Run one calculation in its own process, under a wall-time limit.

Calculations go to worker processes (``python -m bayesal.labelers._worker``): clean
interpreters with the calculation's code (PySCF, an ASE calculator) imported once, which fork
a child per calculation. A crash (segfault, kill by the out-of-memory killer) or a hang costs
that one calculation; the worker reports it and goes on. Workers are started on demand, one
per concurrent caller thread, and are SIGKILLed by Linux if this process dies (children
likewise if their worker dies), so nothing is left running behind a killed campaign.
"""

from __future__ import annotations

import atexit
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from bayesal.labelers._protocol import recv, send

__all__ = ["Outcome", "run_isolated", "shutdown_workers"]

PRELOAD = ("bayesal.labelers._pyscf_run",)
_GRACE_S = 120.0  # extra time before a worker that does not answer is itself killed


@dataclass
class Outcome:
    """How an isolated call ended: ``ok`` (value), ``exception``, ``timeout`` or ``died``."""

    kind: str
    value: Any = None
    message: str = ""
    seconds: float = 0.0


class _Worker:
    def __init__(self, threads: int, preload: tuple[str, ...]) -> None:
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)  # BLAS thread pools are sized at import, in the worker
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bayesal.labelers._worker", *preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        msg = recv(self.proc.stdout.fileno(), time.monotonic() + 120)
        if not msg or msg[0] != "ready":
            self.close()
            raise RuntimeError("calculation worker failed to start")

    def call(self, target: str, kwargs: dict[str, Any], timeout: float | None,
             memory_mb: int | None = None) -> Outcome:
        send(self.proc.stdin.fileno(), (target, kwargs, timeout, memory_mb))
        deadline = None if timeout is None else time.monotonic() + timeout + _GRACE_S
        try:
            msg = recv(self.proc.stdout.fileno(), deadline)
        except TimeoutError:
            msg = None
        if msg is None:
            self.close()
            return Outcome("died", message="calculation worker stopped answering and was "
                           "killed")
        kind, value, message, seconds = msg
        return Outcome(kind, value, message, seconds)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()


_idle: dict[tuple[int, tuple[str, ...]], queue.LifoQueue[_Worker]] = {}
_all: list[_Worker] = []
_lock = threading.Lock()


def run_isolated(target: str, kwargs: dict[str, Any], *, timeout: float | None,
                 threads: int = 1, memory_mb: int | None = None,
                 preload: tuple[str, ...] = PRELOAD) -> Outcome:
    """Call ``module:function(**kwargs)`` in a fresh child process.

    Parameters
    ----------
    target
        ``"package.module:function"``; its return value must be picklable.
    timeout
        Wall-time limit in seconds (``None``: none); the child is killed when it expires.
    threads
        OpenMP/BLAS threads of the worker that forks the child.
    memory_mb
        Address-space limit of the child (RLIMIT_AS, MB; ``None``: none): allocations
        beyond it fail with MemoryError in the child, which costs that call only.
    preload
        Modules the worker imports once, before it forks children (the calculation's code:
        PySCF by default, an ASE calculator's module for ``kind: ase``); workers are kept
        per (threads, preload).
    """
    preload = tuple(preload)
    with _lock:
        pool = _idle.setdefault((threads, preload), queue.LifoQueue())
    try:
        worker = pool.get_nowait()
    except queue.Empty:
        worker = _Worker(threads, preload)
        with _lock:
            _all.append(worker)
    try:
        return worker.call(target, kwargs, timeout, memory_mb)
    finally:
        if worker.alive:
            pool.put(worker)
        else:
            with _lock:
                _all.remove(worker)


def shutdown_workers() -> None:
    """Stop all idle workers (they are restarted on demand)."""
    with _lock:
        for worker in _all:
            worker.close()
        _all.clear()
        _idle.clear()


atexit.register(shutdown_workers)
