"""The reference job as a task (`--task cifar10`, the default): the small CNN on CIFAR-10.

Written with the public task API alone, like any user's task. The clients stand in for N
organisations: each loads the same dataset (`--data`, or Keras' download) and keeps its own
shard under the run's partitioning (`Site.shard`), plus the test examples that match its
shard's classes for federated evaluation. The server evaluates the global model on the whole
test set.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from .data import Examples, load_labels, load_split, model_inputs
from .models import reference_cnn
from .partition import matching_indices
from .task import LocalData, Params, Site, Task

NUM_CLASSES = 10
PREFETCH_BATCHES = 2


def build_model(params: Params) -> Any:
    return reference_cnn(learning_rate=float(params["learning_rate"]))


def load_data(site: Site) -> LocalData:
    train = load_split(site.data, "train")
    x, y = site.shard(train.x, train.y)
    test = load_split(site.data, "test")
    keep = matching_indices(
        train.y, test.y, site.num_clients, site.client_id - 1, site.partition_seed, site.partition
    )
    shard = Examples(x, y)
    return LocalData(
        train=batches(shard, NUM_CLASSES, site.batch_size),
        num_examples=len(shard),
        test=model_inputs(test.subset(keep), NUM_CLASSES),
    )


def load_test_data(site: Site) -> tuple[np.ndarray, np.ndarray]:
    return model_inputs(load_split(site.data, "test"), NUM_CLASSES)


def partition_labels(site: Site) -> np.ndarray:
    return load_labels(site.data, "train")


def batches(examples: Examples, num_classes: int, batch_size: int) -> Any:
    """The shard as shuffled batches for the backend at hand: tf.data on TensorFlow (measured
    faster there), a keras.utils.PyDataset elsewhere (JAX and PyTorch need no TensorFlow)."""
    if keras.backend.backend() == "tensorflow":
        return input_pipeline(examples, num_classes, batch_size)
    return ShuffledBatches(examples, num_classes, batch_size)


class ShuffledBatches(keras.utils.PyDataset):  # type: ignore[misc]
    """Batches of (pixels in [0, 1], one-hot labels) built from uint8 images, reshuffled every
    epoch: the same data, order rule and short last batch as the tf.data pipeline."""

    def __init__(self, examples: Examples, num_classes: int, batch_size: int) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        self.examples, self.num_classes, self.batch_size = examples, num_classes, batch_size
        self.order = np.random.default_rng().permutation(len(examples))

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        x = self.examples.x[rows].astype(np.float32)
        x /= 255.0
        y = np.zeros((len(rows), self.num_classes), np.float32)
        y[np.arange(len(rows)), self.examples.y[rows].astype(np.int64)] = 1.0
        return x, y

    def on_epoch_end(self) -> None:
        self.order = np.random.default_rng().permutation(len(self.examples))


def input_pipeline(examples: Examples, num_classes: int, batch_size: int) -> Any:
    """Shuffled batches of (pixels in [0, 1], one-hot labels), built per batch from uint8 images.

    Keeping the shard as uint8 and converting each batch on the fly moves a quarter of the
    bytes of a float32 copy through memory, and prefetching overlaps that with the training
    step. Each epoch reshuffles the whole shard; the last batch may be short, as in
    Keras' own array input.

    tf.data's autotuner is off: on a 2-core machine it made many epochs of the reference
    shard take 20.5 s instead of 10 to 12 s (its threads and periodic re-tuning compete with
    the training step for the cores). A batch costs a gather and a cast, so one producer
    and a fixed prefetch keep even a GPU fed.
    """
    import tensorflow as tf

    images = tf.constant(examples.x)
    labels = tf.constant(examples.y.astype(np.int32))

    def batch_of(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(tf.gather(images, indices), tf.float32) / 255.0
        y = tf.one_hot(tf.gather(labels, indices), num_classes, dtype=tf.float32)
        return x, y

    dataset = tf.data.Dataset.range(len(examples))
    dataset = dataset.shuffle(len(examples), reshuffle_each_iteration=True).batch(batch_size)
    dataset = dataset.map(batch_of).prefetch(PREFETCH_BATCHES)
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


task = Task(
    name="cifar10",
    build_model=build_model,
    load_data=load_data,
    load_test_data=load_test_data,
    partition_labels=partition_labels,
    params={"learning_rate": 1e-3},
)
