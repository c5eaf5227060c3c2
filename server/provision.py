"""`fl-provision`: a federation's identities, from its project file (fedgrpc.server.project).

    fl-provision project.toml                  issue what is new, write every kit
    fl-provision revoke project.toml --site N  refuse site N from now on

Into the output folder (--out, default: the project's name beside the project file):

    state/   ca.key, ca.crt: the CA (its key never leaves this folder)
             issued.json: every identity issued, by common name; certs/<common name>.crt copies
             revoked.json: the revocation list (fedgrpc.server.revocation)
    kits/    coordinator/, sites/<name>/, admins/<name>/: one per participant (fedgrpc.server.kits)

An identity's life, kept in issued.json:

    (in the project file) --fl-provision--> issued --revoke--> revoked
                                              \\--run again--> issued, untouched

Running it again issues only what is new: the CA and every issued key and certificate are left
byte for byte as they were; only the kits' plain files (start.sh, README.md, kit.toml) are
rewritten when the project changed. A private key is generated here and written only into its
own kit; nothing keeps a copy. A revoked site is never issued again under its id (the
coordinator refuses the id itself): give it a new id.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..common.errors import ConfigError
from . import revocation
from .kits import (
    CA_CERT,
    REVOKED,
    Member,
    create_private,
    kit_texts,
    make_private_dir,
    replace_private,
)
from .pki import Authority
from .project import Project, load_project


@dataclass(frozen=True)
class Identity:
    """One issued identity, as issued.json records it."""

    role: str
    name: str
    common_name: str
    serial: str
    kit: str  # relative to the output folder
    issued_at: str
    client_id: int | None = None
    hosts: tuple[str, ...] = ()
    revoked_at: str | None = None

    @property
    def member(self) -> Member:
        return Member(self.role, self.name, self.common_name, self.serial, self.client_id)


@dataclass(frozen=True)
class _Wanted:
    """An identity the project file asks for."""

    role: str
    name: str
    common_name: str
    kit: str
    client_id: int | None = None
    hosts: tuple[str, ...] = ()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _wanted(project: Project) -> list[_Wanted]:
    return [
        _Wanted("coordinator", "coordinator", "coordinator", "kits/coordinator", hosts=project.hosts),
        *[_Wanted("site", s.name, s.common_name, f"kits/sites/{s.name}", s.id) for s in project.sites],
        *[_Wanted("admin", a.name, a.common_name, f"kits/admins/{a.name}") for a in project.admins],
    ]


class Provisioner:
    """The state folder of one project, and the kits made from it."""

    def __init__(self, project: Project, out: Path) -> None:
        self.project = project
        self.out = out
        self.state = out / "state"
        self.issued: dict[str, Identity] = {}

    def open(self) -> Authority:
        """The project's CA, made on the first run; the issued identities, read."""
        for folder in ("", "state", "state/certs", "kits", "kits/sites", "kits/admins"):
            make_private_dir(self.out / folder)
        registry = self.state / "issued.json"
        if registry.exists():
            document = json.loads(registry.read_text())
            if document["project"] != self.project.name:
                raise ConfigError(
                    f"{self.out} holds project {document['project']!r}, not {self.project.name!r}"
                )
            for common_name, entry in document["identities"].items():
                entry["hosts"] = tuple(entry.get("hosts", ()))
                self.issued[common_name] = Identity(**entry)
        key, cert = self.state / "ca.key", self.state / "ca.crt"
        if key.exists():
            return Authority.load(key.read_bytes(), cert.read_bytes())
        authority = Authority.create(self.project.name, self.project.valid_days)
        create_private(key, authority.key_pem)
        create_private(cert, authority.cert_pem)
        print(f"created the CA of {self.project.name}: {key} (keep it here, never in a kit)")
        return authority

    def provision(self) -> None:
        authority = self.open()
        for wanted in _wanted(self.project):
            known = self.issued.get(wanted.common_name)
            if known is None:
                self.issued[wanted.common_name] = self._issue(authority, wanted)
            elif known.revoked_at:
                print(f"{wanted.common_name} ({known.member.title}): revoked, not issued again")
            elif known.hosts != wanted.hosts:
                print(f"coordinator: its certificate names {list(known.hosts)}, kept as issued")
        wanted_names = {w.common_name for w in _wanted(self.project)}
        for gone in sorted(set(self.issued) - wanted_names):
            print(f"{gone}: issued but no longer in the project file (revoke it to refuse it)")
        self._save()
        for identity in self.issued.values():
            self._write_texts(identity)

    def revoke(self, site: int) -> Identity:
        self.open()
        common_name = f"client-{site}"
        known = self.issued.get(common_name)
        if known is None:
            raise ConfigError(f"no site with id {site} was ever issued in {self.out}")
        if not known.revoked_at:
            known = self.issued[common_name] = Identity(**{**asdict(known), "revoked_at": _now()})
            self._save()
        return known

    def _issue(self, authority: Authority, wanted: _Wanted) -> Identity:
        kit = self.out / wanted.kit
        if kit.exists():
            raise ConfigError(f"{kit} exists, yet {wanted.common_name} was never issued: move it away first")
        issued = authority.issue(wanted.common_name, hosts=wanted.hosts, valid_days=self.project.valid_days)
        identity = Identity(
            wanted.role, wanted.name, wanted.common_name, f"{issued.serial:x}", wanted.kit, _now(),
            wanted.client_id, wanted.hosts,
        )  # fmt: skip
        member = identity.member
        make_private_dir(kit)
        create_private(kit / member.key_file, issued.key_pem)  # the one copy of this key
        create_private(kit / member.cert_file, issued.cert_pem)
        create_private(kit / CA_CERT, authority.cert_pem)
        create_private(self.state / "certs" / f"{wanted.common_name}.crt", issued.cert_pem)
        print(f"issued {wanted.common_name} ({member.title}): {kit}")
        return identity

    def _save(self) -> None:
        identities = {name: asdict(identity) for name, identity in sorted(self.issued.items())}
        document = {"project": self.project.name, "identities": identities}
        replace_private(self.state / "issued.json", (json.dumps(document, indent=2) + "\n").encode())
        revoked = [
            dict(client=i.client_id, common_name=i.common_name, serial=i.serial, revoked_at=i.revoked_at)
            for i in self.issued.values()
            if i.revoked_at and i.client_id is not None  # sites: the coordinator knows only client ids
        ]
        text = revocation.dump(revoked).encode()
        replace_private(self.state / REVOKED, text)
        coordinator = self.out / "kits/coordinator"
        if coordinator.is_dir():
            replace_private(coordinator / REVOKED, text)

    def _write_texts(self, identity: Identity) -> None:
        kit = self.out / identity.kit
        if not kit.is_dir():
            return  # handed over and removed here: nothing to refresh
        for name, (text, mode) in kit_texts(self.project, identity.member).items():
            replace_private(kit / name, text.encode(), mode)


