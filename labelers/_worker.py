"""Calculation worker: ``python -m bayesal.labelers._worker`` (started by labelers.isolation).

A clean, single-threaded interpreter with PySCF imported once. For every request read from
stdin it forks one child that runs the calculation and pipes back the pickled result, so a
crash, hang or memory blow-up ends that child only. The worker enforces the wall-time limit
(SIGKILL to the child) and answers on its protocol channel. Nothing else writes there:
stray prints of the calculation go to stderr.
"""

from __future__ import annotations

import importlib
import os
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback

from bayesal.contracts import die_with_parent
from bayesal.labelers._protocol import recv, send


def _use_scratch(folder: str) -> None:
    """Temporary files of the calculation (PySCF's checkpoint and integral files) go to
    ``folder``, which the worker deletes after the calculation, killed or not."""
    os.environ["TMPDIR"] = folder
    tempfile.tempdir = folder
    pyscf_lib = sys.modules.get("pyscf.lib")
    if pyscf_lib is not None:  # PySCF read TMPDIR when the worker imported it
        pyscf_lib.param.TMPDIR = folder


def _run_child(w: int, target: str, kwargs: dict, parent_pid: int, scratch: str,
               memory_mb: int | None) -> None:
    die_with_parent(parent_pid)
    _use_scratch(scratch)
    if memory_mb is not None:  # a hard ceiling: allocations beyond it fail in this child
        import resource

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        module, name = target.split(":")
        value = getattr(importlib.import_module(module), name)(**kwargs)
        send(w, ("ok", value, ""))
    except MemoryError as exc:
        send(w, ("exception", None, f"MemoryError: out of memory ({exc or 'allocation failed'})"
                 f"; the calculation may use at most {memory_mb} MB of address space"))
    except BaseException as exc:  # everything else is reported too
        send(w, ("exception", None, f"{type(exc).__name__}: {exc}\n"
                 + traceback.format_exc(limit=6)))
    finally:
        os._exit(0)


def _signal_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return name + (" (killed: out of memory?)" if sig == signal.SIGKILL else "")
    return f"exit code {os.WEXITSTATUS(status)}"


def _wait_readable(fd: int, proto_in: int, deadline: float | None, pid: int) -> None:
    """Block until the child's pipe is readable; raise TimeoutError at the deadline.

    The parent never writes while a calculation runs, so the protocol channel turning
    readable means it was closed: the parent is gone, and so is the point of going on.
    """
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = select.select([fd, proto_in], [], [], left)[0]
        if fd in ready:
            return
        if proto_in in ready:
            os.kill(pid, signal.SIGKILL)
            os._exit(0)
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError


def serve_one(target: str, kwargs: dict, timeout: float | None, proto_in: int,
              memory_mb: int | None = None) -> tuple:
    scratch = tempfile.mkdtemp(prefix="bayesal-calc-")
    try:
        return _serve_in(scratch, target, kwargs, timeout, proto_in, memory_mb)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _serve_in(scratch: str, target: str, kwargs: dict, timeout: float | None,
              proto_in: int, memory_mb: int | None) -> tuple:
    r, w = os.pipe()
    t0 = time.monotonic()
    worker = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _run_child(w, target, kwargs, worker, scratch, memory_mb)
    os.close(w)
    try:
        _wait_readable(r, proto_in, None if timeout is None else t0 + timeout, pid)
        msg = recv(r, None if timeout is None else t0 + timeout)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return ("timeout", None, f"wall-time limit of {timeout:g} s exceeded; the calculation "
                "was killed", time.monotonic() - t0)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - t0
    if msg is None:
        return ("died", None, f"calculation process died: {_signal_text(status)}", seconds)
    kind, value, message = msg
    return (kind, value, message, seconds)


def main() -> None:
    # No PR_SET_PDEATHSIG here: Linux would fire it when the *thread* that started the
    # worker exits (a thread pool's). The worker instead exits on EOF of its channel.
    proto_in, proto_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the protocol
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for module in sys.argv[1:]:  # preload (e.g. labelers._pyscf_run)
        importlib.import_module(module)
    send(proto_out, ("ready", os.getpid()))
    while True:
        request = recv(proto_in)
        if request is None:  # parent closed the channel
            return
        target, kwargs, timeout, memory_mb = request
        send(proto_out, serve_one(target, kwargs, timeout, proto_in, memory_mb))


if __name__ == "__main__":
    main()
