"""One client session for every kind of client: fl-client, the script API, light clients.

The same protocol life (poll, train, the exchange's privacy and secure-aggregation steps,
submit) must behave the same whichever driver runs it: these tests run real servers and the
real client code, and check what each driver sends and when."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_synthetic
from fedgrpc.client import light
from fedgrpc.client.light import light_examples
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec, SecAggSpec
from fedgrpc.common.processes import free_port
from fedgrpc.server.checkpoint import CheckpointStore
from fedgrpc.server.masked_sum import SecAggStrategy
from fedgrpc.server.rounds import RoundCoordinator
from fedgrpc.server.strategy import FedAvg
from helpers import (
    ENV,
    STARTED,
    finish,
    finish_all,
    server_command,
    serving,
    start,
    start_clients,
    wait_for_line,
)

SCRIPT = Path(__file__).with_name("script_client.py")

#: What the script client reports with its update: a loss, and a timing.
SCRIPT_METRICS = {"loss": 0.25, "train_seconds": 1.25}


# -- the script API under secure aggregation and DP: a real fl-server, light clients, a script ----


@pytest.fixture(scope="module")
def secure_dp_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One round of fl-server --secagg --dp-clip 1: light clients 1 and 2 (fl-client --light), and
    client 3 a training script on fedgrpc.client's verbs (tests/script_client.py)."""
    tmp = tmp_path_factory.mktemp("secure-dp")
    data = write_synthetic(tmp / "synthetic.npz", train=300, test=100)
    port, out, log = free_port(), tmp / "out", tmp / "server.log"
    flags = ("--secagg", "--dp-clip", "1.0", "--dp-noise-multiplier", "0", "--finish-grace", "1")
    server = start(*server_command(port, data, out, rounds=1, clients=3, extra=flags), log=log)
    wait_for_line(log, "waiting for 3 clients", process=server)
    initial = CheckpointStore(out / "checkpoint").load()
    assert initial is not None and initial.round == 0
    lights = start_clients(port, data, tmp, ids=(1, 2), extra=("--insecure", "--light"))
    script_log = tmp / "script.log"
    script = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--server", f"127.0.0.1:{port}", "--id", "3",
         "--metrics", json.dumps(SCRIPT_METRICS)],
        stdout=subprocess.PIPE, stderr=script_log.open("ab"), env=ENV, text=True,
    )  # fmt: skip
    STARTED.append(script)  # type: ignore[arg-type]
    assert finish(server, log) == 0, log.read_text()
    finish_all(lights)
    printed, _ = script.communicate(timeout=60)
    assert script.returncode == 0, script_log.read_text()
    final = CheckpointStore(out / "checkpoint").load()
    assert final is not None and final.round == 1
    yield {
        "history": json.loads((out / "history.json").read_text()),
        "script": json.loads(printed.strip().splitlines()[-1]),
        "start": list(initial.weights),
        "final": list(final.weights),
    }


def test_the_script_api_sends_its_timings_under_secure_aggregation_as_fl_client_does(
    secure_dp_run: dict[str, Any],
) -> None:
    """Under secure aggregation an update carries timings only (fl-client sends train_seconds):
    the script API sends the timings among the script's metrics, not nothing."""
    (record,) = secure_dp_run["history"]["rounds"]
    sent = {c["client_id"]: dict(c["metrics"]) for c in record["clients"]}
    assert sent == {1: {}, 2: {}, 3: {"train_seconds": 1.25}}


def test_every_kind_of_client_clips_its_update_to_the_runs_dp_clip(secure_dp_run: dict[str, Any]) -> None:
    start_weights, final = secure_dp_run["start"], secure_dp_run["final"]
    clipped = []
    for client in (1, 2, 3):
        sent = light.light_update(start_weights, client, 1)
        change = [u.astype(np.float64) - g for u, g in zip(sent, start_weights, strict=True)]
        norm = float(np.sqrt(sum(float((c**2).sum()) for c in change)))
        assert norm > 1  # so clipping matters
        clipped.append([c / norm for c in change])
    for index, got in enumerate(final):
        want = start_weights[index] + sum(c[index] for c in clipped) / 3
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_the_script_api_does_not_load_fl_clients_module(secure_dp_run: dict[str, Any]) -> None:
    """The script API and fl-client share the session, not one another's private helpers: a
    script under the run's DP does not import fedgrpc.client.app (fl-client's driver)."""
    script = secure_dp_run["script"]
    assert script["rounds"] == 1
    assert "fedgrpc.client.app" not in script["loaded"], script["loaded"]


# -- when a light client shares its keys: before its update is made, as fl-client does -----------


