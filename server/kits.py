"""What one participant's kit holds, and how its files are written (for fedgrpc.server.provision).

A kit is a folder handed to one participant: its own private key and certificate, the CA's
certificate, `kit.toml` (who it is, where the coordinator is), and a `start.sh` with the exact
command that starts it (a README says the same for people). Every file and folder is created
readable by its owner only (0600 files, 0700 folders and start.sh) with `os.open`'s mode, never
loosened then tightened, so no other user ever sees a key, not even for a moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from .project import Project

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
CA_CERT = "ca.crt"
REVOKED = "revoked.json"
SITE_POLICY_EXAMPLE = "site.example.toml"  # rewritten with the kit: the site copies it to edit it


@dataclass(frozen=True)
class Member:
    """One participant as its kit describes it."""

    role: str  # coordinator, site or admin
    name: str
    common_name: str
    serial: str  # hex
    client_id: int | None = None  # sites only

    @property
    def title(self) -> str:
        """'site hospital-a', 'admin alice', 'coordinator'."""
        return self.role if self.name == self.role else f"{self.role} {self.name}"

    @property
    def key_file(self) -> str:
        return f"{self.role}.key"

    @property
    def cert_file(self) -> str:
        return f"{self.role}.crt"


def make_private_dir(path: Path) -> None:
    """Create `path` as 0700 if it is not there (its parent must be)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=PRIVATE_DIR)


def create_private(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Write a new file created with `mode`; refuses to replace one (keys are written once)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def replace_private(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> bool:
    """Write `path` atomically (a reader sees the old or the new file, whole), created with
    `mode`; False, and nothing written, when it already holds `data`."""
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return False
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        create_private(partial, data, mode)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return True


def kit_texts(project: Project, member: Member) -> dict[str, tuple[str, int]]:
    """The kit's files that hold no secret (file name -> text, mode): rewritten when the project
    changes (a new site changes the coordinator's --clients), never its key or certificate."""
    texts = {"kit.toml": (_kit_toml(project, member), PRIVATE_FILE)}
    command = start_command(project, member)
    if command:
        texts["start.sh"] = (_start_script(project, member, command), PRIVATE_DIR)
    texts["README.md"] = (_readme(project, member, command), PRIVATE_FILE)
    if member.role == "site":
        texts[SITE_POLICY_EXAMPLE] = (_site_policy_example(member), PRIVATE_FILE)
    return texts


def start_command(project: Project, member: Member) -> str:
    """The command that starts this participant from its kit ($KIT: the kit's folder); "" for an
    admin (who uses fl-job with --kit instead)."""
    own = f'--tls-cert "$KIT/{member.cert_file}" --tls-key "$KIT/{member.key_file}"'
    if member.role == "coordinator":
        clients = max((site.id for site in project.sites), default=1)
        return (
            f"fl-server --port {project.port} --clients {clients} {own} "
            f'--client-ca "$KIT/{CA_CERT}" --revoked "$KIT/{REVOKED}"'
        )
    if member.role == "site":
        server = shlex.quote(project.address)
        return f'fl-client --id {member.client_id} --server {server} --ca "$KIT/{CA_CERT}" {own}'
    return ""


def _start_script(project: Project, member: Member, command: str) -> str:
    more = "--task TASK --rounds N --data DATA" if member.role == "coordinator" else "--task TASK --data DATA"
    return (
        "#!/bin/sh\n"
        f"# Starts {member.title} of federation {project.name} (written by fl-provision).\n"
        f"# Add the run's own flags after it, e.g.: ./start.sh {more}\n"
        + (
            f"# Or stay up for run after run as a site agent (copy {SITE_POLICY_EXAMPLE} to site.toml and\n"
            '# edit it first): ./start.sh --serve --policy "$KIT/site.toml"\n'
            if member.role == "site"
            else ""
        )
        + "set -eu\n"
        'KIT=$(cd "$(dirname "$0")" && pwd)\n'
        f'exec {command} "$@"\n'
    )


def _site_policy_example(member: Member) -> str:
    """A site's policy to start from (fl-client --serve --policy; docs/sites.md has every key)."""
    return (
        f"# The policy of {member.title} as a site agent: ./start.sh --serve --policy site.toml\n"
        "# Copy this file to site.toml and edit it; this copy is rewritten with the kit.\n"
        "[site]\n"
        "max_rounds = 100             # refuse runs of more rounds\n"
        "max_local_epochs = 5         # refuse runs asking more local epochs a round\n"
        "max_run_time = 86400         # seconds: withdraw from a run still going after this\n"
        "require_secagg = false       # true: refuse runs without secure aggregation\n"
        "# min_dp_noise_multiplier = 1.0  # refuse runs whose central DP adds less noise\n"
        "# require_dp_clip = true         # refuse runs in which clients do not clip their updates\n"
        "\n"
        "[[task]]                     # one table per task this site runs\n"
        'name = "my-task"             # the name the task file declares\n'
        'file = "my_task.py"          # relative paths are read from this file\'s folder\n'
        '# digest = "..."             # pin the file: the SHA-256 it must have (sha256sum my_task.py)\n'
        'data = "my_data.csv"         # this site\'s data for the task\n'
        '# params = ["learning_rate"] # the only task parameters a run may change\n'
    )


def _kit_toml(project: Project, member: Member) -> str:
    values: dict[str, object] = {
        "project": project.name,
        "role": member.role,
        "name": member.name,
        "common_name": member.common_name,
        "serial": member.serial,
    }
    if member.client_id is not None:
        values["client_id"] = member.client_id
    if member.role == "coordinator":
        values["hosts"] = list(project.hosts)
        values["port"] = project.port
        values["revoked"] = REVOKED
    else:
        values["server"] = project.address
    values.update(certificate=member.cert_file, key=member.key_file, ca=CA_CERT)
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]  # JSON scalars are TOML
    return "# Who this kit belongs to (written by fl-provision; do not edit)\n" + "\n".join(lines) + "\n"


def _readme(project: Project, member: Member, command: str) -> str:
    head = (
        f"# {project.name}: kit of the {member.title}\n\n"
        f"Certificate `{member.cert_file}` (common name `{member.common_name}`, serial {member.serial}), "
        f"its private key `{member.key_file}`, and `{CA_CERT}`, the federation's CA. The key is yours "
        "alone: keep this folder readable by you only, and never copy the key anywhere else.\n\n"
    )
    if not command:
        return head + (
            "Manage a standing federation's jobs (fl-server --federation) with it, e.g.:\n\n"
            "    fl-job ls --kit THIS_FOLDER\n\nSee docs/federation.md.\n"
        )
    extra = (
        f"`{REVOKED}` lists the revoked sites; replace it with the one `fl-provision revoke` writes, "
        "and the coordinator refuses them within a second, with no restart.\n\n"
        if member.role == "coordinator"
        else ""
    )
    return (
        head
        + extra
        + "Start it with `./start.sh` followed by the run's flags, which runs, with KIT this folder:\n\n"
        + f"    {command}\n"
    )
