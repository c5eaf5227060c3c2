"""The robust strategies through a real fl-server, with one poisoned client among five.

Four light clients send seeded perturbations of the global weights (anyone can recompute
them); the fifth (tests/rogue_peer.py) sends the same kind of update with its change flipped
and scaled ten times, and claims a million examples. Each round's new global model must be
the strategy's rule, written out here from its definition, applied to those five updates,
and lie within the honest updates' range.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.client.light import light_update
from fedgrpc.common.processes import free_port
from fedgrpc.server.checkpoint import CheckpointStore
from helpers import finish, finish_all, server_command, start, start_clients
from rogue_peer import CLAIMED_EXAMPLES, poisoned

HONEST, ROGUE, ROUNDS = (1, 2, 3, 4), 5, 2
PEER = Path(__file__).parent / "rogue_peer.py"


def median(updates: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Coordinate-wise median (five updates: the third smallest value of each coordinate)."""
    return [np.sort(np.stack(t), axis=0)[len(t) // 2] for t in zip(*updates, strict=True)]


def trimmed_mean(updates: list[list[np.ndarray]], fraction: float = 0.2) -> list[np.ndarray]:
    """Coordinate-wise mean after dropping the int(fraction * n) smallest and largest values."""
    k = int(fraction * len(updates))
    return [
        np.sort(np.stack(t).astype(np.float64), axis=0)[k : len(t) - k].mean(axis=0)
        for t in zip(*updates, strict=True)
    ]


def krum(updates: list[list[np.ndarray]], byzantine: int = 1) -> list[np.ndarray]:
    """The update whose summed squared distance to its n - f - 2 nearest others is least."""
    flat = [np.concatenate([t.astype(np.float64).ravel() for t in u]) for u in updates]
    nearest = len(updates) - byzantine - 2
    scores = [
        sum(sorted(float(np.sum((a - b) ** 2)) for j, b in enumerate(flat) if j != i)[:nearest])
        for i, a in enumerate(flat)
    ]
    return updates[int(np.argmin(scores))]


RULES = {"median": median, "trimmed-mean": trimmed_mean, "krum": krum}


def load_round(folder: Path, number: int) -> list[np.ndarray]:
    with np.load(folder / f"round-{number}.npz") as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


@pytest.mark.parametrize("name", list(RULES))
def test_a_robust_strategy_in_a_real_run_is_its_rule_and_ignores_the_poisoned_client(
    tmp_path: Path, synthetic_npz: Path, name: str
) -> None:
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--strategy", name, "--trim-fraction", "0.2", "--byzantine", "1")
    command = server_command(port, synthetic_npz, out, rounds=ROUNDS, clients=5, extra=extra)
    server = start(*command, log=log)
    clients = start_clients(port, synthetic_npz, tmp_path, ids=HONEST, extra=("--insecure", "--light"))
    seen = tmp_path / "seen"
    peer_log = tmp_path / "rogue.log"
    peer = start(
        "python", str(PEER), "--server", f"127.0.0.1:{port}", "--id", str(ROGUE), "--mode", "poison",
        "--out", str(seen), log=peer_log,
    )  # fmt: skip
    finish_all([*clients, (peer, peer_log)])
    assert finish(server, log) == 0, log.read_text()

    history = json.loads((out / "history.json").read_text())
    for record in history["rounds"]:  # the poisoned update was accepted and counted as sent
        claimed = {c["client_id"]: c["num_examples"] for c in record["clients"]}
        assert sorted(claimed) == [*HONEST, ROGUE] and claimed[ROGUE] == CLAIMED_EXAMPLES, record
    checkpoint = CheckpointStore(out / "checkpoint").load()
    assert checkpoint is not None and checkpoint.round == ROUNDS
    after = {number: load_round(seen, number + 1) for number in range(1, ROUNDS)}
    after[ROUNDS] = [np.asarray(w) for w in checkpoint.weights]

    for number in range(1, ROUNDS + 1):
        start_weights = load_round(seen, number)
        honest = [light_update(start_weights, c, number) for c in HONEST]
        bad = poisoned(start_weights, ROGUE, number)
        want = RULES[name]([*honest, bad])
        got = after[number]
        for g, w, *h in zip(got, want, *honest, strict=True):
            assert g.dtype == h[0].dtype
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
            low, high = np.min(np.stack(h), axis=0), np.max(np.stack(h), axis=0)
            assert np.all((low - 1e-6 <= g) & (g <= high + 1e-6)), f"{name}: outside the honest range"
        if name == "krum":  # it chose one honest update, as sent
            assert any(all(np.array_equal(g, x) for g, x in zip(got, u, strict=True)) for u in honest)
