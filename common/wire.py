"""Conversions between fedgrpc's own types and the generated fedgrpc.v1 messages.

The one module of fedgrpc.common that touches *_pb2 types; the server's servicer and the
client's connection use it on their sides, so the streaming format (a header, then tensor
chunks in order) is written down once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from fedgrpc.v1 import coordinator_pb2 as pb

from . import secagg as sa
from .codec import DEFAULT_CHUNK_BYTES, TensorAssembler, TensorSpec, iter_chunks, to_wire
from .config import EvaluationPlan, ParamValue, RunSpec, SecAggSpec, TaskRef
from .errors import CodecError, SecAggError
from .protocol import Instruction

_DTYPE_TO_PB = {
    "float16": pb.FLOAT16, "float32": pb.FLOAT32, "float64": pb.FLOAT64,
    "int8": pb.INT8, "int16": pb.INT16, "int32": pb.INT32, "int64": pb.INT64,
    "uint8": pb.UINT8, "uint16": pb.UINT16, "uint32": pb.UINT32, "uint64": pb.UINT64,
    "bool": pb.BOOL,
}  # fmt: skip
_DTYPE_FROM_PB = {v: k for k, v in _DTYPE_TO_PB.items()}
_COMPRESSION_TO_PB = {
    "none": pb.COMPRESSION_NONE,
    "fp16": pb.COMPRESSION_FP16,
    "int8": pb.COMPRESSION_INT8,
    "secagg": pb.COMPRESSION_SECAGG,
}
_COMPRESSION_FROM_PB: dict[int, str] = {int(v): k for k, v in _COMPRESSION_TO_PB.items()}

#: The full name of the service, for handlers and calls made without the generated stubs.
SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name


def compression_from_pb(code: int) -> str:
    name = _COMPRESSION_FROM_PB.get(code)
    if name is None:
        raise CodecError(f"unknown compression code {code}")
    return name


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
        batch_size=run.batch_size,
        local_epochs=run.local_epochs,
        compression=_COMPRESSION_TO_PB[run.compression],
        task=task_to_pb(run.task),
        task_params={key: param_to_pb(value) for key, value in run.task_params.items()},
        partition=run.partition,
        evaluation=pb.EvaluationPlan(
            every=run.evaluation.every,
            fraction=run.evaluation.fraction,
            personalize_epochs=run.evaluation.personalize_epochs,
        ),
        proximal_mu=run.proximal_mu,
        dp_clip=run.dp_clip,
        dp_noise_multiplier=run.dp_noise_multiplier,
        secagg=None
        if run.secagg is None
        else pb.SecAggSpec(
            bound=run.secagg.bound, max_examples=run.secagg.max_examples, threshold=run.secagg.threshold
        ),
    )


def run_from_pb(message: pb.RunSpec) -> RunSpec:
    return RunSpec(
        run_id=message.run_id,
        rounds=message.rounds,
        num_clients=message.num_clients,
        partition_seed=message.partition_seed,
        batch_size=message.batch_size,
        local_epochs=message.local_epochs,
        compression=compression_from_pb(message.compression),
        task=task_from_pb(message.task),
        task_params={key: param_from_pb(key, value) for key, value in message.task_params.items()},
        partition=message.partition or "iid",
        evaluation=EvaluationPlan(
            every=message.evaluation.every,
            fraction=message.evaluation.fraction or 1.0,
            personalize_epochs=message.evaluation.personalize_epochs,
        ),
        proximal_mu=message.proximal_mu,
        dp_clip=message.dp_clip,
        dp_noise_multiplier=message.dp_noise_multiplier,
        secagg=SecAggSpec(message.secagg.bound, message.secagg.max_examples, message.secagg.threshold)
        if message.HasField("secagg")
        else None,
    )


def task_to_pb(task: TaskRef | None) -> pb.TaskRef:
    return pb.TaskRef() if task is None else pb.TaskRef(name=task.name, digest=task.digest)


#: TaskRef.digest: a SHA-256 as hashlib writes it, or empty (a client that runs no task code).
_DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_TASK_NAME = 128
MAX_REASON = 500


def task_from_pb(message: pb.TaskRef) -> TaskRef:
    """The TaskRef a peer sent; CodecError for a digest that is not 64 lower-case hex digits or a
    name that could not be a task's (both end up in log lines)."""
    if message.digest and not _DIGEST.fullmatch(message.digest):
        raise CodecError(
            f"TaskRef.digest {message.digest[:80]!r} is not a SHA-256: send 64 lower-case hex digits"
        )
    checked_text(message.name, "TaskRef.name", MAX_TASK_NAME, empty=True)
    return TaskRef(name=message.name, digest=message.digest)


def checked_text(text: str, what: str, max_length: int, *, empty: bool = False) -> str:
    """A peer's free text that the server will log or show: at most `max_length` printable
    characters, so no newline or control character can forge or hide a log line."""
    if not text and not empty:
        raise CodecError(f"{what} is empty")
    if len(text) > max_length:
        raise CodecError(f"{what} has {len(text)} characters; at most {max_length} are accepted")
    if not text.isprintable():
        raise CodecError(f"{what} {text[:80]!r} holds control characters (a newline, a tab, ...)")
    return text


