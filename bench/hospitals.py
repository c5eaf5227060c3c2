"""The case for federating, measured on examples/hospitals: federated vs pooled vs each site alone.

    python bench/hospitals.py [--seeds 3] [--rounds 10] [--local-epochs 5]

Four hospitals of very different sizes hold scikit-learn's breast-cancer data; each keeps a
quarter of its patients aside (the task's own split). Three ways to get a model:

- federated: fl-server + 4 fl-client processes (examples/hospitals/task.py), FedAvg, `--rounds`
  rounds of `--local-epochs` epochs; the server holds no data;
- pooled: the same model trained on all hospitals' training patients at once, for as many
  epochs (what no hospital may do: it needs every patient in one place);
- each hospital alone, on its own training patients, as many epochs.

Every model is evaluated on every hospital's held-out patients. Prints accuracy on all held-out
patients together and at each hospital, mean over `--seeds` initial weights, and writes JSON
(bench/results/hospitals.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "examples" / "hospitals" / "task.py"
SITES = 4


def held_out_sets(task: Any, files: list[Path]) -> list[tuple[tuple[np.ndarray, np.ndarray], ...]]:
    """Each hospital's (train, test) split, as its client makes it."""
    from fedgrpc.common.task import Site

    params = dict(task.task.params)
    return [
        (data.train, data.test)
        for data in (
            task.task.load_data(Site(client_id=k, num_clients=SITES, data=str(f), params=params))
            for k, f in enumerate(files, start=1)
        )
    ]


def accuracies(model: Any, splits: list[tuple[tuple[np.ndarray, np.ndarray], ...]]) -> dict[str, float]:
    tests = [test for _, test in splits]
    x = np.concatenate([t[0] for t in tests])
    y = np.concatenate([t[1] for t in tests])
    result = {"all": float(model.evaluate(x, y, verbose=0)[1])}
    for k, (tx, ty) in enumerate(tests, start=1):
        result[f"hospital {k}"] = float(model.evaluate(tx, ty, verbose=0)[1])
    return result


def trained(task: Any, x: np.ndarray, y: np.ndarray, epochs: int, batch: int, seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    model = task.task.build_model(dict(task.task.params))
    model.fit(x, y, epochs=epochs, batch_size=batch, shuffle=True, verbose=0)
    return model


def federated(
    files_pattern: str, rounds: int, epochs: int, batch: int, seed: int, work: Path
) -> tuple[Any, float]:
    import keras
    from fedgrpc.server.local import run_federation

    out = work / f"federated-{seed}"
    started = time.monotonic()
    code = run_federation(
        clients=SITES,
        rounds=rounds,
        data=files_pattern,
        out_dir=out,
        task=str(TASK),
        server_args=[
            "--local-epochs",
            str(epochs),
            "--batch-size",
            str(batch),
            "--init-seed",
            str(seed),
            "--eval-every",
            "1",
        ],  # fmt: skip
        logs_dir=work / f"logs-{seed}",
    )
    if code != 0:
        for log in sorted((work / f"logs-{seed}").glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
        raise SystemExit("the federated run failed")
    return keras.models.load_model(out / "final_model.keras"), time.monotonic() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "hospitals.json")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "examples" / "hospitals"))
    from fedgrpc.common.task_loader import load_task
    from make_sites import write_sites

    task = load_task(str(TASK))
    epochs = args.rounds * args.local_epochs
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedgrpc-hospitals-") as tmp:
        work = Path(tmp)
        files = write_sites(work / "data")
        splits = held_out_sets(task, files)
        sizes = [len(train[1]) for train, _ in splits]
        x_all = np.concatenate([train[0] for train, _ in splits])
        y_all = np.concatenate([train[1] for train, _ in splits])
        for seed in range(args.seeds):
            print(f"seed {seed}: federated run ({SITES} client processes) ...", flush=True)
            pattern = str(work / "data" / "hospital_{id}.csv")
            model, seconds = federated(pattern, args.rounds, args.local_epochs, args.batch_size, seed, work)
            rows.setdefault("federated", []).append(accuracies(model, splits) | {"seconds": seconds})
            pooled = trained(task, x_all, y_all, epochs, args.batch_size, seed)
            rows.setdefault("pooled (all patients in one place)", []).append(accuracies(pooled, splits))
            for k, (train, _) in enumerate(splits, start=1):
                alone = trained(task, train[0], train[1], epochs, args.batch_size, seed)
                rows.setdefault(f"hospital {k} alone ({sizes[k - 1]} patients)", []).append(
                    accuracies(alone, splits)
                )

    columns = ["all"] + [f"hospital {k}" for k in range(1, SITES + 1)]
    print()
    print(f"accuracy on held-out patients, mean over {args.seeds} seeds ({args.rounds} rounds x "
          f"{args.local_epochs} epochs; {epochs} epochs for the others)")  # fmt: skip
    print(f"{'model':<34} | " + " ".join(f"{c:>10}" for c in columns))
    print("-" * (37 + 11 * len(columns)))
    summary: dict[str, dict[str, float]] = {}
    for name, results in rows.items():
        summary[name] = {c: statistics.fmean(r[c] for r in results) for c in columns}
        print(f"{name:<34} | " + " ".join(f"{summary[name][c]:>10.4f}" for c in columns))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "mean": summary,
                                     "runs": rows, "train_sizes": sizes}, indent=2))  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