def test_light_clients_share_their_keys_before_they_make_their_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full client advertises its keys and sends its shares before training, so that they are
    ready when training ends. A light client does the same: its update is made only once the
    server has closed the key stage (until every client has advertised, it is at "advertise")."""
    run = RunSpec(num_clients=3, rounds=1, secagg=SecAggSpec(max_examples=1000))
    weights = [np.full(50, 0.5, np.float32), np.linspace(-1, 1, 7, dtype=np.float32)]
    specs = [TensorSpec(f"t{i}", "float32", w.shape) for i, w in enumerate(weights)]
    coordinator = RoundCoordinator(run, specs, SecAggStrategy(FedAvg()), secagg_timeout_s=20)
    stages: list[tuple[int, str]] = []  # (client, the server's secure stage when its update was made)
    real_update = light.light_update

    def observed(weights: Sequence[np.ndarray], client_id: int, round_number: int) -> list[np.ndarray]:
        secure = coordinator.secure_round
        stages.append((client_id, secure.stage if secure is not None else "none"))
        return real_update(weights, client_id, round_number)

    monkeypatch.setattr(light, "light_update", observed)
    with serving(coordinator) as endpoint:
        target = f"127.0.0.1:{endpoint.port}"
        threads = [
            threading.Thread(
                target=light.run_light_client, args=(target, c), kwargs={"connect_timeout_s": 20}, daemon=True
            )
            for c in (1, 2, 3)
        ]
        for thread in threads:
            thread.start()
        try:
            assert coordinator.wait_ready(3, 20)
            coordinator.open_round(1, weights)
            secure = coordinator.secure_round
            assert secure is not None
            assert secure.run_key_stages(20, lambda: False)
            assert coordinator.wait_for_updates(3, 20)
            while coordinator.fold_queue_depth:
                time.sleep(0.01)
            scale = secure.scale
            outcome = coordinator.close_round()
            coordinator.finish()
            for thread in threads:
                thread.join(30)
        finally:
            coordinator.interrupt()
    assert sorted(c for c, _ in stages) == [1, 2, 3]
    assert all(stage != "advertise" for _, stage in stages), stages
    assert sorted(u.client_id for u in outcome.updates) == [1, 2, 3]
    total = sum(light_examples(c) for c in (1, 2, 3))
    for index, g in enumerate(weights):
        changes = [real_update(weights, c, 1)[index].astype(np.float64) - g for c in (1, 2, 3)]
        want = g + sum(light_examples(c) * ch for c, ch in zip((1, 2, 3), changes, strict=True)) / total
        np.testing.assert_allclose(outcome.weights[index], want, rtol=0, atol=3 * 0.5 / scale / total + 1e-7)


# -- the exchange's steps, composed -------------------------------------------------------------


def test_a_runs_steps_compose_around_the_exchange_in_order() -> None:
    """The run's DP clip, then compression, then the connection's submit: the update that reaches
    the end of the chain is clipped and marked for compression, whatever the driver."""
    from fedgrpc.client.connection import Connection
    from fedgrpc.client.link import BlockingLink, run_blocking
    from fedgrpc.client.steps import (
        ClipToRun,
        Compress,
        LocalDP,
        LocalPrivacy,
        SecureAggregation,
        Update,
        chain,
        exchange_steps,
    )

    with Connection("127.0.0.1:1", 1) as connection:  # never dialled: the chain ends before it
        link = BlockingLink(connection)
        plain = RunSpec(num_clients=2, dp_clip=1.0, compression="int8")
        steps = exchange_steps(link, plain)
        assert [type(s) for s in steps] == [ClipToRun, Compress]
        secure = RunSpec(num_clients=3, secagg=SecAggSpec(max_examples=1000))
        local = LocalDP(clip=2.0, noise_multiplier=1.0)
        kinds = [type(s) for s in exchange_steps(link, secure, local_dp=local)]
        assert kinds == [LocalPrivacy, SecureAggregation]
    reached: list[Update] = []

    async def end(update: Update) -> tuple[int, int]:
        reached.append(update)
        return 1, 2

    reference = [np.zeros(4, np.float32)]
    specs = (TensorSpec("t0", "float32", (4,)),)
    update = Update(1, specs, [np.full(4, 3.0, np.float32)], 10, {}, reference)
    assert run_blocking(chain(steps, end)(update)) == (1, 2)
    (sent,) = reached
    assert sent.compression == "int8"
    assert float(np.linalg.norm(sent.weights[0])) == pytest.approx(1.0, rel=1e-6)


def test_a_blocking_session_that_would_suspend_says_so() -> None:
    import asyncio

    from fedgrpc.client.link import run_blocking

    async def needs_a_loop() -> None:
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="needs an event loop"):
        run_blocking(needs_a_loop())
