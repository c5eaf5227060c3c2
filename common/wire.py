"""Conversions between fedgrpc's own types and the generated fedgrpc.v1 messages.

The one module of fedgrpc.common that touches *_pb2 types; the server's servicer and the
client's connection use it on their sides, so the streaming format (a header, then tensor
chunks in order) is written down once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES, TensorAssembler, TensorSpec, iter_chunks, to_wire
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import CodecError
from fedgrpc.v1 import coordinator_pb2 as pb

_DTYPE_TO_PB = {
    "float16": pb.FLOAT16, "float32": pb.FLOAT32, "float64": pb.FLOAT64,
    "int8": pb.INT8, "int16": pb.INT16, "int32": pb.INT32, "int64": pb.INT64,
    "uint8": pb.UINT8, "uint16": pb.UINT16, "uint32": pb.UINT32, "uint64": pb.UINT64,
    "bool": pb.BOOL,
}  # fmt: skip
_DTYPE_FROM_PB = {v: k for k, v in _DTYPE_TO_PB.items()}


def spec_to_pb(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=_DTYPE_TO_PB[spec.dtype], shape=spec.shape)


def spec_from_pb(message: pb.TensorSpec) -> TensorSpec:
    dtype = _DTYPE_FROM_PB.get(message.dtype)
    if dtype is None:
        raise CodecError(f"tensor {message.name!r} has unknown dtype code {message.dtype}")
    return TensorSpec(name=message.name, dtype=dtype, shape=tuple(message.shape))


def run_to_pb(run: RunSpec) -> pb.RunSpec:
    return pb.RunSpec(
        run_id=run.run_id,
        rounds=run.rounds,
        num_clients=run.num_clients,
        partition_seed=run.partition_seed,
        model=run.model,
        batch_size=run.batch_size,
        local_epochs=run.local_epochs,
        learning_rate=run.learning_rate,
        input_shape=run.input_shape,
        num_classes=run.num_classes,
    )


def run_from_pb(message: pb.RunSpec) -> RunSpec:
    return RunSpec(
        run_id=message.run_id,
        rounds=message.rounds,
        num_clients=message.num_clients,
        partition_seed=message.partition_seed,
        model=message.model,
        batch_size=message.batch_size,
        local_epochs=message.local_epochs,
        learning_rate=message.learning_rate,
        input_shape=tuple(message.input_shape),
        num_classes=message.num_classes,
    )


def _chunk_messages(arrays: Sequence[np.ndarray], chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    for chunk in iter_chunks((to_wire(a) for a in arrays), chunk_bytes):
        yield pb.TensorChunk(tensor_index=chunk.index, offset=chunk.offset, data=bytes(chunk.data))


def weights_stream(
    round_number: int,
    specs: Sequence[TensorSpec],
    arrays: Sequence[np.ndarray],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    run_id: str = "",
) -> list[pb.WeightsMessage]:
    """The whole GetGlobalWeights answer for a TRAIN instruction, built once and sent to every client."""
    header = pb.WeightsHeader(
        instruction=pb.TRAIN, round=round_number, tensors=[spec_to_pb(s) for s in specs], run_id=run_id
    )
    messages = [pb.WeightsMessage(header=header)]
    messages.extend(pb.WeightsMessage(chunk=c) for c in _chunk_messages(arrays, chunk_bytes))
    return messages


def update_stream(
    *,
    client_id: int,
    round_number: int,
    num_examples: int,
    metrics: Mapping[str, float],
    specs: Sequence[TensorSpec],
    arrays: Sequence[np.ndarray],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[pb.UpdateMessage]:
    """A SubmitUpdate request stream: the header, then every tensor's chunks (made lazily)."""
    yield pb.UpdateMessage(
        header=pb.UpdateHeader(
            client_id=client_id,
            round=round_number,
            num_examples=num_examples,
            metrics=dict(metrics),
            tensors=[spec_to_pb(s) for s in specs],
        )
    )
    for chunk in _chunk_messages(arrays, chunk_bytes):
        yield pb.UpdateMessage(chunk=chunk)


@dataclass(frozen=True)
class Received:
    """Tensors assembled from a stream, and the bytes that carried them."""

    arrays: list[np.ndarray]
    wire_bytes: int


def assemble(
    specs: Sequence[TensorSpec],
    chunks: Iterable[pb.TensorChunk],
    *,
    max_total_bytes: int | None = None,
) -> Received:
    """Check and join a stream of chunks into arrays (raises CodecError on any mismatch)."""
    assembler = TensorAssembler(specs, max_total_bytes=max_total_bytes)
    wire_bytes = 0
    for chunk in chunks:
        assembler.add(chunk.tensor_index, chunk.offset, chunk.data)
        wire_bytes += len(chunk.data)
    return Received(assembler.finish(), wire_bytes)
