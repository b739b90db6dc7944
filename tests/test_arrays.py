from __future__ import annotations

import numpy as np
import pytest

from bayesal.db.arrays import ArrayEncodingError, decode_array, encode_array


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).normal(size=(7, 3)),
        np.arange(9, dtype=np.int32),
        np.zeros((0, 3)),
        np.array([True, False, True]),
        np.float64(2.5) * np.ones(()),
        np.random.default_rng(1).normal(size=(2, 3, 4)).astype(">f8"),  # big-endian input
    ],
)
def test_round_trip_is_exact(array):
    back = decode_array(encode_array(array))
    assert back.shape == array.shape
    assert back.dtype.kind == array.dtype.kind
    np.testing.assert_array_equal(back, array)


def test_layout_is_documented_little_endian_float64():
    blob = encode_array(np.array([[1.0, 2.0]]))
    assert blob[:2] == b"BA" and blob[2] == 1 and blob[3] == ord("f") and blob[4] == 2
    payload = np.frombuffer(blob[5 + 8 :], dtype="<f8")
    np.testing.assert_array_equal(payload, [1.0, 2.0])


def test_corrupt_bytes_raise():
    blob = encode_array(np.ones((4, 3)))
    with pytest.raises(ArrayEncodingError, match="payload"):
        decode_array(blob[:-8])
    with pytest.raises(ArrayEncodingError, match="magic"):
        decode_array(b"xx" + blob[2:])
    with pytest.raises(ArrayEncodingError, match="dtype"):
        encode_array(np.array(["a", "b"]))


def test_none_passes_through():
    assert decode_array(None) is None
