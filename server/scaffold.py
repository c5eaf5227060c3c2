"""SCAFFOLD on the server (Karimireddy et al. 2020, "Stochastic Controlled Averaging").

Clients drift apart on heterogeneous data; SCAFFOLD corrects each local step by (c - c_i),
the server's control variate minus the client's (fedgrpc.client.scaffold). Each round:

    down   the weights x, and c as extra tensors "scaffold/c/<tensor>"
    up     y_i, and delta c_i = c_i+ - c_i as extra tensors "scaffold/delta_c/<tensor>"
    here   x <- x + lr_g * mean_S(y_i - x)
           c <- c + (|S| / N) * mean_S(delta c_i)      (N: the run's clients)

`scaffold_update` is that definition on whole arrays; the Scaffold strategy folds the same
sums update by update. Unweighted means, as in the paper. c is the strategy's state, so it
goes into the checkpoint and a restarted server goes on with it.

Refused with secure aggregation (the server would need each delta c_i's sum unmasked too,
and the masked sum carries the model's tensors only) and with DP (the clip and the noise
would leave delta c_i, which says as much about a client's data as its update, in the clear).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import SecAggSpec
from ..common.errors import ConfigError
from .aggregate import Weights
from .strategy import CentralDP

C_PREFIX = "scaffold/c/"
DELTA_PREFIX = "scaffold/delta_c/"


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


class Scaffold:
    """SCAFFOLD (see the module's docstring), a superset of the Strategy protocol: it also names
    the extra tensors an update lists (`use_model`) and those a TRAIN carries (`round_tensors`)."""

    name = "scaffold"

    def __init__(self, num_clients: int, server_lr: float = 1.0) -> None:
        if num_clients < 1:
            raise ConfigError(f"SCAFFOLD needs the run's client count, got {num_clients}")
        if not server_lr > 0:
            raise ConfigError(f"SCAFFOLD's global step size must be positive, got {server_lr}")
        self.num_clients = num_clients
        self.server_lr = server_lr
        self._specs: tuple[TensorSpec, ...] = ()
        self._c: list[np.ndarray] | None = None
        self._x: list[np.ndarray] = []
        self._sum_dy: list[np.ndarray] = []
        self._sum_dc: list[np.ndarray] = []
        self._count = 0
        self._max_updates = 1

    # -- the strategy protocol's extra tensors ---------------------------------------------------

    def use_model(self, specs: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
        """The model's tensors (c starts at zero over them); returns the extra tensors an update
        lists after the model's: delta c_i, float32, the model's shapes."""
        self._specs = tuple(specs)
        if self._c is None:
            self._c = [np.zeros(s.shape, np.float64) for s in self._specs]
        return tuple(TensorSpec(DELTA_PREFIX + s.name, "float32", s.shape) for s in self._specs)

    def round_tensors(self) -> list[tuple[TensorSpec, np.ndarray]]:
        """What a TRAIN carries beside the weights: c, float32."""
        c = self._control()
        return [
            (TensorSpec(C_PREFIX + s.name, "float32", s.shape), ct.astype(np.float32))
            for s, ct in zip(self._specs, c, strict=True)
        ]

    # -- the Strategy protocol -------------------------------------------------------------------

    def begin_round(self, global_weights: Sequence[np.ndarray], max_updates: int) -> None:
        self._x = [np.asarray(w) for w in global_weights]
        self._sum_dy = [np.zeros(np.shape(w), np.float64) for w in self._x]
        self._sum_dc = [np.zeros(np.shape(c), np.float64) for c in self._control()]
        self._count = 0
        self._max_updates = max(1, max_updates)

    def bound(self, reference: np.ndarray) -> float:
        """A round's sum of changes stays finite in float64."""
        return float(np.finfo(np.float64).max) / (2 * self._max_updates)

    def prepare(
        self, tensor: np.ndarray, reference: np.ndarray, num_examples: int, *, in_place: bool
    ) -> np.ndarray:
        """y_i - x for the model's tensors; delta c_i as sent for the extras (their reference is 0)."""
        change: np.ndarray = np.subtract(tensor, reference, dtype=np.float64)
        return change

    def add(self, update: Sequence[np.ndarray], num_examples: int) -> None:
        """One client's prepared update: the model's changes, then its delta c_i."""
        models = len(self._x)
        if len(update) != models + len(self._sum_dc):
            raise RuntimeError(
                f"a SCAFFOLD update has {len(update)} tensors, not {models + len(self._sum_dc)}"
            )
        for total, change in zip(self._sum_dy + self._sum_dc, update, strict=True):
            total += np.asarray(change, np.float64)
        self._count += 1

    def result(self) -> Weights:
        if self._count == 0:
            return [w.copy() for w in self._x]
        step = self.server_lr / self._count
        weights = [
            (np.asarray(x, np.float64) + step * dy).astype(np.asarray(x).dtype)
            for x, dy in zip(self._x, self._sum_dy, strict=True)
        ]
        share = 1.0 / self.num_clients  # (|S| / N) * (sum / |S|)
        self._c = [c + share * dc for c, dc in zip(self._control(), self._sum_dc, strict=True)]
        self._sum_dy, self._sum_dc = [], []
        return weights

    def state(self) -> dict[str, np.ndarray]:
        return {f"c/{index}": c for index, c in enumerate(self._control())}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        if not state:
            return
        keys = sorted(state, key=lambda k: int(k.split("/", 1)[1]) if k.startswith("c/") else -1)
        if any(not k.startswith("c/") for k in keys):
            raise ConfigError(f"the checkpoint's strategy state is not SCAFFOLD's: {sorted(state)}")
        self._c = [np.asarray(state[k], np.float64) for k in keys]

    def _control(self) -> list[np.ndarray]:
        if self._c is None:
            raise RuntimeError("use_model was not called: SCAFFOLD does not know the model's tensors")
        return self._c


def scaffold_strategy(
    num_clients: int,
    privacy: CentralDP | None,
    secagg: SecAggSpec | None,
    proximal_mu: float = 0.0,
) -> Scaffold:
    """`--strategy scaffold`, refusing what it does not work with (see the module's docstring)."""
    if secagg is not None:
        raise ConfigError(
            "--strategy scaffold cannot run under secure aggregation: the server needs each client's "
            "control variate change, which the masked sum does not carry; leave --secagg off"
        )
    if privacy is not None:
        raise ConfigError(
            "--strategy scaffold cannot take differential privacy: each client's control variate "
            "change would travel unclipped and unnoised; leave --dp-clip off"
        )
    if proximal_mu > 0:
        raise ConfigError("--strategy scaffold corrects the local steps itself: leave --proximal-mu off")
    return Scaffold(num_clients)
