"""Light clients (no TensorFlow) against a real fl-server: sampling, compression, the aggregate."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import numpy as np
from fedgrpc.client.light import light_examples
from fedgrpc.common.processes import free_port
from helpers import finish, finish_all, server_command, start, start_clients

CNN_PARAMETERS = 167_562


def test_a_sample_of_light_clients_per_round_with_int8_updates(tmp_path: Path, synthetic_npz: Path) -> None:
    port, out, server_log = free_port(), tmp_path / "out", tmp_path / "server.log"
    spool = tmp_path / "spool"
    spool.mkdir()
    extra = (
        *("--clients-per-round", "4", "--compression", "int8", "--record-updates", "--sample-seed", "5"),
        *("--spool-dir", str(spool)),  # updates staged on disk on their way to the sum
    )
    server = start(
        *server_command(port, synthetic_npz, out, rounds=2, clients=12, extra=extra), log=server_log
    )
    clients = start_clients(
        port, synthetic_npz, tmp_path, ids=tuple(range(1, 13)), extra=("--insecure", "--light")
    )
    # Spool files are unlinked from the start: while an update is being received (one held open
    # here, as a client sampled for round 1), its file is open in the server and has no name.
    helpers.wait_for_line(server_log, "listening on port", process=server)
    with helpers.held_update(port, clients=12, num_examples=light_examples) as held:
        staged = helpers.spool_files(server.pid, spool, timeout=120)
        assert staged and all(target.endswith(" (deleted)") for target in staged), staged
        assert not list(spool.iterdir()), "a spool file had a name"
        held.set()
    finish_all(clients)
    assert finish(server, server_log) == 0, server_log.read_text()

    history = json.loads((out / "history.json").read_text())
    samples = [sorted(c["client_id"] for c in r["clients"]) for r in history["rounds"]]
    assert [len(s) for s in samples] == [4, 4] and samples[0] != samples[1]
    for record, sample in zip(history["rounds"], samples, strict=True):
        assert [c["num_examples"] for c in record["clients"]] == [light_examples(i) for i in sample]
        # int8: a byte a parameter up (plus headers), four bytes a parameter down
        assert 4 * CNN_PARAMETERS < record["bytes_in"] < 4 * CNN_PARAMETERS * 1.1
        assert record["bytes_out"] > 4 * CNN_PARAMETERS * 4
    assert "clients 4/4" in server_log.read_text()
    assert f"staged on disk in {spool}" in server_log.read_text()
    assert not list(spool.iterdir())  # and nothing is left behind

    import keras

    last = history["rounds"][-1]
    updates = []
    for client in last["clients"]:
        with np.load(out / "updates" / "round-0002" / f"client-{client['client_id']}.npz") as npz:
            updates.append(([npz[k] for k in sorted(npz.files)], client["num_examples"]))
    total = sum(n for _, n in updates)
    expected = [sum(w[i].astype(np.float64) * n for w, n in updates) / total for i in range(8)]
    saved = keras.models.load_model(out / "final_model.keras").get_weights()
    for got, want in zip(saved, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
