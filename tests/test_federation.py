"""A standing federation with real processes on 127.0.0.1: fl-provision's kits (an admin and
three sites), `fl-server --federation DIR` under mutual TLS, jobs submitted with fl-job, light
clients for each job; a coordinator killed with SIGKILL mid-job and started again; the admin
service refusing sites, strangers and hostile calls as the coordinator's service does."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from fedgrpc.client.admin_connection import AdminCallError, AdminConnection, JobView
from fedgrpc.client.channel import ChannelSecurity
from fedgrpc.common.processes import free_port
from fedgrpc.server.auth import hash_token
from fedgrpc.v1 import admin_pb2
from helpers import BIN, ENV, finish, finish_all, start, start_clients, wait_for_line
from test_provision import SITES, provisioned, start_kit

#: A task small enough that a round is a fraction of a second: the test is of the federation.
TINY_TASK = """
import keras
import numpy as np
from fedgrpc.common.task import LocalData, Task


def build_model(params):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64")


task = Task(
    name="tiny", build_model=build_model, load_data=lambda site: LocalData(train=_data(site.client_id)),
    load_test_data=lambda site: _data(99),
)
"""


def run_file(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def jobs_a_and_b(folder: Path, data: Path) -> tuple[Path, Path]:
    """Two jobs of different tasks: cifar10 on a synthetic set, and a task file of the admin's."""
    (folder / "tiny_task.py").write_text(TINY_TASK)
    a = run_file(folder, "cifar", f'[run]\nclients = 3\nrounds = 2\nbatch_size = 32\ndata = "{data}"\n')
    b = run_file(folder, "tiny", '[run]\ntask = "tiny_task.py"\nclients = 3\nrounds = 3\nbatch_size = 16\n')
    return a, b


