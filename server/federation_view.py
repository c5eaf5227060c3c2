"""What `fl-server --federation DIR --http PORT` shows: the federation (its sites and jobs)
beside the running job's run, for the dashboard and for Prometheus.

    snapshot() = the running job's Monitor snapshot (the run view, as a one-run server has it;
                 "run": null between jobs) + "federation": {sites, jobs}

Prometheus: the running job's metrics carry a `job` label (its id); the federation's own
gauges are fedgrpc_federation_sites_online and fedgrpc_federation_jobs{state}; the process's
metrics appear once, unlabelled. A job's withdrawals are kept when it ends (the last
RECENT_WITHDRAWALS of each of the last KEPT_JOBS jobs), its other numbers are in its history.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector
from prometheus_client.metrics_core import Metric

from .jobs import ENDED, JobRecord
from .monitor import Monitor
from .sites import SiteRegistry

KEPT_JOBS = 100
#: Jobs listed one by one in a snapshot, the newest (all of them are counted by state).
LISTED_JOBS = 200
RECENT_WITHDRAWALS = 20
#: The view is sent again at least this often (times since, sites going offline, the queue).
TICK_S = 5
JOB_STATES = ("queued", "running", "finished", "failed", "stopped")


class Jobs(Protocol):
    """What the view asks of the federation (fedgrpc.server.federation.Federation)."""

    def jobs(self) -> list[JobRecord]: ...
    def rounds_done(self, job_id: str) -> int: ...
    def current(self) -> tuple[str, Monitor] | None: ...


class FederationView:
    """The dashboard's source in federation mode (the Monitor's role in a one-run server)."""

    def __init__(self, jobs: Jobs, sites: SiteRegistry, clock: Callable[[], float] = time.time) -> None:
        self._jobs = jobs
        self.sites = sites
        self._clock = clock
        self._lock = threading.Lock()
        self._withdrawals: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._ended = 0
        self._rounds_of_ended: dict[str, int] = {}  # read once from its history.json
        self._key: tuple[Any, ...] = ()
        self._version = 0
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        Gauge(
            "fedgrpc_federation_sites_online",
            "Sites heard from lately (announced, or in the running job)",
            registry=self.registry,
        ).set_function(self.sites_online)
        by_state = Gauge("fedgrpc_federation_jobs", "Jobs by state", ["state"], registry=self.registry)
        for state in JOB_STATES:
            by_state.labels(state).set_function(partial(self._count, state))
        self.registry.register(_JobMetrics(jobs))

    @property
    def version(self) -> int:
        """Moves (up only: the page drops an older snapshot) whenever anything shown changes,
        and every TICK_S seconds; a new job's Monitor starts its own count again."""
        current = self._jobs.current()
        key = (
            self.sites.version, self._ended, current[0] if current else None,
            current[1].version if current else 0, int(self._clock()) // TICK_S,
        )  # fmt: skip
        with self._lock:
            if key != self._key:
                self._key, self._version = key, self._version + 1
            return self._version

    def job_ended(self, job_id: str, monitor: Monitor | None) -> None:
        """Keep the ended job's withdrawals (its Monitor goes with it)."""
        recent = monitor.snapshot()["withdrawals"]["recent"][:RECENT_WITHDRAWALS] if monitor else []
        with self._lock:
            self._withdrawals[job_id] = recent
            while len(self._withdrawals) > KEPT_JOBS:
                self._withdrawals.popitem(last=False)
            self._ended += 1

    def sites_online(self) -> int:
        return sum(site["online"] for site in self._site_view())

    def snapshot(self) -> dict[str, Any]:
        current = self._jobs.current()
        snapshot: dict[str, Any] = current[1].snapshot() if current else {"run": None}
        running = current[0] if current else None
        jobs, records = [], self._jobs.jobs()
        for record in records[-LISTED_JOBS:]:
            if record.id == running:
                withdrawals = snapshot["withdrawals"]["recent"][:RECENT_WITHDRAWALS]
            else:
                with self._lock:
                    withdrawals = list(self._withdrawals.get(record.id, []))
            jobs.append(_job_view(record, self._rounds_done(record), withdrawals))
        snapshot.update(version=self.version, now=self._clock())
        snapshot["federation"] = {
            "sites": self._site_view(), "jobs": jobs, "running": running, "total_jobs": len(records),
        }  # fmt: skip
        return snapshot

    def _rounds_done(self, record: JobRecord) -> int:
        if record.state not in ENDED:
            return self._jobs.rounds_done(record.id)
        with self._lock:
            done = self._rounds_of_ended.get(record.id)
        if done is None:
            done = self._jobs.rounds_done(record.id)
            with self._lock:
                self._rounds_of_ended[record.id] = done
        return done

    def _site_view(self) -> list[dict[str, Any]]:
        current = self._jobs.current()
        monitor = current[1] if current else None
        return self.sites.view(monitor.heard_from if monitor else lambda _: False)

    def _count(self, state: str) -> int:
        return sum(job.state == state for job in self._jobs.jobs())


def _job_view(record: JobRecord, rounds_done: int, withdrawals: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": record.id, "name": record.name, "task": record.task, "state": record.state,
        "rounds": record.rounds, "rounds_done": rounds_done, "submitted_by": record.submitted_by,
        "submitted_at": record.submitted_at, "started_at": record.started_at or None,
        "ended_at": record.ended_at or None, "detail": record.detail, "withdrawals": withdrawals,
    }  # fmt: skip


class _JobMetrics:
    """The running job's own metrics (its Monitor's registry), each sample labelled with its job."""

    def __init__(self, jobs: Jobs) -> None:
        self._jobs = jobs

    def collect(self) -> Iterator[Metric]:
        current = self._jobs.current()
        if current is None:
            return
        job_id, monitor = current
        for family in monitor.registry.collect():
            if family.name.startswith("process_"):  # the federation's registry has them, once
                continue
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(
                    sample.name,
                    {**sample.labels, "job": job_id},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
            yield labelled
