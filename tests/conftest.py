"""Shared fixtures: small synthetic data (never the network), free loopback ports, a private cache.

Strictness: when $CI is set (CI sets it, and so does `make test`), a test that would skip because
something is missing here (a Docker engine, kubectl, chromium, Ray, JAX) fails instead, with the
skip's reason, so that a run cannot pass having run less. Without $CI skips stay skips, and the
end of the run lists them loudly.
"""

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


STRICT_HINT = (
    "install what it needs (.ci/run shows how on Debian), or run without $CI (`make test CI=`) to let it skip"
)


def strict() -> bool:
    return bool(os.environ.get("CI"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under $CI a skip is a failure: the run must not pass having left tests out."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and strict() and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"this test would skip, but $CI is set: {reason}\n{STRICT_HINT}"


def _skip_reason(report: pytest.TestReport) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly what did not run, and why: a green run that skipped tests proved less."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: dict[str, list[str]] = {}
    for report in skipped:
        reasons.setdefault(_skip_reason(report), []).append(report.nodeid)
    terminalreporter.section(f"{len(skipped)} TESTS DID NOT RUN", sep="!", red=True, bold=True)
    for reason, nodeids in sorted(reasons.items()):
        terminalreporter.line(f"{len(nodeids):4d} skipped: {reason}", red=True, bold=True)
        for nodeid in nodeids[:3]:
            terminalreporter.line(f"       {nodeid}")
        if len(nodeids) > 3:
            terminalreporter.line(f"       ... and {len(nodeids) - 3} more")
    terminalreporter.line(
        "With $CI set (as `make test` and CI set it) these fail instead of skipping.", red=True, bold=True
    )


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
