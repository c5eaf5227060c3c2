"""Frozen settings shared by both sides: what a run is."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from fedgrpc.common.errors import ConfigError, NotEnrolledError


def new_run_id() -> str:
    return secrets.token_hex(6)


@dataclass(frozen=True)
class RunSpec:
    """What every client of a run must agree on; the server owns it and sends it at Join.

    Client ids are 1..num_clients; client k trains shard k-1 of a shuffle seeded with
    partition_seed, so a shard is a pure function of (seed, k, num_clients).
    """

    rounds: int = 10
    num_clients: int = 3
    partition_seed: int = 42
    model: str = "cnn"
    batch_size: int = 32
    local_epochs: int = 1
    learning_rate: float = 1e-3
    input_shape: tuple[int, ...] = (32, 32, 3)
    num_classes: int = 10
    compression: str = "none"  # how clients send updates: none, fp16 or int8 (fedgrpc.common.compression)
    run_id: str = field(default_factory=new_run_id)

    def __post_init__(self) -> None:
        for name in ("rounds", "num_clients", "batch_size", "local_epochs", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.partition_seed < 0:
            raise ConfigError(f"partition_seed must be >= 0, got {self.partition_seed}")
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise ConfigError(f"input_shape must be positive dimensions, got {self.input_shape}")
        if self.compression not in ("none", "fp16", "int8"):
            raise ConfigError(f"compression must be none, fp16 or int8, got {self.compression!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")

    def check_client_id(self, client_id: int) -> None:
        """Refuse an id outside 1..num_clients, saying what the valid ids are."""
        if not 1 <= client_id <= self.num_clients:
            raise NotEnrolledError(
                f"client id {client_id} is not part of this run: ids are 1..{self.num_clients}"
            )
