"""Who is running a campaign: an advisory lock file in the campaign's folder.

A campaign flow holds ``<campaign folder>/run.lock`` (``flock``, exclusive) for as long as it
runs, with its host, pid and start time written in it. The kernel releases the lock the
moment the process ends, however it ends (SIGKILL, the OOM killer), so a lock nobody holds
means nobody is running the campaign, whatever the database says: a round still marked
``running`` then is a crash's leftover that ``--resume`` continues (``bayesal doctor``). A
second run of a campaign that is running is refused instead of racing the first.

The lock file is opened close-on-exec: spawned processes (ensemble members, labeler
workers, Dask) do not keep it; a forked child would, but it dies with its parent.

:func:`end_with_parent` binds a deployment run to the Prefect worker that started it: when
the worker is killed, the run gets SIGTERM (Prefect marks it Crashed) instead of running on
as an orphan nobody supervises (a worker restarted later would start a second copy).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "CampaignBusyError", "check_not_running", "end_with_parent",
           "lock_holder", "run_lock"]

LOCK_FILE = "run.lock"


class CampaignBusyError(RuntimeError):
    """Another process runs this campaign now."""


def _busy(campaign: str, info: dict[str, Any] | None) -> CampaignBusyError:
    who = "another process" if not info else (
        f"process {info.get('pid')} on {info.get('host')} (since {info.get('started', '?')})")
    return CampaignBusyError(f"campaign {campaign} is being run by {who}: wait for it to end "
                             "or stop it; two runs of one campaign would race each other")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def lock_holder(folder: str | Path) -> dict[str, Any] | None:
    """``{"host", "pid", "started"}`` of the process running the campaign whose folder this
    is, or None when nobody runs it (no lock file, or nobody holds it)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(path) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_not_running(folder: str | Path, campaign: str) -> None:
    """CampaignBusyError when a process holds the campaign's run lock now."""
    holder = lock_holder(folder)
    if holder is not None:
        raise _busy(campaign, holder)


@contextlib.contextmanager
def run_lock(folder: str | Path, campaign: str) -> Iterator[None]:
    """Hold the campaign's run lock for the block; CampaignBusyError when another process
    holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _busy(campaign, _read(path)) from None
    try:
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.now(UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def end_with_parent(poll_s: float = 1.0) -> threading.Thread:
    """SIGTERM this process within ``poll_s`` of its parent's death (its parent changes: the
    orphan is adopted by init or a subreaper). A watcher thread polls ``getppid`` rather than
    PR_SET_PDEATHSIG, which fires when the parent *thread* that forked us ends: Prefect
    workers spawn flow runs from event-loop threads that may end before the worker does."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="bayesal-end-with-parent", daemon=True)
    thread.start()
    return thread
