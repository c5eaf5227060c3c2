"""An admin's connection to a standing federation: fedgrpc.v1.FederationAdmin calls, blocking.

The only module of fedgrpc.client that touches admin_pb2. A call the coordinator refuses
raises AdminCallError with its status code's name and the coordinator's sentence; every call
has a deadline (`timeout_s`), a followed log as long as the coordinator holds it (it ends the
call within its --max-wait; `log` asks again from where it got).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from fedgrpc.v1 import admin_pb2 as pb

from ..common.errors import FedGrpcError
from .channel import ChannelSecurity

_SERVICE = "/fedgrpc.v1.FederationAdmin/"


class AdminCallError(FedGrpcError):
    """A FederationAdmin call that failed: `code` is its gRPC status's name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code


@dataclass(frozen=True)
class JobView:
    """One job as the coordinator reports it."""

    id: str
    name: str
    state: str
    submitted_by: str
    submitted_at: float
    started_at: float
    ended_at: float
    task: str
    rounds: int
    rounds_done: int
    detail: str


class AdminConnection:
    """One channel to the coordinator; use as a context manager."""

    def __init__(self, target: str, security: ChannelSecurity, timeout_s: float = 30.0) -> None:
        self._channel = security.channel(target)
        self._metadata = security.metadata()
        self._timeout_s = timeout_s

    def __enter__(self) -> AdminConnection:
        return self

    def __exit__(self, *_: object) -> None:
        self._channel.close()

    def submit(self, name: str, run_file: bytes, task_file: bytes = b"") -> JobView:
        request = pb.SubmitJobRequest(name=name, run_file=run_file, task_file=task_file)
        return _view(self._unary("SubmitJob", request, pb.Job))

    def jobs(self) -> list[JobView]:
        reply = self._unary("ListJobs", pb.ListJobsRequest(), pb.ListJobsReply)
        return [_view(job) for job in reply.jobs]

    def job(self, job_id: str) -> JobView:
        return _view(self._unary("GetJob", pb.GetJobRequest(id=job_id), pb.Job))

    def stop(self, job_id: str) -> JobView:
        return _view(self._unary("StopJob", pb.StopJobRequest(id=job_id), pb.Job))

    def log(self, job_id: str, offset: int = 0, *, follow: bool = False) -> Iterator[bytes]:
        """The job's log from `offset`; following it, until the job has ended."""
        while True:
            request = pb.WatchJobLogRequest(id=job_id, offset=offset, follow=follow)
            for chunk in self._stream("WatchJobLog", request, pb.LogChunk, timeout_s=None):
                offset = chunk.offset + len(chunk.data)
                yield chunk.data
            if not follow or self.job(job_id).state not in ("queued", "running"):
                return

    def download(self, job_id: str, out: Path) -> list[Path]:
        """The job's files written under `out`; their paths."""
        written: list[Path] = []
        request = pb.DownloadJobRequest(id=job_id)
        file = None
        for chunk in self._stream("DownloadJob", request, pb.FileChunk, timeout_s=None):
            path = _inside(out, chunk.path)
            if file is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                file = path.open("wb")
                written.append(path)
            file.write(chunk.data)
            if chunk.last:
                file.close()
                file = None
        return written

    def _unary(self, method: str, request: object, reply: Any) -> Any:
        call = self._channel.unary_unary(
            _SERVICE + method, request_serializer=_serialize, response_deserializer=reply.FromString
        )
        try:
            return call(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def _stream(self, method: str, request: object, reply: Any, timeout_s: float | None) -> Iterator[Any]:
        call = self._channel.unary_stream(
            _SERVICE + method, request_serializer=_serialize, response_deserializer=reply.FromString
        )
        try:
            yield from call(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None


def _serialize(message: object) -> bytes:
    return message.SerializeToString()  # type: ignore[attr-defined,no-any-return]


def _error(exc: grpc.RpcError) -> AdminCallError:
    code = exc.code()
    return AdminCallError(code.name if code is not None else "UNKNOWN", exc.details() or "")


def _view(job: object) -> JobView:
    assert isinstance(job, pb.Job)
    return JobView(
        job.id, job.name, job.state, job.submitted_by, job.submitted_at, job.started_at, job.ended_at,
        job.task, job.rounds, job.rounds_done, job.detail,
    )  # fmt: skip


def _inside(out: Path, relative: str) -> Path:
    """`relative` under `out`, refused if it would leave it (a coordinator is trusted, not blindly)."""
    path = (out / relative).resolve()
    if not relative or not path.is_relative_to(out.resolve()):
        raise AdminCallError(
            "INVALID_ARGUMENT", f"the coordinator sent a file outside the folder: {relative!r}"
        )
    return path
