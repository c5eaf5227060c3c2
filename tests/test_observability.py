"""Watching a real run: the dashboard in a real browser, /metrics, TensorBoard, reflection, JSON logs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from fedgrpc.client.connection import Connection
from fedgrpc.common.processes import free_port
from fedgrpc.common.protocol import Instruction
from helpers import finish, finish_all, server_command, start, start_clients, wait_for_line

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
XSS = "<img src=x onerror=document.title='pwned'>"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"


def wait_until(condition: Any, bound_s: float = 60.0) -> None:
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {bound_s} s"
        time.sleep(0.05)


def until_closed(connection: socket.socket, received: bytearray | None = None, bound_s: float = 60.0) -> bool:
    """Read what the server still sends (into `received`) until it closes the connection (True),
    or the bound passes."""
    connection.settimeout(bound_s)
    try:
        while data := connection.recv(65536):
            if received is not None:
                received += data
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass  # closed, with unread data dropped
    return True


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.headers.get("Content-Type", ""), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def hostile_metric(port: int, client_id: int) -> None:
    """A member of the run whose update carries a metric named like markup: refused, and shown."""
    with Connection(f"127.0.0.1:{port}", client_id, connect_timeout_s=60) as connection:
        while True:
            task = connection.next_task(0, max_wait_s=5)
            if task.instruction is Instruction.TRAIN:
                break
        from fedgrpc.common import wire
        from fedgrpc.v1 import coordinator_pb2 as pb
        from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc

        stream = list(
            wire.update_stream(
                client_id=client_id, round_number=task.round, num_examples=5, metrics={},
                specs=task.specs, arrays=task.weights,
            )
        )  # fmt: skip
        messages = [m if isinstance(m, pb.UpdateMessage) else pb.UpdateMessage.FromString(m) for m in stream]
        messages[0].header.metrics[XSS] = 1.0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.CoordinatorStub(channel).SubmitUpdate(iter(messages), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="no chromium (apt-get install chromium)"
)
def test_the_dashboard_shows_a_live_run_in_a_real_browser(tmp_path: Path) -> None:
    """Three clients train for real; a fourth first sends an update with a metric named like
    markup (refused, and shown as text), then goes on as a light client. Meanwhile 200 HTTP
    connections are opened and never send a byte. The page is watched in Debian's chromium."""
    from conftest import write_synthetic
    from playwright.sync_api import sync_playwright
    from prometheus_client.parser import text_string_to_metric_families

    assert CHROMIUM is not None, "CI installs chromium (.ci/run)"
    data = write_synthetic(tmp_path / "data.npz", train=1200, test=300)
    port, http, out, log = free_port(), free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = (
        *("--http", str(http), "--tensorboard", str(tmp_path / "tb")),
        *("--eval-every", "1", "--personalize-epochs", "1"),  # central, federated and personalized curves
        *("--linger", "300"),  # the page and /metrics stay up after the run: a last scrape
    )
    server = start(*server_command(port, data, out, rounds=6, clients=4, extra=extra), log=log)
    wait_for_line(log, f"dashboard on http://127.0.0.1:{http}/", process=server)
    idle = [socket.create_connection(("127.0.0.1", http)) for _ in range(200)]  # slow clients: never send
    clients = start_clients(port, data, tmp_path, ids=(1, 2, 3))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            for connection in idle[:150]:  # make room: past its connection limit the server answers 503
                connection.close()
            page.goto(f"http://127.0.0.1:{http}/")
            page.wait_for_selector("#live.on", timeout=60_000)
            hostile_metric(port, 4)
            clients += start_clients(port, data, tmp_path, ids=(4,), extra=("--insecure", "--light"))
            seen, scraped = set(), b""
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and "finished" not in seen:
                seen.add(page.text_content("#round") or "")
                seen.add(page.text_content("#phase") or "")
                if "3 / 6" in seen and not scraped:  # Prometheus scrapes a run in progress
                    status, content_type, scraped = get(http, "/metrics")
                    assert status == 200 and content_type.startswith("text/plain")
                time.sleep(0.2)
            assert {"1 / 6", "3 / 6", "6 / 6", "finished"} <= seen, (
                seen
            )  # the run advanced on the page itself
            assert XSS in (page.text_content("#refusals tbody") or "")  # shown as text ...
            assert page.query_selector("#refusals img") is None  # ... never as markup
            assert page.title() == "fedgrpc dashboard"
            assert page.query_selector_all(".client-row .strip span")  # the round timeline strips
            assert "strategy fedavg" in (page.text_content("#run") or "")
            assert "personalized" in (page.text_content("#chart-loss .u-legend") or "")
            assert page.text_content("#bytes-title") == "Bytes per round (MB)"
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            if os.environ.get("FEDGRPC_UPDATE_SCREENSHOT"):
                shutil.copy(tmp_path / "dashboard.png", SCREENSHOT)
            finish_all(clients)
            wait_for_line(log, "stay up 300 s more (--linger)", process=server)
            status, _, final = get(http, "/metrics")  # the run is over: the last scrape still answers
            assert status == 200 and b"fedgrpc_rounds_completed_total 6.0" in final
            server.send_signal(signal.SIGTERM)  # ends the linger, with the page still open
            assert finish(server, log) == 0, log.read_text()
            page.wait_for_selector("#live.off", timeout=60_000)
            browser.close()
        families = {f.name: f for f in text_string_to_metric_families(scraped.decode())}
        for name in (
            "fedgrpc_rounds_completed", "fedgrpc_round_duration_seconds", "fedgrpc_received_bytes",
            "fedgrpc_sent_bytes", "fedgrpc_updates_accepted", "fedgrpc_refusals", "fedgrpc_clients_connected",
            "fedgrpc_inflight_bytes", "fedgrpc_fold_queue_depth", "process_resident_memory_bytes",
        ):  # fmt: skip
            assert name in families, sorted(families)
        samples = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
        assert samples["fedgrpc_rounds_completed_total"] >= 2 and samples["fedgrpc_round"] >= 3
        refused = {s.labels.get("code"): s.value for s in families["fedgrpc_refusals"].samples}
        assert refused.get("INVALID_ARGUMENT", 0) >= 1
        for complaint in ("Task was destroyed", "Event loop is closed", "Traceback"):
            assert complaint not in log.read_text(), log.read_text()
    finally:
        for connection in idle:
            connection.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    check_tensorboard(tmp_path / "tb")


