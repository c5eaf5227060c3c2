"""What both sides need of a task's model, whatever its framework.

Keras helpers (the reference CNN, weight specs, resetting an optimizer) import Keras when
called, never at import: a framework-free task (fedgrpc.common.task) runs without it. For such
a task the helpers here seed the generators its build_model may draw from, say which devices
it has, and keep its weights in a plain .npz file.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .codec import TensorSpec, spec_of
from .errors import ConfigError

if TYPE_CHECKING:
    import keras

    from .task import Task


def small_cnn(input_shape: tuple[int, ...] = (32, 32, 3), num_classes: int = 10) -> keras.Model:
    """The reference CNN: Conv32-Pool-Conv64-Pool-Dense64-Dense10, 167,562 parameters on CIFAR-10."""
    import keras

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
    import keras

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


def is_keras_model(model: Any) -> bool:
    """Whether `model` is a keras.Model; False, without importing Keras, when nothing has."""
    keras_module = sys.modules.get("keras")
    return keras_module is not None and isinstance(model, keras_module.Model)


def configure_devices(task: Task, threads: int | None) -> str:
    """Set the devices up for the task's model; returns the log line's description. A Keras
    task gets its backend's setup (fedgrpc.common.device); a framework-free task picks its own
    devices, and only its CPU threads are capped (OMP_NUM_THREADS, set before it was imported)."""
    if task.uses_keras:
        from . import device

        return device.configure(threads)
    torch = sys.modules.get("torch")  # imported by the task file, if at all
    if torch is not None and threads:
        torch.set_num_threads(threads)
    cores = threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count()
    return f"the task's own (framework-free, no Keras); CPU threads: {cores}"


def seed_everything(task: Task, seed: int) -> None:
    """Seed what a task's build_model may draw its initial weights from: Keras' generators for
    a Keras task; else Python's, numpy's global one and, when the task imported it, torch's."""
    if task.uses_keras:
        import keras

        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def save_weights(path: Path, weights: Sequence[np.ndarray]) -> None:
    """The weights as an .npz of plain arrays named 0000, 0001, ... in order (no pickle)."""
    arrays: dict[str, Any] = {f"{i:04d}": np.asarray(w) for i, w in enumerate(weights)}
    np.savez(path, **arrays)


def load_weights(path: Path) -> list[np.ndarray]:
    """The weights save_weights wrote (or any .npz of arrays, taken in name order)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return [np.array(stored[name]) for name in sorted(stored.files)]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as an .npz of weights: {exc}") from None
