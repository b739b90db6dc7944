"""Portable binary encoding of numpy arrays for SQL columns.

Layout of an encoded array (all integers little-endian)::

    b"BA"            magic
    uint8            format version (1)
    uint8            dtype code: ord("f") float64, ord("i") int64, ord("b") bool (uint8)
    uint8            ndim
    ndim x uint32    shape
    payload          C-order data, little-endian

Any language reads it back; in Python::

    from bayesal.db import decode_array
    forces = decode_array(row.forces)   # (n_atoms, 3) float64, eV/Å
"""

from __future__ import annotations

import struct

import numpy as np
from sqlalchemy import LargeBinary
from sqlalchemy.types import TypeDecorator

__all__ = ["ArrayEncodingError", "NumpyArray", "decode_array", "encode_array"]

_MAGIC = b"BA"
_VERSION = 1
_CODES: dict[str, tuple[int, str]] = {
    "f": (ord("f"), "<f8"),
    "i": (ord("i"), "<i8"),
    "b": (ord("b"), "u1"),
}
_BY_CODE = {code: dt for code, dt in _CODES.values()}


class ArrayEncodingError(ValueError):
    """An array cannot be encoded, or stored bytes are not a bayesal array."""


_HEADERS: dict[tuple[int, int], struct.Struct] = {}


def encode_array(array: np.ndarray) -> bytes:
    """Encode a numeric array as portable bytes (float64, int64 or bool kept as such).

    Parameters
    ----------
    array
        Any real floating, integer or boolean array of at most 255 dimensions.
    """
    arr = np.asarray(array)
    kind = arr.dtype.kind
    if kind == "f":
        code, dtype = _CODES["f"]
    elif kind in "iu":
        code, dtype = _CODES["i"]
    elif kind == "b":
        code, dtype = _CODES["b"]
    else:
        raise ArrayEncodingError(
            f"cannot store an array of dtype {arr.dtype} (use float, int or bool)"
        )
    ndim = arr.ndim
    if ndim > 255:
        raise ArrayEncodingError(f"array has {ndim} dimensions; at most 255 are supported")
    header = _HEADERS.get((code, ndim))
    if header is None:
        header = _HEADERS[(code, ndim)] = struct.Struct(f"<2sBBB{ndim}I")
    data = arr.astype(dtype, order="C", copy=False).tobytes()
    return header.pack(_MAGIC, _VERSION, code, ndim, *arr.shape) + data


def decode_array(blob: bytes | memoryview | None) -> np.ndarray | None:
    """Decode bytes written by :func:`encode_array`; ``None`` stays ``None``."""
    if blob is None:
        return None
    data = bytes(blob)
    if len(data) < 5 or data[:2] != _MAGIC:
        raise ArrayEncodingError("stored value is not a bayesal array (bad magic bytes)")
    version, code, ndim = struct.unpack_from("<BBB", data, 2)
    if version != _VERSION:
        raise ArrayEncodingError(f"array format version {version} is not supported (expected 1)")
    if code not in _BY_CODE:
        raise ArrayEncodingError(f"unknown array dtype code {code}")
    shape = struct.unpack_from(f"<{ndim}I", data, 5)
    offset = 5 + 4 * ndim
    dtype = np.dtype(_BY_CODE[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ArrayEncodingError(
            f"array payload has {len(data) - offset} bytes, shape {shape} needs {expected}"
        )
    out = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    if code == ord("b"):
        return out.astype(bool)
    return out.astype(dtype.newbyteorder("="))  # native order, writable copy


class NumpyArray(TypeDecorator[np.ndarray]):
    """SQL column holding a numpy array (BLOB on SQLite, BYTEA on PostgreSQL)."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value, dialect):  # type: ignore[override]
        return None if value is None else encode_array(value)

    def process_result_value(self, value, dialect):  # type: ignore[override]
        return decode_array(value)
