"""One poisoned client against each aggregation strategy, on synthetic data.

    python bench/poisoning.py [--rounds 10] [--json bench/results/poisoning.json]

Five clients train a softmax-regression model on their shards of a synthetic 10-class
problem (plain numpy, so the whole table takes seconds); every round, client 5 sends a
poisoned update instead of its own: its update direction flipped and scaled ten times
("sign-flip"), or random weights of a hundredfold scale ("noise"). The aggregation itself is
fedgrpc's own strategies (fedgrpc.server.strategy). Printed: test accuracy after the last
round, clean and under each attack, per strategy. Exit status 1 if a robust strategy ends
more than 2 points below its clean run or fedavg is not visibly hurt.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from fedgrpc.server.strategy import ROBUST, StrategySettings, add_update, make_strategy

ROBUST_AND_FEDAVG = ("fedavg", *ROBUST)

CLASSES, FEATURES, CLIENTS = 10, 20, 5


def make_data(seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.0, (CLASSES, FEATURES))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, CLASSES, n)
        return centers[y] + rng.normal(0, 1.5, (n, FEATURES)), y

    shards = [sample(400) for _ in range(CLIENTS)]
    return shards, sample(2000)


def accuracy(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    w, b = weights
    return float(np.mean(np.argmax(x @ w + b, axis=1) == y))


def local_train(
    weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of mini-batch SGD (batch 32) on softmax cross-entropy."""
    w, b = (np.array(a, dtype=np.float32) for a in weights)
    order = rng.permutation(len(x))
    for start in range(0, len(x), 32):
        idx = order[start : start + 32]
        logits = x[idx] @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(idx)), y[idx]] -= 1.0
        w -= 0.1 * (x[idx].T @ p / len(idx)).astype(np.float32)
        b -= 0.1 * p.mean(axis=0).astype(np.float32)
    return [w, b]


def poison(
    attack: str, global_weights: Sequence[np.ndarray], honest: Sequence[np.ndarray]
) -> list[np.ndarray]:
    if attack == "sign-flip":
        return [g - 10.0 * (h - g) for g, h in zip(global_weights, honest, strict=True)]
    if attack == "noise":
        rng = np.random.default_rng(len(honest))
        return [rng.normal(0, 100.0, h.shape).astype(h.dtype) for h in honest]
    return list(honest)


def run(strategy_name: str, attack: str, rounds: int, seed: int) -> float:
    shards, (x_test, y_test) = make_data(seed)
    rng = np.random.default_rng(seed + 1)
    weights = [np.zeros((FEATURES, CLASSES), np.float32), np.zeros(CLASSES, np.float32)]
    strategy = make_strategy(StrategySettings(strategy_name, trim_fraction=0.2, byzantine=1))
    for _ in range(rounds):
        strategy.begin_round(weights, len(shards))
        for client, (x, y) in enumerate(shards, start=1):
            update = local_train(weights, x, y, rng)
            if client == CLIENTS:
                update = poison(attack, weights, update)
            add_update(strategy, update, weights, len(x))
        weights = strategy.result()
    return accuracy(weights, x_test, y_test)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "poisoning.json")
    args = p.parse_args()
    attacks = ("none", "sign-flip", "noise")
    table = {s: {a: run(s, a, args.rounds, args.seed) for a in attacks} for s in ROBUST_AND_FEDAVG}
    print(f"{'strategy':<13} | {'clean':>6} {'sign-flip':>9} {'noise':>6} | worst drop")
    print("-" * 52)
    ok = True
    for name, row in table.items():
        drop = row["none"] - min(row["sign-flip"], row["noise"])
        print(
            f"{name:<13} | {row['none']:>6.3f} {row['sign-flip']:>9.3f} {row['noise']:>6.3f} | "
            f"{100 * drop:>5.1f} pts"
        )
        ok &= drop > 0.10 if name == "fedavg" else drop <= 0.02
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rounds": args.rounds, "seed": args.seed, "accuracy": table}, indent=2))
    print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
