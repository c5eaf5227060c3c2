"""A standing federation: `fl-server --federation DIR` stays up and runs the jobs admins submit.

    start --> idle --a job queued--> running a job --it ends--> idle --> ... --SIGTERM--> stopped

One endpoint (fedgrpc.server.endpoint) for the federation's whole life: the sites' Coordinator
service serves the running job's RoundCoordinator, and answers UNAVAILABLE between jobs; the
admins' FederationAdmin service (fedgrpc.server.admin) is served beside it throughout. Jobs
run one at a time, in the order they were submitted (fedgrpc.server.jobs keeps the queue in
DIR): one model in one coordinator process at a time, all the sites' resources for it, and no
policy needed for a site two jobs want at once.

A job is a run file, the same TOML as `fl-server --config`, checked by the same code when it
is submitted (a run the coordinator would refuse is refused then, with the same sentence).
What belongs to the federation comes from fl-server's own flags (FEDERATION_WIDE: where it
listens, its TLS and identities, its limits); a run file that sets any of it is refused.
Each job runs as FederatedServer would run it alone, with its run id the job's id and its
outputs (history.json, curves, checkpoint, the final model, its log) in DIR/jobs/<id>/. A
coordinator killed mid-job and started again with the same DIR runs that job first, from
its checkpoint.

With --http, the dashboard and /metrics show the federation (fedgrpc.server.federation_view):
the sites that announced themselves (fedgrpc.server.sites, served beside the admin service)
and the jobs, beside the running job's run.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from types import FrameType

from ..common import run_file, settings
from ..common.errors import ConfigError, FedGrpcError
from ..common.words import plural
from . import cli
from .admin import SERVICE as ADMIN_SERVICE
from .admin import AdminAuthenticator, AdminServicer, load_admin_tokens
from .app import FederatedServer
from .auth import Authenticator
from .config import ServerConfig
from .endpoint import EndpointConfig, GrpcEndpoint
from .federation_view import FederationView
from .http import DashboardServer
from .jobs import LOG_FILE, RUN_FILE, JobQueue, JobRecord
from .monitor import Monitor
from .revocation import RevocationList
from .sites import SERVICE as SITES_SERVICE
from .sites import SiteRegistry, SitesServicer

log = logging.getLogger("fedgrpc.server")

#: fl-server settings that are the federation's, not a job's: given to fl-server --federation,
#: refused in a job's run file.
FEDERATION_WIDE = (
    "host", "port", "insecure", "tls_cert", "tls_key", "client_ca", "tokens", "revoked", "http",
    "http_host", "linger", "health_port", "spool_dir", "out", "stall_timeout", "max_calls",
    "max_calls_per_peer", "max_calls_per_client", "max_wait", "inflight_wait", "max_inflight_mb",
    "chunk_kb", "threads", "verbose", "log_format", "federation", "admin_tokens",
)  # fmt: skip
TASK_FILE = "task.py"
_IDLE_WAIT_S = 1.0


class Federation:
    """The coordinator of a standing federation; see the module docstring."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        typed = settings.typed_flags(cli.build_parser(), argv)
        # --clients too, as a coordinator kit's start.sh gives it: here it only sizes the overall
        # call limit (each job's run file says how many clients it has).
        per_job = sorted(typed - set(FEDERATION_WIDE) - {"config", "clients"})
        if per_job or args.config is not None:
            flags = ", ".join("--" + n.replace("_", "-") for n in per_job) or "--config"
            verb = "belongs" if len(per_job) <= 1 else "belong"
            raise ConfigError(
                f"--federation runs the jobs admins submit: {flags} {verb} in each job's run file "
                f"(fl-job submit RUN.toml); fl-server takes only the federation's own settings here"
            )
        tls, tokens = cli.security_from(args)
        self._tls, self._site_tokens = tls, tokens
        self._mutual_tls = tls is not None and tls.client_ca is not None
        admin_tokens = load_admin_tokens(args.admin_tokens) if args.admin_tokens else None
        if not self._mutual_tls and admin_tokens is None:
            raise ConfigError(
                "--federation needs admin identities: --client-ca (fl-provision's admin kits) or "
                "--admin-tokens FILE"
            )
        self._admin_tokens = admin_tokens
        self.args = args
        self.folder: Path = args.federation
        self.queue = JobQueue(self.folder)  # a damaged job record stops us here, before listening
        self._stop = threading.Event()
        self._running: tuple[str, FederatedServer] | None = None
        self._stopping_job: str | None = None
        self._lock = threading.Lock()
        self.sites = SiteRegistry()
        self.view = FederationView(self, self.sites)
        http = cli.http_from(args)
        self.dashboard = DashboardServer(self.view, http) if http is not None else None

    # -- the jobs, for the admin service -----------------------------------------------

    def submit(self, name: str, by: str, run_toml: bytes, task_file: bytes) -> JobRecord:
        """Check the run file as fl-server --config would, then queue it."""
        files = {RUN_FILE: run_toml, **({TASK_FILE: task_file} if task_file else {})}
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=".incoming-") as incoming:
            for file_name, data in files.items():
                (Path(incoming) / file_name).write_bytes(data)
            try:
                config = self.job_config(Path(incoming), "job-0")
            except ConfigError as exc:  # said of the file the admin submitted, not of our copy
                raise ConfigError(str(exc).replace(str(Path(incoming) / RUN_FILE), RUN_FILE)) from None
            # the task as the admin named it, not our copy's path
            task = run_file.read_run_file(Path(incoming) / RUN_FILE)[0].get("task") if task_file else None
        record = self.queue.submit(name, by, str(task or config.task), config.run.rounds, files)
        log.info(
            "%s (%s) submitted by %s: %s, %s",
            record.id,
            name,
            by,
            record.task,
            plural(record.rounds, "round"),
        )
        return record

    def jobs(self) -> list[JobRecord]:
        return self.queue.all()

    def job(self, job_id: str) -> JobRecord | None:
        return self.queue.get(job_id)

    def stop(self, job_id: str) -> JobRecord:
        stopped = self.queue.stop_queued(job_id)
        if stopped is not None:
            log.info("%s stopped before it started", job_id)
            return stopped
        with self._lock:
            if self._running is not None and self._running[0] == job_id:
                self._stopping_job = job_id
                self._running[1].request_stop(None)
        record = self.queue.get(job_id)
        assert record is not None  # the admin service looked it up
        return record

    def current(self) -> tuple[str, Monitor] | None:
        """The running job's id and Monitor (the dashboard's run view), if one is running."""
        with self._lock:
            if self._running is None or self._running[1].monitor is None:
                return None
            return self._running[0], self._running[1].monitor

    def folder_of(self, job_id: str) -> Path:
        return self.queue.folder_of(job_id)

    def log_of(self, job_id: str) -> Path:
        return self.folder_of(job_id) / LOG_FILE

    def rounds_done(self, job_id: str) -> int:
        with self._lock:
            if self._running is not None and self._running[0] == job_id:
                return len(self._running[1].records)
        try:
            history = json.loads((self.folder_of(job_id) / "history.json").read_text())
            return len(history["rounds"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    # -- a job's settings --------------------------------------------------------------

    def job_config(self, folder: Path, job_id: str) -> ServerConfig:
        """The ServerConfig of the job whose run file is in `folder`: its run file's settings,
        the federation's own over them, its outputs in `folder`, its run id its job id."""
        run_path = folder / RUN_FILE
        argv = ["--config", str(run_path), "--out", str(folder)]
        if (folder / TASK_FILE).exists():
            argv += ["--task", str(folder / TASK_FILE)]
        table, _ = run_file.read_run_file(run_path)
        clash = sorted(set(table) & set(FEDERATION_WIDE))
        if clash:
            raise ConfigError(
                f"the run file sets {', '.join(clash)}, which the federation sets for every job "
                "(fl-server --federation's flags); remove them from the run file"
            )
        job_args, task_params = cli.parse_args(argv)
        for name in FEDERATION_WIDE:
            if name not in ("out", "federation", "admin_tokens"):
                setattr(job_args, name, getattr(self.args, name))
        config = cli.config_from(job_args, task_params)
        # the federation's dashboard shows every job (its run view, the running one's)
        return replace(config, run=replace(config.run, run_id=job_id), http=None)

    # -- the coordinator ---------------------------------------------------------------

    def request_stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """The coordinator stops; a running job stays `running`, to resume at the next start."""
        self._stop.set()
        with self._lock:
            if self._running is not None:
                self._running[1].request_stop(signum, frame)

    def run(self) -> None:
        endpoint = self._start_endpoint()
        if self.dashboard is not None:
            http_port = self.dashboard.start()
            log.info(
                "dashboard on http://%s:%d/ (read-only; /metrics for Prometheus)",
                self.args.http_host,
                http_port,
            )
        try:
            while not self._stop.is_set():
                job = self.queue.next_to_run(_IDLE_WAIT_S)
                if job is not None and not self._stop.is_set():
                    self._run_job(job, endpoint)
        finally:
            endpoint.set_serving(False)
            if self.dashboard is not None:
                self.dashboard.stop()
            endpoint.stop(grace=2.0)

    def _start_endpoint(self) -> GrpcEndpoint:
        args = self.args
        revoked = RevocationList(args.revoked) if args.revoked else None
        sites = Authenticator(self._site_tokens, mutual_tls=self._mutual_tls, revoked=revoked)
        limits = cli.limits_from(args)
        admin = AdminServicer(
            self,
            AdminAuthenticator(sites, mutual_tls=self._mutual_tls, tokens=self._admin_tokens),
            limits,
            args.clients,
        )
        announced = SitesServicer(self.sites, sites, limits, args.clients)
        endpoint = GrpcEndpoint(
            None,
            EndpointConfig(
                host=args.host,
                port=args.port,
                tls=self._tls,
                authenticator=sites,
                limits=limits,
                chunk_bytes=args.chunk_kb << 10,
                max_inflight_bytes=args.max_inflight_mb << 20,
                spool_dir=args.spool_dir,
                health_port=args.health_port,
                max_clients=args.clients,
            ),
            services=[
                (admin.handler(), admin.admission, ADMIN_SERVICE),
                (announced.handler(), announced.admission, SITES_SERVICE),
            ],
        )
        port = endpoint.start()
        endpoint.set_serving(True)
        jobs = self.queue.all()
        waiting = sum(j.state in ("queued", "running") for j in jobs)
        log.info(
            "federation in %s: %s, %d to run; %s; listening on port %d",
            self.folder, plural(len(jobs), "job"), waiting,
            "mutual TLS" if self._mutual_tls else "TLS" if self._tls else "INSECURE, no TLS", port,
        )  # fmt: skip
        return endpoint

    def _run_job(self, job: JobRecord, endpoint: GrpcEndpoint) -> None:
        folder = self.folder_of(job.id)
        job_log = _JobLog(folder / LOG_FILE)
        try:
            resumed = job.state == "running"
            self.queue.start(job.id)
            log.info("%s (%s): %s", job.id, job.name, "resuming" if resumed else "starting")
            server = FederatedServer(self.job_config(folder, job.id), endpoint)
            with self._lock:
                self._running = (job.id, server)
            if self._stop.is_set():
                server.request_stop()
            server.run()
        except FedGrpcError as exc:
            log.error("%s failed: %s", job.id, exc)
            self.queue.end(job.id, "failed", str(exc))
        except Exception as exc:  # a job's failure must not end the federation
            log.exception("%s failed", job.id)
            self.queue.end(job.id, "failed", f"{type(exc).__name__}: {exc}")
        else:
            self._ended(job.id)
        finally:
            current = self.current()
            self.view.job_ended(job.id, current[1] if current else None)
            with self._lock:
                self._running = None
            job_log.close()
            _forget_models()

    def _ended(self, job_id: str) -> None:
        if self._stopping_job == job_id:
            self._stopping_job = None
            self.queue.end(job_id, "stopped", "stopped by an admin (fl-job stop)")
            log.info("%s stopped", job_id)
        elif self._stop.is_set():
            log.info("%s stays running: it resumes from its checkpoint when the coordinator is back", job_id)
        else:
            self.queue.end(job_id, "finished", self._left_out(job_id))
            log.info("%s finished", job_id)

    def _left_out(self, job_id: str) -> str:
        """The sites that withdrew from a finished job, and why (its history's "withdrawn"): a
        site's policy refusing the job is shown by fl-job status, not only in the history."""
        try:
            history = json.loads((self.folder_of(job_id) / "history.json").read_text())
            withdrawn = [f"client {w['client_id']}: {w['reason']}" for w in history.get("withdrawn", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return ""
        return "left out: " + "; ".join(withdrawn) if withdrawn else ""


class _JobLog:
    """The job's own log file, DIR/jobs/<id>/server.log: every line the coordinator logs while
    the job runs, as its console shows them."""

    def __init__(self, path: Path) -> None:
        root = logging.getLogger()
        self._handler = logging.FileHandler(path, encoding="utf-8")
        if root.handlers:
            self._handler.setFormatter(root.handlers[0].formatter)
        self._handler.setLevel(logging.INFO)
        root.addHandler(self._handler)

    def close(self) -> None:
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()


def _forget_models() -> None:
    """Keras keeps every model built in its global state: a long-lived coordinator drops the
    last job's before the next builds its own."""
    keras = sys.modules.get("keras")
    if keras is not None:
        keras.backend.clear_session()
