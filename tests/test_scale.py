"""Light clients (no TensorFlow) against a real fl-server: sampling, compression, the aggregate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import helpers
import numpy as np
import pytest
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


SIZED = Path(__file__).resolve().parents[1] / "bench" / "tasks" / "sized.py"


def _metric(http_port: int, name: str) -> float:
    """One value from the server's /metrics (0 while the server is not up yet)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError):
        return 0.0
    values = [float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def test_hundreds_of_asyncio_light_clients_in_one_process_some_cancelling(tmp_path: Path) -> None:
    """300 light clients on one event loop complete a round against a real fl-server. Before it,
    20 of them cancel a long-poll the server is holding; in it, 20 cancel their download after
    its header. The server counts the calls of both kinds as ended early (in a summary line and
    on /metrics), logs no traceback for them, and summarises the joins instead of writing 300 lines."""
    import asyncio

    import grpc
    from fedgrpc.client.light import LightSettings, light_client, run_light_clients
    from fedgrpc.v1 import coordinator_pb2 as pb
    from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc

    clients, port, out, server_log = 300, free_port(), tmp_path / "out", tmp_path / "server.log"
    http_port = free_port()
    server = start(
        "fl-server", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--rounds", "1",
        "--clients", str(clients), "--task", str(SIZED), "--param", "parameters=1048576",
        "--chunk-kb", "256", "--eval-every", "0", "--out", str(out), "--threads", "1",
        "--http", str(http_port),
        log=server_log,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    settings = LightSettings(connect_timeout_s=180)

    async def metric_reaches(name: str, at_least: float) -> float:
        value = 0.0
        for _ in range(1200):  # up to 5 minutes and more on a loaded machine
            value = await asyncio.to_thread(_metric, http_port, name)
            if value >= at_least:
                return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"{name} stayed at {value}, below {at_least}")

    async def join(stub: pb_grpc.CoordinatorStub, client_id: int) -> None:
        for _ in range(600):
            try:
                await stub.Join(pb.JoinRequest(client_id=client_id), timeout=10)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.3)
        raise AssertionError("the server never answered Join")

    async def cancel_a_wait(channel: grpc.aio.Channel, client_id: int, held: asyncio.Event) -> None:
        stub = pb_grpc.CoordinatorStub(channel)
        await join(stub, client_id)
        call = stub.GetGlobalWeights(
            pb.GetGlobalWeightsRequest(client_id=client_id, after_round=1000, max_wait_ms=30_000)
        )
        await held.wait()  # the server holds the long-poll: nothing to send after round 1000
        assert not call.done()
        call.cancel()

    async def cancel_a_download_then_take_part(channel: grpc.aio.Channel, client_id: int) -> None:
        stub = pb_grpc.CoordinatorStub(channel)
        await join(stub, client_id)
        while True:  # wait for round 1, read the header of its 4 MiB of weights, then hang up
            request = pb.GetGlobalWeightsRequest(client_id=client_id, after_round=0, max_wait_ms=30_000)
            call = stub.GetGlobalWeights(request, timeout=300)
            first = await call.read()
            assert isinstance(first, pb.WeightsMessage)
            call.cancel()
            if first.header.instruction == pb.TRAIN:
                break
        await light_client(target, client_id, settings, channel=channel)

    async def everyone() -> tuple[dict[int, object], dict[int, str], float]:
        channel = grpc.aio.insecure_channel(target)
        held = asyncio.Event()
        waits = [asyncio.ensure_future(cancel_a_wait(channel, i, held)) for i in range(1, 21)]
        await metric_reaches("fedgrpc_open_calls", 20)  # all 20 long-polls held by the server
        held.set()
        await asyncio.gather(*waits)
        ended_waits = await metric_reaches("fedgrpc_calls_ended_early_total", 20)
        others = [asyncio.ensure_future(cancel_a_download_then_take_part(channel, i)) for i in range(21, 41)]
        done, failed = await run_light_clients(
            target, [i for i in range(1, clients + 1) if not 21 <= i <= 40], settings
        )
        await asyncio.gather(*others)
        await channel.close(None)
        return dict(done), failed, ended_waits

    done, failed, ended_waits = asyncio.run(asyncio.wait_for(everyone(), 900))
    assert finish(server, server_log) == 0, server_log.read_text()[-3000:]
    assert not failed and len(done) == clients - 20
    assert ended_waits == 20  # the cancelled waits alone, before any download began

    history = json.loads((out / "history.json").read_text())
    assert len(history["rounds"][0]["clients"]) == clients
    log = server_log.read_text()
    assert "Traceback" not in log and "ExecuteBatchError" not in log, log[-3000:]
    counts = r": \d+(?: more)? in the last \d+ s, (\d+) in all"
    ended = [int(n) for n in re.findall(r"calls ended by their client .*" + counts, log)]
    assert ended and ended[-1] >= 40, log[-3000:]  # the 20 cancelled waits and the 20 downloads
    assert log.count(" joined from ") <= 10
    joined = [int(n) for n in re.findall(r"clients joined" + counts, log)]
    assert joined and joined[-1] >= clients, log[-3000:]


def test_a_summary_logs_the_first_events_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from fedgrpc.server.summary import EventSummary

    now = [100.0]
    summary = EventSummary(logging.getLogger("test.summary"), "clients joined", first=2, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.summary"):
        for client in range(1, 1001):
            summary.event("client %d joined", client)
            now[0] += 0.025  # 1,000 joins over 25 s
        summary.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == ["client 1 joined", "client 2 joined"]
    assert len(lines) <= 2 + 4  # one count line per 10 s at most, and the last one flushed
    assert lines[-1].endswith(", 1000 in all")
    counts = [int(line.split(": ")[1].split()[0]) for line in lines[2:]]
    assert sum(counts) == 998


def test_a_summary_counts_bursts_only_and_logs_an_event_marked_always(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Joins spread over a long run are logged one by one however many there are; in a burst,
    the first ten are, then counts, except a client joining again; after the burst, lines again."""
    import logging

    from fedgrpc.server.summary import EventSummary

    now = [100.0]
    summary = EventSummary(logging.getLogger("test.bursts"), "clients joined", first=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.bursts"):
        for client in range(1, 13):  # one every 20 s: no burst
            summary.event("client %d joined", client)
            now[0] += 20
        for client in range(13, 63):  # 50 in 5 s: a burst
            summary.event("client %d joined", client)
            now[0] += 0.1
        summary.event("client %d joined again", 3, always=True)
        now[0] += 60
        summary.flush()
        summary.event("client %d joined", 63)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:22] == [f"client {i} joined" for i in range(1, 23)], lines
    assert "client 3 joined again" in lines and lines[-1] == "client 63 joined", lines
    counts = [line for line in lines if " in all" in line]
    assert counts and counts[-1].endswith(", 63 in all"), lines
    assert sum(int(line.split(": ")[1].split()[0]) for line in counts) == 40, lines
