"""The exchange's steps: what happens to a trained update between the trainer and the server.

Each step wraps the exchange as middleware (the model is Flower's client mods): it may do
something before training (`prepare`), and it gets the update on its way out (`send`) with the
rest of the exchange as `call_next`, to pass it on changed, or to send it some other way.

    KeepControlVariate  SCAFFOLD: once the update went through, c_i+ into the site's state store
    ClipToRun        the run's DP (dp_clip): the change from the global weights clipped
    LocalPrivacy     local DP: clipped (the stricter clip) and noised here, epsilon accounted
    Compress         the update travels compressed (fp16, int8) relative to the global weights
    SecureAggregation  keys and shares before training; the update masked, with timings only
                     as metrics, then the reveal (it sends, so it is last: nothing after it)
    Transport        not a step: the exchange's end, the connection's submit; the update's
                     extra tensors (the strategy protocol's) listed after the model's

`exchange_steps` picks a run's steps, in that order; `chain` joins steps and Transport into one
`Send`. A step that fails with StaleRoundError or SecAggError has lost its round: the session
logs it and asks for the next instruction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import RunSpec
from ..common.errors import ConfigError, UpdateRejectedError
from ..common.privacy import PrivacyAccountant, clip_update, noise_generator, privatize_locally
from ..common.protocol import Assignment, timings
from . import scaffold
from .link import Link
from .secagg import SecureSteps
from .state import StateStore

log = logging.getLogger("fedgrpc.client")


@dataclass(frozen=True)
class Update:
    """A trained update on its way out: what every step takes and passes on."""

    round: int
    specs: Sequence[TensorSpec]
    weights: list[np.ndarray]
    num_examples: int
    metrics: Mapping[str, float]
    reference: Sequence[np.ndarray]  # the global weights the round's training started from
    compression: str = "none"
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)  # the strategy protocol's tensors


#: The rest of the exchange, from a step's point of view: send this update, get back (updates
#: the round has received, updates it expects).
Send = Callable[[Update], Coroutine[Any, Any, tuple[int, int]]]


class Step:
    """A step that does nothing: each kind below overrides what it needs."""

    async def prepare(self, assignment: Assignment) -> None:
        """Before training on `assignment` (a TRAIN one)."""

    async def send(self, update: Update, call_next: Send) -> tuple[int, int]:
        return await call_next(update)


@dataclass(frozen=True)
class LocalDP:
    """Local differential privacy: this client clips and noises its own update before it leaves
    (for a server it does not trust to add noise), and accounts for the epsilon it spends."""

    clip: float
    noise_multiplier: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.noise_multiplier > 0):
            raise ConfigError("--local-dp-clip and --local-dp-noise-multiplier must be positive")


class ClipToRun(Step):
    """The run's DP-FedAvg: the update's change from the global weights clipped to L2 `clip`."""

    def __init__(self, clip: float) -> None:
        self.clip = clip

    async def send(self, update: Update, call_next: Send) -> tuple[int, int]:
        clipped = clip_update(update.weights, update.reference, self.clip)
        return await call_next(replace(update, weights=clipped))


class LocalPrivacy(Step):
    """Local DP: clipped to `clip` (the stricter of this client's and the run's) and noised, with
    the epsilon spent logged after every update that went through."""

    def __init__(self, local: LocalDP, run_clip: float) -> None:
        self.clip = min(local.clip, run_clip) if run_clip > 0 else local.clip
        self.noise_multiplier = local.noise_multiplier
        self.accountant = PrivacyAccountant(local.noise_multiplier, local.delta)
        self.rounds = 0
        self._rng = noise_generator()

    async def send(self, update: Update, call_next: Send) -> tuple[int, int]:
        if update.extras:
            raise ConfigError(
                f"local DP protects the model's tensors, not the strategy's {sorted(update.extras)[0]!r}: "
                "leave local DP off under this strategy"
            )
        noised = privatize_locally(
            update.weights, update.reference, self.clip, self.noise_multiplier, self._rng
        )
        answer = await call_next(replace(update, weights=noised))
        self.rounds += 1
        log.info(
            "local DP: epsilon %.3f spent so far (delta %g)",
            self.accountant.epsilon(self.rounds),
            self.accountant.delta,
        )
        return answer


class Compress(Step):
    """The update travels compressed (`method`: fp16, int8) relative to the global weights."""

    def __init__(self, method: str) -> None:
        self.method = method

    async def send(self, update: Update, call_next: Send) -> tuple[int, int]:
        return await call_next(replace(update, compression=self.method))


class SecureAggregation(Step):
    """Secure aggregation (fedgrpc.client.secagg): keys and shares when a round is assigned,
    before training, so that they are ready when it ends; then the update masked and sent, and
    the reveal. The masked update carries the update's timings only: one client's loss or
    accuracy would say something about its data."""

    def __init__(self, link: Link, run: RunSpec, max_wait_s: float) -> None:
        self.link, self.run, self.max_wait_s = link, run, max_wait_s
        self._attempt: SecureSteps | None = None

    async def prepare(self, assignment: Assignment) -> None:
        self._attempt = SecureSteps(self.link, self.run, assignment.round, max_wait_s=self.max_wait_s)
        await self._attempt.share_keys()

    async def send(self, update: Update, call_next: Send) -> tuple[int, int]:
        attempt, self._attempt = self._attempt, None
        if attempt is None or attempt.round != update.round:
            raise RuntimeError(f"round {update.round}: secure aggregation's keys were not shared first")
        answer = await attempt.submit(
            update.round, update.specs, update.weights, update.num_examples, timings(update.metrics),
            reference=update.reference,
        )  # fmt: skip
        await attempt.reveal()
        return answer


class KeepControlVariate(Step):
    """SCAFFOLD's c_i+ = c_i + delta c_i into the site's state store once the server has the
    update (fedgrpc.client.scaffold): a round lost on the way leaves c_i as it was."""

    def __init__(self, state: StateStore) -> None:
        self.state = state

    async def send(self, update: Update, call_next: Send) -> tuple[int, int]:
        answer = await call_next(update)
        deltas = {
            name.removeprefix(scaffold.DELTA_PREFIX): delta
            for name, delta in update.extras.items()
            if name.startswith(scaffold.DELTA_PREFIX)
        }
        if deltas:
            specs = [s for s in update.specs if s.name in deltas]
            ci = scaffold.client_control(self.state, specs)
            self.state.save(
                scaffold.STATE_GROUP, {s.name: c + deltas[s.name] for s, c in zip(specs, ci, strict=True)}
            )
        return answer


class Transport:
    """The exchange's end: the update sent as it is. A retried submit whose first try got
    through (ALREADY_EXISTS) counts as sent: (0, `expected`)."""

    def __init__(self, link: Link, expected: int) -> None:
        self.link, self.expected = link, expected

    async def __call__(self, update: Update) -> tuple[int, int]:
        specs, weights, reference = _with_extras(update)
        try:
            return await self.link.submit(
                update.round, specs, weights, update.num_examples, update.metrics,
                reference=reference, method=update.compression,
            )  # fmt: skip
        except UpdateRejectedError as exc:
            if exc.code != "ALREADY_EXISTS":
                raise
            return 0, self.expected


def _with_extras(update: Update) -> tuple[list[TensorSpec], list[np.ndarray], list[np.ndarray]]:
    """The tensors an update lists: the model's, then the strategy protocol's extras (float32,
    relative to zero, so compression encodes them as it does the model's changes)."""
    specs, weights, reference = list(update.specs), list(update.weights), list(update.reference)
    for name, array in update.extras.items():
        extra = np.asarray(array, np.float32)
        specs.append(TensorSpec(name, "float32", tuple(extra.shape)))
        weights.append(extra)
        reference.append(np.zeros_like(extra))
    return specs, weights, reference


def exchange_steps(
    link: Link,
    run: RunSpec,
    *,
    local_dp: LocalDP | None = None,
    max_wait_s: float = 30.0,
    state: StateStore | None = None,
) -> list[Step]:
    """The steps a run's updates go through, outermost first (see the module's docstring);
    `state`: the site's state store, where SCAFFOLD's c_i is kept once an update went through."""
    steps: list[Step] = [] if state is None else [KeepControlVariate(state)]
    if local_dp is not None:
        steps.append(LocalPrivacy(local_dp, run.dp_clip))
    elif run.dp_clip > 0:
        steps.append(ClipToRun(run.dp_clip))
    if run.secagg is not None:
        steps.append(SecureAggregation(link, run, max_wait_s))
    elif run.compression != "none":
        steps.append(Compress(run.compression))
    return steps


def chain(steps: Sequence[Step], last: Send) -> Send:
    """`steps` around `last`: the first step gets the update first."""
    send = last
    for step in reversed(steps):
        send = _bound(step, send)
    return send


def _bound(step: Step, call_next: Send) -> Send:
    async def send(update: Update) -> tuple[int, int]:
        return await step.send(update, call_next)

    return send