def check_tensorboard(logdir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = events.Tags()["scalars"]
    want = {"central/accuracy", "federated/personalized_accuracy", "round/seconds", "clients/1/train/loss"}
    assert want | {"clients/2/evaluate/accuracy"} <= set(tags), sorted(tags)
    assert [e.step for e in events.Scalars("central/accuracy")][:2] == [1, 2]


def test_the_http_server_refuses_what_it_does_not_serve(tmp_path: Path) -> None:
    from fedgrpc.common.config import RunSpec
    from fedgrpc.server.http import HEAD_TIMEOUT_S, DashboardServer, HttpConfig
    from fedgrpc.server.monitor import Monitor

    monitor = Monitor(RunSpec())
    server = DashboardServer(monitor, HttpConfig(port=0, max_connections=5))
    port = server.start()
    try:
        assert get(port, "/healthz")[0] == 200
        assert get(port, "/static/../../../etc/passwd")[0] == 404
        assert get(port, "/nope")[0] == 404
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/state", method="POST", data=b"x")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 405
        with socket.create_connection(("127.0.0.1", port)) as big:
            big.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 9000)
            assert big.recv(100).startswith(b"HTTP/1.1 431")
        with socket.create_connection(("127.0.0.1", port), timeout=20 * HEAD_TIMEOUT_S) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\n")  # and never the rest of the head
            assert slow.recv(100).startswith(b"HTTP/1.1 408")  # answered, not left hanging
            assert until_closed(slow)
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        wait_until(lambda: server.open_connections == 5)
        extra = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(50)]
        for connection in extra:  # turned away: answered, and closed at once, not left open
            assert connection.recv(100).startswith(b"HTTP/1.1 503")
            assert until_closed(connection)
            connection.close()
        assert server.turned_away == 50 and server.open_connections == 5
        for connection in held:
            connection.close()
        headers = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).headers
        assert (
            "script-src 'self'" in headers["Content-Security-Policy"]
            and headers["X-Content-Type-Options"] == "nosniff"
        )
    finally:
        server.stop()


