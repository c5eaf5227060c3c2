"""fl-provision: a federation's CA, certificates and kits; a real fl-server started from the
coordinator's kit, a site joining from its own, a site added later and one revoked while the
server runs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedgrpc.client.connection import ChannelSecurity, Connection
from fedgrpc.common.errors import AuthError, ConfigError
from fedgrpc.common.processes import free_port
from fedgrpc.server.revocation import RevocationList, dump
from helpers import BIN, ENV, STARTED, wait_for_line

SITES = {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}


def write_project(folder: Path, port: int, sites: dict[int, str]) -> Path:
    project = folder / "project.toml"
    text = f'[project]\nname = "demo"\n\n[coordinator]\nhosts = ["localhost", "127.0.0.1"]\nport = {port}\n'
    text += "".join(f'\n[[site]]\nid = {i}\nname = "{name}"\n' for i, name in sites.items())
    project.write_text(text + '\n[[admin]]\nname = "alice"\n')
    return project


def provision(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed fl-provision where this environment has it, else its module: a real process."""
    command = [str(BIN / "fl-provision")] if (BIN / "fl-provision").exists() else [
        sys.executable, "-m", "fedgrpc.server.provision"
    ]  # fmt: skip
    return subprocess.run([*command, *args], capture_output=True, text=True, env=ENV, timeout=120)


def provisioned(folder: Path, port: int, sites: dict[int, str] = SITES) -> Path:
    done = provision(str(write_project(folder, port, sites)))
    assert done.returncode == 0, done.stderr
    return folder / "demo"


def kits(out: Path) -> list[Path]:
    return [out / "kits/coordinator", *sorted((out / "kits/sites").iterdir()), out / "kits/admins/alice"]


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def own_certificate(kit: Path) -> x509.Certificate:
    (path,) = [f for f in kit.glob("*.crt") if f.name != "ca.crt"]
    return certificate(path)


def identity_files(out: Path, names: list[str]) -> dict[str, bytes]:
    return {
        f"{kit.name}/{file.name}": file.read_bytes()
        for kit in kits(out)
        if kit.name in names
        for file in kit.iterdir()
        if file.suffix in (".key", ".crt")
    }