def _out_folder(project_file: Path, project: Project, out: Path | None) -> Path:
    return out if out is not None else project_file.resolve().parent / project.name


def build_parser(revoke: bool) -> argparse.ArgumentParser:
    if revoke:
        parser = argparse.ArgumentParser(
            prog="fl-provision revoke",
            description="Revoke a site: the coordinator refuses its client id within a second of "
            "reading the new revocation list (written to state/ and to the coordinator's kit).",
        )
        parser.add_argument("--site", type=int, required=True, metavar="ID", help="the site's client id")
    else:
        parser = argparse.ArgumentParser(
            prog="fl-provision",
            description="Issue a federation's CA, certificates and kits from its project file; run "
            "again after adding sites or admins: only the new ones are issued. "
            "`fl-provision revoke PROJECT.toml --site ID` revokes a site.",
        )
    parser.add_argument("project", type=Path, metavar="PROJECT.toml", help="the project file")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help="the state and kits folder (default: the project's name, beside the project file)",
    )  # fmt: skip
    return parser


def run(argv: list[str]) -> None:
    revoke = bool(argv) and argv[0] == "revoke"
    args = build_parser(revoke).parse_args(argv[1:] if revoke else argv)
    project = load_project(args.project)
    out = _out_folder(args.project, project, args.out)
    if out.parent != out and not out.parent.is_dir():
        raise ConfigError(f"--out {out}: its parent folder does not exist")
    provisioner = Provisioner(project, out)
    if not revoke:
        provisioner.provision()
        print(f"kits in {out / 'kits'}; hand each folder to its participant only")
        return
    revoked = provisioner.revoke(args.site)
    print(
        f"revoked client {args.site} (site {revoked.name}) at {revoked.revoked_at}; "
        f"{out / 'kits/coordinator' / REVOKED} is current: if the coordinator runs elsewhere, "
        "copy it over its kit's; it refuses the site within a second"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except (ConfigError, OSError, ValueError, KeyError, TypeError) as exc:
        print(f"fl-provision: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
