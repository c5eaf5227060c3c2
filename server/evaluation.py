"""Evaluating the global model: centrally on a test set the server holds, or federated, by the
clients on their own held-out data, and the round line that reports both.

Federated evaluation is the example-weighted mean of the clients' reports, metric by metric
(a client that has no held-out data reports 0 examples and weighs nothing); `weighted_metrics`
is that definition, a pure function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..common.task import Dataset, Params, RoundContext, evaluate_model
from ..common.task_loader import LoadedTask, call, set_weights
from .evaluation_round import EvaluationReport

PERSONALIZED_PREFIX = "personalized_"
_SHORT = {"accuracy": "acc", "loss": "loss"}


def weighted_metrics(reports: Sequence[EvaluationReport]) -> dict[str, float]:
    """Each metric's mean over the reports that carry it, weighted by their example counts."""
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}
    for report in reports:
        if report.num_examples <= 0:
            continue
        for name, value in report.metrics.items():
            totals[name] = totals.get(name, 0.0) + value * report.num_examples
            weights[name] = weights.get(name, 0) + report.num_examples
    return {name: totals[name] / weights[name] for name in sorted(totals)}


@dataclass(frozen=True)
class FederatedEvaluation:
    clients: int  # clients that had held-out data
    num_examples: int
    metrics: dict[str, float]

    @classmethod
    def of(cls, reports: Sequence[EvaluationReport]) -> FederatedEvaluation:
        counted = [r for r in reports if r.num_examples > 0]
        return cls(len(counted), sum(r.num_examples for r in counted), weighted_metrics(counted))


class CentralEvaluator:
    """The task's evaluation of the global model on the server's own test set."""

    def __init__(
        self, loaded: LoadedTask, model: Any, test: Dataset, params: Params, batch_size: int
    ) -> None:
        self._loaded = loaded
        self._model = model
        self._test = test
        self._params = params
        self._batch_size = batch_size
        self._evaluate = loaded.task.evaluate or evaluate_model

    def __call__(self, round_number: int, weights: Sequence[np.ndarray]) -> dict[str, float]:
        set_weights(self._loaded, self._model, list(weights))
        ctx = RoundContext(round=round_number, params=self._params, batch_size=self._batch_size, epochs=1)
        metrics = call(self._loaded, "evaluate", self._evaluate, self._model, self._test, ctx)
        return {name: float(value) for name, value in dict(metrics).items()}


def main_metric(declared: str | None, *metric_sets: Mapping[str, float] | None) -> str:
    """The metric a round line leads with: the task's choice, else accuracy, else loss."""
    if declared:
        return declared
    names = {name for metrics in metric_sets if metrics for name in metrics}
    return "accuracy" if "accuracy" in names else "loss"


def describe(
    main: str,
    central: Mapping[str, float] | None,
    federated: Mapping[str, float] | None,
    *,
    reported: int | None = None,
) -> str:
    """'acc 0.6106  loss 1.1160  fed acc 0.6012  fed loss 1.2  pers acc 0.7010': the round line's
    part. `reported`: how many clients answered a federated evaluation this round (None: none
    was asked for), so that one whose clients hold no held-out data says so."""
    parts = []
    for prefix, metrics in (("", central), ("fed ", federated)):
        if not metrics:
            continue
        for name in dict.fromkeys((main, "loss")):
            if name in metrics:
                parts.append(f"{prefix}{_SHORT.get(name, name)} {metrics[name]:.4f}")
        personalized = PERSONALIZED_PREFIX + main
        if personalized in metrics:
            parts.append(f"pers {_SHORT.get(main, main)} {metrics[personalized]:.4f}")
    if reported is not None and not federated:
        parts.append(
            f"fed: none of {reported} clients had held-out data" if reported else "fed: no client reported"
        )
    return "  ".join(parts) or "no evaluation"
