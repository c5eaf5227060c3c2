"""A federation's project file: who takes part, read by `fl-provision` (fedgrpc.server.provision).

    [project]
    name = "hospitals"
    valid_days = 365                  # optional: how long certificates last (default 365)

    [coordinator]
    hosts = ["fl.example.org", "10.0.0.5"]   # names the sites dial; all go in its certificate
    port = 50051

    [[site]]
    id = 1                            # its client id: certificate common name client-1
    name = "hospital-a"

    [[admin]]
    name = "alice"                    # certificate common name admin-alice

Names become folder names, so they are short and plain: letters, digits, '.', '_' and '-'.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HOST = re.compile(r"[A-Za-z0-9.:_-]{1,253}")
_MAX_CLIENT_ID = 9_999_999_999  # auth.py reads at most ten digits after client-


@dataclass(frozen=True)
class SiteEntry:
    id: int
    name: str

    @property
    def common_name(self) -> str:
        return f"client-{self.id}"  # exactly what fedgrpc.server.auth maps to a client id


@dataclass(frozen=True)
class AdminEntry:
    name: str

    @property
    def common_name(self) -> str:
        return f"admin-{self.name}"


@dataclass(frozen=True)
class Project:
    name: str
    hosts: tuple[str, ...]
    port: int
    sites: tuple[SiteEntry, ...]
    admins: tuple[AdminEntry, ...] = ()
    valid_days: int = 365

    def __post_init__(self) -> None:
        _check_name(self.name, "[project] name")
        if not self.hosts or any(not _HOST.fullmatch(h) for h in self.hosts):
            raise ConfigError(f"[coordinator] hosts must be host names or addresses, got {list(self.hosts)}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"[coordinator] port must be in 1..65535, got {self.port}")
        if not 1 <= self.valid_days <= 3650:
            raise ConfigError(f"[project] valid_days must be in 1..3650, got {self.valid_days}")
        for site in self.sites:
            if type(site.id) is not int or not 1 <= site.id <= _MAX_CLIENT_ID:
                raise ConfigError(f"[[site]] {site.name!r}: id must be a whole number >= 1, got {site.id!r}")
            _check_name(site.name, "[[site]] name")
        for admin in self.admins:
            _check_name(admin.name, "[[admin]] name")
        _check_unique([s.id for s in self.sites], "site ids")
        _check_unique([s.name for s in self.sites], "site names")
        _check_unique([a.name for a in self.admins], "admin names")

    @property
    def address(self) -> str:
        """What sites dial: the first host name, and the port."""
        host = self.hosts[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{what} must be letters, digits, '.', '_' or '-' (at most 63), got {name!r}")


def _check_unique(values: list[Any], what: str) -> None:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"{what} must be unique: {', '.join(repeated)} given twice")


def load_project(path: Path) -> Project:
    """The project file at `path`; a ConfigError that names the file when it is not one."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"project file {path}: {exc}") from None
    try:
        return _project(document)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"project file {path}: {exc!r} missing or of the wrong type; see docs/provisioning.md"
        ) from None
    except ConfigError as exc:
        raise ConfigError(f"project file {path}: {exc}") from None


def _project(document: dict[str, Any]) -> Project:
    project, coordinator = document["project"], document["coordinator"]
    hosts = coordinator["hosts"]
    if isinstance(hosts, str) or not isinstance(hosts, list):
        raise ConfigError(f"[coordinator] hosts must be a list of names, got {hosts!r}")
    return Project(
        name=project["name"],
        hosts=tuple(str(h) for h in hosts),
        port=int(coordinator["port"]),
        sites=tuple(SiteEntry(entry["id"], entry["name"]) for entry in document.get("site", [])),
        admins=tuple(AdminEntry(entry["name"]) for entry in document.get("admin", [])),
        valid_days=int(project.get("valid_days", 365)),
    )