def test_kits_are_private_and_each_holds_only_its_own_key(tmp_path: Path) -> None:
    out = provisioned(tmp_path, 50051)
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = 0o700 if path.is_dir() or path.name == "start.sh" else 0o600
        assert mode == wanted, f"{path} is {oct(mode)}"
    ca_key = (out / "state/ca.key").read_bytes()
    ca = certificate(out / "state/ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert [kit.name for kit in kits(out)] == ["coordinator", *SITES.values(), "alice"]
    for kit in kits(out):
        keys = [f for f in kit.iterdir() if b"PRIVATE KEY" in f.read_bytes()]
        assert len(keys) == 1, f"{kit} holds keys {keys}"
        assert all(ca_key not in f.read_bytes() for f in kit.iterdir())
        cert = own_certificate(kit)
        cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
        assert (kit / "ca.crt").read_bytes() == (out / "state/ca.crt").read_bytes()
        key = serialization.load_pem_private_key(keys[0].read_bytes(), password=None)
        assert key.public_key() == cert.public_key()  # the kit's key is its own certificate's
    names = {kit.name: own_certificate(kit) for kit in kits(out)}
    for client, site in SITES.items():
        assert names[site].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"client-{client}"
        usage = names[site].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert names["alice"].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin-alice"
    alt = names["coordinator"].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in alt.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert [p.relative_to(out).as_posix() for p in out.glob("state/**/*.key")] == ["state/ca.key"]


def test_a_project_that_cannot_work_is_refused_with_a_sentence(tmp_path: Path) -> None:
    project = write_project(tmp_path, 50051, SITES)
    project.write_text(project.read_text() + '\n[[site]]\nid = 2\nname = "again"\n')
    done = provision(str(project))
    assert done.returncode == 2
    assert "site ids must be unique: 2 given twice" in done.stderr
    assert not (tmp_path / "demo").exists()
    done = provision("revoke", str(write_project(tmp_path, 50051, SITES)), "--site", "1")
    assert done.returncode == 2 and "no site with id 1 was ever issued" in done.stderr


def test_the_revocation_list_is_looked_at_once_a_second(tmp_path: Path) -> None:
    path, now = tmp_path / "revoked.json", [100.0]
    path.write_text(dump([]))
    revoked = RevocationList(path, clock=lambda: now[0])
    assert not revoked.is_revoked(2)
    path.write_text(dump([{"client": 2, "serial": "ab"}]))
    now[0] += 0.5
    assert not revoked.is_revoked(2)  # not looked at again within the second
    now[0] += 0.5
    assert revoked.is_revoked(2) and not revoked.is_revoked(1)
    path.write_text('{"revoked": [{"client": 3')  # half written: the last good list stays
    now[0] += 1
    assert revoked.is_revoked(2) and not revoked.is_revoked(3)
    path.unlink()
    now[0] += 1
    assert revoked.is_revoked(2)
    with pytest.raises(ConfigError, match="--revoked"):
        RevocationList(tmp_path / "missing.json")


def start_kit(kit: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """A kit's own start.sh, with the installed fl-server / fl-client first on PATH."""
    env = {**ENV, "PATH": f"{BIN}{os.pathsep}{ENV.get('PATH', '')}"}
    process = subprocess.Popen(
        ["sh", str(kit / "start.sh"), *args], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env
    )
    STARTED.append(process)
    return process


def connect(port: int, kit: Path, client: int) -> Connection:
    security = ChannelSecurity(kit / "ca.crt", kit / "site.crt", kit / "site.key")
    return Connection(f"localhost:{port}", client, connect_timeout_s=10, security=security)


def test_sites_join_from_their_kits_and_a_revoked_one_is_refused_at_once(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    port = free_port()
    out = provisioned(tmp_path, port)
    sites = out / "kits/sites"
    server_log = tmp_path / "server.log"
    server = start_kit(
        out / "kits/coordinator", "--host", "127.0.0.1", "--rounds", "1", "--data", str(synthetic_npz),
        "--out", str(tmp_path / "run"), "--threads", "1", log=server_log,
    )  # fmt: skip
    wait_for_line(server_log, "listening on port", process=server)
    assert "mutual TLS on, client identity from certificates" in server_log.read_text()
    site_log = tmp_path / "site-1.log"
    site = start_kit(
        sites / "hospital-a", "--light", "--data", str(synthetic_npz), "--threads", "1", log=site_log
    )
    wait_for_line(server_log, "client 1 joined from", process=server)

    before = identity_files(out, ["coordinator", *SITES.values(), "alice"])
    ca_before = (out / "state/ca.key").read_bytes()
    provisioned(tmp_path, port, {**SITES, 4: "hospital-d"})
    assert identity_files(out, ["coordinator", *SITES.values(), "alice"]) == before
    assert (out / "state/ca.key").read_bytes() == ca_before
    certificate(sites / "hospital-d/site.crt").verify_directly_issued_by(certificate(out / "state/ca.crt"))
    assert "--clients 4" in (out / "kits/coordinator/start.sh").read_text()

    with connect(port, sites / "hospital-b", 2) as connection:
        connection.join()  # site 2 is in, over mutual TLS
        done = provision("revoke", str(tmp_path / "project.toml"), "--site", "2")
        assert done.returncode == 0, done.stderr
        revoked_at, refused = time.monotonic(), None
        while refused is None and time.monotonic() - revoked_at < 5:
            try:
                connection.join()
            except AuthError as exc:
                refused = exc
        assert refused is not None, "site 2 was still let in 5 s after its revocation"
        assert refused.code == "UNAUTHENTICATED"
        assert "client 2's identity was revoked" in str(refused)
    with connect(port, sites / "hospital-a", 1) as connection:
        connection.join()  # site 1 is still in
    assert server.poll() is None and site.poll() is None, site_log.read_text()
    assert "revoked.json changed: 1 revoked client ids" in server_log.read_text()
