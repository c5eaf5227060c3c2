"""What one server run is set to: ServerConfig and the pieces it holds (RoundPolicy, PrivacySettings).

Each field's default is its flag's (fedgrpc.server.flags), and each range its flag's: a value
is held to one rule whether it came from the command line, a run file or code that builds a
ServerConfig directly (tests, fl-sim). What joins several fields is checked here once too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.config import DEFAULT_TASK, RunSpec, SecAggSpec, check_clients_per_round
from ..common.errors import ConfigError
from ..common.settings import by_name
from .auth import ServerTls, TokenTable
from .flags import SETTINGS
from .http import HttpConfig
from .limits import Limits
from .round_settings import RoundSchedule
from .staleness import StalenessWeight
from .strategy import ROBUST, StrategySettings

_FLAGS = by_name(SETTINGS)


def _default(name: str) -> Any:
    """The declared default of fl-server's setting `name`."""
    return _FLAGS[name].default


def _check(value: Any, name: str) -> None:
    """`value` held to the range of fl-server's setting `name`, refused naming its flag."""
    setting = _FLAGS[name]
    setting.check_range(value, setting.option)


@dataclass(frozen=True)
class RoundPolicy:
    """When a round may close without every client.

    A round closes as soon as all enrolled clients have reported. After `timeout_s` it closes
    with what it has, if that is at least `min_clients`; with fewer it keeps waiting, unless
    withdrawals left fewer than `min_clients` clients: then the run stops (RunFailedError). The first
    round opens when every client is ready, or after `join_timeout_s` with `min_clients`
    (clients start slowly: a TensorFlow import and a shard to load). Federated evaluations
    close when every asked client has reported, or after `timeout_s` with what came.
    """

    min_clients: int | None = _default("min_clients")  # None: all enrolled clients
    timeout_s: float | None = _default("round_timeout")  # None: wait for everyone, however long
    join_timeout_s: float = _default("join_timeout")  # how long the first round waits for every client

    def __post_init__(self) -> None:
        _check(self.min_clients, "min_clients")
        _check(self.timeout_s, "round_timeout")
        _check(self.join_timeout_s, "join_timeout")

    def minimum(self, run: RunSpec) -> int:
        wanted = run.num_clients if self.min_clients is None else self.min_clients
        if not 1 <= wanted <= run.num_clients:
            raise ConfigError(f"--min-clients must be in 1..{run.num_clients}, got {wanted}")
        return wanted


@dataclass(frozen=True)
class PrivacySettings:
    """Central DP-FedAvg (fedgrpc.common.privacy): clip, noise, and the budget to stop at."""

    clip: float
    noise_multiplier: float
    clip_on: str = _default("dp_clip_on")  # client: clients clip (works under secure aggregation)
    delta: float = _default("dp_delta")
    target_epsilon: float | None = _default("dp_target_epsilon")  # stop before a round would spend more

    def __post_init__(self) -> None:
        _check(self.clip, "dp_clip")
        _check(self.noise_multiplier, "dp_noise_multiplier")
        _check(self.clip_on, "dp_clip_on")
        _check(self.delta, "dp_delta")
        _check(self.target_epsilon, "dp_target_epsilon")


@dataclass(frozen=True)
class FedBuffSettings:
    """--mode fedbuff (fedgrpc.server.buffered): at most `concurrency` clients train at once
    (None: every enrolled one), every `buffer_size` updates make a new version (None: half the
    concurrency, rounded up), an update is weighted by its staleness and refused past
    `max_staleness`."""

    concurrency: int | None = _default("concurrency")
    buffer_size: int | None = _default("buffer_size")
    weight: StalenessWeight = field(default_factory=StalenessWeight)
    max_staleness: int = _default("max_staleness")

    def __post_init__(self) -> None:
        _check(self.concurrency, "concurrency")
        _check(self.buffer_size, "buffer_size")
        _check(self.max_staleness, "max_staleness")

    def slots(self, num_clients: int) -> int:
        """Clients training at once (ConfigError: more than the run has)."""
        if self.concurrency is not None and self.concurrency > num_clients:
            raise ConfigError(
                f"--concurrency must be in 1..{num_clients} (at most --clients), got {self.concurrency}"
            )
        return num_clients if self.concurrency is None else self.concurrency

    def buffer(self, num_clients: int) -> int:
        """Updates per aggregation; at most the concurrency, since a client puts at most one
        update in each buffer (a larger buffer could never fill)."""
        slots = self.slots(num_clients)
        size = (slots + 1) // 2 if self.buffer_size is None else self.buffer_size
        if size > slots:
            raise ConfigError(
                f"--buffer-size {size} is more than the {slots} clients training at once (--concurrency): "
                "a buffer takes at most one update per client and would never fill"
            )
        return size


