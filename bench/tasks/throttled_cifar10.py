"""The reference job (fedgrpc.common.cifar10: the small CNN on CIFAR-10) with a throttle for the
straggler benchmark (bench/stragglers.py). Bench only: nothing in the product slows a client.

Task parameters (set on the server, which hands them to every client):

    slow_client     the client id to slow down (0: none)
    slowdown        after each local training, that client sleeps slowdown x the training's own
                    measured time (3: every round takes it 4x as long as the others)
    train_examples  keep only this many of each client's training examples (0: all; --quick)
    test_examples   keep only this many of the server's test examples (0: all; --quick)

    fl-server --task bench/tasks/throttled_cifar10.py --param slow_client=4 --param slowdown=3 ...
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np
from fedgrpc.common import cifar10
from fedgrpc.common.data import Examples, load_split, model_inputs
from fedgrpc.common.partition import matching_indices
from fedgrpc.common.task import LocalData, RoundContext, Site, Task, fit_model

log = logging.getLogger("fedgrpc.client")
_THIS_CLIENT = [0]  # the id of the client this process is (load_data sees it, train does not)


def load_data(site: Site) -> LocalData:
    _THIS_CLIENT[0] = site.client_id
    train = load_split(site.data, "train")
    x, y = site.shard(train.x, train.y)
    limit = int(site.params["train_examples"])
    if limit:
        x, y = x[:limit], y[:limit]
    test = load_split(site.data, "test")
    keep = matching_indices(
        train.y, test.y, site.num_clients, site.client_id - 1, site.partition_seed, site.partition
    )
    shard = Examples(x, y)
    return LocalData(
        train=cifar10.batches(shard, cifar10.NUM_CLASSES, site.batch_size),
        num_examples=len(shard),
        test=model_inputs(test.subset(keep), cifar10.NUM_CLASSES),
    )


def load_test_data(site: Site) -> tuple[np.ndarray, np.ndarray]:
    test = load_split(site.data, "test")
    limit = int(site.params["test_examples"])
    if limit:
        test = test.subset(np.arange(min(limit, len(test.y))))
    return model_inputs(test, cifar10.NUM_CLASSES)


def train(model: keras.Model, data: LocalData, ctx: RoundContext) -> dict[str, float]:
    """The default training; the slowed client then sleeps `slowdown` x what it took."""
    started = time.perf_counter()
    metrics = fit_model(model, data, ctx)
    took = time.perf_counter() - started
    if _THIS_CLIENT[0] == int(ctx.params["slow_client"]):
        pause = float(ctx.params["slowdown"]) * took
        log.info("straggler throttle: trained in %.1f s, sleeping %.1f s", took, pause)
        time.sleep(pause)
    return metrics


task = Task(
    name="cifar10-stragglers",
    build_model=cifar10.build_model,
    load_data=load_data,
    load_test_data=load_test_data,
    train=train,
    partition_labels=cifar10.partition_labels,
    params={
        "learning_rate": 1e-3,
        "slow_client": 0,
        "slowdown": 3.0,
        "train_examples": 0,
        "test_examples": 0,
    },
)
