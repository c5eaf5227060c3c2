"""Local training and evaluation of a task: one client's model, its data, a round's work.

The model, its compiled steps and the site's data stay warm across rounds. Each round starts
from the global weights with the optimizer put back to its just-compiled state, as if a new
one had been built: no optimizer state carries over between rounds (the reference job's
rule, and the usual one for stateless clients). Under FedProx (the run's proximal_mu > 0) the
optimizer also pulls the weights toward the round's global weights (fedgrpc.client.proximal).
A framework-free task's model is the task's own: weights go in and out through its
get_weights/set_weights, and its train resets what it keeps and applies FedProx itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import RunSpec
from ..common.errors import MetricsError, TaskError
from ..common.metrics import check_metrics
from ..common.task import LocalData, Params, RoundContext, evaluate_model, fit_model
from ..common.task_loader import LoadedTask, call, get_weights, set_weights, weight_specs

PERSONALIZED_PREFIX = "personalized_"


@dataclass(frozen=True)
class TrainResult:
    weights: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float]


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
        self._proximal = None
        self._fresh_optimizer = None
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
        self, round_number: int, weights: Sequence[np.ndarray], epochs: int | None = None
    ) -> TrainResult:
        started = time.monotonic()
        self._start_from(weights)
        ctx = self._context(round_number, epochs or self.run.local_epochs)
        metrics = self._checked("train", call(self.loaded, "train", self._train, self.model, self.data, ctx))
        metrics["train_seconds"] = round(time.monotonic() - started, 3)
        num_examples = self.data.num_examples
        assert num_examples is not None  # LocalData counts or requires it
        return TrainResult(get_weights(self.loaded, self.model), num_examples, metrics)

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

    def _context(self, round_number: int, epochs: int) -> RoundContext:
        return RoundContext(
            round=round_number,
            params=self.params,
            batch_size=self.run.batch_size,
            epochs=epochs,
            proximal_mu=self.run.proximal_mu,
        )

    def _checked(self, what: str, metrics: Mapping[str, float] | None) -> dict[str, float]:
        try:
            return check_metrics(dict(metrics or {}))
        except (MetricsError, TypeError, ValueError) as exc:
            raise TaskError(
                f"task {self.loaded.name!r}: {what} returned metrics that cannot be reported: {exc}"
            ) from None
