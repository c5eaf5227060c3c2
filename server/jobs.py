"""A standing federation's job queue, kept in its folder so that it outlives the coordinator.

    queued --start--> running --end--> finished | failed | stopped
    queued --stop--> stopped

Each job is one small JSON file, DIR/jobs/<id>/job.json, written whole to a temporary file and
renamed over the old one (atomic on POSIX): a coordinator killed at any moment leaves every job
as it was before or after the change, never half written. On a restart a job still `running`
was cut off: it is run again first, and resumes from its checkpoint. Jobs run in the order
they were submitted (`seq`). Thread-safe: the admin service's handlers submit and stop, the
federation's driver thread starts and ends.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..common.errors import ConfigError

State = Literal["queued", "running", "finished", "failed", "stopped"]
STATES: tuple[State, ...] = ("queued", "running", "finished", "failed", "stopped")
ENDED: tuple[State, ...] = ("finished", "failed", "stopped")
JOB_FILE = "job.json"
RUN_FILE = "run.toml"
LOG_FILE = "server.log"
#: An admin's name for a job, and a job id: printable, no path separators, short.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ID = re.compile(r"job-([1-9][0-9]{0,8})")
MAX_DETAIL = 500


def checked_name(name: str, what: str = "job name") -> str:
    """A name fit to be stored, shown in logs and used in a path; ConfigError otherwise."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {ascii(name[:80])} must be 1 to 64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )
    return name


def is_job_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


@dataclass(frozen=True)
class JobRecord:
    """One job's state, as job.json holds it."""

    id: str
    seq: int
    name: str
    submitted_by: str
    submitted_at: float
    task: str
    rounds: int
    state: State = "queued"
    started_at: float = 0.0
    ended_at: float = 0.0
    detail: str = ""

    @staticmethod
    def from_json(data: Any, path: Path) -> JobRecord:
        """A job.json's record, every field checked (the folder may have been edited by hand)."""
        try:
            record = JobRecord(**data)
            ok = (
                is_job_id(record.id)
                and record.state in STATES
                and isinstance(record.seq, int)
                and all(isinstance(v, str) for v in (record.name, record.submitted_by, record.task))
                and isinstance(record.rounds, int)
            )
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(
                f"{path} is not a job record fedgrpc wrote; move it out of the federation folder"
            )
        return record


class JobQueue:
    """The jobs of DIR/jobs, on disk and in memory (they are few, and small)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "jobs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Condition()
        self._jobs: dict[str, JobRecord] = {}
        for path in sorted(self.folder.glob(f"*/{JOB_FILE}")):
            record = JobRecord.from_json(_read_json(path), path)
            self._jobs[record.id] = record

    def folder_of(self, job_id: str) -> Path:
        return self.folder / job_id

    def all(self) -> list[JobRecord]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.seq)

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._jobs.get(job_id)

    def submit(self, name: str, by: str, task: str, rounds: int, files: dict[str, bytes]) -> JobRecord:
        """Store a new job's files, then its record (queued): a crash between the two leaves a
        folder without job.json, which is not a job."""
        with self._lock:
            seq = max((j.seq for j in self._jobs.values()), default=0) + 1
            record = JobRecord(f"job-{seq}", seq, name, by, time.time(), task, rounds)
            folder = self.folder_of(record.id)
            folder.mkdir(parents=True, exist_ok=True)
            for file_name, data in files.items():
                _write_atomically(folder / file_name, data)
            self._save(record)
            self._lock.notify_all()
            return record

    def next_to_run(self, timeout_s: float) -> JobRecord | None:
        """The job to run now: one cut off while running first, else the oldest queued; waits
        up to `timeout_s` for one to be submitted."""
        with self._lock:
            self._lock.wait_for(lambda: self._first() is not None, timeout=timeout_s)
            return self._first()

    def _first(self) -> JobRecord | None:
        jobs = sorted(self._jobs.values(), key=lambda j: (j.state != "running", j.seq))
        return next((j for j in jobs if j.state in ("running", "queued")), None)

    def start(self, job_id: str) -> JobRecord:
        return self._change(
            job_id, lambda j: replace(j, state="running", started_at=j.started_at or time.time())
        )

    def end(self, job_id: str, state: State, detail: str = "") -> JobRecord:
        return self._change(
            job_id, lambda j: replace(j, state=state, ended_at=time.time(), detail=detail[:MAX_DETAIL])
        )

    def stop_queued(self, job_id: str) -> JobRecord | None:
        """Stop a job that has not started (None if it has)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state != "queued":
                return None
            return self.end(job_id, "stopped", "stopped before it started")

    def _change(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        with self._lock:
            record = change(self._jobs[job_id])
            self._save(record)
            self._lock.notify_all()
            return record

    def _save(self, record: JobRecord) -> None:
        data = json.dumps(asdict(record), indent=1).encode()
        _write_atomically(self.folder_of(record.id) / JOB_FILE, data)
        self._jobs[record.id] = record


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {exc}") from None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file beside it, flushed, renamed over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