def param_to_pb(value: ParamValue) -> pb.ParamValue:
    if isinstance(value, bool):  # before int: a bool is an int in Python
        return pb.ParamValue(bool_value=value)
    if isinstance(value, int):
        return pb.ParamValue(int_value=value)
    if isinstance(value, float):
        return pb.ParamValue(float_value=value)
    return pb.ParamValue(string_value=value)


def param_from_pb(key: str, message: pb.ParamValue) -> ParamValue:
    kind = message.WhichOneof("kind")
    if kind is None:
        raise CodecError(f"task parameter {key!r} has no value")
    value: ParamValue = getattr(message, kind)
    return value


def settings_to_pb(settings: Mapping[str, ParamValue]) -> dict[str, pb.ParamValue]:
    """A round's client settings (WeightsHeader.settings)."""
    return {key: param_to_pb(value) for key, value in settings.items()}


def settings_from_pb(settings: Mapping[str, pb.ParamValue]) -> dict[str, ParamValue]:
    return {key: param_from_pb(key, value) for key, value in settings.items()}


# -- chunk messages, serialized by hand ---------------------------------------------------
#
# A chunk message is almost all payload. Building a TensorChunk and serializing it copies the
# payload twice; writing the few bytes of protobuf framing ourselves and joining them with a
# view of the tensor copies it once. The bytes are exactly what protobuf writes (a test
# parses them back and compares), so receivers use the generated parser as usual.

_CHUNK_FIELD = 2  # WeightsMessage.chunk and UpdateMessage.chunk
_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


_CHUNK_TAG = _tag(_CHUNK_FIELD, _LENGTH_DELIMITED)
_INDEX_TAG, _OFFSET_TAG, _DATA_TAG = _tag(1, 0), _tag(2, 0), _tag(3, _LENGTH_DELIMITED)


def encode_chunk(index: int, offset: int, data: memoryview) -> bytes:
    """The serialized WeightsMessage/UpdateMessage that carries this chunk (one copy of data)."""
    head = b""
    if index:  # proto3 leaves fields at their default out
        head += _INDEX_TAG + _varint(index)
    if offset:
        head += _OFFSET_TAG + _varint(offset)
    if len(data):
        head += _DATA_TAG + _varint(len(data))
    return b"".join((_CHUNK_TAG, _varint(len(head) + len(data)), head, data))


def serialize(message: pb.WeightsMessage | pb.UpdateMessage | bytes) -> bytes:
    """gRPC serializer for the weight streams: messages, or chunks already encoded by encode_chunk."""
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass(frozen=True)
class Undecodable:
    """A stream message that did not parse; the handler answers it with INVALID_ARGUMENT."""

    size: int
    reason: str


def parse_update_message(data: bytes) -> pb.UpdateMessage | Undecodable:
    """gRPC deserializer for SubmitUpdate that never raises: gRPC would answer a raising
    deserializer with INTERNAL, which tells a client nothing about its own mistake."""
    try:
        return pb.UpdateMessage.FromString(data)
    except Exception as exc:  # the parser's error types differ between protobuf backends
        return Undecodable(len(data), str(exc) or type(exc).__name__)


def _encoded_chunks(arrays: Sequence[np.ndarray], chunk_bytes: int) -> Iterator[bytes]:
    for chunk in iter_chunks((to_wire(a) for a in arrays), chunk_bytes):
        yield encode_chunk(chunk.index, chunk.offset, chunk.data)


_INSTRUCTION_TO_PB = {
    Instruction.TRAIN: pb.TRAIN,
    Instruction.WAIT: pb.WAIT,
    Instruction.FINISHED: pb.FINISHED,
    Instruction.EVALUATE: pb.EVALUATE,
}


def instruction_to_pb(instruction: Instruction) -> pb.Instruction:
    return _INSTRUCTION_TO_PB[instruction]


# Secure aggregation's vocabulary on the wire: one table each, used by both sides.
_STEP_TO_PB = {sa.Step.SHARE: pb.SHARE_KEYS, sa.Step.MASK: pb.MASKED_INPUT, sa.Step.UNMASK: pb.UNMASKING}
_STEP_FROM_PB = {int(v): k for k, v in _STEP_TO_PB.items()}
_STATUS_TO_PB = {
    sa.StageStatus.WAIT: pb.SECAGG_WAIT,
    sa.StageStatus.READY: pb.SECAGG_READY,
    sa.StageStatus.ABORTED: pb.SECAGG_ABORTED,
}
_STATUS_FROM_PB = {int(v): k for k, v in _STATUS_TO_PB.items()}
_SHARE_KIND_TO_PB = {sa.ShareKind.SELF_MASK: pb.SELF_MASK_SEED, sa.ShareKind.MASK_KEY: pb.MASK_KEY}
_SHARE_KIND_FROM_PB = {int(v): k for k, v in _SHARE_KIND_TO_PB.items()}


