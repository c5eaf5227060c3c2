"""The gRPC face of a standing federation's admins: fedgrpc.v1.FederationAdmin over a Federation.

The only module of fedgrpc.server that touches admin_pb2. Every call is admitted first by a
fedgrpc.server.admission interceptor of its own (the per-address limit, refusal lines,
errors to status codes), with `AdminAuthenticator` as its credentials check:

    no identity, or one not known         UNAUTHENTICATED
    a site's identity (client-<id>)       PERMISSION_DENIED: sites run jobs, admins manage them

A handler's own refusals:

    a job id that is not one, a bad job name, a run file the coordinator would refuse
                                          INVALID_ARGUMENT (fl-server's own sentence)
    a job id the federation does not hold NOT_FOUND
    stopping a job that has ended         FAILED_PRECONDITION

Every wait is bounded: WatchJobLog with `follow` holds the call at most Limits.max_wait_s
(the caller asks again from the offset it reached); DownloadJob streams files in 1 MiB
chunks, each a message well under the 16 MiB cap every message of this server has.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any, Protocol

import grpc
from fedgrpc.v1 import admin_pb2 as pb

from ..common.errors import AuthError, ConfigError
from .admission import Admission
from .auth import Authenticator, CallContext, hash_token
from .jobs import ENDED, JobRecord, checked_name, is_job_id
from .limits import Limits
from .refusals import RefusalLog

SERVICE = pb.DESCRIPTOR.services_by_name["FederationAdmin"].full_name
ADMIN_PREFIX = "admin-"
_ADMIN_NAME = re.compile(r"admin-([A-Za-z0-9][A-Za-z0-9._-]{0,63})")
MAX_RUN_FILE = 64 << 10
MAX_TASK_FILE = 1 << 20
CHUNK = 1 << 20
_LOG_POLL_S = 0.2


class Jobs(Protocol):
    """What the admin service asks of the federation (fedgrpc.server.federation.Federation)."""

    def submit(self, name: str, by: str, run_toml: bytes, task_file: bytes) -> JobRecord: ...
    def jobs(self) -> list[JobRecord]: ...
    def job(self, job_id: str) -> JobRecord | None: ...
    def stop(self, job_id: str) -> JobRecord: ...
    def folder_of(self, job_id: str) -> Path: ...
    def log_of(self, job_id: str) -> Path: ...
    def rounds_done(self, job_id: str) -> int: ...


def load_admin_tokens(path: Path) -> dict[str, str]:
    """An admin tokens file: {"admins": {"alice": "<sha256 of alice's token>"}} (fl-server
    --hash-token prints a digest)."""
    try:
        admins = json.loads(path.read_text(encoding="utf-8"))["admins"]
        tokens = {checked_name(str(name), "admin name"): str(digest) for name, digest in admins.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f'--admin-tokens {path}: write {{"admins": {{"alice": "<sha256>"}}}} ({exc})'
        ) from None
    if not tokens:
        raise ConfigError(f"--admin-tokens {path} names no admin")
    return tokens


class AdminAuthenticator(Authenticator):
    """Admits admins only: a certificate named admin-<name> under mutual TLS, or an admin token.
    `identify` returns no client id (admins are not clients); `admin` says who it is."""

    def __init__(self, sites: Authenticator, *, mutual_tls: bool, tokens: dict[str, str] | None) -> None:
        super().__init__(mutual_tls=mutual_tls)
        self._sites = sites
        self._admin_tokens = tokens

    def identify(self, context: CallContext) -> int | None:
        self.admin(context)
        return None

    def admin(self, context: CallContext) -> str:
        """The admin this call proved; AuthError otherwise (PERMISSION_DENIED for a site)."""
        token = self._bearer(context)
        if token is not None and self._admin_tokens is not None:
            digest = hash_token(token)
            for name, known in self._admin_tokens.items():
                if hmac.compare_digest(digest, known):
                    return name
        if self._mutual_tls:
            names: Any = context.auth_context().get("x509_common_name", [])
            for raw in names:
                match = _ADMIN_NAME.fullmatch(raw.decode("ascii", errors="replace"))
                if match:
                    return match.group(1)
        if self._is_site(context):
            raise AuthError("a site's identity may not administer the federation", code="PERMISSION_DENIED")
        raise AuthError("no admin identity: use an admin kit's certificate (fl-provision) or an admin token")

    def _is_site(self, context: CallContext) -> bool:
        try:
            return self._sites.identify(context) is not None
        except AuthError:
            return False


class AdminServicer:
    """fedgrpc.v1.FederationAdmin; serve `handler()` with `admission` among the interceptors."""

    def __init__(self, jobs: Jobs, auth: AdminAuthenticator, limits: Limits, max_clients: int) -> None:
        self._jobs = jobs
        self._auth = auth
        self._limits = limits
        self.refusals = RefusalLog()
        self.admission = Admission(
            SERVICE,
            {},
            authenticator=auth,
            limits=limits,
            num_clients=max_clients,
            refusals=self.refusals,
            ended_early=lambda: None,
        )

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        unary: dict[str, tuple[Any, Any]] = {
            "SubmitJob": (self.SubmitJob, pb.SubmitJobRequest),
            "ListJobs": (self.ListJobs, pb.ListJobsRequest),
            "GetJob": (self.GetJob, pb.GetJobRequest),
            "StopJob": (self.StopJob, pb.StopJobRequest),
        }
        methods: dict[str, grpc.RpcMethodHandler] = {  # type: ignore[type-arg]
            name: grpc.unary_unary_rpc_method_handler(
                behavior, request_deserializer=request.FromString, response_serializer=_serialize
            )
            for name, (behavior, request) in unary.items()
        }
        for name, behavior, request in (
            ("WatchJobLog", self.WatchJobLog, pb.WatchJobLogRequest),
            ("DownloadJob", self.DownloadJob, pb.DownloadJobRequest),
        ):
            methods[name] = grpc.unary_stream_rpc_method_handler(
                behavior, request_deserializer=request.FromString, response_serializer=_serialize
            )
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    # -- RPCs ----------------------------------------------------------------------

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: CallContext) -> pb.Job:
        admin = self._auth.admin(context)
        if len(request.run_file) > MAX_RUN_FILE or len(request.task_file) > MAX_TASK_FILE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a run file may have {MAX_RUN_FILE >> 10} KiB, a task file {MAX_TASK_FILE >> 20} MiB",
            )
        try:
            name = checked_name(request.name)
            # Loading the run file reads files and may take a moment: off the event loop.
            record = await asyncio.to_thread(
                self._jobs.submit, name, admin, request.run_file, request.task_file
            )
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self._job_pb(record)

    async def ListJobs(self, request: pb.ListJobsRequest, context: CallContext) -> pb.ListJobsReply:
        return pb.ListJobsReply(jobs=[self._job_pb(job) for job in self._jobs.jobs()])

    async def GetJob(self, request: pb.GetJobRequest, context: CallContext) -> pb.Job:
        return self._job_pb(await self._find(request.id, context))

    async def StopJob(self, request: pb.StopJobRequest, context: CallContext) -> pb.Job:
        job = await self._find(request.id, context)
        if job.state in ENDED:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{job.id} has already {job.state}")
        return self._job_pb(self._jobs.stop(job.id))

    async def WatchJobLog(self, request: pb.WatchJobLogRequest, context: CallContext) -> None:
        job = await self._find(request.id, context)
        path, offset = self._jobs.log_of(job.id), max(0, request.offset)
        deadline = time.monotonic() + self._limits.max_wait_s
        while True:
            data = await asyncio.to_thread(_whole_lines, path, offset, CHUNK)
            if data:
                await context.write(pb.LogChunk(offset=offset, data=data))
                offset += len(data)
                continue
            current = self._jobs.job(job.id)
            done = current is None or current.state in ENDED
            if not request.follow or done or time.monotonic() >= deadline:
                return
            await asyncio.sleep(_LOG_POLL_S)

    async def DownloadJob(self, request: pb.DownloadJobRequest, context: CallContext) -> None:
        job = await self._find(request.id, context)
        folder = self._jobs.folder_of(job.id)
        for path in _outputs(folder):
            relative = path.relative_to(folder).as_posix()
            offset, size = 0, path.stat().st_size
            while True:
                data = await asyncio.to_thread(_read_at, path, offset, CHUNK)
                offset += len(data)
                last = not data or offset >= size
                await context.write(pb.FileChunk(path=relative, data=data, last=last))
                if last:
                    break

    # -- helpers -------------------------------------------------------------------

    async def _find(self, job_id: str, context: CallContext) -> JobRecord:
        if not is_job_id(job_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{ascii(job_id[:40])} is not a job id (job-N)"
            )
        job = self._jobs.job(job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"there is no {job_id} in this federation")
        assert job is not None  # abort raises
        return job

    def _job_pb(self, job: JobRecord) -> pb.Job:
        return pb.Job(
            id=job.id,
            name=job.name,
            state=job.state,
            submitted_by=job.submitted_by,
            submitted_at=job.submitted_at,
            started_at=job.started_at,
            ended_at=job.ended_at,
            task=job.task,
            rounds=job.rounds,
            rounds_done=self._jobs.rounds_done(job.id),
            detail=job.detail,
        )


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]


def _outputs(folder: Path) -> list[Path]:
    """The job's files, its own record and temporary files left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".") and p.name != "job.json"
    )


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read(size)


def _whole_lines(path: Path, offset: int, size: int) -> bytes:
    """Up to `size` bytes of the log from `offset`, cut after its last whole line."""
    try:
        data = _read_at(path, offset, size)
    except FileNotFoundError:
        return b""
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else (data if len(data) == size else b"")