def fl_job(kit: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The installed fl-job where this environment has it, else its module: a real process either way.
    program = (
        [str(BIN / "fl-job")]
        if (BIN / "fl-job").exists()
        else [sys.executable, "-m", "fedgrpc.client.job_cli"]
    )
    command = [*program, *args, "--kit", str(kit)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=60)


def admin(port: int, kit: Path) -> AdminConnection:
    security = ChannelSecurity(kit / "ca.crt", kit / "admin.crt", kit / "admin.key")
    return AdminConnection(f"localhost:{port}", security, timeout_s=10)


def wait_state(port: int, kit: Path, job_id: str, state: str, timeout: float = 120) -> JobView:
    deadline = time.monotonic() + timeout
    with admin(port, kit) as connection:
        while time.monotonic() < deadline:
            job = connection.job(job_id)
            if job.state == state:
                return job
            time.sleep(0.1)
    pytest.fail(f"{job_id} is {job.state}, not {state}, after {timeout} s")


def sites(out: Path, data: Path, logs: Path, tag: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """A light fl-client (one run) from each site's kit."""
    started = []
    for name in SITES.values():
        log = logs / f"{tag}-{name}.log"
        process = start_kit(
            out / "kits/sites" / name, "--light", "--data", str(data), "--threads", "1",
            "--connect-timeout", "90", log=log,
        )  # fmt: skip
        started.append((process, log))
    return started


def federation(out: Path, folder: Path, log: Path) -> subprocess.Popen[bytes]:
    server = start_kit(
        out / "kits/coordinator",
        "--federation",
        str(folder),
        "--host",
        "127.0.0.1",
        "--threads",
        "1",
        log=log,
    )
    wait_for_line(log, "listening on port", process=server)
    return server


def rounds_of(history: Path) -> list[object]:
    """Each round's central evaluation and each client's example count and training metrics
    (timings left out), rounded past float noise: updates are folded in the order they arrive,
    so the last bits of a sum may differ between two runs of the same settings."""

    def rounded(metrics: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 4) for k, v in metrics.items() if not k.endswith("_seconds")}

    rounds = json.loads(history.read_text())["rounds"]
    assert rounds, f"{history} records no round"
    return [
        (
            r["round"],
            rounded(r["central"] or {}),
            sorted((c["client_id"], c["num_examples"], rounded(c["metrics"])) for c in r["clients"]),
        )
        for r in rounds
    ]


def test_two_jobs_run_one_after_the_other_as_they_would_alone(tmp_path: Path, synthetic_npz: Path) -> None:
    port = free_port()
    out = provisioned(tmp_path, port)
    alice = out / "kits/admins/alice"
    a, b = jobs_a_and_b(tmp_path, synthetic_npz)
    server_log = tmp_path / "federation.log"
    server = federation(out, tmp_path / "fed", server_log)

    submitted = [fl_job(alice, "submit", str(path)) for path in (a, b)]
    assert [s.returncode for s in submitted] == [0, 0], [s.stderr for s in submitted]
    assert "job-1  queued" in submitted[0].stdout and "job-2  queued" in submitted[1].stdout
    for job_id, tag in (("job-1", "a"), ("job-2", "b")):
        wait_state(port, alice, job_id, "running")
        finish_all(sites(out, synthetic_npz, tmp_path, tag))
        assert wait_state(port, alice, job_id, "finished").rounds_done == (2 if tag == "a" else 3)
    listed = fl_job(alice, "ls")
    assert listed.returncode == 0 and listed.stdout.count("finished") == 2, listed.stdout
    assert "  tiny_task.py  " in listed.stdout.splitlines()[1], listed.stdout  # as the admin named it
    got = fl_job(alice, "download", "job-2", "--out", str(tmp_path / "job-2"))
    assert got.returncode == 0, got.stderr
    assert {"history.json", "curves.png", "final_model.keras", "server.log"} <= {
        p.name for p in (tmp_path / "job-2").iterdir()
    }
    logs = fl_job(alice, "logs", "job-1")
    assert "job-1 finished" in logs.stdout and "round 2/2" in logs.stdout
    assert json.loads((tmp_path / "fed/jobs/job-1/history.json").read_text())["run"]["run_id"] == "job-1"
    server.send_signal(signal.SIGTERM)
    assert finish(server, server_log, timeout=30) == 0

    # The same two runs, each alone in a one-run fl-server (both at once): the same rounds, to
    # the last digit.
    alone = []
    for path, job_id in ((a, "job-1"), (b, "job-2")):
        alone_port, folder = free_port(), tmp_path / f"alone-{job_id}"
        folder.mkdir()
        process = start(
            "fl-server", "--config", str(path), "--insecure", "--host", "127.0.0.1",
            "--port", str(alone_port), "--out", str(folder), "--threads", "1", log=folder / "server.log",
        )  # fmt: skip
        clients = start_clients(alone_port, synthetic_npz, folder, extra=("--insecure", "--light"))
        alone.append((process, folder, clients, job_id))
    for process, folder, clients, job_id in alone:
        finish_all(clients)
        assert finish(process, folder / "server.log") == 0, (folder / "server.log").read_text()
        assert rounds_of(folder / "history.json") == rounds_of(
            tmp_path / "fed/jobs" / job_id / "history.json"
        )


def test_a_coordinator_killed_mid_job_resumes_it_from_its_checkpoint(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    port = free_port()
    out = provisioned(tmp_path, port)
    alice = out / "kits/admins/alice"
    a, b = jobs_a_and_b(tmp_path, synthetic_npz)
    a.write_text(a.read_text().replace("rounds = 2", "rounds = 40"))
    log = tmp_path / "federation.log"
    server = federation(out, tmp_path / "fed", log)
    for path in (a, b):
        assert fl_job(alice, "submit", str(path)).returncode == 0
    wait_state(port, alice, "job-1", "running")
    clients = sites(out, synthetic_npz, tmp_path, "a")
    wait_for_line(log, "round 2/40", process=server)
    server.kill()  # SIGKILL: no checkpoint written on the way out, no state saved
    server.wait()
    states = {
        p.parent.name: json.loads(p.read_text())["state"] for p in (tmp_path / "fed/jobs").glob("*/job.json")
    }
    assert states == {"job-1": "running", "job-2": "queued"}

    again = tmp_path / "federation-again.log"
    server = federation(out, tmp_path / "fed", again)
    wait_for_line(again, "job-1 (cifar): resuming", process=server)
    wait_for_line(again, "resuming run job-1 after round", process=server)
    finish_all(clients)  # the same client processes: they waited for the coordinator to come back
    job = wait_state(port, alice, "job-1", "finished")
    assert job.rounds_done == 40
    history = json.loads((tmp_path / "fed/jobs/job-1/history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == list(range(1, 41))
    assert wait_state(port, alice, "job-2", "running").name == "tiny"
    stopped = fl_job(alice, "stop", "job-2")
    assert stopped.returncode == 0, stopped.stderr
    assert wait_state(port, alice, "job-2", "stopped").detail == "stopped by an admin (fl-job stop)"
    server.send_signal(signal.SIGTERM)
    assert finish(server, again, timeout=30) == 0


def test_only_admins_may_call_the_admin_service(tmp_path: Path, synthetic_npz: Path) -> None:
    port = free_port()
    out = provisioned(tmp_path, port)
    log = tmp_path / "federation.log"
    server = federation(out, tmp_path / "fed", log)
    site = out / "kits/sites" / SITES[1]
    refused = fl_job(site, "ls", "--cert", str(site / "site.crt"), "--key", str(site / "site.key"))
    assert refused.returncode == 2 and "PERMISSION_DENIED" in refused.stderr, refused.stderr
    bad = run_file(tmp_path, "bad", "[run]\nrounds = 0\n")
    said = fl_job(out / "kits/admins/alice", "submit", str(bad))
    assert said.returncode == 2 and "INVALID_ARGUMENT: bad.toml" not in said.stderr
    assert "rounds must be at least 1" in said.stderr, said.stderr
    clash = run_file(tmp_path, "clash", "[run]\nport = 5000\n")
    said = fl_job(out / "kits/admins/alice", "submit", str(clash))
    assert "the run file sets port" in said.stderr, said.stderr
    assert not list((tmp_path / "fed/jobs").iterdir())  # nothing refused was stored
    server.send_signal(signal.SIGTERM)
    assert finish(server, log, timeout=30) == 0


def test_admin_tokens_without_tls_and_hostile_calls(tmp_path: Path) -> None:
    port = free_port()
    tokens = tmp_path / "admins.json"
    tokens.write_text(json.dumps({"admins": {"bob": hash_token("s3cret")}}))
    log = tmp_path / "federation.log"
    server = start(
        "fl-server", "--federation", str(tmp_path / "fed"), "--insecure", "--host", "127.0.0.1",
        "--port", str(port), "--admin-tokens", str(tokens), "--threads", "1", "--max-calls-per-peer", "2",
        "--max-wait", "3", log=log,
    )  # fmt: skip
    wait_for_line(log, "listening on port", process=server)
    target = f"127.0.0.1:{port}"
    for security in (ChannelSecurity(), ChannelSecurity(token="wrong")):
        with (
            AdminConnection(target, security, timeout_s=5) as stranger,
            pytest.raises(AdminCallError) as refused,
        ):
            stranger.jobs()
        assert refused.value.code == "UNAUTHENTICATED"
    with AdminConnection(target, ChannelSecurity(token="s3cret"), timeout_s=5) as bob:
        assert bob.jobs() == []
        with pytest.raises(AdminCallError, match="INVALID_ARGUMENT"):
            bob.submit("x" * 65, b"[run]\n")
        with pytest.raises(AdminCallError, match="NOT_FOUND"):
            bob.job("job-1")
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    # A Coordinator call between jobs: UNAVAILABLE, come back later.
    join = channel.unary_unary("/fedgrpc.v1.Coordinator/Join", None, None)
    with pytest.raises(grpc.RpcError) as error:
        join(b"", timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "no job is running" in (
        error.value.details() or ""
    )
    # Followed logs hold a call each: past the per-address limit, RESOURCE_EXHAUSTED; and a
    # held one ends by itself within --max-wait.
    with AdminConnection(target, ChannelSecurity(token="s3cret"), timeout_s=5) as bob:
        tiny = b'[run]\ntask = "tiny_task.py"\nclients = 3\nrounds = 1\n'
        assert bob.submit("tiny", tiny, TINY_TASK.encode()).id == "job-1"
    wait_for_line(log, "waiting for 3 clients", process=server)
    bearer = (("authorization", "Bearer s3cret"),)
    follow = channel.unary_stream(
        "/fedgrpc.v1.FederationAdmin/WatchJobLog", None, admin_pb2.LogChunk.FromString
    )
    request = admin_pb2.WatchJobLogRequest(id="job-1", follow=True).SerializeToString()
    held: list[Any] = [follow(request, timeout=20, metadata=bearer) for _ in range(2)]
    assert next(held[0]).data and next(held[1]).data  # the log so far, then held
    with pytest.raises(grpc.RpcError) as error:
        list(follow(request, timeout=20, metadata=bearer))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    started = time.monotonic()
    for call in held:
        list(call)
    assert time.monotonic() - started < 6
    # Oversized: a message past the server's cap gets RESOURCE_EXHAUSTED, as on the Coordinator.
    submit = channel.unary_unary("/fedgrpc.v1.FederationAdmin/SubmitJob", None, None)
    with pytest.raises(grpc.RpcError) as error:
        submit(
            b"\x12" + _varint(17 << 20) + b"\0" * (17 << 20),
            timeout=10,
            metadata=(("authorization", "Bearer s3cret"),),
        )
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()
    with AdminConnection(target, ChannelSecurity(token="s3cret"), timeout_s=5) as bob:
        assert bob.stop("job-1").id == "job-1"
    assert server.poll() is None
    server.send_signal(signal.SIGTERM)
    assert finish(server, log, timeout=30) == 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_federation_flags_that_belong_to_a_job_are_refused_at_start(tmp_path: Path) -> None:
    for flags, said in (
        (["--insecure", "--admin-tokens", str(tmp_path / "none.json"), "--rounds", "3"], "--rounds belongs"),
        (["--insecure"], "needs admin identities"),
    ):
        done = subprocess.run(
            [str(BIN / "fl-server"), "--federation", str(tmp_path / "fed"), *flags],
            capture_output=True, text=True, env=ENV, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not (tmp_path / "fed").exists()  # nothing made for a start that was refused


def test_the_queue_survives_a_torn_write_and_refuses_a_damaged_record(tmp_path: Path) -> None:
    from fedgrpc.common.errors import ConfigError
    from fedgrpc.server.jobs import JobQueue

    queue = JobQueue(tmp_path)
    first = queue.submit("a", "alice", "cifar10", 2, {"run.toml": b"[run]\n"})
    second = queue.submit("b", "alice", "cifar10", 2, {"run.toml": b"[run]\n"})
    queue.start(first.id)
    (tmp_path / "jobs" / first.id / ".job.json.tmp").write_text('{"torn')  # killed mid-write
    again = JobQueue(tmp_path)
    assert [(j.id, j.state) for j in again.all()] == [("job-1", "running"), ("job-2", "queued")]
    assert again.next_to_run(0) == again.get(first.id)  # the cut-off job first
    again.end(first.id, "finished")
    assert again.next_to_run(0) == again.get(second.id)
    assert again.stop_queued(second.id) is not None and again.next_to_run(0) is None
    (tmp_path / "jobs" / second.id / "job.json").write_text('{"id": "../x"}')
    with pytest.raises(ConfigError, match="not a job record"):
        JobQueue(tmp_path)
