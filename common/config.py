"""Frozen settings shared by both sides: what a run is."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .compression import COMPRESSIONS
from .errors import ConfigError, NotEnrolledError
from .partition import check_scheme

#: A task parameter's value: the types TOML, the command line and the wire all carry
#: (fedgrpc.common.task shows it to task authors).
ParamValue = bool | int | float | str

DEFAULT_TASK = "cifar10"


def new_run_id() -> str:
    return secrets.token_hex(6)


def check_clients_per_round(clients_per_round: int | None, num_clients: int) -> None:
    """Refuse a per-round sample that the run's clients cannot fill (None: every client)."""
    if clients_per_round is not None and not 1 <= clients_per_round <= num_clients:
        raise ConfigError(
            f"--clients-per-round must be in 1..{num_clients} (at most --clients), got {clients_per_round}"
        )


@dataclass(frozen=True)
class TaskRef:
    """Which task a run federates: its name and the SHA-256 of the file that defines it."""

    name: str = DEFAULT_TASK
    digest: str = ""


@dataclass(frozen=True)
class EvaluationPlan:
    """When clients evaluate the global model on their own held-out data (federated evaluation)."""

    every: int = 0  # after every Nth round and after the last; 0: never
    fraction: float = 1.0  # share of the ready clients asked each time
    personalize_epochs: int = 0  # fine-tune locally this many epochs, then evaluate again

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"--eval-every must be >= 0, got {self.every}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--eval-fraction must be in (0, 1], got {self.fraction}")
        if self.personalize_epochs < 0:
            raise ConfigError(f"--personalize-epochs must be >= 0, got {self.personalize_epochs}")

    def due(self, round_number: int, rounds: int) -> bool:
        """Whether clients evaluate the global model after `round_number`."""
        return self.every > 0 and (round_number % self.every == 0 or round_number == rounds)


@dataclass(frozen=True)
class SecAggSpec:
    """Secure aggregation's encoding (fedgrpc.common.secagg): each change coordinate clipped to
    +-bound, weighted by at most max_examples; `threshold` the share of a client's neighbours
    (itself included) whose shares rebuild its secrets, as the smallest count above it."""

    bound: float = 1.0
    max_examples: int = 100_000
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ConfigError(f"--secagg-bound must be a positive number, got {self.bound}")
        if not isinstance(self.max_examples, int) or self.max_examples < 1:
            raise ConfigError(f"--secagg-max-examples must be a positive integer, got {self.max_examples}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"--secagg-threshold must be in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class RunSpec:
    """What every client of a run must agree on; the server owns it and sends it at Join.

    Client ids are 1..num_clients. In stand-in federations cut from one dataset, client k
    trains shard k-1 under `partition` and `partition_seed` (fedgrpc.common.partition), a
    pure function of the spec.
    """

    rounds: int = 10
    num_clients: int = 3
    partition_seed: int = 42
    batch_size: int = 32
    local_epochs: int = 1
    compression: str = "none"  # how clients send updates: none, fp16 or int8 (fedgrpc.common.compression)
    task: TaskRef = field(default_factory=TaskRef)
    task_params: Mapping[str, ParamValue] = field(default_factory=dict)
    partition: str = "iid"
    evaluation: EvaluationPlan = field(default_factory=EvaluationPlan)
    proximal_mu: float = 0.0  # FedProx: clients add mu/2 ||w - w_global||^2 to their loss
    dp_clip: float = 0.0  # DP: clients clip their change to this L2 norm (0: they do not)
    secagg: SecAggSpec | None = None  # secure aggregation: the server sees only the round's sum
    dp_noise_multiplier: float = 0.0  # central DP's noise, told to sites for their privacy floor
    run_id: str = field(default_factory=new_run_id)

    def __post_init__(self) -> None:
        for name in ("rounds", "num_clients", "batch_size", "local_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.partition_seed < 0:
            raise ConfigError(f"partition_seed must be >= 0, got {self.partition_seed}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        check_scheme(self.partition)
        for name in ("proximal_mu", "dp_clip", "dp_noise_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        for key, value in self.task_params.items():
            if not isinstance(value, bool | int | float | str):
                raise ConfigError(
                    f"task parameter {key!r} is a {type(value).__name__}: use bool, int, float or str"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"task parameter {key!r} is {value}; numbers must be finite")
        if self.secagg is not None and self.compression != "none":
            raise ConfigError(
                "secure aggregation sends masked ring words, which cannot be compressed: "
                f"leave out --compression {self.compression}"
            )

    @property
    def update_encoding(self) -> str:
        """How updates travel: the compression, or "secagg" (masked words) under secure aggregation."""
        return "secagg" if self.secagg is not None else self.compression

    def check_client_id(self, client_id: int) -> None:
        """Refuse an id outside 1..num_clients, saying what the valid ids are."""
        if not 1 <= client_id <= self.num_clients:
            raise NotEnrolledError(
                f"client id {client_id} is not part of this run: ids are 1..{self.num_clients}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (for checkpoints and history)."""
        document = asdict(self)
        document["task_params"] = dict(self.task_params)
        return document

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> RunSpec:
        fields = dict(document)
        fields["task"] = TaskRef(**fields.get("task", {}))
        fields["evaluation"] = EvaluationPlan(**fields.get("evaluation", {}))
        fields["task_params"] = dict(fields.get("task_params", {}))
        if fields.get("secagg") is not None:
            fields["secagg"] = SecAggSpec(**fields["secagg"])
        return cls(**fields)
