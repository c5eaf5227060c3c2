"""SCAFFOLD on the server (Karimireddy et al. 2020, "Stochastic Controlled Averaging").

Clients drift apart on heterogeneous data; SCAFFOLD corrects each local step by (c - c_i),
the server's control variate minus the client's (fedgrpc.client.scaffold). Each round:

    down   the weights x, c ("scaffold/c/<tensor>") and the local step size lr_l
    there  K plain SGD steps y <- y - lr_l (g - c_i + c); delta c_i = (x - y_i) / (K lr_l) - c
    up     y_i, and delta c_i ("scaffold/delta_c/<tensor>")
    here   x <- x + lr_g * mean_S(y_i - x)
           c <- c + (|S| / N) * mean_S(delta c_i)      (N: the run's clients)

Written on the public strategy API (fedgrpc.server.strategies): a MeanStrategy whose updates
weigh 1 (unweighted means, as in the paper), c going down as `train_tensors`, delta c_i coming
up as `update_tensors`, lr_l as the round's learning_rate setting (`round_settings`; LOCAL_LR
unless the run file's [rounds] table names one). `scaffold_update` is the paper's step on whole
arrays; the strategy folds the same sums update by update. c is the strategy's state, so it
goes into the checkpoint and a restarted server goes on with it.

The local steps are plain SGD whatever the task compiled: option II's delta c_i assumes SGD
steps, and with Adam it is of order 1 in every weight and drowns the real gradient (the reason
and the measurement: docs/strategies.md, *SCAFFOLD*). Refused with secure aggregation (the
masked sum carries the model's tensors only), with DP (delta c_i would travel unclipped and
unnoised; the API refuses both for any strategy with update tensors) and with --proximal-mu.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..common.config import RunSpec
from ..common.errors import ConfigError
from .strategies import MeanStrategy, RoundTotals, TensorSpec, Weights

C_PREFIX = "scaffold/c/"
DELTA_PREFIX = "scaffold/delta_c/"
LOCAL_LR = 0.05  # the clients' SGD step size by default: the reference CNN's (fedgrpc.client.scaffold)


def scaffold_update(
    x: Sequence[np.ndarray],
    c: Sequence[np.ndarray],
    ys: Sequence[Sequence[np.ndarray]],
    delta_cs: Sequence[Sequence[np.ndarray]],
    num_clients: int,
    server_lr: float = 1.0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The paper's server step, in float64: (new x, new c) from the round's y_i and delta c_i."""
    count = len(ys)
    new_x, new_c = [], []
    for t, xt in enumerate(x):
        mean_dy = sum(np.asarray(y[t], np.float64) - xt for y in ys) / count
        new_x.append(np.asarray(xt, np.float64) + server_lr * mean_dy)
    for t, ct in enumerate(c):
        mean_dc = sum(np.asarray(d[t], np.float64) for d in delta_cs) / count
        new_c.append(np.asarray(ct, np.float64) + (count / num_clients) * mean_dc)
    return new_x, new_c


class Scaffold(MeanStrategy):
    """SCAFFOLD (see the module's docstring)."""

    name = "scaffold"

    def __init__(self, server_lr: float = 1.0, local_lr: float = LOCAL_LR) -> None:
        if not server_lr > 0 or not local_lr > 0:
            raise ConfigError(f"SCAFFOLD's step sizes must be positive, got {server_lr} and {local_lr}")
        self.server_lr, self.local_lr = server_lr, local_lr
        self._names: tuple[str, ...] = ()
        self._c: list[np.ndarray] | None = None

    def configure(self, run: RunSpec) -> None:
        if run.proximal_mu > 0:
            raise ConfigError("--strategy scaffold corrects the local steps itself: leave --proximal-mu off")
        super().configure(run)

    def weight(self, num_examples: int) -> float:
        return 1.0  # the paper's means are over clients

    def round_settings(self, round: int) -> dict[str, Any]:
        return {"learning_rate": self.local_lr}

    def update_tensors(self, model: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
        """delta c_i, float32, the model's shapes; c starts at zero over them."""
        self._names = tuple(s.name for s in model)
        if self._c is None:
            self._c = [np.zeros(s.shape, np.float64) for s in model]
        return tuple(TensorSpec(DELTA_PREFIX + s.name, "float32", s.shape) for s in model)

    def train_tensors(self) -> dict[str, np.ndarray]:
        return {
            C_PREFIX + name: c.astype(np.float32)
            for name, c in zip(self._names, self._control(), strict=True)
        }

    def step(self, weights: Weights, mean_change: Weights, round: RoundTotals) -> Weights:
        """The fold's means weigh each update 1 over round.examples: rescaled to means over S."""
        count = len(round.counts)
        if count == 0:
            return weights
        step = self.server_lr * round.examples / count  # sum / examples -> lr_g * sum / |S|
        new_x = [
            (np.asarray(x, np.float64) + step * np.asarray(dy, np.float64)).astype(x.dtype)
            for x, dy in zip(weights, mean_change, strict=True)
        ]
        share = round.examples / self._num_clients()  # (|S| / N) * mean_S = sum / N
        deltas = [np.asarray(round.extras[DELTA_PREFIX + name], np.float64) for name in self._names]
        self._c = [c + share * d for c, d in zip(self._control(), deltas, strict=True)]
        return new_x

    def state(self) -> dict[str, np.ndarray]:
        return {f"c/{index}": c for index, c in enumerate(self._control())}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        if not state:
            return
        keys = sorted(state, key=lambda k: int(k.split("/", 1)[1]) if k.startswith("c/") else -1)
        if any(not k.startswith("c/") for k in keys):
            raise ConfigError(f"the checkpoint's strategy state is not SCAFFOLD's: {sorted(state)}")
        self._c = [np.asarray(state[k], np.float64) for k in keys]

    def _num_clients(self) -> int:
        if self.run is None or self.run.num_clients < 1:
            raise RuntimeError("configure was not called: SCAFFOLD does not know the run's client count")
        return self.run.num_clients

    def _control(self) -> list[np.ndarray]:
        if self._c is None:
            raise RuntimeError("use_model was not called: SCAFFOLD does not know the model's tensors")
        return self._c
