"""Tensors to little-endian bytes and back: pure functions, no pickle, no protobuf.

A tensor travels as a `TensorSpec` (name, dtype, shape) and its raw bytes in C order,
little-endian whatever the machine. Encoding is zero-copy for arrays that are already
contiguous and little-endian (every float32 Keras weight on x86 and ARM); decoding is
`np.frombuffer` over the received buffer, so no byte is copied twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import CodecError, UnsupportedDTypeError

#: Every dtype the wire carries, by numpy name.
SUPPORTED_DTYPES: tuple[str, ...] = (
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool",
)  # fmt: skip

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: big enough to amortise per-message cost, small enough to stream


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver must know to rebuild a tensor from bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * wire_dtype(self.dtype).itemsize


def wire_dtype(name: str) -> np.dtype[np.generic]:
    """The little-endian numpy dtype for a supported dtype name."""
    if name not in SUPPORTED_DTYPES:
        raise UnsupportedDTypeError(
            f"dtype {name!r} is not supported on the wire; use one of {', '.join(SUPPORTED_DTYPES)}"
        )
    return np.dtype(name).newbyteorder("<")


def spec_of(name: str, array: np.ndarray) -> TensorSpec:
    """The spec of an array, refusing dtypes the wire cannot carry."""
    dtype_name = np.dtype(array.dtype).name
    wire_dtype(dtype_name)
    return TensorSpec(name=name, dtype=dtype_name, shape=tuple(int(d) for d in array.shape))


def to_wire(array: np.ndarray) -> memoryview:
    """The array's bytes in C order, little-endian; a view when no conversion is needed."""
    target = wire_dtype(np.dtype(array.dtype).name)
    if array.dtype != target:  # big-endian input: swap once
        array = array.astype(target)
    flat = np.ascontiguousarray(array).reshape(-1)  # a view for contiguous input
    return flat.view(np.uint8).data


def from_wire(spec: TensorSpec, buffer: bytes | bytearray | memoryview) -> np.ndarray:
    """The array that `buffer` holds under `spec`, sharing its memory (no copy)."""
    dtype = wire_dtype(spec.dtype)
    if any(d < 0 for d in spec.shape):
        raise CodecError(f"tensor {spec.name!r} has a negative dimension in shape {spec.shape}")
    expected = spec.nbytes
    if len(buffer) != expected:
        raise CodecError(
            f"tensor {spec.name!r} ({spec.dtype}{list(spec.shape)}) needs {expected} bytes, got {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(spec.shape)


@dataclass(frozen=True)
class Chunk:
    """Bytes [offset, offset+len(data)) of tensor number `index`."""

    index: int
    offset: int
    data: memoryview


def iter_chunks(buffers: Iterable[memoryview], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """Cut each tensor's bytes into chunks of at most chunk_bytes, in order (views, no copies)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    for index, buffer in enumerate(buffers):
        for offset in range(0, len(buffer), chunk_bytes):
            yield Chunk(index, offset, buffer[offset : offset + chunk_bytes])


class TensorAssembler:
    """Rebuilds tensors from chunks, checking every chunk against the declared specs.

    Each tensor gets one buffer of its declared size; chunks are copied into it once and
    must arrive in order without gaps or overlap, so a short, long, reordered or mislabelled
    stream is caught before any array is handed out. With `keep=False` each complete tensor
    belongs to `on_tensor` alone, so a receiver that stores tensors elsewhere holds one
    tensor in memory, not the stream.
    """

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        *,
        max_total_bytes: int | None = None,
        on_tensor: Callable[[int, np.ndarray], None] | None = None,
        keep: bool = True,
    ) -> None:
        if not keep and on_tensor is None:
            raise ValueError("an assembler that keeps no tensor needs on_tensor")
        total = 0
        for spec in specs:
            wire_dtype(spec.dtype)
            if any(d < 0 for d in spec.shape):
                raise CodecError(f"tensor {spec.name!r} has a negative dimension in shape {spec.shape}")
            total += spec.nbytes
        if max_total_bytes is not None and total > max_total_bytes:
            raise CodecError(f"tensors declare {total} bytes, more than the {max_total_bytes} allowed")
        self.specs = tuple(specs)
        self.total_bytes = total
        self._on_tensor = on_tensor
        self._keep = keep
        self._sizes = [spec.nbytes for spec in self.specs]
        # Allocated when a tensor's first chunk arrives; np.empty, not bytearray: no zero-fill
        # pass over memory that the chunks overwrite anyway.
        self._buffers: list[np.ndarray | None] = [None] * len(self.specs)
        self._filled = [0] * len(self.specs)
        self._current = 0
        self._handed_out = 0  # tensors before this index went to on_tensor

    def add(self, index: int, offset: int, data: bytes | memoryview) -> None:
        if not 0 <= index < len(self.specs):
            raise CodecError(f"chunk for tensor #{index}, but only {len(self.specs)} tensors were declared")
        # Skip past tensors that are complete (zero-byte tensors have no chunks at all).
        while self._current < index and self._filled[self._current] == self._sizes[self._current]:
            self._current += 1
        if index != self._current:
            name = self.specs[self._current].name
            raise CodecError(
                f"chunk for tensor #{index} arrived while tensor #{self._current} ({name}) is incomplete"
            )
        filled = self._filled[index]
        if offset != filled:
            raise CodecError(
                f"chunk of tensor {self.specs[index].name!r} at offset {offset}, expected {filled}"
            )
        end = filled + len(data)
        size = self._sizes[index]
        if end > size:
            raise CodecError(f"tensor {self.specs[index].name!r} overflows its declared {size} bytes")
        buffer = self._buffers[index]
        if buffer is None:
            buffer = self._buffers[index] = np.empty(size, dtype=np.uint8)
        buffer[filled:end] = np.frombuffer(data, dtype=np.uint8)
        self._filled[index] = end
        if end == size:
            self._hand_out(index + 1)

    def finish(self) -> list[np.ndarray]:
        """The decoded tensors (none with keep=False); raises if any tensor is incomplete."""
        for spec, size, filled in zip(self.specs, self._sizes, self._filled, strict=True):
            if filled != size:
                raise CodecError(f"tensor {spec.name!r} is incomplete: {filled} of {size} bytes arrived")
        self._hand_out(len(self.specs))
        return [self._array(i) for i in range(len(self.specs))] if self._keep else []

    def _array(self, index: int) -> np.ndarray:
        buffer = self._buffers[index]
        if buffer is None:  # a zero-byte tensor: no chunk ever arrived
            buffer = self._buffers[index] = np.empty(0, dtype=np.uint8)
        return from_wire(self.specs[index], buffer.data)

    def _hand_out(self, stop: int) -> None:
        """Give every complete tensor before `stop` to on_tensor, once and in order, so a
        receiver can check (and decode) each tensor while the next one is still arriving."""
        while self._handed_out < stop:
            index = self._handed_out
            self._handed_out += 1
            if self._on_tensor is not None:
                array = self._array(index)
                if not self._keep:
                    self._buffers[index] = None
                self._on_tensor(index, array)
