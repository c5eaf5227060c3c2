"""A task whose model is one dense layer of a chosen size: for benchmarks of the protocol itself,
driven by light clients (fedgrpc.client.light), which never load data or train.

    fl-server --task bench/tasks/sized.py --param parameters=262144 --eval-every 0   # 1 MiB
"""

from __future__ import annotations

import keras
from fedgrpc.common.errors import DataError
from fedgrpc.common.task import LocalData, Params, Site, Task

INPUTS = 1024


def build_model(params: Params) -> keras.Model:
    units = max(1, int(params["parameters"]) // INPUTS)
    model = keras.Sequential([keras.Input(shape=(INPUTS,)), keras.layers.Dense(units, use_bias=False)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def load_data(site: Site) -> LocalData:
    raise DataError("the sized task has no data: drive it with light clients (fl-client --light)")


task = Task(name="sized", build_model=build_model, load_data=load_data, params={"parameters": 262_144})
