"""--mode fedbuff (fedgrpc.server.buffered): staleness weights against their definitions, a
buffer's aggregate against its definition, refusals over the real gRPC surface, and real
server processes with script clients on 127.0.0.1 (a slow client, a kill -9 and a resume)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedgrpc.client.connection import Connection
from fedgrpc.common import wire
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec, SecAggSpec
from fedgrpc.common.errors import ConfigError, StaleRoundError, UpdateRejectedError
from fedgrpc.common.privacy import l2_norm
from fedgrpc.common.processes import free_port
from fedgrpc.common.protocol import Instruction
from fedgrpc.server.cli import config_from, parse_args
from fedgrpc.server.config import FedBuffSettings, ServerConfig
from fedgrpc.server.fedopt import FedAdam
from fedgrpc.server.limits import Limits
from fedgrpc.server.monitor import Monitor
from fedgrpc.server.results import RoundRecord
from fedgrpc.server.rounds import RoundCoordinator, UpdateHeader
from fedgrpc.server.staleness import StalenessWeight
from fedgrpc.server.strategies import MeanStrategy
from fedgrpc.server.strategy import CentralDP, FedAvg, StrategySettings
from fedgrpc.v1 import coordinator_pb2 as pb
from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc
from helpers import ENV, finish, serving, start, wait_for_line

SPECS = [TensorSpec("w", "float32", (3,))]
TINY_TASK = Path(__file__).resolve().parents[1] / "bench" / "tasks" / "tiny.py"
SCRIPT = Path(__file__).resolve().parent / "slow_script_client.py"


# -- the weights -----------------------------------------------------------------------------


def test_staleness_weights_are_the_papers_formulas() -> None:
    for s in range(0, 40):
        assert StalenessWeight()(s) == pytest.approx(1 / math.sqrt(1 + s), rel=1e-15)  # the default
        assert StalenessWeight("constant")(s) == 1.0
        assert StalenessWeight("polynomial", a=0.5)(s) == pytest.approx(1 / math.sqrt(1 + s), rel=1e-15)
        assert StalenessWeight("polynomial", a=1.7)(s) == pytest.approx((1 + s) ** -1.7, rel=1e-15)
        hinge = 1.0 if s <= 3 else 1 / (1 + 0.25 * (s - 3))
        assert StalenessWeight("hinge", a=0.25, b=3)(s) == pytest.approx(hinge, rel=1e-15)
    with pytest.raises(ConfigError, match="unknown --staleness-weight 'cubic'"):
        StalenessWeight("cubic")


# -- one buffer, in process ------------------------------------------------------------------


def buffered(strategy: MeanStrategy, *, clients: int = 3, **settings: int) -> RoundCoordinator:
    coordinator = RoundCoordinator(
        RunSpec(rounds=10, num_clients=clients),
        SPECS,
        strategy,
        max_examples=1000,
        fedbuff=FedBuffSettings(**settings),  # type: ignore[arg-type]
    )
    for client in range(1, clients + 1):
        coordinator.next_task(client, after_round=0, timeout=0)
    assert coordinator.wait_ready(clients, timeout=0)
    return coordinator


def submit(c: RoundCoordinator, client: int, trained_from: int, value: list[float], n: int) -> None:
    c.admit(UpdateHeader(client, trained_from, n, SPECS))
    c.submit(client, trained_from, n, {}, [np.array(value, np.float32)], wire_bytes=12)


def test_a_buffer_aggregates_the_staleness_weighted_mean_of_changes() -> None:
    """x_{v+1} = x_v + sum n_i w(s_i) (y_i - x_{r_i}) / sum n_i, each change against the version
    its client trained from."""
    c = buffered(FedAvg(), buffer_size=2, max_staleness=5)
    versions = {1: np.array([0.0, 1.0, 2.0])}
    c.open_round(1, [versions[1].astype(np.float32)])
    assert c.next_task(3, after_round=0, timeout=0).round == 1  # client 3 trains from version 1 ...
    submit(c, 1, 1, [1.0, 1.0, 1.0], 10)
    submit(c, 2, 1, [0.0, 3.0, 2.0], 30)
    assert c.wait_for_updates(2, timeout=0)
    versions[2] = np.asarray(c.close_round().weights[0], np.float64)
    c.open_round(2, [versions[2].astype(np.float32)])
    submit(c, 1, 2, [5.0, 5.0, 5.0], 10)
    submit(c, 3, 1, [4.0, -2.0, 0.5], 20)  # ... and sends it one version late
    got = c.close_round()
    w = 1 / math.sqrt(2)
    expected = (
        versions[2] + (10 * (5.0 - versions[2]) + 20 * w * (np.array([4.0, -2.0, 0.5]) - versions[1])) / 30
    )
    np.testing.assert_allclose(got.weights[0], expected, rtol=1e-6)
    assert {u.client_id: u.staleness for u in got.updates} == {1: 0, 3: 1}


def test_fedadam_steps_on_the_buffers_weighted_mean_change() -> None:
    """As in the paper: the server optimizer's pseudo-gradient is the buffer's weighted mean."""
    c = buffered(FedAdam(server_lr=0.1), buffer_size=2)
    start = np.array([0.0, 1.0, 2.0], np.float32)
    c.open_round(1, [start])
    c.next_task(3, after_round=0, timeout=0)
    submit(c, 1, 1, [1.0, 1.0, 1.0], 10)
    submit(c, 2, 1, [1.0, 1.0, 1.0], 10)
    second = np.asarray(c.close_round().weights[0])
    c.open_round(2, [second])
    submit(c, 1, 2, [2.0, 0.0, 1.0], 10)
    submit(c, 3, 1, [3.0, 3.0, -1.0], 30)  # one version stale
    got = c.close_round().weights[0]
    x1, x2 = start.astype(np.float64), second.astype(np.float64)
    m, v = np.zeros(3), np.full(3, 1e-6)  # beta1 0.9, beta2 0.99, tau 1e-3: m 0, v tau^2 at first

    def adam(x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        nonlocal m, v
        m, v = 0.9 * m + 0.1 * delta, 0.99 * v + 0.01 * delta**2
        return x + 0.1 * m / (np.sqrt(v) + 1e-3)

    np.testing.assert_allclose(second, adam(x1, np.array([1.0, 0.0, -1.0])), rtol=1e-5)
    fresh, stale = np.array([2.0, 0.0, 1.0]) - x2, np.array([3.0, 3.0, -1.0]) - x1
    expected = adam(x2, (10 * fresh + 30 / math.sqrt(2) * stale) / 40)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_under_dp_each_change_is_clipped_then_weighted() -> None:
    """The staleness weight cannot raise the sensitivity: clip to C first, then scale by w(s) <= 1."""
    dp = CentralDP(clip=1.0, noise_multiplier=0.0, expected_updates=2)
    c = buffered(FedAvg(dp), buffer_size=2)
    start = np.zeros(3, np.float32)
    c.open_round(1, [start])
    c.next_task(2, after_round=0, timeout=0)
    submit(c, 1, 1, [3.0, 4.0, 0.0], 10)  # norm 5: clipped to 1
    c.close_round()
    c.open_round(2, [np.zeros(3, np.float32)])
    submit(c, 2, 1, [0.0, 0.0, 10.0], 10)  # norm 10, one version stale
    submit(c, 1, 2, [0.0, 0.3, 0.0], 10)  # within the clip
    got = c.close_round().weights[0]
    expected = (np.array([0.0, 0.0, 1.0]) / math.sqrt(2) + np.array([0.0, 0.3, 0.0])) / 2
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert l2_norm([got * 2]) <= 1.0 / math.sqrt(2) + 0.3 + 1e-6


def test_who_trains_concurrency_and_one_update_per_buffer() -> None:
    c = buffered(FedAvg(), clients=3, concurrency=2, buffer_size=2)
    c.open_round(1, [np.zeros(3, np.float32)])
    assert c.next_task(1, after_round=0, timeout=0).instruction is Instruction.TRAIN
    assert c.next_task(2, after_round=0, timeout=0).instruction is Instruction.TRAIN
    assert c.next_task(3, after_round=0, timeout=0).instruction is Instruction.WAIT  # 2 slots taken
    submit(c, 1, 1, [1.0, 1.0, 1.0], 10)  # its slot is free again ...
    assert c.next_task(3, after_round=0, timeout=0).instruction is Instruction.TRAIN
    assert c.next_task(1, after_round=1, timeout=0).instruction is Instruction.WAIT  # ... and it waits for v2
    with pytest.raises(UpdateRejectedError, match="already submitted") as retried:
        submit(c, 1, 1, [1.0, 1.0, 1.0], 10)  # a retry of the same update
    assert retried.value.code == "ALREADY_EXISTS"


def test_flags_that_cannot_go_with_fedbuff_are_refused_at_start() -> None:
    run = RunSpec(num_clients=4)
    with pytest.raises(ConfigError, match="cannot run under --secagg"):
        ServerConfig(run=run, secagg=SecAggSpec(), fedbuff=FedBuffSettings())
    with pytest.raises(ConfigError, match="--strategy median cannot take it"):
        ServerConfig(run=run, strategy=StrategySettings("median"), fedbuff=FedBuffSettings())
    with pytest.raises(ConfigError, match="--buffer-size 3 is more than the 2 clients"):
        ServerConfig(run=run, fedbuff=FedBuffSettings(concurrency=2, buffer_size=3))
    with pytest.raises(ConfigError, match="belong to --mode fedbuff"):
        config_from(*parse_args(["--insecure", "--buffer-size", "2"]))
    config = config_from(
        *parse_args(["--insecure", "--mode", "fedbuff", "--clients", "4", "--concurrency", "3"])
    )
    assert config.fedbuff is not None and config.fedbuff.buffer(4) == 2  # half of C, rounded up


# -- refused over the wire -------------------------------------------------------------------


def test_an_update_past_max_staleness_is_refused_failed_precondition() -> None:
    c = buffered(FedAvg(), clients=2, buffer_size=1, max_staleness=2)
    weights = [np.zeros(3, np.float32)]
    c.open_round(1, weights)
    with serving(c, limits=Limits(max_wait_s=2)) as endpoint:
        target = f"127.0.0.1:{endpoint.port}"
        with Connection(target, 1, connect_timeout_s=10) as one:
            for version in (1, 2, 3):  # client 1 makes versions 2, 3, 4 alone
                assert one.next_task(after_round=version - 1, max_wait_s=5).round == version
                one.submit(version, tuple(SPECS), [np.full(3, version, np.float32)], 10, {})
                assert c.wait_for_updates(1, timeout=5)
                c.open_round(version + 1, c.close_round().weights)
        # client 2 trained from version 1: 3 versions stale at version 4
        messages = wire.update_stream(
            client_id=2, round_number=1, num_examples=10, metrics={}, specs=tuple(SPECS), arrays=weights
        )
        stream = [m if isinstance(m, pb.UpdateMessage) else pb.UpdateMessage.FromString(m) for m in messages]
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.CoordinatorStub(channel).SubmitUpdate(iter(stream), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "trained from version 1 is 3 versions stale, more than --max-staleness 2" in (
        info.value.details() or ""
    )
    with pytest.raises(StaleRoundError, match="is 3 versions stale"):  # the same check in process
        c.admit(UpdateHeader(2, 1, 10, SPECS))
    c.admit(UpdateHeader(2, 2, 10, SPECS))  # 2 versions stale: taken


# -- real server processes -------------------------------------------------------------------


def fedbuff_server(port: int, out: Path, *extra: str, rounds: int = 6, clients: int = 3) -> list[str]:
    return [
        "fl-server", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--task", str(TINY_TASK),
        "--rounds", str(rounds), "--clients", str(clients), "--out", str(out), "--threads", "1",
        "--eval-every", "0", "--mode", "fedbuff", *extra,
    ]  # fmt: skip


def script_client(port: int, client_id: int, delay: float, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--server",
            f"127.0.0.1:{port}",
            "--id",
            str(client_id),
            "--delay",
            str(delay),
        ],
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        env=ENV,
    )


def versions_of(process: subprocess.Popen[bytes]) -> list[int]:
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0
    return list(json.loads(out.decode().strip().splitlines()[-1])["versions"])


def history(out: Path) -> list[dict[str, object]]:
    document = json.loads((out / "history.json").read_text())
    assert document["finished"] is True
    return list(document["rounds"])


def test_a_slow_client_does_not_hold_back_the_versions(tmp_path: Path) -> None:
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    server = start(*fedbuff_server(port, out, "--buffer-size", "2", "--finish-grace", "1"), log=log)
    fast = [script_client(port, k, 0.1, tmp_path / f"client-{k}.log") for k in (1, 2)]
    slow = script_client(port, 3, 60.0, tmp_path / "client-3.log")  # longer than the whole run
    try:
        assert finish(server, log, timeout=50) == 0, log.read_text()
    finally:
        slow.kill()
    rounds = history(out)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert all(r["staleness"] == {"1": 0, "2": 0} for r in rounds)
    assert [versions_of(p) for p in fast] == [[1, 2, 3, 4, 5, 6]] * 2
    assert "version 6/6" in log.read_text()


def test_a_killed_fedbuff_server_resumes_exactly(tmp_path: Path) -> None:
    """Deterministic: two clients, a buffer of both, updates a function of (weights, id, version).
    Killed mid-run, the restarted server drops its buffer and the clients train those versions
    again: the final weights are those of a run never interrupted (both runs go side by side)."""
    runs = {}
    for name in ("whole", "killed"):
        port, out, log = free_port(), tmp_path / f"out-{name}", tmp_path / f"server-{name}.log"
        command = fedbuff_server(port, out, "--buffer-size", "2", rounds=12, clients=2)
        clients = [script_client(port, k, 0.15, tmp_path / f"client-{k}-{name}.log") for k in (1, 2)]
        runs[name] = (command, out, log, start(*command, log=log), clients)
    command, _, log, server, _ = runs["killed"]
    wait_for_line(log, "version 4/12", process=server)
    server.kill()  # SIGKILL, with version 5 open and its buffer filling
    server.wait()
    restarted = start(*command, log=log)
    wait_for_line(log, "resuming run", process=restarted)
    runs["killed"] = (*runs["killed"][:3], restarted, runs["killed"][4])
    digests = []
    for _, out, log, server, clients in runs.values():
        assert finish(server, log) == 0, log.read_text()
        for client in clients:
            assert versions_of(client)[-1] == 12
        rounds = history(out)
        assert [r["round"] for r in rounds] == list(range(1, 13))
        digests.append(rounds[-1]["end_digest"])
    assert digests[0] == digests[1]


# -- what a run shows ------------------------------------------------------------------------


def test_the_dashboard_draws_a_version_line_with_each_updates_staleness() -> None:
    record = RoundRecord(round=1, seconds=1.0, bytes_in=1, bytes_out=1, staleness={"1": 0, "3": 2})
    monitor = Monitor(RunSpec(num_clients=3), mode="fedbuff")
    monitor.round_recorded(asdict(record), "accuracy")
    snapshot = monitor.snapshot()
    assert snapshot["run"]["mode"] == "fedbuff" and snapshot["rounds"][0]["staleness"] == [0, 2]
    app = resources.files("fedgrpc.server").joinpath("web", "app.js").read_text()
    assert 'run.mode === "fedbuff" ? "version" : "round"' in app
    synchronous = Monitor(RunSpec(num_clients=3))
    synchronous.round_recorded(asdict(replace(record, staleness=None)), "accuracy")
    assert "staleness" not in synchronous.snapshot()["rounds"][0]  # a synchronous run's stays as it was
    assert "staleness" not in replace(record, staleness=None).to_dict()
    assert record.to_dict()["staleness"] == {"1": 0, "3": 2}