def step_to_pb(step: sa.Step) -> pb.SecAggStep:
    return _STEP_TO_PB[step]


def step_from_pb(code: int) -> sa.Step:
    step = _STEP_FROM_PB.get(code)
    if step is None:
        raise SecAggError(f"unknown secure aggregation step {code}")
    return step


def share_kind_to_pb(kind: sa.ShareKind) -> pb.SecretKind:
    return _SHARE_KIND_TO_PB[kind]


def share_kind_from_pb(code: int) -> str:
    """The kind, or "" for a code this version does not know (the server refuses the share)."""
    return _SHARE_KIND_FROM_PB.get(code, "")


def stage_to_pb(round_number: int, stage: sa.Stage) -> pb.SecAggStage:
    reply = pb.SecAggStage(
        status=_STATUS_TO_PB[stage.status],
        round=round_number,
        session=stage.session,
        reason=stage.reason,
        threshold=stage.threshold,
        scale=stage.scale,
        masking=stage.masking,
        survivors=stage.survivors,
        dropped=stage.dropped,
    )
    reply.neighbours.extend(
        pb.PeerKeys(client_id=v, cipher_public_key=c, mask_public_key=m) for v, c, m in stage.neighbours
    )
    reply.shares.extend(pb.EncryptedShares(client_id=u, ciphertext=c) for u, c in stage.shares)
    return reply


def stage_from_pb(reply: pb.SecAggStage) -> sa.Stage:
    return sa.Stage(
        status=_STATUS_FROM_PB.get(reply.status, sa.StageStatus.WAIT),
        session=reply.session,
        reason=reply.reason,
        neighbours=tuple((p.client_id, p.cipher_public_key, p.mask_public_key) for p in reply.neighbours),
        threshold=reply.threshold,
        scale=reply.scale,
        shares=tuple((e.client_id, e.ciphertext) for e in reply.shares),
        masking=tuple(reply.masking),
        survivors=tuple(reply.survivors),
        dropped=tuple(reply.dropped),
    )


def weights_stream(
    round_number: int,
    specs: Sequence[TensorSpec],
    arrays: Sequence[np.ndarray],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    run_id: str = "",
    instruction: Instruction = Instruction.TRAIN,
    settings: Mapping[str, ParamValue] | None = None,
    extras: Sequence[tuple[TensorSpec, np.ndarray]] = (),
) -> Iterator[pb.WeightsMessage | bytes]:
    """A GetGlobalWeights answer for a TRAIN or EVALUATE instruction: the header, then encoded
    chunks (lazily). A TRAIN's round `settings` and the strategy protocol's `extras` travel with
    it: the extras' chunks follow the model's (their tensor_index counts on)."""
    header = pb.WeightsHeader(
        instruction=instruction_to_pb(instruction),
        round=round_number,
        tensors=[spec_to_pb(s) for s in specs],
        run_id=run_id,
        settings=settings_to_pb(settings or {}),
        extra_tensors=[spec_to_pb(s) for s, _ in extras],
    )
    yield pb.WeightsMessage(header=header)
    yield from _encoded_chunks([*arrays, *(a for _, a in extras)], chunk_bytes)


def update_stream(
    *,
    client_id: int,
    round_number: int,
    num_examples: int,
    metrics: Mapping[str, float],
    specs: Sequence[TensorSpec],
    arrays: Sequence[np.ndarray],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compression: str = "none",
    scales: Sequence[float] = (),
    session: bytes = b"",
) -> Iterator[pb.UpdateMessage | bytes]:
    """A SubmitUpdate request stream: the header, then every tensor's chunks (encoded lazily).

    `specs` are the model's tensors; `arrays` are what travels for them under `compression`
    (see fedgrpc.common.compression), with their `scales`.
    """
    yield pb.UpdateMessage(
        header=pb.UpdateHeader(
            client_id=client_id,
            round=round_number,
            num_examples=num_examples,
            metrics=dict(metrics),
            tensors=[spec_to_pb(s) for s in specs],
            compression=_COMPRESSION_TO_PB[compression],
            scales=list(scales),
            session=session,
        )
    )
    yield from _encoded_chunks(arrays, chunk_bytes)


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
    on_tensor: Callable[[int, np.ndarray], None] | None = None,
) -> Received:
    """Check and join a stream of chunks into arrays (raises CodecError on any mismatch);
    `on_tensor` sees each tensor as soon as its last chunk is in."""
    assembler = TensorAssembler(specs, max_total_bytes=max_total_bytes, on_tensor=on_tensor)
    wire_bytes = 0
    for chunk in chunks:
        assembler.add(chunk.tensor_index, chunk.offset, chunk.data)
        wire_bytes += len(chunk.data)
    return Received(assembler.finish(), wire_bytes)