@dataclass(frozen=True)
class ServerConfig:
    """One server run, checked at start: a bad value or combination fails here with a sentence."""

    run: RunSpec = field(default_factory=RunSpec)
    task: str = DEFAULT_TASK  # a task file, module:attribute or installed name (--task)
    task_params: Mapping[str, Any] = field(default_factory=dict)  # overrides of the task's defaults
    init_model: Path | None = None  # start from these weights: a saved Keras model, or an .npz
    federated_eval: bool | None = None  # None: federated evaluation when there is no central test set
    host: str = _default("host")
    port: int = _default("port")
    data: str | None = None
    out_dir: Path = _default("out")
    strategy: StrategySettings = field(default_factory=StrategySettings)
    privacy: PrivacySettings | None = None
    secagg: SecAggSpec | None = None  # secure aggregation (fedgrpc.server.secagg)
    secagg_timeout_s: float = _default("secagg_timeout")  # each key stage's and the unmasking's wait
    client_sampling: str = _default("client_sampling")  # with clients_per_round: fixed-size, or poisson
    tls: ServerTls | None = None
    tokens: TokenTable | Mapping[int, str] | None = None
    revoked: Path | None = None  # revoked client ids (fedgrpc.server.revocation), re-read when changed
    init_seed: int = _default("init_seed")
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    max_examples: int = _default("max_examples")
    limits: Limits = field(default_factory=Limits)
    finish_grace_s: float = _default("finish_grace")
    record_updates: bool = False
    threads: int | None = None
    clients_per_round: int | None = None  # None: every enrolled client trains every round
    sample_seed: int = _default("sample_seed")
    chunk_bytes: int = _default("chunk_kb") << 10
    max_inflight_bytes: int = _default("max_inflight_mb") << 20
    spool_dir: Path | None = None  # stage updates being received on disk (see fedgrpc.server.spool)
    http: HttpConfig | None = None  # the dashboard and /metrics (fedgrpc.server.http)
    tensorboard: Path | None = None  # write TensorBoard scalars there
    health_port: int | None = None  # plain-text health checks on this port too (probes)
    fedbuff: FedBuffSettings | None = None  # --mode fedbuff: buffered asynchronous aggregation
    round_schedule: RoundSchedule = field(default_factory=RoundSchedule)  # the run file's [rounds]

    def __post_init__(self) -> None:
        check_clients_per_round(self.clients_per_round, self.run.num_clients)
        _check(self.client_sampling, "client_sampling")
        _check(self.port, "port")
        _check(self.health_port, "health_port")
        _check(self.secagg_timeout_s, "secagg_timeout")
        _check(self.max_examples, "max_examples")
        if self.fedbuff is not None:
            self._check_fedbuff(self.fedbuff)

    def _check_fedbuff(self, fedbuff: FedBuffSettings) -> None:
        """What --mode fedbuff cannot be combined with, refused at start with the reason."""
        if self.secagg is not None:
            raise ConfigError(
                "--mode fedbuff cannot run under --secagg: secure aggregation unmasks the sum of one "
                "round's fixed set of clients, and a buffer's updates come from different versions and "
                "clients; use --mode sync with --secagg, or fedbuff without it"
            )
        if self.strategy.name in ROBUST:
            raise ConfigError(
                f"--mode fedbuff weights each update's change by its staleness and needs a mean of "
                f"changes: --strategy {self.strategy.name} cannot take it; use fedavg, fedprox or a "
                "server optimizer (fedavgm, fedadagrad, fedadam, fedyogi)"
            )
        if self.clients_per_round is not None and self.client_sampling == "poisson":
            raise ConfigError(
                "--mode fedbuff samples a fixed number of clients per version (--client-sampling "
                "fixed); a Poisson sample may hold nobody and leave a buffer that never fills"
            )
        fedbuff.buffer(self.run.num_clients)  # concurrency and buffer size in range
