"""No listener may take the descriptors a run needs (fedgrpc.server.descriptors).

Before: under `ulimit -n 1024`, 1,100 idle connections to the dashboard's port were answered
503 and left open; they used up the server's descriptors, the next checkpoint write failed
with EMFILE, and the server died with a traceback, gRPC with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.common.config import RunSpec
from fedgrpc.common.processes import free_port
from fedgrpc.server.checkpoint import CheckpointStore
from fedgrpc.server.http import HEAD_TIMEOUT_S
from fedgrpc.server.results import persist
from helpers import BIN, ENV, STARTED, finish, finish_all, server_command, start_clients, wait_for_line

LIMIT = 1024
ATTACKERS = 1100


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_limited(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """fl-server as `ulimit -n 1024` would start it: soft and hard limit both 1024."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))

    process = subprocess.Popen(
        [str(BIN / command[0]), *command[1:]],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=ENV,
        preexec_fn=limit,
    )
    STARTED.append(process)
    return process


@pytest.fixture
def room_for_attackers() -> Iterator[None]:
    """The test's own soft descriptor limit raised for its 1,100 sockets (and put back after),
    so that a connection it cannot open is the server's doing, never its own EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = ATTACKERS + 256
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard descriptor limit ({hard}) leaves no room for {ATTACKERS} test connections")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _dashboard_answers(port: int, within_s: float) -> bool:
    """Whether /healthz answers 200 within `within_s`; a 503 (connections held) is asked again."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as probe:
            probe.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            if probe.recv(100).startswith(b"HTTP/1.1 200"):
                return True
        time.sleep(0.5)
    return False


