"""Write the four hospitals' files: scikit-learn's bundled breast-cancer data, split unevenly.

    python examples/hospitals/make_sites.py [--out examples/hospitals/data]

569 patients, 30 measurements of a tumour each, and the diagnosis (1 benign, 0 malignant). The
patients are shuffled once (seed 7) and dealt to four hospitals of very different sizes
(45%, 30%, 17%, 8%), each a CSV file with a header row. Nothing is downloaded: the data ships
inside scikit-learn.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

SHARES = (0.45, 0.30, 0.17, 0.08)
SEED = 7


def write_sites(out: Path) -> list[Path]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = np.random.default_rng(SEED).permutation(len(data.target))
    cuts = (np.cumsum(SHARES)[:-1] * len(order)).astype(int)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, rows in enumerate(np.split(order, cuts), start=1):
        path = out / f"hospital_{number}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*(name.replace(" ", "_") for name in data.feature_names), "benign"])
            for row in rows:
                writer.writerow([*(f"{v:.6g}" for v in data.data[row]), int(data.target[row])])
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    for path in write_sites(p.parse_args().out):
        print(f"wrote {path} ({sum(1 for _ in path.open()) - 1} patients)")


if __name__ == "__main__":
    main()
