"""SCAFFOLD on the client (Karimireddy et al. 2020): local steps corrected by (c - c_i).

The server sends its control variate c with each TRAIN, as the strategy protocol's extra
tensors "scaffold/c/<tensor>"; this client keeps its own c_i in its state store (group
"scaffold", fedgrpc.client.state), zero before its first round. Each local step's gradient
g becomes g + c - c_i, added in the optimizer as FedProx's term is (fedgrpc.client.proximal),
so `fit`, `train_on_batch` and a task's own loop all get it.

Under SCAFFOLD the local steps are plain SGD, y <- y - lr (g - c_i + c), whatever optimizer
the task compiled: option II's estimate below reads (x - y_i) / (K * lr) as the mean gradient
of the K steps, which holds for SGD only. With Adam (the reference task's) every step moves
each weight by about lr whatever its gradient, so that estimate is of order 1 everywhere, and
the correction, added to the gradient before Adam's normalization, swamps the real gradient:
the model trains toward the corrections and stays at chance. lr is the round's learning_rate
setting, which the server's SCAFFOLD sends (fedgrpc.server.scaffold, default LOCAL_LR) and the
run file's [rounds] table may change. After K local steps at lr, from the global weights x to
y_i (option II of the paper):

    c_i+ = c_i - c + (x - y_i) / (K * lr)

The update carries delta c_i = c_i+ - c_i as "scaffold/delta_c/<tensor>"; c_i+ replaces c_i in
the state store once the server has the update (fedgrpc.client.steps.KeepControlVariate), so a
round whose update was lost leaves c_i as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..common.codec import TensorSpec
from ..common.errors import TaskError

C_PREFIX = "scaffold/c/"  # the server's control variate, down with TRAIN
DELTA_PREFIX = "scaffold/delta_c/"  # the client's change of its own, up with the update
STATE_GROUP = "scaffold"
LOCAL_LR = 0.05  # the local SGD step size when a round names no learning_rate (the reference CNN's)


def is_scaffold(extras: Mapping[str, np.ndarray]) -> bool:
    return any(name.startswith(C_PREFIX) for name in extras)


def delta_specs(specs: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The delta c_i tensors an update lists after the model's: float32, the model's shapes."""
    return tuple(TensorSpec(DELTA_PREFIX + s.name, "float32", s.shape) for s in specs)


def server_control(specs: Sequence[TensorSpec], extras: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """c from a TRAIN's extras, one array per model tensor (TaskError if one is missing)."""
    try:
        return [np.asarray(extras[C_PREFIX + s.name], np.float32).reshape(s.shape) for s in specs]
    except (KeyError, ValueError) as exc:
        raise TaskError(f"SCAFFOLD: the server's control variate does not fit this model ({exc})") from None


def client_control(state: Any, specs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """c_i from the state store, zeros before this site's first SCAFFOLD round."""
    saved = state.load(STATE_GROUP) if state is not None else None
    if saved is None:
        return [np.zeros(s.shape, np.float32) for s in specs]
    try:
        return [np.asarray(saved[s.name], np.float32).reshape(s.shape) for s in specs]
    except (KeyError, ValueError) as exc:
        raise TaskError(
            f"SCAFFOLD: this site's saved control variate does not fit the model ({exc})"
        ) from None


def control_delta(
    c: Sequence[np.ndarray],
    x: Sequence[np.ndarray],
    y: Sequence[np.ndarray],
    steps: int,
    learning_rate: float,
) -> list[np.ndarray]:
    """delta c_i = c_i+ - c_i = (x - y_i) / (K * lr) - c (option II, c_i cancels out)."""
    if steps < 1 or not learning_rate > 0:
        raise TaskError(
            f"SCAFFOLD needs local steps and a positive learning rate ({steps} steps, lr {learning_rate})"
        )
    scale = 1.0 / (steps * learning_rate)
    return [
        ((np.asarray(xi, np.float64) - np.asarray(yi, np.float64)) * scale - ci).astype(np.float32)
        for ci, xi, yi in zip(c, x, y, strict=True)
    ]


class _Corrected:
    """Mixed into the model's optimizer class: its gradients plus the correction (c - c_i)."""

    def build(self, variables: Any) -> None:
        super().build(variables)  # type: ignore[misc]
        self._corrections = [
            self.add_variable_from_reference(variable, name="scaffold_correction")  # type: ignore[attr-defined]
            for variable in variables
        ]

    def apply(self, grads: Any, trainable_variables: Any = None) -> Any:
        from keras import ops

        known = self._trainable_variables  # type: ignore[attr-defined]
        variables = known if trainable_variables is None else list(trainable_variables)
        position = {id(v): i for i, v in enumerate(known)}
        corrected = []
        for grad, variable in zip(grads, variables, strict=True):
            index = position.get(id(variable))
            corrected.append(
                grad if grad is None or index is None else ops.add(grad, self._corrections[index])
            )
        return super().apply(corrected, trainable_variables)  # type: ignore[misc]

    def set_corrections(self, corrections: Sequence[np.ndarray]) -> None:
        for variable, value in zip(self._corrections, corrections, strict=True):
            variable.assign(value.astype(variable.dtype))


def install(model: Any, learning_rate: float = LOCAL_LR) -> Any:
    """Give the compiled model a corrected plain SGD optimizer (no momentum), built on its
    trainable weights, in place of the task's (see the module's docstring); returns it."""
    import keras

    original = getattr(model, "optimizer", None)
    if original is None:
        raise TaskError("SCAFFOLD needs a compiled model (its optimizer takes the correction)")
    if hasattr(original, "set_anchors"):
        raise TaskError("SCAFFOLD and FedProx's proximal term do not go together: leave proximal_mu at 0")
    corrected_class: Any = type("ScaffoldSGD", (_Corrected, keras.optimizers.SGD), {})
    optimizer = corrected_class(learning_rate=learning_rate)
    optimizer.build(model.trainable_variables)
    model.optimizer = optimizer
    return optimizer


def local_rate(settings: Mapping[str, Any]) -> float:
    """The round's local step size: its learning_rate setting, else LOCAL_LR."""
    rate = settings.get("learning_rate")
    if isinstance(rate, int | float) and not isinstance(rate, bool) and rate > 0:
        return float(rate)
    return LOCAL_LR


def corrections(
    trainable: Sequence[int], c: Sequence[np.ndarray], ci: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """(c - c_i) for each trainable variable (`trainable`: the index of each in the model's
    tensors, get_weights order; a non-trainable tensor gets no correction)."""
    return [(c[index] - ci[index]).astype(np.float32) for index in trainable]
