"""TLS, mutual TLS and per-client tokens, with a real server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from certs import Authority, Pair
from fedgrpc.client.connection import ChannelSecurity, Connection
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import AuthError, ServerUnavailableError
from fedgrpc.common.processes import free_port
from fedgrpc.common.protocol import Instruction
from fedgrpc.server.auth import Authenticator, ServerTls, hash_token
from fedgrpc.server.checkpoint import weights_digest
from fedgrpc.server.limits import Limits
from fedgrpc.server.rounds import RoundCoordinator
from fedgrpc.server.strategy import FedAvg
from helpers import finish, serving, start

SPECS = [TensorSpec("w", "float32", (3,))]
GLOBAL = [np.arange(3, dtype=np.float32)]
TOKENS = {1: "token-of-one", 2: "token-of-two"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(folder), Authority(folder, "rogue CA")
    return {
        "ca": ca.pair,
        "server": ca.issue("localhost", server=True),
        "client-1": ca.issue("client-1"),
        "client-2": ca.issue("client-2"),
        "expired": ca.issue("client-1", expired=True, stem="expired"),
        "unknown": rogue.issue("client-1", stem="unknown"),
        "leading-zero": ca.issue("client-01", stem="leading-zero"),
        "arabic-digit": ca.issue("client-\u0661", stem="arabic-digit"),  # ARABIC-INDIC DIGIT ONE
        "suffix": ca.issue("client-1x", stem="suffix"),
    }


@contextlib.contextmanager
def serve_secure(
    pki: dict[str, Pair], *, mutual: bool, tokens: bool, clients: int = 2
) -> Iterator[tuple[RoundCoordinator, int]]:
    coordinator = RoundCoordinator(RunSpec(rounds=1, num_clients=clients), SPECS, FedAvg())
    for client in range(1, clients + 1):
        coordinator.next_task(client, after_round=0, timeout=0)
    coordinator.open_round(1, GLOBAL)
    digests = {c: hash_token(t) for c, t in TOKENS.items()} if tokens else None
    tls = ServerTls(pki["server"].cert, pki["server"].key, pki["ca"].cert if mutual else None)
    authenticator = Authenticator(digests, mutual_tls=mutual)
    with serving(coordinator, limits=Limits(max_wait_s=1), authenticator=authenticator, tls=tls) as endpoint:
        yield coordinator, endpoint.port


@pytest.fixture
def token_server(pki: dict[str, Pair]) -> Iterator[tuple[RoundCoordinator, int]]:
    with serve_secure(pki, mutual=False, tokens=True) as served:
        yield served


@pytest.fixture
def mtls_server(pki: dict[str, Pair]) -> Iterator[tuple[RoundCoordinator, int]]:
    with serve_secure(pki, mutual=True, tokens=False) as served:
        yield served


def connect(
    port: int, client: int, pki: dict[str, Pair], *, token: str | None = None, cert: str | None = None
) -> Connection:
    pair = pki[cert] if cert else None
    security = ChannelSecurity(pki["ca"].cert, pair.cert if pair else None, pair.key if pair else None, token)
    return Connection(f"localhost:{port}", client, connect_timeout_s=3, security=security)


def unchanged(coordinator: RoundCoordinator) -> bool:
    return coordinator.received == 0 and weights_digest(coordinator.global_weights) == weights_digest(GLOBAL)


def test_the_right_token_gets_in(token_server: tuple[RoundCoordinator, int], pki: dict[str, Pair]) -> None:
    coordinator, port = token_server
    with connect(port, 1, pki, token=TOKENS[1]) as connection:
        task = connection.next_task(0, max_wait_s=1)
        assert task.instruction is Instruction.TRAIN
        assert connection.submit(1, SPECS, GLOBAL, 5, {}) == (1, 2)


@pytest.mark.parametrize(
    ("client", "token", "code"),
    [
        (1, None, "UNAUTHENTICATED"),
        (1, "wrong", "UNAUTHENTICATED"),
        (2, TOKENS[1], "PERMISSION_DENIED"),  # client 1's token, speaking for client 2
    ],
    ids=["no-token", "wrong-token", "borrowed-token"],
)
def test_bad_tokens_are_refused(
    token_server: tuple[RoundCoordinator, int],
    pki: dict[str, Pair],
    client: int,
    token: str | None,
    code: str,
) -> None:
    coordinator, port = token_server
    with connect(port, client, pki, token=token) as connection:
        for call in (
            connection.join,
            lambda: connection.next_task(0, 0.5),
            lambda: connection.submit(1, SPECS, GLOBAL, 5, {}),
        ):
            with pytest.raises(AuthError) as info:
                call()
            assert info.value.code == code
    assert unchanged(coordinator)


def test_a_certificate_identifies_its_client(
    mtls_server: tuple[RoundCoordinator, int], pki: dict[str, Pair]
) -> None:
    coordinator, port = mtls_server
    with connect(port, 2, pki, cert="client-2") as connection:
        assert connection.submit(1, SPECS, GLOBAL, 5, {}) == (1, 2)
    with connect(port, 1, pki, cert="client-2") as connection, pytest.raises(AuthError) as info:
        connection.submit(1, SPECS, GLOBAL, 5, {})
    assert info.value.code == "PERMISSION_DENIED"


@pytest.mark.parametrize("cert", ["leading-zero", "arabic-digit", "suffix"])
def test_only_exact_ascii_certificate_names_identify_a_client(
    mtls_server: tuple[RoundCoordinator, int], pki: dict[str, Pair], cert: str
) -> None:
    """Before: client-01 and client- with a non-ASCII digit were taken for client 1."""
    coordinator, port = mtls_server
    with connect(port, 1, pki, cert=cert) as connection, pytest.raises(AuthError) as info:
        connection.submit(1, SPECS, GLOBAL, 5, {})
    assert info.value.code == "UNAUTHENTICATED"
    assert "common name must be client-<id>" in str(info.value)
    assert unchanged(coordinator)


@pytest.mark.parametrize("cert", [None, "expired", "unknown"])
def test_missing_expired_or_foreign_certificates_never_connect(
    mtls_server: tuple[RoundCoordinator, int], pki: dict[str, Pair], cert: str | None
) -> None:
    coordinator, port = mtls_server
    with connect(port, 1, pki, cert=cert) as connection, pytest.raises(ServerUnavailableError):
        connection.submit(1, SPECS, GLOBAL, 5, {})  # the TLS handshake fails: UNAVAILABLE until the timeout
    assert unchanged(coordinator)


def test_plain_text_to_a_tls_server_is_refused(token_server: tuple[RoundCoordinator, int]) -> None:
    coordinator, port = token_server
    with (
        Connection(f"127.0.0.1:{port}", 1, connect_timeout_s=2) as connection,
        pytest.raises(ServerUnavailableError),
    ):
        connection.join()
    assert unchanged(coordinator)


def test_two_rounds_over_mutual_tls_with_tokens(
    tmp_path: Path, synthetic_npz: Path, pki: dict[str, Pair]
) -> None:
    port, out = free_port(), tmp_path / "out"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"clients": {str(c): hash_token(t) for c, t in TOKENS.items()}}))
    server_log = tmp_path / "server.log"
    server = start(
        "fl-server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--rounds",
        "2",
        "--clients",
        "2",
        "--data",
        str(synthetic_npz),
        "--out",
        str(out),
        "--tls-cert",
        str(pki["server"].cert),
        "--tls-key",
        str(pki["server"].key),
        "--client-ca",
        str(pki["ca"].cert),
        "--tokens",
        str(tokens),
        log=server_log,
    )
    clients = []
    for client_id in (1, 2):
        log = tmp_path / f"client-{client_id}.log"
        pair = pki[f"client-{client_id}"]
        clients.append(
            (
                start(
                    "fl-client",
                    "--id",
                    str(client_id),
                    "--server",
                    f"localhost:{port}",
                    "--data",
                    str(synthetic_npz),
                    "--ca",
                    str(pki["ca"].cert),
                    "--tls-cert",
                    str(pair.cert),
                    "--tls-key",
                    str(pair.key),
                    "--token",
                    TOKENS[client_id],
                    "--threads",
                    "1",
                    log=log,
                ),
                log,
            )
        )
    for client, log in clients:
        assert finish(client, log) == 0, log.read_text()
    assert finish(server, server_log) == 0, server_log.read_text()
    assert "mutual TLS on" in server_log.read_text()
    assert [r["round"] for r in json.loads((out / "history.json").read_text())["rounds"]] == [1, 2]
