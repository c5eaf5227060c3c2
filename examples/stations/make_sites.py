"""Write weather stations' temperature logs: one CSV of hourly readings per station.

    python examples/stations/make_sites.py [--stations 3] [--days 60] [--out examples/stations/data]

Each station has its own climate (mean, daily swing, weather noise), a slow seasonal drift,
and weather fronts that persist for hours: a series where the next hour depends on the past
day. Seeded by station, so the files are the same on every machine.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def station_series(number: int, days: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + number)
    hours = np.arange(days * 24)
    mean, swing = rng.uniform(5, 20), rng.uniform(3, 9)
    daily = swing * np.sin(2 * np.pi * (hours % 24 - 9) / 24)
    season = 4 * np.sin(2 * np.pi * hours / (24 * 90) + rng.uniform(0, np.pi))
    front = np.zeros(len(hours))
    for t in range(1, len(hours)):  # an AR(1) of weather: a front lasts about a day
        front[t] = 0.96 * front[t - 1] + rng.normal(0, 0.6)
    return (mean + daily + season + front + rng.normal(0, 0.3, len(hours))).astype(np.float32)


def write_sites(out: Path, stations: int = 3, days: int = 60) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, stations + 1):
        path = out / f"station_{number}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["hour", "temperature_c"])
            for hour, value in enumerate(station_series(number, days)):
                writer.writerow([hour, f"{value:.3f}"])
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stations", type=int, default=3)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    args = p.parse_args()
    for path in write_sites(args.out, args.stations, args.days):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
