"""Shared fixtures: small synthetic data (never the network), free loopback ports, a private cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_synthetic(n: int, seed: int, *, size: int = 32, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images whose red level tracks the label: learnable in a round or two, like a tiny CIFAR."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    x[..., 0] += (y * (190 // classes)).astype(np.uint8)[:, None, None]
    return x, y


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    yield
    from helpers import kill_leftovers

    kill_leftovers()


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("FEDGRPC_CACHE", str(cache))
    return cache


def write_synthetic(path: Path, *, train: int, test: int) -> Path:
    """An .npz data source (uint8 x_train, y_train, x_test, y_test) of synthetic images."""
    x_train, y_train = make_synthetic(train, seed=1)
    x_test, y_test = make_synthetic(test, seed=2)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture
def synthetic_npz(tmp_path: Path) -> Path:
    return write_synthetic(tmp_path / "synthetic.npz", train=300, test=100)
