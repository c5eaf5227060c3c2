"""`fl-job`: an admin's command line for a standing federation (fl-server --federation DIR).

    fl-job submit RUN.toml [--name NAME]     queue a job (its task file too, when the run file
                                             names a local .py file)
    fl-job ls                                every job, oldest first
    fl-job status ID                         one job
    fl-job logs ID [--follow]                its log (following it until the job ends)
    fl-job stop ID                           a queued job never starts; a running one stops
    fl-job download ID --out DIR             its outputs: history.json, curves, model, checkpoint

Who the admin is and where the coordinator is come from an admin kit of fl-provision's
(`--kit kits/admins/alice`: its certificate, key, CA and the coordinator's address), or from
--ca/--cert/--key, or --token (an admin token, with --ca or --insecure).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..common import run_file, settings
from ..common.errors import ConfigError
from ..common.settings import Setting
from .admin_connection import AdminConnection, JobView
from .channel import ChannelSecurity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

COMMANDS = ("submit", "ls", "status", "logs", "stop", "download")
_SEC = "security"
SETTINGS: tuple[Setting, ...] = (
    Setting("server", str, None, env="FL_SERVER", metavar="HOST:PORT", help="the coordinator"),
    Setting("kit", Path, None, metavar="DIR", help="an admin kit of fl-provision: kits/admins/<name>"),
    Setting("ca", Path, None, group=_SEC, metavar="PEM", help="the federation's CA (instead of --kit)"),
    Setting("cert", Path, None, group=_SEC, metavar="PEM", help="the admin's certificate (admin-<name>)"),
    Setting("key", Path, None, group=_SEC, metavar="PEM", help="the admin's private key"),
    Setting("token", str, None, group=_SEC, env="FL_ADMIN_TOKEN", help="an admin token (--admin-tokens)"),
    Setting("insecure", bool, False, group=_SEC, help="plain text (a coordinator without TLS)"),
    Setting("name", str, None, metavar="NAME", help="submit: the job's name (default: the run file's)"),
    Setting("follow", bool, False, help="logs: go on until the job has ended"),
    Setting("out", Path, None, metavar="DIR", help="download: where the job's files go"),
    Setting("timeout", float, 30.0, above=0, metavar="S", help="deadline of each call (default 30)"),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = settings.build_parser(
        SETTINGS,
        prog="fl-job",
        usage="%(prog)s {" + ",".join(COMMANDS) + "} [RUN.toml | JOB-ID] [--kit DIR] [options]",
        description=__doc__ or "",
        raw_description=True,
    )
    parser.add_argument("command", choices=COMMANDS, help="what to do: " + ", ".join(COMMANDS))
    parser.add_argument("target", nargs="?", help="submit: the run file; the others but ls: the job id")
    return parser


def security_of(args: argparse.Namespace) -> tuple[str, ChannelSecurity]:
    """The coordinator's address and how to reach it as this admin."""
    server = args.server
    ca, cert, key = args.ca, args.cert, args.key
    if args.kit is not None:
        kit = args.kit
        ca, cert, key = ca or kit / "ca.crt", cert or kit / "admin.crt", key or kit / "admin.key"
        if server is None:
            table = tomllib.loads((kit / "kit.toml").read_text(encoding="utf-8"))
            server = str(table.get("server", "")) or None
    if server is None:
        raise ConfigError("give --server HOST:PORT, or --kit with an admin kit that names it")
    settings.go_together({"--cert": cert, "--key": key})
    settings.require_tls(ca is not None, args.insecure, give="give --kit or --ca", without="pass --insecure")
    return server, ChannelSecurity(ca=ca, cert=cert, key=key, token=args.token)


def main(argv: list[str] | None = None) -> int:
    return settings.run_cli("fl-job", lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "ls" and not args.target:
        raise ConfigError(
            f"fl-job {args.command} needs {'a run file' if args.command == 'submit' else 'a job id'}"
        )
    server, security = security_of(args)
    with AdminConnection(server, security, args.timeout) as admin:
        if args.command == "submit":
            name, run_bytes, task_bytes = _submission(Path(args.target), args.name)
            _show(admin.submit(name, run_bytes, task_bytes))
        elif args.command == "ls":
            for job in admin.jobs():
                _show(job)
        elif args.command == "status":
            _show(admin.job(args.target), long=True)
        elif args.command == "stop":
            _show(admin.stop(args.target))
        elif args.command == "logs":
            for data in admin.log(args.target, follow=args.follow):
                sys.stdout.write(data.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        else:
            if args.out is None:
                raise ConfigError("fl-job download needs --out DIR")
            for path in admin.download(args.target, args.out):
                print(path)
    return 0


def _submission(path: Path, name: str | None) -> tuple[str, bytes, bytes]:
    """The job's name, its run file, and its task file when the run file names a local .py file
    (paths in a run file are read from its folder, as fl-server --config reads them)."""
    try:
        run_bytes = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
    table, _ = run_file.read_run_file(path)
    task = table.get("task")
    task_bytes = b""
    if isinstance(task, str) and task.endswith(".py"):
        task_path = path.parent / task
        if task_path.is_file():
            task_bytes = task_path.read_bytes()
    return name or path.stem, run_bytes, task_bytes


def _show(job: JobView, *, long: bool = False) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.submitted_at))
    rounds = f"{job.rounds_done}/{job.rounds} rounds"
    print(f"{job.id}  {job.state:<8} {job.name}  {rounds}  {job.task}  by {job.submitted_by} {when}")
    if long and job.detail:
        print(f"  {job.detail}")


if __name__ == "__main__":
    sys.exit(main())
