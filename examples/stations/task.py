"""Weather stations learn to forecast the next hour's temperature from the last day's readings.

A regression on sequences, unlike the image and table tasks: each example is a window of 24
hourly readings (a sequence of shape (24, 1)), its target the reading that follows. Each
station reads its own log (`fl-client --data station_2.csv`); the last fifth of it, in time,
is held out, so evaluation is a true forecast. The metric to watch is the mean absolute error
in degrees (`mae`), which the round line leads with.
"""

from __future__ import annotations

import csv
from pathlib import Path

import keras
import numpy as np
from fedgrpc.common.task import LocalData, Params, Site, Task


def windows(series: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(past `length` readings, the next one) for every position of the series."""
    x = np.lib.stride_tricks.sliding_window_view(series[:-1], length)
    return x[..., None].astype(np.float32), series[length:, None].astype(np.float32)


def build_model(params: Params) -> keras.Model:
    length = int(params["window_hours"])
    model = keras.Sequential(
        [
            keras.Input(shape=(length, 1)),
            keras.layers.Rescaling(1 / 20.0),  # degrees to about unit scale, the same everywhere
            keras.layers.GRU(int(params["units"])),
            keras.layers.Dense(1),
            keras.layers.Rescaling(20.0),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(float(params["learning_rate"])), loss="mse", metrics=["mae"]
    )
    return model


def load_data(site: Site) -> LocalData:
    if not site.data:
        raise ValueError("give each client its station's log: fl-client --data station_N.csv")
    with Path(site.data).open(newline="") as handle:
        series = np.asarray([float(row[1]) for row in list(csv.reader(handle))[1:]], dtype=np.float32)
    x, y = windows(series, int(site.params["window_hours"]))
    cut = int(len(y) * 0.8)
    return LocalData(train=(x[:cut], y[:cut]), test=(x[cut:], y[cut:]))


task = Task(
    name="stations",
    build_model=build_model,
    load_data=load_data,
    params={"window_hours": 24, "units": 16, "learning_rate": 0.005},
    main_metric="mae",
)