def test_event_streams_end_cleanly_when_the_dashboard_stops(caplog: pytest.LogCaptureFixture) -> None:
    """Before: a page left open at the end kept its stream's task pending on a loop that was
    stopped, never closed: 'Task was destroyed but it is pending!' and 'Event loop is closed' at
    exit, and the browser's connection was never closed."""
    import gc

    from fedgrpc.common.config import RunSpec
    from fedgrpc.server.http import DashboardServer, HttpConfig
    from fedgrpc.server.monitor import Monitor
    from fedgrpc.server.phases import Phase, PhaseChange

    monitor = Monitor(RunSpec())
    server = DashboardServer(monitor, HttpConfig(port=0))
    port = server.start()
    streams = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(3)]
    for stream in streams:
        stream.sendall(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert stream.recv(65536).startswith(b"HTTP/1.1 200")
    wait_until(lambda: server.open_connections == 3)
    monitor.phase(PhaseChange(Phase.FINISHED, 10))
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        server.stop()
        for stream in streams:
            assert until_closed(stream, received := bytearray())  # the last state, then the end
            assert b'"phase":"finished"' in received
            stream.close()
        gc.collect()
    complaints = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not complaints, complaints


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="no chromium (apt-get install chromium)"
)
def test_every_client_string_is_shown_as_text(tmp_path: Path) -> None:
    """Markup in every string a peer or a task can put on the dashboard: refusal fields, client
    addresses, metric names (central, federated, the main metric), the task's and the
    strategy's names. Shown literally; no element is made of it; no script runs."""
    from fedgrpc.common.config import RunSpec, TaskRef
    from fedgrpc.server.http import DashboardServer, HttpConfig
    from fedgrpc.server.monitor import Monitor
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "CI installs chromium (.ci/run)"

    hostile = {tag: f"<{tag} id=injected-{tag} src=x onerror=\"document.title='pwned'\">{tag}" for tag in (
        "img", "b", "script", "svg", "iframe", "a", "style", "input",
    )}  # fmt: skip
    run = RunSpec(task=TaskRef(name=hostile["b"]), rounds=4)
    monitor = Monitor(run, strategy={"name": hostile["svg"], hostile["a"]: 0.5})
    monitor.client_joined(1, hostile["img"])
    monitor.task_started(1, 1, "download")
    monitor.task_sent(1, 1, 9000)
    monitor.refused(hostile["iframe"], hostile["script"], hostile["style"], hostile["input"], 1)
    metrics = {
        hostile["img"]: 0.5,
        "loss": 1.0,
        f"personalized_{hostile['img']}": 0.6,
        "personalized_loss": 0.9,
    }
    for number in (1, 2):
        record = {
            "round": number, "seconds": 1.5, "bytes_in": 9000 + number, "bytes_out": 9500,
            "clients": [{"client_id": 1, "num_examples": 5, "metrics": {}}],
            "central": {hostile["img"]: 0.4, "loss": 1.2},
            "federated": {"metrics": metrics},
        }  # fmt: skip
        monitor.round_recorded(record, hostile["img"])
    server = DashboardServer(monitor, HttpConfig(port=0))
    port = server.start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#live.on", timeout=60_000)
            page.wait_for_function("document.querySelector('#refusals tbody tr') !== null", timeout=60_000)
            text = page.text_content("body") or ""
            for tag, markup in hostile.items():
                assert page.query_selector(f"#injected-{tag}") is None, tag  # no element made of it
                assert markup in text, tag  # ... and shown as it is
            assert page.title() == "fedgrpc dashboard" and not errors, errors
            assert (
                page.text_content("#metric-title") == f"{hostile['img']} by round"
            )  # the main metric's name
            assert page.text_content("#main-label") == hostile["img"]
            assert page.text_content("#bytes-title") == "Bytes per round (KB)"  # 9 KB, not 0.009 MB
            header = page.text_content("#run") or ""
            assert f"strategy {hostile['svg']} ({hostile['a']} 0.5)" in header
            loss_legend = page.text_content("#chart-loss .u-legend") or ""
            assert "personalized" in loss_legend  # the personalized loss curve
            page.screenshot(path=str(tmp_path / "hostile.png"), full_page=True)
            browser.close()
    finally:
        server.stop()


def test_refusals_of_two_clients_from_one_host_both_show(tmp_path: Path, synthetic_npz: Path) -> None:
    """Before: refusals were rate-limited per address, so a second client refused from the same
    host within a minute never reached the log. Now per address and client, with the rest counted
    and summed up when the run ends."""
    from fedgrpc.v1 import coordinator_pb2 as pb
    from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc

    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=2), log=log)
    wait_for_line(log, "listening on port", process=server)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for client_id in (1, 2, 1, 2, 2):
            with pytest.raises(grpc.RpcError):  # no evaluation is open: refused
                stub.SubmitEvaluation(
                    pb.EvaluationReport(client_id=client_id, round=99, num_examples=1), timeout=30
                )
    clients = start_clients(port, synthetic_npz, tmp_path, ids=(1, 2), extra=("--insecure", "--light"))
    finish_all(clients)
    assert finish(server, log) == 0, log.read_text()
    lines = [line for line in log.read_text().splitlines() if "refused evaluation of client" in line]
    assert len(lines) == 2, lines
    assert "(client 1)" in lines[0] and "(client 2)" in lines[1], lines
    assert "refusals: 5 in all; 3 not logged one by one:" in log.read_text()


