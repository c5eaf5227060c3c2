"""A tiny task for simulations at scale: a 20-feature logistic regression on synthetic data
each client draws from its id, so thousands of simulated clients really train (a few
milliseconds each) without any data file.

    fl-sim --task bench/tasks/tiny.py --clients 2000 --clients-per-round 100 --rounds 3
"""

from __future__ import annotations

import keras
import numpy as np
from fedgrpc.common.task import LocalData, Params, Site, Task

FEATURES = 20
TRUE_WEIGHTS = np.random.default_rng(0).normal(size=FEATURES)


def build_model(params: Params) -> keras.Model:
    model = keras.Sequential([keras.Input(shape=(FEATURES,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(
        optimizer=keras.optimizers.SGD(float(params["learning_rate"])),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


def load_data(site: Site) -> LocalData:
    rng = np.random.default_rng([site.client_id, site.partition_seed])
    n = int(site.params["examples"])
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x @ TRUE_WEIGHTS + rng.normal(scale=0.5, size=n) > 0).astype(np.float32)[:, None]
    return LocalData(train=(x, y))


task = Task(
    name="tiny",
    build_model=build_model,
    load_data=load_data,
    params={"learning_rate": 0.1, "examples": 32},
)
