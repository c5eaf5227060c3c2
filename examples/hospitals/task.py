"""Four hospitals learn to tell benign from malignant tumours, and no patient leaves its hospital.

Each client reads only its own file (`fl-client --task task.py --data hospital_2.csv`) and
keeps a quarter of its patients aside to evaluate on; the server holds no data at all and
learns how the model does from the hospitals' own evaluations (federated evaluation).
"""

from __future__ import annotations

import csv
from pathlib import Path

import keras
import numpy as np
from fedgrpc.common.task import LocalData, Params, Site, Task

FEATURES = 30


def read_site(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """A hospital's CSV file: 30 measurements and the diagnosis per row (header first)."""
    if not path:
        raise ValueError("give each client its hospital's file: fl-client --data hospital_N.csv")
    with Path(path).open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    table = np.asarray(rows, dtype=np.float64)
    # All measurements are positive and span orders of magnitude: work with their logarithm.
    return np.log1p(table[:, :FEATURES]), table[:, FEATURES:].astype(np.float32)


def split(x: np.ndarray, y: np.ndarray, held_out: float, seed: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """A seeded held-out share, then each hospital standardizes its measurements with its own
    training patients' means and deviations: no statistic leaves the hospital."""
    order = np.random.default_rng(seed).permutation(len(y))
    cut = len(y) - max(1, int(round(held_out * len(y))))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-6
    scaled = ((x - mean) / std).astype(np.float32)
    return (scaled[train], y[train]), (scaled[test], y[test])


def build_model(params: Params) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(FEATURES,)),
            keras.layers.Dense(int(params["hidden_units"]), activation="relu"),
            keras.layers.Dense(int(params["hidden_units"]) // 2, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(float(params["learning_rate"])),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


def load_data(site: Site) -> LocalData:
    x, y = read_site(site.data)
    train, test = split(x, y, float(site.params["held_out"]), seed=site.client_id)
    return LocalData(train=train, test=test)


task = Task(
    name="hospitals",
    build_model=build_model,
    load_data=load_data,
    params={"learning_rate": 0.003, "hidden_units": 32, "held_out": 0.25},
)
