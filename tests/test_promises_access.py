"""Credentials as the Kubernetes base (deploy/k8s/base) passes them, with real processes.

The server holds a certificate issued for `fedgrpc-server` only, digests made by
`fl-server --hash-token`, and a plain-text health port; its clients dial 127.0.0.1 with
`--tls-server-name fedgrpc-server`, one reading its token from a per-id file
(`--token-file .../client-{id}`, its id from $FL_CLIENT_ID), the other from $FL_TOKEN.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from certs import Authority, Pair, _write
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fedgrpc.common import wire
from fedgrpc.common.processes import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import BIN, ENV, finish, finish_all, start

NAME = "fedgrpc-server"  # the Service name the Kubernetes base dials, not the address used here
TOKENS = {1: "token of client one", 2: "token of client two"}


def issue_for_name(ca: Authority, name: str) -> Pair:
    """A server certificate that names only `name` (no IP address, no localhost)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return _write(ca.folder, name, cert, key)


def health(port: int, service: str) -> int:
    """The status the plain-text health port reports for `service`."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return check(health_pb2.HealthCheckRequest(service=service), timeout=5).status  # type: ignore[no-any-return]


def wait_serving(port: int, server: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"fl-server exited {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if health(port, "") == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass  # not listening yet
        time.sleep(0.2)
    pytest.fail(f"the health port never said SERVING:\n{log.read_text()[-3000:]}")


def test_hash_token_prints_the_sha256_digest_of_the_token() -> None:
    result = subprocess.run(
        [str(BIN / "fl-server"), "--hash-token", TOKENS[1]],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256(TOKENS[1].encode()).hexdigest()


def test_the_kubernetes_base_credentials_in_a_real_run(tmp_path: Path, synthetic_npz: Path) -> None:
    ca = Authority(tmp_path)
    pair = issue_for_name(ca, NAME)
    digests = {}
    for client, token in TOKENS.items():  # as an operator makes tokens.json
        result = subprocess.run(
            [str(BIN / "fl-server"), "--hash-token", token],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
        digests[str(client)] = result.stdout.strip()
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"clients": digests}))
    secret = tmp_path / "client-tokens"  # a mounted Secret: one file per client, newline included
    secret.mkdir()
    for client, token in TOKENS.items():
        (secret / f"client-{client}").write_text(token + "\n")

    port, health_port, out, log = free_port(), free_port(), tmp_path / "out", tmp_path / "server.log"
    server = start(
        "fl-server", "--host", "127.0.0.1", "--port", str(port), "--health-port", str(health_port),
        "--rounds", "2", "--clients", "2", "--data", str(synthetic_npz), "--out", str(out),
        "--tls-cert", str(pair.cert), "--tls-key", str(pair.key), "--tokens", str(tokens), "--threads", "1",
        log=log,
    )  # fmt: skip
    wait_serving(health_port, server, log)
    assert health(health_port, wire.SERVICE) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:  # health only on that port
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(f"/{wire.SERVICE}/Join", None, None)(b"", timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED

    dial = ("--server", f"127.0.0.1:{port}", "--ca", str(ca.pair.cert), "--light", "--connect-timeout", "90")
    unnamed_log = tmp_path / "unnamed.log"  # the certificate does not name 127.0.0.1: never connects
    unnamed = start(
        "fl-client", "--id", "1", *dial, "--connect-timeout", "5", "--token", TOKENS[1], log=unnamed_log
    )
    assert finish(unnamed, unnamed_log, timeout=120) != 0
    assert "Hostname Verification Check failed" in unnamed_log.read_text()
    clients = []
    for client, how, env in [
        (1, ("--token-file", str(secret / "client-{id}")), {"FL_CLIENT_ID": "1"}),
        (2, ("--id", "2"), {"FL_TOKEN": TOKENS[2]}),
    ]:
        client_log = tmp_path / f"client-{client}.log"
        command = ("fl-client", *dial, "--tls-server-name", NAME, *how)
        clients.append((start(*command, log=client_log, env=env), client_log))
    finish_all(clients)
    assert finish(server, log) == 0, log.read_text()
    history = json.loads((out / "history.json").read_text())
    assert [sorted(c["client_id"] for c in r["clients"]) for r in history["rounds"]] == [[1, 2], [1, 2]]
    assert "UNAUTHENTICATED" not in log.read_text()