def test_idle_dashboard_connections_cannot_take_the_descriptors_of_the_run(
    tmp_path: Path, synthetic_npz: Path, room_for_attackers: None
) -> None:
    port, http, out, log = free_port(), free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--http", str(http), "--linger", "300")  # the server stays up after the run: counted then
    server = start_limited(server_command(port, synthetic_npz, out, rounds=3, clients=3, extra=extra), log)
    wait_for_line(log, f"dashboard on http://127.0.0.1:{http}/", process=server)
    baseline = descriptors(server.pid)
    attackers, unanswered = [], 0
    for _ in range(ATTACKERS):  # idle: they never send a byte, and never close
        try:
            attackers.append(socket.create_connection(("127.0.0.1", http), timeout=10))
        except OSError as exc:
            assert exc.errno not in (errno.EMFILE, errno.ENFILE), f"the test ran out of descriptors: {exc}"
            unanswered += 1  # a server out of descriptors stops accepting: the connect times out
    try:
        clients = start_clients(port, synthetic_npz, tmp_path, ids=(1, 2, 3), extra=("--insecure", "--light"))
        finish_all(clients)
        wait_for_line(log, "stay up 300 s more (--linger)", process=server)
        assert server.poll() is None, log.read_text()[-3000:]
        history = json.loads((out / "history.json").read_text())
        assert history["finished"] and [r["round"] for r in history["rounds"]] == [1, 2, 3]
        assert unanswered == 0
        # The dashboard answers again once the idle connections it held have timed out (5 s
        # without a request head: HEAD_TIMEOUT_S), and the descriptors are back where they started.
        assert _dashboard_answers(http, within_s=HEAD_TIMEOUT_S + 25), "the dashboard never answered 200"
    finally:
        for connection in attackers:
            connection.close()
    deadline = time.monotonic() + 120
    while descriptors(server.pid) > baseline + 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert descriptors(server.pid) <= baseline + 4, (baseline, descriptors(server.pid))
    server.send_signal(signal.SIGTERM)  # ends the linger
    assert finish(server, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "Too many open files" not in text and "Traceback" not in text, text[-3000:]


def test_idle_grpc_connections_are_held_within_the_descriptors_left(
    tmp_path: Path, synthetic_npz: Path, room_for_attackers: None
) -> None:
    """The gRPC listener closes connections past its share at once (grpc core's connection
    quota), so 1,100 idle connections that never finish their handshake cannot take the
    descriptors of the checkpoints either; once they go, the run goes on."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--stall-timeout", "600")  # the handshake timeout would close them too: not what is tested
    server = start_limited(server_command(port, synthetic_npz, out, rounds=2, clients=2, extra=extra), log)
    wait_for_line(log, "listening on port", process=server)
    attackers = []
    try:
        for _ in range(ATTACKERS):
            with contextlib.suppress(OSError):  # turned away
                attackers.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        peak = 0
        for _ in range(20):  # for a second, while they all wait
            peak = max(peak, descriptors(server.pid))
            time.sleep(0.05)
        assert peak < LIMIT - 128, peak  # the reserve is left whole
        assert server.poll() is None, log.read_text()[-3000:]
    finally:
        for connection in attackers:
            connection.close()
    clients = start_clients(port, synthetic_npz, tmp_path, ids=(1, 2), extra=("--insecure", "--light"))
    finish_all(clients)
    assert finish(server, log) == 0, log.read_text()[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert "Too many open files" not in log.read_text()


def test_a_checkpoint_that_cannot_be_written_is_reported_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The folder is missing its way (a file stands where it should be) for the first two
    tries, as descriptors or disk space are missing for a while; the third try writes it."""
    blocker = tmp_path / "checkpoint"
    blocker.write_text("in the way")
    store = CheckpointStore(blocker)
    weights = [np.arange(4, dtype=np.float32)]
    save = partial(store.save, RunSpec(), 1, weights, [])
    calls = 0

    def save_once_cleared() -> object:
        nonlocal calls
        calls += 1
        if calls > 2:  # the first two fail for real; then the space is back
            blocker.unlink(missing_ok=True)
        return save()

    with caplog.at_level(logging.ERROR, logger="fedgrpc.server"):
        assert persist("the checkpoint after round 1", save_once_cleared, first_retry_s=0.01)
    assert calls == 3
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert all("the checkpoint after round 1 could not be written" in line for line in said), said
    assert all("trying again" in line for line in said), said
    loaded = store.load()
    assert loaded is not None and loaded.round == 1 and np.array_equal(loaded.weights[0], weights[0])
    caplog.clear()
    blocker.rename(tmp_path / "moved")
    blocker.write_text("in the way for good")
    with caplog.at_level(logging.ERROR, logger="fedgrpc.server"):
        assert not persist("the checkpoint after round 2", save, first_retry_s=0.01)
    assert "could not be written (4 tries)" in caplog.text


def test_a_write_asked_to_stop_makes_one_last_try_at_once(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def full_disk() -> None:
        nonlocal calls
        calls += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    stop = threading.Event()
    stop.set()
    with caplog.at_level(logging.ERROR, logger="fedgrpc.server"):
        assert not persist("the history", full_disk, stop=stop, first_retry_s=600)
    assert calls == 2 and "the history could not be written (2 tries)" in caplog.text


FULL_DISK = """
import resource, signal, sys
from functools import partial
from pathlib import Path

import numpy as np
from fedgrpc.common.config import RunSpec
from fedgrpc.server.checkpoint import CheckpointStore
from fedgrpc.server.http import HEAD_TIMEOUT_S
from fedgrpc.server.results import persist, write_atomically

folder = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
history = partial(write_atomically, folder / "out" / "history.json", bytes(20000))
checkpoint = partial(CheckpointStore(folder / "checkpoint").save, RunSpec(), 1, [np.zeros(20000)], [])
writes = {"history": history, "checkpoint": checkpoint}
written = [persist(what, write, first_retry_s=0.01) for what, write in writes.items()]
sys.exit(1 if any(written) else 0)
"""


def test_writes_that_fail_on_a_full_disk_leave_no_temporary_files(tmp_path: Path) -> None:
    """A file size limit makes every write past 4 KiB fail as a full disk would (EFBIG for
    ENOSPC), four tries each: the history and the checkpoint leave nothing behind that
    would fill the disk further."""
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not be written (4 tries)" in result.stderr, result.stderr[-3000:]
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == [], left
