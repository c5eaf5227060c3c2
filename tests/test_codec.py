from typing import Any

import numpy as np
import pytest
from fedgrpc.common.codec import (
    SUPPORTED_DTYPES,
    TensorAssembler,
    TensorSpec,
    from_wire,
    iter_chunks,
    spec_of,
    to_wire,
)
from fedgrpc.common.errors import CodecError, UnsupportedDTypeError


def roundtrip(array: np.ndarray) -> np.ndarray:
    spec = spec_of("t", array)
    return from_wire(spec, bytes(to_wire(array)))


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_roundtrip_every_supported_dtype(dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    out = roundtrip(array)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    "array",
    [
        np.array(3.5, dtype=np.float32),  # 0-d
        np.zeros((0,), dtype=np.float32),  # empty
        np.zeros((4, 0, 2), dtype=np.int64),  # empty with shape
        np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2],  # non-contiguous
        np.arange(24, dtype=np.float32).reshape(4, 6).T,  # Fortran order
        np.arange(10, dtype=">i4"),  # big-endian input
    ],
    ids=["0d", "empty", "empty-shaped", "strided", "transposed", "big-endian"],
)
def test_roundtrip_odd_arrays(array: np.ndarray) -> None:
    out = roundtrip(array)
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_wire_bytes_are_little_endian() -> None:
    assert bytes(to_wire(np.array([1], dtype=">u2"))) == b"\x01\x00"
    assert bytes(to_wire(np.array([1], dtype="<u2"))) == b"\x01\x00"


def test_encode_is_zero_copy_for_contiguous_little_endian() -> None:
    array = np.arange(10, dtype="<f4")
    view = to_wire(array)
    array[0] = 42.0
    assert np.frombuffer(view, dtype="<f4")[0] == 42.0


def test_decode_shares_the_buffer() -> None:
    buffer = bytearray(np.arange(4, dtype="<f4").tobytes())
    out = from_wire(TensorSpec("t", "float32", (4,)), buffer)
    buffer[0:4] = np.float32(7).tobytes()
    assert out[0] == 7


@pytest.mark.parametrize("dtype", [np.complex64, np.str_, object, "datetime64[s]"])
def test_unsupported_dtypes_are_refused_clearly(dtype: Any) -> None:
    with pytest.raises(UnsupportedDTypeError, match="not supported"):
        spec_of("t", np.zeros(2, dtype=dtype))


def test_wrong_length_is_refused() -> None:
    with pytest.raises(CodecError, match="needs 16 bytes, got 12"):
        from_wire(TensorSpec("t", "float32", (4,)), b"\0" * 12)


def test_chunks_reassemble_to_the_original() -> None:
    arrays: list[np.ndarray] = [
        np.arange(1000, dtype=np.float32),
        np.zeros(0, np.float32),
        np.ones((3, 3), np.int8),
    ]
    specs = [spec_of(str(i), a) for i, a in enumerate(arrays)]
    assembler = TensorAssembler(specs)
    chunks = list(iter_chunks([to_wire(a) for a in arrays], chunk_bytes=333))
    assert max(len(c.data) for c in chunks) == 333
    for chunk in chunks:
        assembler.add(chunk.index, chunk.offset, chunk.data)
    for out, array in zip(assembler.finish(), arrays, strict=True):
        np.testing.assert_array_equal(out, array)


def _assembler() -> TensorAssembler:
    return TensorAssembler([TensorSpec("a", "float32", (4,)), TensorSpec("b", "float32", (2,))])


def test_assembler_refuses_gaps_overflow_reordering_and_short_streams() -> None:
    with pytest.raises(CodecError, match="offset 4, expected 0"):
        _assembler().add(0, 4, b"\0" * 4)
    with pytest.raises(CodecError, match="overflows"):
        _assembler().add(0, 0, b"\0" * 20)
    with pytest.raises(CodecError, match="incomplete"):
        _assembler().add(1, 0, b"\0" * 8)
    with pytest.raises(CodecError, match="only 2 tensors"):
        _assembler().add(5, 0, b"\0")
    short = _assembler()
    short.add(0, 0, b"\0" * 16)
    with pytest.raises(CodecError, match="'b' is incomplete"):
        short.finish()


def test_assembler_refuses_oversized_declarations() -> None:
    with pytest.raises(CodecError, match="more than the 100 allowed"):
        TensorAssembler([TensorSpec("a", "float64", (1000,))], max_total_bytes=100)