def test_the_log_and_history_say_what_the_run_does(tmp_path: Path, synthetic_npz: Path) -> None:
    """Before: the strategy appeared in neither the start-up log nor history.json, and a
    federated evaluation whose clients hold no held-out data (light clients report 0 examples,
    like a script without evaluate=) was announced, then every round said 'no evaluation'."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--strategy", "fedavgm", "--server-lr", "0.5", "--eval-every", "1")
    server = start(*server_command(port, synthetic_npz, out, rounds=2, clients=2, extra=extra), log=log)
    clients = start_clients(port, synthetic_npz, tmp_path, ids=(1, 2), extra=("--insecure", "--light"))
    finish_all(clients)
    assert finish(server, log) == 0, log.read_text()
    text = log.read_text()
    assert "strategy: fedavgm (server_lr 0.5, momentum 0.9)" in text
    history = json.loads((out / "history.json").read_text())
    assert history["run"]["strategy"] == {"name": "fedavgm", "server_lr": 0.5, "momentum": 0.9}
    assert "federated, all clients every round, by those that hold held-out data" in text
    rounds = [line for line in text.splitlines() if " round 1/2 " in line or " round 2/2 " in line]
    assert len(rounds) == 2 and all("fed: none of 2 clients had held-out data" in line for line in rounds), (
        rounds
    )
    assert text.count("none of the 2 clients asked to evaluate holds held-out data") == 1  # said once


def test_reflection_lists_and_describes_the_services(tmp_path: Path, synthetic_npz: Path) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    port, log = free_port(), tmp_path / "server.log"
    server = start(*server_command(port, synthetic_npz, tmp_path / "out", rounds=1, clients=1), log=log)
    try:
        wait_for_line(log, "listening on port", process=server)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            assert {"fedgrpc.v1.Coordinator", "grpc.health.v1.Health"} <= services
            coordinator = DescriptorPool(database).FindServiceByName("fedgrpc.v1.Coordinator")
            assert {m.name for m in coordinator.methods} == {
                "Join",
                "GetGlobalWeights",
                "SubmitUpdate",
                "SubmitEvaluation",
                "Withdraw",
                *("AdvertiseKeys", "GetSecAggStage", "ShareKeys", "RevealShares"),  # secure aggregation
            }
    finally:
        server.kill()


def test_json_logs_carry_the_same_events(tmp_path: Path, synthetic_npz: Path) -> None:
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--log-format", "json")
    server = start(*server_command(port, synthetic_npz, out, rounds=2, clients=2, extra=extra), log=log)
    clients = start_clients(
        port, synthetic_npz, tmp_path, ids=(1, 2), extra=("--insecure", "--light", "--log-format", "json")
    )
    finish_all(clients)
    assert finish(server, log) == 0, log.read_text()
    events: list[dict[str, Any]] = []
    for path in (log, tmp_path / "client-1.log"):
        ours = [line for line in path.read_text().splitlines() if line.startswith("{")]
        assert ours, path.read_text()
        events += [json.loads(line) for line in ours]
    assert all(set(e) >= {"time", "level", "role", "logger", "message"} for e in events)
    messages = [e["message"] for e in events if e["role"] == "server"]
    assert any(m.startswith("round 2/2  acc") for m in messages)
    assert any(e["role"] == "client 1" and "light client: 2 rounds submitted" in e["message"] for e in events)


def test_the_grafana_dashboard_asks_only_for_metrics_the_server_exports() -> None:
    import re

    from fedgrpc.common.codec import TensorSpec
    from fedgrpc.common.config import RunSpec
    from fedgrpc.server.rounds import RoundCoordinator
    from fedgrpc.server.strategy import FedAvg
    from helpers import serving
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    dashboard = json.loads(
        (
            SCREENSHOT.parents[1] / "docker" / "monitoring" / "grafana" / "dashboards" / "fedgrpc.json"
        ).read_text()
    )
    asked = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(?:fedgrpc|process)_[a-z_]+", target["expr"])
    }
    coordinator = RoundCoordinator(RunSpec(), [TensorSpec("w", "float32", (2,))], FedAvg())
    with serving(coordinator) as endpoint:
        text = generate_latest(endpoint.monitor.registry).decode()
    exported = set()
    for family in text_string_to_metric_families(text):  # labelled families have no samples yet
        exported |= {sample.name for sample in family.samples} | {family.name}
        if family.type == "counter":
            exported.add(family.name + "_total")
    assert asked and asked <= exported, asked - exported
