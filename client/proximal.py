"""FedProx on the client: mu/2 * ||w - w_global||^2 added to the training loss (Li et al. 2020).

The term is added where every training path meets, in the optimizer: its gradient,
mu * (w - w_global), is added to each trainable weight's gradient before the model's own
optimizer (Adam, SGD, ...) uses it, which is exactly what adding the term to the loss does.
So Keras' `fit`, `train_on_batch` and a task's own loop that calls `optimizer.apply` all get
it, on every Keras backend. w_global lives in the optimizer's own variables ("anchors"),
set at the start of each round, so compiled training steps keep working without a retrace.
"""

from __future__ import annotations

from typing import Any

from ..common.errors import TaskError


class _Proximal:
    """Mixed into the model's optimizer class: its gradients plus mu * (w - anchor)."""

    proximal_mu: float = 0.0  # the run's; a round's setting changes `_mu` (a variable: no retrace)

    def build(self, variables: Any) -> None:
        super().build(variables)  # type: ignore[misc]
        self._mu = self.add_variable(shape=(), initializer="zeros", name="proximal_mu")  # type: ignore[attr-defined]
        self._mu.assign(self.proximal_mu)
        self._anchors = [
            self.add_variable_from_reference(variable, name="proximal_anchor")  # type: ignore[attr-defined]
            for variable in variables
        ]

    def apply(self, grads: Any, trainable_variables: Any = None) -> Any:
        from keras import ops

        known = self._trainable_variables  # type: ignore[attr-defined]
        variables = known if trainable_variables is None else list(trainable_variables)
        position = {id(v): i for i, v in enumerate(known)}
        pulled = []
        for grad, variable in zip(grads, variables, strict=True):
            index = position.get(id(variable))
            if grad is None or index is None:
                pulled.append(grad)
                continue
            anchor = self._anchors[index]
            mu = ops.cast(self._mu, variable.dtype)
            pulled.append(ops.add(grad, ops.multiply(mu, ops.subtract(variable, anchor))))
        return super().apply(pulled, trainable_variables)  # type: ignore[misc]

    def set_mu(self, mu: float) -> None:
        """This round's mu (a round setting), until the optimizer is put back to its built state."""
        self._mu.assign(float(mu))

    def set_anchors(self) -> None:
        """The round's global weights: what the trainable weights now hold."""
        for anchor, variable in zip(self._anchors, self._trainable_variables, strict=True):  # type: ignore[attr-defined]
            anchor.assign(variable.value)


def install(model: Any, mu: float) -> Any:
    """Give the compiled model a proximal copy of its optimizer (same class and settings), built
    on its trainable weights; returns it. Call `set_anchors()` on it at each round's start."""
    original = getattr(model, "optimizer", None)
    if original is None:
        raise TaskError("FedProx needs a compiled model: the run sets --proximal-mu")
    proximal_class: Any = type(f"Proximal{type(original).__name__}", (_Proximal, type(original)), {})
    optimizer = proximal_class.from_config(original.get_config())
    optimizer.proximal_mu = float(mu)
    optimizer.build(model.trainable_variables)  # its mu variable starts at proximal_mu
    model.optimizer = optimizer
    return optimizer
