"""Enrolment at scale: a token is checked by one lookup in a table loaded once, the tokens file
re-read only when it changed (at most once a second), with a real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import ConfigError
from fedgrpc.server.auth import Authenticator, TokenTable, hash_token
from fedgrpc.server.rounds import RoundCoordinator
from fedgrpc.server.strategy import FedAvg
from fedgrpc.v1 import coordinator_pb2 as pb
from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc
from helpers import serving

SPECS = [TensorSpec("w", "float32", (3,))]


def _write(path: Path, tokens: dict[int, str]) -> None:
    path.write_text(json.dumps({"clients": {str(c): hash_token(t) for c, t in tokens.items()}}))


def _digest(token: str) -> bytes:
    return bytes.fromhex(hash_token(token))


def test_a_changed_tokens_file_is_read_again_at_most_once_a_second(tmp_path: Path) -> None:
    path, now = tmp_path / "tokens.json", [0.0]
    _write(path, {1: "one", 2: "two"})
    table = TokenTable(path, clock=lambda: now[0])
    assert [table.client_of(_digest(t)) for t in ("one", "two", "three")] == [1, 2, None]
    _write(path, {1: "one", 3: "three"})
    os.utime(path, ns=(1, 1))  # a different mtime whatever the file system's resolution
    now[0] = 0.5
    assert table.client_of(_digest("three")) is None and table.reads == 1  # not looked at yet
    now[0] = 1.0
    assert table.client_of(_digest("three")) == 3 and table.client_of(_digest("two")) is None
    assert table.reads == 2
    now[0] = 5.0
    assert table.client_of(_digest("one")) == 1 and table.reads == 2  # unchanged: stat'ed, not read
    path.write_text("{half a file")
    os.utime(path, ns=(2, 2))
    now[0] = 7.0
    assert table.client_of(_digest("one")) == 1  # unreadable: the last good table stands


def test_a_bad_tokens_file_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"clients": {"1": "not-a-digest"}}))
    with pytest.raises(ConfigError, match="not SHA-256 hex digests"):
        TokenTable(path)


def test_calls_with_tokens_read_the_tokens_file_once(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tokens = {client: f"token-{client}" for client in range(1, 2001)}
    _write(path, tokens)
    table = TokenTable(path)
    coordinator = RoundCoordinator(RunSpec(rounds=1, num_clients=2000), SPECS, FedAvg())
    coordinator.open_round(1, [np.zeros(3, np.float32)])
    with (
        serving(coordinator, authenticator=Authenticator(table)) as endpoint,
        grpc.insecure_channel(f"127.0.0.1:{endpoint.port}") as channel,
    ):
        stub = pb_grpc.CoordinatorStub(channel)
        for client in range(1, 2001, 50):
            metadata = (("authorization", f"Bearer token-{client}"),)
            stub.Join(pb.JoinRequest(client_id=client), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            as_two = (("authorization", "Bearer token-2"),)
            stub.Join(pb.JoinRequest(client_id=1), metadata=as_two, timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert table.reads == 1
