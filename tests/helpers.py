"""Starting and watching real fl-server / fl-client processes for the tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fedgrpc.server.endpoint import EndpointConfig, GrpcEndpoint
from fedgrpc.server.rounds import RoundCoordinator

BIN = Path(sys.executable).parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


#: Every process a test started; conftest kills the ones still running when the test ends.
STARTED: list[subprocess.Popen[bytes]] = []


def start(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start fl-server or fl-client (args[0]) with its output appended to `log` (`env`: more variables)."""
    process = subprocess.Popen(
        [str(BIN / args[0]), *args[1:]],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**ENV, **(env or {})},
    )
    STARTED.append(process)
    return process


def kill_leftovers() -> None:
    """Kill what a test left running (a failed assertion skips the test's own waits)."""
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def finish(process: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"{process.args!r} did not finish in {timeout} s:\n{log.read_text()[-3000:]}")


def wait_for_line(
    log: Path, text: str, timeout: float = 180, *, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll a log file until it contains `text` (fails early if `process` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if process is not None and process.poll() is not None:
            pytest.fail(
                f"process exited {process.returncode} before logging {text!r}:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.05)
    pytest.fail(f"{text!r} did not appear in {log} within {timeout} s:\n{log.read_text()[-3000:]}")


def server_command(
    port: int, data: Path, out: Path, *, rounds: int, clients: int, extra: tuple[str, ...] = ()
) -> list[str]:
    """fl-server on 127.0.0.1 in plain text (tests only ever talk over loopback)."""
    return [
        "fl-server", "--insecure", "--host", "127.0.0.1", "--port", str(port),
        "--rounds", str(rounds), "--clients", str(clients),
        "--data", str(data), "--out", str(out), "--threads", "1", *extra,
    ]  # fmt: skip


def start_clients(
    port: int,
    data: Path,
    logs: Path,
    ids: tuple[int, ...] = (1, 2, 3),
    extra: tuple[str, ...] = ("--insecure",),
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Start fl-client processes for `ids`, each logging to logs/client-<id>.log."""
    started = []
    for client_id in ids:
        log = logs / f"client-{client_id}.log"
        command = ["fl-client", "--id", str(client_id), "--server", f"127.0.0.1:{port}", "--data", str(data)]
        started.append((start(*command, "--threads", "1", "--connect-timeout", "90", *extra, log=log), log))
    return started


def finish_all(processes: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for process, log in processes:
        assert finish(process, log) == 0, log.read_text()


@contextlib.contextmanager
def serving(coordinator: RoundCoordinator, **config: Any) -> Iterator[GrpcEndpoint]:
    """The real gRPC endpoint serving `coordinator` on 127.0.0.1 (a free port) until the block ends."""
    config.setdefault("host", "127.0.0.1")
    config.setdefault("port", 0)
    endpoint = GrpcEndpoint(coordinator, EndpointConfig(**config))
    endpoint.start()
    endpoint.set_serving(True)
    try:
        yield endpoint
    finally:
        endpoint.stop(grace=0)


@contextlib.contextmanager
def held_update(port: int, clients: int, num_examples: Callable[[int], int]) -> Iterator[threading.Event]:
    """An int8 update from whichever of clients 1..N is sampled for round 1, on 127.0.0.1:port,
    whose stream stops after its header and first chunk until the event is set (then the call is
    cancelled): an update being received, held for as long as a test looks at the server."""
    from fedgrpc.client.connection import Connection
    from fedgrpc.common import compression, wire
    from fedgrpc.common.protocol import Instruction
    from fedgrpc.v1 import coordinator_pb2 as pb

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    connections = [
        Connection(f"127.0.0.1:{port}", c, connect_timeout_s=180, channel=channel)
        for c in range(1, clients + 1)
    ]
    try:
        deadline, task, client = time.monotonic() + 180, None, 0
        while task is None:  # ask as each client in turn until one is given round 1 to train
            assert time.monotonic() < deadline, "no client was given round 1"
            for connection in connections:
                polled = connection.next_task(after_round=0, max_wait_s=0.2)
                if polled.instruction is Instruction.TRAIN:
                    task, client = polled, connection.client_id
                    break
        arrays, scales = compression.encode(task.specs, task.weights, task.weights, "int8")
        stream = wire.update_stream(
            client_id=client, round_number=task.round, num_examples=num_examples(client), metrics={},
            specs=task.specs, arrays=arrays, compression="int8", scales=scales,
        )  # fmt: skip
        release = threading.Event()

        def held() -> Iterator[pb.UpdateMessage | bytes]:
            yield next(stream)
            yield next(stream)
            release.wait(300)

        submit = channel.stream_unary(
            f"/{wire.SERVICE}/SubmitUpdate", request_serializer=wire.serialize, response_deserializer=None
        )
        call = submit.future(held(), timeout=300)
        try:
            yield release
        finally:
            release.set()
            call.cancel()  # type: ignore[no-untyped-call]
    finally:
        channel.close()


def spool_files(pid: int, spool: Path, timeout: float) -> list[str]:
    """The files in `spool` that process `pid` has open, once it has any (what /proc shows)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        targets = []
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                targets.append(os.readlink(fd))
        if found := [t for t in targets if t.startswith(f"{spool}/")]:
            return found
        time.sleep(0.02)
    return []
