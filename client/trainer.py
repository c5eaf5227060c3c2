"""Local training and evaluation of a task: one client's model, its data, a round's work.

The model, its compiled steps and the site's data stay warm across rounds. Each round starts
from the global weights with the optimizer put back to its just-compiled state, as if a new
one had been built: no optimizer state carries over between rounds (the reference job's
rule, and the usual one for stateless clients). Under FedProx (the run's proximal_mu > 0) the
optimizer also pulls the weights toward the round's global weights (fedgrpc.client.proximal).
A framework-free task's model is the task's own: weights go in and out through its
get_weights/set_weights, and its train resets what it keeps and applies FedProx itself.

A round's client settings (RoundContext.settings) come with its TRAIN: local_epochs sets the
epochs, proximal_mu FedProx's mu (installing the proximal optimizer the first time a round
asks for it), learning_rate the default training's rate (fedgrpc.common.task.fit_model).
Under SCAFFOLD (its c among the TRAIN's extra tensors) a Keras task's optimizer gives way to
plain SGD at the round's learning_rate, its steps corrected by (c - c_i), c_i read from the
site's state store, and the result carries delta c_i (fedgrpc.client.scaffold).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import RunSpec
from ..common.errors import MetricsError, TaskError
from ..common.metrics import check_metrics
from ..common.task import LocalData, Params, RoundContext, evaluate_model, fit_model
from ..common.task_loader import LoadedTask, call, get_weights, set_weights, weight_specs
from . import scaffold
from .state import StateStore

log = logging.getLogger("fedgrpc.client")

PERSONALIZED_PREFIX = "personalized_"


@dataclass(frozen=True)
class TrainResult:
    weights: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # the strategy protocol's, sent along


@dataclass(frozen=True)
class Evaluation:
    num_examples: int  # 0: this client has no held-out data
    metrics: dict[str, float]


class LocalTrainer:
    """Runs a task's training and evaluation on this client's data, round after round."""

    def __init__(self, loaded: LoadedTask, run: RunSpec, params: Params, data: LocalData, model: Any) -> None:
        self.loaded = loaded
        self.run = run
        self.params = params
        self.data = data
        self.model = model
        self.specs: list[TensorSpec] = weight_specs(loaded, model)
        self._proximal: Any = None
        self._scaffold: Any = None
        self._fresh_optimizer: Any = None
        if loaded.task.uses_keras:  # a framework-free task's train does both itself
            from ..common.models import FreshOptimizer

            if run.proximal_mu > 0:
                from . import proximal

                self._proximal = proximal.install(model, run.proximal_mu)
            self._fresh_optimizer = FreshOptimizer(model)
        self._train = loaded.task.train or fit_model
        self._evaluate = loaded.task.evaluate or evaluate_model

    def use_data(self, data: LocalData) -> None:
        """Train and evaluate on another site's data from now on: one warm model serving many
        simulated clients (fedgrpc.client.simulation)."""
        self.data = data

    def train(
        self,
        round_number: int,
        weights: Sequence[np.ndarray],
        epochs: int | None = None,
        *,
        settings: Params | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
        state: StateStore | None = None,
    ) -> TrainResult:
        """One round's training from `weights`, with the round's client `settings`, the strategy
        protocol's `extras` (SCAFFOLD's c) and the site's `state` store."""
        started = time.monotonic()
        self._start_from(weights)
        settings = dict(settings or {})
        ctx = self._context(round_number, epochs or _epochs(settings, self.run.local_epochs), settings, state)
        control = self._scaffold_begin(extras or {}, state, settings)
        if self._proximal is not None:
            self._proximal.set_mu(ctx.proximal_mu)
        metrics = self._checked("train", call(self.loaded, "train", self._train, self.model, self.data, ctx))
        metrics["train_seconds"] = round(time.monotonic() - started, 3)
        num_examples = self.data.num_examples
        assert num_examples is not None  # LocalData counts or requires it
        trained = get_weights(self.loaded, self.model)
        sent = {} if control is None else self._scaffold_end(control, weights, trained)
        return TrainResult(trained, num_examples, metrics, sent)

    def _scaffold_begin(
        self, extras: Mapping[str, np.ndarray], state: StateStore | None, settings: Params
    ) -> list[np.ndarray] | None:
        """Under SCAFFOLD (its c among the extras): the round's step size and the correction
        (c - c_i) into the corrected SGD, installed on the first such round; returns c."""
        if not scaffold.is_scaffold(extras):
            return None
        if not self.loaded.task.uses_keras:
            raise TaskError(
                f"task {self.loaded.name!r} is framework-free, and SCAFFOLD corrects a Keras "
                "optimizer's steps: run it with another strategy, or as a Keras task"
            )
        if self._scaffold is None:
            self._scaffold = self._swap_optimizer(lambda: scaffold.install(self.model))
            if state is not None and scaffold.STATE_GROUP in state.groups():
                log.info("SCAFFOLD: this site's control variate c_i taken up from %s", state.folder)
        c = scaffold.server_control(self.specs, extras)
        ci = scaffold.client_control(state, self.specs)
        place = {id(v): i for i, v in enumerate(self.model.weights)}
        trainable = [place[id(v)] for v in self.model.trainable_variables]
        self._scaffold.set_corrections(scaffold.corrections(trainable, c, ci))
        self._scaffold.learning_rate = scaffold.local_rate(settings)
        return c

    def _scaffold_end(
        self, c: list[np.ndarray], start: Sequence[np.ndarray], trained: Sequence[np.ndarray]
    ) -> dict[str, np.ndarray]:
        """delta c_i, by name, for the update to carry (option II, fedgrpc.client.scaffold)."""
        optimizer = self.model.optimizer
        steps = int(np.asarray(optimizer.iterations))
        rate = float(np.asarray(optimizer.learning_rate))
        delta = scaffold.control_delta(c, start, trained, steps, rate)
        return {s.name: d for s, d in zip(scaffold.delta_specs(self.specs), delta, strict=True)}

    def _swap_optimizer(self, install: Callable[[], Any]) -> Any:
        """A wrapped optimizer put in mid-run: the fresh state and the training step rebuilt."""
        from ..common.models import FreshOptimizer

        optimizer = install()
        self._fresh_optimizer = FreshOptimizer(self.model)
        self.model.train_function = None  # traced with the old optimizer: trace it again
        return optimizer

    def evaluate(
        self, round_number: int, weights: Sequence[np.ndarray], personalize_epochs: int = 0
    ) -> Evaluation:
        """The global model's metrics on this client's held-out data; with personalize_epochs,
        also after that many epochs of local fine-tuning (which is never sent back)."""
        if self.data.test is None:
            return Evaluation(0, {})
        self._start_from(weights)
        ctx = self._context(round_number, self.run.local_epochs)
        metrics = self._checked(
            "evaluate", call(self.loaded, "evaluate", self._evaluate, self.model, self.data.test, ctx)
        )
        if personalize_epochs > 0:
            self.train(round_number, weights, epochs=personalize_epochs)
            tuned = self._checked(
                "evaluate", call(self.loaded, "evaluate", self._evaluate, self.model, self.data.test, ctx)
            )
            metrics.update({f"{PERSONALIZED_PREFIX}{name}": value for name, value in tuned.items()})
        return Evaluation(self.data.num_test_examples or 0, metrics)

    def _start_from(self, weights: Sequence[np.ndarray]) -> None:
        try:
            set_weights(self.loaded, self.model, list(weights))
        except ValueError as exc:
            raise TaskError(
                f"task {self.loaded.name!r}: the server's weights do not fit this client's model "
                f"({exc}); are both sides on the same task file?"
            ) from None
        if self._fresh_optimizer is not None:
            self._fresh_optimizer.reset()
        if self._proximal is not None:
            self._proximal.set_anchors()

    def _context(
        self, round_number: int, epochs: int, settings: Params | None = None, state: StateStore | None = None
    ) -> RoundContext:
        settings = settings or {}
        mu = settings.get("proximal_mu", self.run.proximal_mu)
        mu = float(mu) if isinstance(mu, int | float) and not isinstance(mu, bool) else self.run.proximal_mu
        keras_task = self.loaded.task.uses_keras  # a framework-free task applies ctx.proximal_mu itself
        if keras_task and mu > 0 and self._proximal is None:  # a round turns FedProx on mid-run
            from . import proximal

            self._proximal = self._swap_optimizer(lambda: proximal.install(self.model, mu))
            self._proximal.set_anchors()  # the round's start: the weights were just set
        return RoundContext(
            round=round_number,
            params=self.params,
            batch_size=self.run.batch_size,
            epochs=epochs,
            proximal_mu=mu if self._proximal is not None or not keras_task else 0.0,
            settings=settings,
            state=state,
        )

    def _checked(self, what: str, metrics: Mapping[str, float] | None) -> dict[str, float]:
        try:
            return check_metrics(dict(metrics or {}))
        except (MetricsError, TypeError, ValueError) as exc:
            raise TaskError(
                f"task {self.loaded.name!r}: {what} returned metrics that cannot be reported: {exc}"
            ) from None


def _epochs(settings: Params, default: int) -> int:
    """The round's local_epochs setting, else the run's."""
    epochs = settings.get("local_epochs")
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0 else default
