"""Length-prefixed pickle messages over pipes, shared by labelers.isolation and the worker."""

from __future__ import annotations

import os
import pickle
import select
import struct
import time

_HEADER = struct.Struct("<Q")


def send(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def recv(fd: int, deadline: float | None = None):
    """Read one message; ``None`` on EOF; TimeoutError past ``deadline`` (monotonic)."""
    def read_exact(n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    head = read_exact(_HEADER.size)
    if head is None:
        return None
    body = read_exact(_HEADER.unpack(head)[0])
    return None if body is None else pickle.loads(body)
