"""Every error fedgrpc raises on purpose, in one hierarchy.

    FedGrpcError                  base: catch this to catch anything of ours
    ├── ConfigError               a setting or command-line value that cannot work
    ├── DataError                 a dataset that is missing, unreadable or of the wrong shape
    ├── TaskError                 a task that cannot be loaded or run (names the task and function)
    │   └── TaskMismatchError     a client whose task is not the run's (refused at Join)
    ├── SecAggError               a secure aggregation step that cannot go on (bad key, share, ...)
    ├── CodecError                tensor bytes that cannot be encoded or decoded
    │   └── UnsupportedDTypeError a dtype the wire format does not carry
    ├── UpdateRejectedError       the server refused an update (status and reason inside)
    │   └── StaleRoundError       the update was for a round that is not open any more
    ├── NotEnrolledError          the server does not know this client id
    ├── ServerUnavailableError    the server could not be reached in time
    ├── AuthError                 missing, wrong or borrowed credentials (status code inside)
    ├── RunChangedError           the server now runs another run than the one joined
    ├── RunFailedError            the server cannot go on with a run (its checkpoint is intact)
    └── CheckpointError           a checkpoint that is missing pieces, truncated or corrupted

gRPC status codes are mapped to and from these at the two boundaries only:
fedgrpc.server.admission and fedgrpc.client.connection.
"""

from __future__ import annotations


class FedGrpcError(Exception):
    """Base of every fedgrpc error."""


class ConfigError(FedGrpcError):
    """A setting that cannot work; the message says which and what to do."""


class DataError(FedGrpcError):
    """A dataset that is missing, unreadable or malformed."""


class TaskError(FedGrpcError):
    """A task that cannot be loaded, or whose functions fail or return the wrong thing."""


class TaskMismatchError(TaskError):
    """A client runs another task (name or code) than the run's: FAILED_PRECONDITION at Join."""


class SecAggError(FedGrpcError):
    """A secure aggregation message or step that cannot be used: a bad key, a share that does not
    decrypt or rebuild, a client outside the step. INVALID_ARGUMENT at the boundary."""


class CodecError(FedGrpcError):
    """Tensor bytes that do not match their declared dtype and shape."""


class UnsupportedDTypeError(CodecError):
    """A numpy dtype that fedgrpc's wire format does not carry."""


class UpdateRejectedError(FedGrpcError):
    """The server answered an update with an error status."""

    def __init__(self, message: str, *, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


class StaleRoundError(UpdateRejectedError):
    """The update's round is closed; `current_round` is the one now open, if known."""

    def __init__(self, message: str, *, current_round: int | None = None) -> None:
        super().__init__(message, code="FAILED_PRECONDITION")
        self.current_round = current_round


class NotEnrolledError(FedGrpcError):
    """The client id is not part of this run."""


class ServerUnavailableError(FedGrpcError):
    """The server did not answer before the connect timeout."""


class RunChangedError(FedGrpcError):
    """The server answers for a different run than the one this client joined."""


class CheckpointError(FedGrpcError):
    """A checkpoint that cannot be trusted; the message says which file and why."""


class AuthError(FedGrpcError):
    """The caller is not who it must be: UNAUTHENTICATED, or PERMISSION_DENIED for another's id."""

    def __init__(self, message: str, *, code: str = "UNAUTHENTICATED") -> None:
        super().__init__(message)
        self.code = code


class MetricsError(FedGrpcError):
    """Client metrics that break the rules of fedgrpc.common.metrics."""


class OverloadError(FedGrpcError):
    """A call refused for capacity, not content: RESOURCE_EXHAUSTED (a limit on what one peer or
    client may hold open) or UNAVAILABLE (busy right now). The same call may succeed later."""

    def __init__(self, message: str, *, code: str = "RESOURCE_EXHAUSTED") -> None:
        super().__init__(message)
        self.code = code


class StalledError(FedGrpcError):
    """A peer sent nothing for longer than the server's stall timeout; its call was cut."""


class RunFailedError(FedGrpcError):
    """The run cannot go on (e.g. rounds keep producing unusable weights); the checkpoint is intact."""
