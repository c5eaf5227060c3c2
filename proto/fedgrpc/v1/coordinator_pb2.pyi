from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    UINT16: _ClassVar[DType]
    UINT32: _ClassVar[DType]
    UINT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_FP16: _ClassVar[Compression]
    COMPRESSION_INT8: _ClassVar[Compression]
    COMPRESSION_SECAGG: _ClassVar[Compression]

class Instruction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTRUCTION_UNSPECIFIED: _ClassVar[Instruction]
    TRAIN: _ClassVar[Instruction]
    WAIT: _ClassVar[Instruction]
    FINISHED: _ClassVar[Instruction]
    EVALUATE: _ClassVar[Instruction]

class SecAggStep(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_STEP_UNSPECIFIED: _ClassVar[SecAggStep]
    SHARE_KEYS: _ClassVar[SecAggStep]
    MASKED_INPUT: _ClassVar[SecAggStep]
    UNMASKING: _ClassVar[SecAggStep]

class SecAggStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_STATUS_UNSPECIFIED: _ClassVar[SecAggStatus]
    SECAGG_WAIT: _ClassVar[SecAggStatus]
    SECAGG_READY: _ClassVar[SecAggStatus]
    SECAGG_ABORTED: _ClassVar[SecAggStatus]

class SecretKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECRET_KIND_UNSPECIFIED: _ClassVar[SecretKind]
    SELF_MASK_SEED: _ClassVar[SecretKind]
    MASK_KEY: _ClassVar[SecretKind]
DTYPE_UNSPECIFIED: DType
FLOAT16: DType
FLOAT32: DType
FLOAT64: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
UINT8: DType
UINT16: DType
UINT32: DType
UINT64: DType
BOOL: DType
COMPRESSION_NONE: Compression
COMPRESSION_FP16: Compression
COMPRESSION_INT8: Compression
COMPRESSION_SECAGG: Compression
INSTRUCTION_UNSPECIFIED: Instruction
TRAIN: Instruction
WAIT: Instruction
FINISHED: Instruction
EVALUATE: Instruction
SECAGG_STEP_UNSPECIFIED: SecAggStep
SHARE_KEYS: SecAggStep
MASKED_INPUT: SecAggStep
UNMASKING: SecAggStep
SECAGG_STATUS_UNSPECIFIED: SecAggStatus
SECAGG_WAIT: SecAggStatus
SECAGG_READY: SecAggStatus
SECAGG_ABORTED: SecAggStatus
SECRET_KIND_UNSPECIFIED: SecretKind
SELF_MASK_SEED: SecretKind
MASK_KEY: SecretKind

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("tensor_index", "offset", "data")
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor_index: int
    offset: int
    data: bytes
    def __init__(self, tensor_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TaskRef(_message.Message):
    __slots__ = ("name", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class ParamValue(_message.Message):
    __slots__ = ("bool_value", "int_value", "float_value", "string_value")
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    bool_value: bool
    int_value: int
    float_value: float
    string_value: str
    def __init__(self, bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ...) -> None: ...

class EvaluationPlan(_message.Message):
    __slots__ = ("every", "fraction", "personalize_epochs")
    EVERY_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    every: int
    fraction: float
    personalize_epochs: int
    def __init__(self, every: _Optional[int] = ..., fraction: _Optional[float] = ..., personalize_epochs: _Optional[int] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("run_id", "rounds", "num_clients", "partition_seed", "batch_size", "local_epochs", "compression", "task", "task_params", "partition", "evaluation", "proximal_mu", "dp_clip", "secagg", "dp_noise_multiplier")
    class TaskParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParamValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParamValue, _Mapping]] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rounds: int
    num_clients: int
    partition_seed: int
    batch_size: int
    local_epochs: int
    compression: Compression
    task: TaskRef
    task_params: _containers.MessageMap[str, ParamValue]
    partition: str
    evaluation: EvaluationPlan
    proximal_mu: float
    dp_clip: float
    secagg: SecAggSpec
    dp_noise_multiplier: float
    def __init__(self, run_id: _Optional[str] = ..., rounds: _Optional[int] = ..., num_clients: _Optional[int] = ..., partition_seed: _Optional[int] = ..., batch_size: _Optional[int] = ..., local_epochs: _Optional[int] = ..., compression: _Optional[_Union[Compression, str]] = ..., task: _Optional[_Union[TaskRef, _Mapping]] = ..., task_params: _Optional[_Mapping[str, ParamValue]] = ..., partition: _Optional[str] = ..., evaluation: _Optional[_Union[EvaluationPlan, _Mapping]] = ..., proximal_mu: _Optional[float] = ..., dp_clip: _Optional[float] = ..., secagg: _Optional[_Union[SecAggSpec, _Mapping]] = ..., dp_noise_multiplier: _Optional[float] = ...) -> None: ...

class SecAggSpec(_message.Message):
    __slots__ = ("bound", "max_examples", "threshold")
    BOUND_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    bound: float
    max_examples: int
    threshold: float
    def __init__(self, bound: _Optional[float] = ..., max_examples: _Optional[int] = ..., threshold: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "task", "spec_only")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SPEC_ONLY_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    task: TaskRef
    spec_only: bool
    def __init__(self, client_id: _Optional[int] = ..., task: _Optional[_Union[TaskRef, _Mapping]] = ..., spec_only: _Optional[bool] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run", "current_round")
    RUN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    run: RunSpec
    current_round: int
    def __init__(self, run: _Optional[_Union[RunSpec, _Mapping]] = ..., current_round: _Optional[int] = ...) -> None: ...

class GetGlobalWeightsRequest(_message.Message):
    __slots__ = ("client_id", "after_round", "max_wait_ms", "accepts_retry_after")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    after_round: int
    max_wait_ms: int
    accepts_retry_after: bool
    def __init__(self, client_id: _Optional[int] = ..., after_round: _Optional[int] = ..., max_wait_ms: _Optional[int] = ..., accepts_retry_after: _Optional[bool] = ...) -> None: ...

class WeightsHeader(_message.Message):
    __slots__ = ("instruction", "round", "tensors", "run_id", "retry_after_ms", "settings", "extra_tensors")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParamValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParamValue, _Mapping]] = ...) -> None: ...
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_TENSORS_FIELD_NUMBER: _ClassVar[int]
    instruction: Instruction
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    run_id: str
    retry_after_ms: int
    settings: _containers.MessageMap[str, ParamValue]
    extra_tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, instruction: _Optional[_Union[Instruction, str]] = ..., round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., run_id: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., settings: _Optional[_Mapping[str, ParamValue]] = ..., extra_tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class WeightsMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: WeightsHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[WeightsHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("client_id", "round", "num_examples", "metrics", "tensors", "compression", "scales", "session")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    round: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    compression: Compression
    scales: _containers.RepeatedScalarFieldContainer[float]
    session: bytes
    def __init__(self, client_id: _Optional[int] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., compression: _Optional[_Union[Compression, str]] = ..., scales: _Optional[_Iterable[float]] = ..., session: _Optional[bytes] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("client_id", "round", "num_examples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    round: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[int] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SubmitEvaluationReply(_message.Message):
    __slots__ = ("round", "received", "expected")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    received: int
    expected: int
    def __init__(self, round: _Optional[int] = ..., received: _Optional[int] = ..., expected: _Optional[int] = ...) -> None: ...

class SubmitUpdateReply(_message.Message):
    __slots__ = ("round", "received", "expected")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    received: int
    expected: int
    def __init__(self, round: _Optional[int] = ..., received: _Optional[int] = ..., expected: _Optional[int] = ...) -> None: ...

class WithdrawRequest(_message.Message):
    __slots__ = ("client_id", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    reason: str
    def __init__(self, client_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WithdrawReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("client_id", "round", "cipher_public_key", "mask_public_key", "commitment")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    round: int
    cipher_public_key: bytes
    mask_public_key: bytes
    commitment: bytes
    def __init__(self, client_id: _Optional[int] = ..., round: _Optional[int] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., commitment: _Optional[bytes] = ...) -> None: ...

class SecAggStageRequest(_message.Message):
    __slots__ = ("client_id", "round", "step", "max_wait_ms")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    round: int
    step: SecAggStep
    max_wait_ms: int
    def __init__(self, client_id: _Optional[int] = ..., round: _Optional[int] = ..., step: _Optional[_Union[SecAggStep, str]] = ..., max_wait_ms: _Optional[int] = ...) -> None: ...

class PeerKeys(_message.Message):
    __slots__ = ("client_id", "cipher_public_key", "mask_public_key")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    cipher_public_key: bytes
    mask_public_key: bytes
    def __init__(self, client_id: _Optional[int] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ...) -> None: ...

class EncryptedShares(_message.Message):
    __slots__ = ("client_id", "ciphertext")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    ciphertext: bytes
    def __init__(self, client_id: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggStage(_message.Message):
    __slots__ = ("status", "round", "session", "reason", "neighbours", "threshold", "scale", "shares", "masking", "survivors", "dropped")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    MASKING_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    status: SecAggStatus
    round: int
    session: bytes
    reason: str
    neighbours: _containers.RepeatedCompositeFieldContainer[PeerKeys]
    threshold: int
    scale: float
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShares]
    masking: _containers.RepeatedScalarFieldContainer[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, status: _Optional[_Union[SecAggStatus, str]] = ..., round: _Optional[int] = ..., session: _Optional[bytes] = ..., reason: _Optional[str] = ..., neighbours: _Optional[_Iterable[_Union[PeerKeys, _Mapping]]] = ..., threshold: _Optional[int] = ..., scale: _Optional[float] = ..., shares: _Optional[_Iterable[_Union[EncryptedShares, _Mapping]]] = ..., masking: _Optional[_Iterable[int]] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("client_id", "round", "shares", "session")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShares]
    session: bytes
    def __init__(self, client_id: _Optional[int] = ..., round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[EncryptedShares, _Mapping]]] = ..., session: _Optional[bytes] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "kind", "index", "value")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    kind: SecretKind
    index: int
    value: bytes
    def __init__(self, owner: _Optional[int] = ..., kind: _Optional[_Union[SecretKind, str]] = ..., index: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...

class RevealSharesRequest(_message.Message):
    __slots__ = ("client_id", "round", "shares", "session")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    session: bytes
    def __init__(self, client_id: _Optional[int] = ..., round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., session: _Optional[bytes] = ...) -> None: ...

class SecAggAck(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...
