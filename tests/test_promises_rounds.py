"""Who takes part in a round, with a real fl-server: Poisson client sampling, and a client
killed (SIGKILL) in round 1 before its first update."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import numpy as np
from fedgrpc.client.light import light_examples, light_update
from fedgrpc.common.processes import free_port
from fedgrpc.server.checkpoint import CheckpointStore
from helpers import finish, finish_all, server_command, start, start_clients, wait_for_line

PEER = Path(__file__).parent / "rogue_peer.py"


def poisson_sample(seed: int, number: int, clients: int, rate: float) -> list[int]:
    """Poisson sampling: each client on its own with probability `rate`, from the run's seeded
    draw for this round (seed and round number, so a restarted server draws the same)."""
    rng = random.Random(f"{seed}:{number}")
    return [client for client in range(1, clients + 1) if rng.random() < rate]


def test_poisson_sampling_draws_each_client_with_probability_k_over_n(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    clients, per_round, seed, rounds = 6, 3, 0, 4
    expected = [poisson_sample(seed, r, clients, per_round / clients) for r in range(1, rounds + 1)]
    # The seed was picked so that the sizes vary, down to a round that samples nobody.
    assert [len(e) for e in expected] == [3, 4, 6, 0]
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = (
        "--clients-per-round",
        str(per_round),
        "--client-sampling",
        "poisson",
        "--sample-seed",
        str(seed),
    )
    server = start(
        *server_command(port, synthetic_npz, out, rounds=rounds, clients=clients, extra=extra), log=log
    )
    ids = tuple(range(1, clients + 1))
    finish_all(start_clients(port, synthetic_npz, tmp_path, ids=ids, extra=("--insecure", "--light")))
    assert finish(server, log) == 0, log.read_text()
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == list(range(1, rounds + 1))
    got = [sorted(c["client_id"] for c in r["clients"]) for r in history["rounds"]]
    assert got == expected, log.read_text()
    empty = history["rounds"][3]  # no client sampled: the model stays as it was
    assert empty["start_digest"] == empty["end_digest"] == history["rounds"][2]["end_digest"]
    assert history["rounds"][2]["start_digest"] != history["rounds"][2]["end_digest"]


def test_a_client_killed_in_round_1_before_its_update_does_not_stop_the_run(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    """Client 3 takes round 1's weights and is killed (SIGKILL) while it would train. Each round
    closes after --round-timeout with the two others (>= --min-clients), and the final model is
    their example-weighted mean, round after round."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--round-timeout", "3", "--min-clients", "2")
    server = start(*server_command(port, synthetic_npz, out, rounds=2, clients=3, extra=extra), log=log)
    seen, peer_log = tmp_path / "seen", tmp_path / "client-3.log"
    peer = start(
        "python", str(PEER), "--server", f"127.0.0.1:{port}", "--id", "3", "--mode", "stall",
        "--out", str(seen), log=peer_log,
    )  # fmt: skip
    light = start_clients(port, synthetic_npz, tmp_path, ids=(1, 2), extra=("--insecure", "--light"))
    wait_for_line(peer_log, "round 1: training", process=peer)
    peer.send_signal(signal.SIGKILL)
    assert peer.wait(timeout=30) == -signal.SIGKILL
    finish_all(light)
    assert finish(server, log) == 0, log.read_text()

    history = json.loads((out / "history.json").read_text())
    assert [sorted(c["client_id"] for c in r["clients"]) for r in history["rounds"]] == [[1, 2], [1, 2]]
    assert "closing after 3 s with 2 of 3 updates" in log.read_text()
    with np.load(seen / "round-1.npz") as saved:
        weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    for number in (1, 2):
        updates = {c: light_update(weights, c, number) for c in (1, 2)}
        total = sum(light_examples(c) for c in updates)
        weights = [
            (
                np.sum([light_examples(c) * u[i].astype(np.float64) for c, u in updates.items()], axis=0)
                / total
            ).astype(w.dtype)
            for i, w in enumerate(weights)
        ]
    checkpoint = CheckpointStore(out / "checkpoint").load()
    assert checkpoint is not None and checkpoint.round == 2
    for got, want in zip(checkpoint.weights, weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
