"""Keras helpers both sides use: the reference CNN, weight specs, resetting an optimizer."""

from __future__ import annotations

import keras
import numpy as np

from .codec import TensorSpec, spec_of


def small_cnn(input_shape: tuple[int, ...] = (32, 32, 3), num_classes: int = 10) -> keras.Model:
    """The reference CNN: Conv32-Pool-Conv64-Pool-Dense64-Dense10, 167,562 parameters on CIFAR-10."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Conv2D(64, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="cnn",
    )


def reference_cnn(
    input_shape: tuple[int, ...] = (32, 32, 3),
    num_classes: int = 10,
    *,
    learning_rate: float = 1e-3,
    jit_compile: bool | None = None,
) -> keras.Model:
    """The CNN compiled as the reference job trains it: Adam, categorical cross-entropy, accuracy.

    jit_compile (None: by backend). TensorFlow: off. Keras' "auto" turns XLA on for this model,
    and on these CPUs the XLA-compiled training step measured 2.5x slower than the plain one.
    JAX: on. There, off means no compilation at all: an epoch of a 16,666-image shard took
    about 64 s on an H200 against 0.9 s compiled.
    """
    if jit_compile is None:
        jit_compile = keras.backend.backend() == "jax"
    model = small_cnn(input_shape, num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def weight_specs(model: keras.Model) -> list[TensorSpec]:
    """Name, dtype and shape of every weight, in get_weights() order: what updates must match."""
    return [spec_of(w.path, np.asarray(w.numpy())) for w in model.weights]


class FreshOptimizer:
    """Puts a compiled model's optimizer back to its just-built state before each round.

    The reference job builds a new Adam every round (no state carries over). Building a new
    one and recompiling would retrace the training step each round; zeroing the optimizer's
    own variables (step count, moments) gives the same numbers without the retrace.
    """

    def __init__(self, model: keras.Model) -> None:
        self._optimizer = model.optimizer
        self._optimizer.build(model.trainable_variables)
        self._initial = [np.array(v.numpy()) for v in self._optimizer.variables]

    def reset(self) -> None:
        for variable, value in zip(self._optimizer.variables, self._initial, strict=True):
            variable.assign(value)
