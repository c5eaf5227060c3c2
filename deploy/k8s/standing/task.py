"""Logistic regression in plain numpy: a framework-free task, with no Keras and no TensorFlow.

The model is two arrays, a weight vector and a bias; `train` is a few epochs of mini-batch
gradient descent written out, `evaluate` the log-loss and accuracy. The data is synthetic
(two Gaussian classes, the same seeded draw on every side), cut into the sites' shards by the
run's partitioning, so it runs anywhere numpy does::

    fl-local --task examples/numpy/task.py --clients 3 --rounds 5 --out results

fedgrpc needs nothing of the model but `get_weights` and `set_weights`: the weights as numpy
arrays, out and in, always in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fedgrpc.common.task import Dataset, LocalData, Params, RoundContext, Site, Task

FEATURES = 8
EXAMPLES = 1200  # the stand-in dataset the sites' shards are cut from
HELD_OUT = 300  # the server's central test set


@dataclass
class LogisticRegression:
    """p(y=1 | x) = sigmoid(x . w + b)."""

    w: np.ndarray  # (FEATURES,) float32
    b: np.ndarray  # (1,) float32

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(x @ self.w + self.b[0])))


def make_dataset(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Two classes whose means differ along every feature: separable to about 90%."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, EXAMPLES + HELD_OUT)
    x = rng.normal(0.0, 1.0, (len(y), FEATURES)) + np.where(y[:, None] == 1, 0.6, -0.6)
    return x.astype(np.float32), y.astype(np.float32)


def build_model(params: Params) -> LogisticRegression:
    # numpy's global generator: the server seeds it with --init-seed before building the model
    w = np.random.normal(0.0, 0.01, FEATURES).astype(np.float32)
    return LogisticRegression(w, np.zeros(1, np.float32))


def get_weights(model: LogisticRegression) -> list[np.ndarray]:
    return [model.w.copy(), model.b.copy()]


def set_weights(model: LogisticRegression, weights: list[np.ndarray]) -> None:
    w, b = weights
    if w.shape != model.w.shape or b.shape != model.b.shape:
        raise ValueError(f"weights of shapes {w.shape}, {b.shape} do not fit ({FEATURES},), (1,)")
    model.w, model.b = np.array(w, np.float32), np.array(b, np.float32)


def load_data(site: Site) -> LocalData:
    x, y = make_dataset()
    x_site, y_site = site.shard(x[:EXAMPLES], y[:EXAMPLES])
    cut = len(y_site) * 4 // 5  # a fifth held out, for federated evaluation
    return LocalData(train=(x_site[:cut], y_site[:cut]), test=(x_site[cut:], y_site[cut:]))


def load_test_data(site: Site) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_dataset()
    return x[EXAMPLES:], y[EXAMPLES:]


def train(model: LogisticRegression, data: LocalData, ctx: RoundContext) -> dict[str, float]:
    """ctx.epochs epochs of mini-batch gradient descent on the log-loss, shuffled; under FedProx
    (ctx.proximal_mu > 0) each step is also pulled toward the round's global weights."""
    x, y = data.train
    lr = float(ctx.params["learning_rate"])
    anchor_w, anchor_b = model.w.copy(), model.b.copy()
    rng = np.random.default_rng(ctx.round)
    for _ in range(ctx.epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), ctx.batch_size):
            batch = order[start : start + ctx.batch_size]
            error = model.probabilities(x[batch]) - y[batch]
            grad_w = x[batch].T @ error / len(batch) + ctx.proximal_mu * (model.w - anchor_w)
            grad_b = np.array([error.mean()]) + ctx.proximal_mu * (model.b - anchor_b)
            model.w = (model.w - lr * grad_w).astype(np.float32)
            model.b = (model.b - lr * grad_b).astype(np.float32)
    return evaluate(model, data.train, ctx)


def evaluate(model: LogisticRegression, data: Dataset, ctx: RoundContext) -> dict[str, float]:
    x, y = data
    p = np.clip(model.probabilities(x), 1e-7, 1 - 1e-7)
    loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    return {"loss": float(loss), "accuracy": float(np.mean((p > 0.5) == (y > 0.5)))}


task = Task(
    "numpy-logistic-regression",
    build_model,
    load_data,
    load_test_data=load_test_data,
    train=train,
    evaluate=evaluate,
    get_weights=get_weights,
    set_weights=set_weights,
    params={"learning_rate": 0.5},
)
