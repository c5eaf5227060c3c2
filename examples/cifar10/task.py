"""The reference job as a task file to copy and change: the small CNN on CIFAR-10.

fedgrpc's built-in `cifar10` task is the same job with a faster input pipeline; this one keeps
to plain arrays, the shortest way to write it. Every client loads the same dataset (--data,
or Keras' download) and keeps its shard under the run's partitioning: a stand-in for
organisations that would each load their own images here.

    fl-server --task examples/cifar10/task.py --insecure
    fl-client --task examples/cifar10/task.py --insecure --id 1     (and 2, 3)
"""

from __future__ import annotations

import keras
import numpy as np
from fedgrpc.common.data import load_split
from fedgrpc.common.task import LocalData, Params, Site, Task

CLASSES = 10


def as_inputs(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [0, 1] and one-hot labels, as the model trains on them."""
    return images.astype(np.float32) / 255.0, keras.utils.to_categorical(labels, CLASSES)


def build_model(params: Params) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(32, 32, 3)),
            keras.layers.Conv2D(32, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Conv2D(64, (3, 3), activation="relu"),
            keras.layers.MaxPooling2D((2, 2)),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(float(params["learning_rate"])),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def load_data(site: Site) -> LocalData:
    train = load_split(site.data, "train")
    images, labels = site.shard(train.x, train.y)
    return LocalData(train=as_inputs(images, labels))


def load_test_data(site: Site) -> tuple[np.ndarray, np.ndarray]:
    test = load_split(site.data, "test")
    return as_inputs(test.x, test.y)


task = Task(
    name="cifar10-example",
    build_model=build_model,
    load_data=load_data,
    load_test_data=load_test_data,
    params={"learning_rate": 1e-3},
)
