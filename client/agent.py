"""`fl-client --serve`: a site agent that stays up and takes part in run after run.

The coordinator may be a standing federation running job after job, or one fl-server after
another on the same address; the agent does not care which. Its life:

    waiting --Join answered: a run it has not done--> deciding
       ^  ^                                             |  refused (policy): Withdraw(reason) --+
       |  +---- coordinator away / no run / a run it has done: bounded backoff, ask again      |
       |                                                |  accepted: Join with the task's ref   |
       |                                                v                                       |
       +--- FINISHED, or over max_run_time (Withdraw) <- taking part (fedgrpc.client.app.take_part)
       +--- the run was replaced, or the coordinator went away for longer than --connect-timeout:
            the run is not done; ask again (a resumed run is joined again)

A spec-only Join (JoinRequest.spec_only, an empty TaskRef) gives the run's spec with no other
effect (the server neither records nor logs a join), so the agent reads which task the run
names before it chooses one of its installed tasks (fedgrpc.client.policy.check_run). Each wait
is at most the policy's retry_max, and the log has one line per state change, not one per try.

Warm between runs (WarmTasks): every installed task is imported once, at start. A task's model,
its compiled steps and its loaded data are kept after a run and reused by the next run of the
same task file (same digest) on the same site data, parameters, client id, client count,
batch size and partition, with the same FedProx mu; any of these differing rebuilds both
(logged with the reason). Reuse is safe because every round starts from the server's weights
with a freshly reset optimizer (fedgrpc.client.trainer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..common import device
from ..common.config import RunSpec
from ..common.errors import ConfigError, FedGrpcError, RunChangedError, ServerUnavailableError
from ..common.protocol import Assignment
from ..common.task import Site
from ..common.task_loader import LoadedTask, check_params, load_task
from ..common.words import plural
from .announce import announce
from .app import ClientConfig, prepare_trainer, take_part
from .channel import Backoff
from .connection import Connection
from .policy import InstalledTask, SitePolicy, check_run
from .policy import check_params as check_allowed_params

if TYPE_CHECKING:
    from .trainer import LocalTrainer

log = logging.getLogger("fedgrpc.client")

#: How long one try to reach the coordinator may take while waiting (the backoff comes after).
PROBE_TIMEOUT_S = 2.0


class RunTimeLimitError(FedGrpcError):
    """The run went on longer than the site's max_run_time."""


def install_tasks(policy: SitePolicy) -> dict[str, LoadedTask]:
    """Import every installed task once, checking that each file declares the name the policy
    gives it and still has the digest read at start."""
    loaded: dict[str, LoadedTask] = {}
    for installed in policy.tasks:
        task = load_task(str(installed.file))
        if task.name != installed.name:
            raise ConfigError(
                f"--policy: task file {installed.file} declares task {task.name!r}, not {installed.name!r}"
            )
        if task.ref.digest != installed.digest:
            raise ConfigError(f"--policy: task file {installed.file} changed while it was loaded")
        loaded[installed.name] = task
    return loaded


@dataclass
class _Warm:
    site: Site
    proximal_mu: float
    trainer: LocalTrainer


class WarmTasks:
    """Each installed task's trainer (model and data), kept between runs (module docstring)."""

    def __init__(self) -> None:
        self._warm: dict[str, _Warm] = {}
        self.builds = 0
        self.reuses = 0

    def trainer(
        self, installed: InstalledTask, loaded: LoadedTask, run: RunSpec, config: ClientConfig
    ) -> LocalTrainer:
        params = check_params(loaded.task, run.task_params)
        site = Site(
            client_id=config.client_id, num_clients=run.num_clients, data=installed.data, params=params,
            batch_size=run.batch_size, partition_seed=run.partition_seed, partition=run.partition,
        )  # fmt: skip
        warm = self._warm.get(installed.name)
        if warm is not None and warm.site == site and warm.proximal_mu == run.proximal_mu:
            warm.trainer.run = run
            self.reuses += 1
            log.info(
                "task %s: reusing its warm model and data (%d reuses so far)", installed.name, self.reuses
            )
            return warm.trainer
        why = "first run of this task" if warm is None else _changed(warm, site, run)
        self._warm.pop(installed.name, None)  # let the old model go before building the new one
        trainer = prepare_trainer(loaded, run, replace(config, task=str(installed.file), data=installed.data))
        self._warm[installed.name] = _Warm(site, run.proximal_mu, trainer)
        self.builds += 1
        log.info("task %s: built its model and loaded its data (%s)", installed.name, why)
        return trainer


def _changed(warm: _Warm, site: Site, run: RunSpec) -> str:
    differ = [name for name in ("params", "num_clients", "batch_size", "partition", "partition_seed", "data")
              if getattr(warm.site, name) != getattr(site, name)]  # fmt: skip
    if warm.proximal_mu != run.proximal_mu:
        differ.append("proximal_mu")
    return "rebuilt: the run's " + ", ".join(differ) + " differ from the last run's"


class SiteAgent:
    """Waits for runs and takes part in those its policy allows (module docstring)."""

    def __init__(self, config: ClientConfig, policy: SitePolicy, loaded: dict[str, LoadedTask]) -> None:
        self.config, self.policy, self.loaded = config, policy, loaded
        self.warm = WarmTasks()
        self.done: set[str] = set()  # runs finished or refused here: not joined again
        self._channel = config.security.channel(config.server)
        self._state = ""
        self._announce_at = 0.0  # monotonic time of the next announcement (fedgrpc.client.announce)

    def serve(self, until: Callable[[], bool] = lambda: False) -> None:
        """Forever (or until `until()`): wait for a run, decide, take part, wait again."""
        log.info(
            "site agent for %s at %s: installed %s", plural(len(self.loaded), "task"), self.config.server,
            ", ".join(f"{name} ({task.ref.digest[:12]})" for name, task in self.loaded.items()),
        )  # fmt: skip
        log.info("devices: %s", device.configure(self.config.threads))
        delays = Backoff(initial_s=0.5, maximum_s=self.policy.retry_max).delays()
        while not until():
            if time.monotonic() >= self._announce_at:  # at start, after a run, and while waiting
                every = announce(self._channel, self.config.security, self.config.client_id, self.policy)
                self._announce_at = time.monotonic() + (every or 0.0)
            run = self._probe()
            if run is not None and run.run_id not in self.done:
                self._attend(run)
                self._announce_at = 0.0
                delays = Backoff(initial_s=0.5, maximum_s=self.policy.retry_max).delays()
                continue
            time.sleep(next(delays))

    def _probe(self) -> RunSpec | None:
        """The coordinator's current run, or None (away, no run, or not enrolled: one line each)."""
        connection = Connection(
            self.config.server, self.config.client_id, connect_timeout_s=PROBE_TIMEOUT_S,
            security=self.config.security, channel=self._channel,
        )  # fmt: skip
        try:
            run, _ = connection.join(None, spec_only=True)
        except ServerUnavailableError as exc:
            self._say("away", "waiting for a run at %s: %s", self.config.server, exc)
            return None
        except FedGrpcError as exc:  # not enrolled, credentials refused, a spec it cannot read, ...
            self._say(f"refused {exc}", "the coordinator turned this site away: %s", exc)
            return None
        if run.run_id in self.done:
            self._say(f"done {run.run_id}", "run %s is done here; waiting for the next run", run.run_id)
        return run

    def _say(self, state: str, message: str, *args: Any) -> None:
        """Log `message` when the state changes (not once per try)."""
        if state != self._state:
            self._state = state
            log.info(message, *args)

    def _attend(self, run: RunSpec) -> None:
        """Decide on `run`, then take part or refuse; marks the run done unless it was cut short."""
        self._state = f"run {run.run_id}"
        decision = check_run(self.policy, run)
        if isinstance(decision, InstalledTask):
            loaded = self.loaded[decision.name]
            decision = check_allowed_params(decision, loaded.task.params, run) or decision
        if isinstance(decision, str):
            self._refuse(run, decision)
            self._state = f"done {run.run_id}"
            return
        config = replace(self.config, task=str(decision.file), data=decision.data)
        with Connection(
            config.server, config.client_id, connect_timeout_s=config.connect_timeout_s,
            chunk_bytes=config.chunk_bytes, security=config.security, channel=self._channel,
        ) as connection:  # fmt: skip
            if self._take_part(connection, decision, run, config):
                self.done.add(run.run_id)
        if run.run_id in self.done:  # said already: the next try that finds it says nothing
            self._state = f"done {run.run_id}"

    def _refuse(
        self, run: RunSpec, reason: str, connection: Connection | None = None, *, verb: str = "refused"
    ) -> None:
        """Say why this site does not (or no longer) take part in `run`, here and to the coordinator."""
        log.warning("run %s (task %s): %s: %s", run.run_id, run.task.name, verb, reason)
        connection = connection or Connection(
            self.config.server, self.config.client_id, security=self.config.security, channel=self._channel
        )
        if not connection.withdraw(f"site policy: {reason}"):
            log.warning("run %s: the coordinator did not hear the refusal", run.run_id)
        self.done.add(run.run_id)

    def _take_part(
        self, connection: Connection, installed: InstalledTask, run: RunSpec, config: ClientConfig
    ) -> bool:
        """True when the run is over for this site (finished, or withdrawn from)."""
        loaded = self.loaded[installed.name]
        try:
            joined, current = connection.join(loaded.ref)  # the coordinator checks the task too
            if joined.run_id != run.run_id:
                return False
            log.info(
                "joined run %s at %s: task %s, %s, %s (round %d open)", run.run_id, config.server,
                loaded.name, plural(run.rounds, "round"), plural(run.num_clients, "client"), current,
            )  # fmt: skip
            trainer = self.warm.trainer(installed, loaded, joined, config)
            self._bound(connection)
            take_part(connection, joined, trainer, config, main_metric=loaded.task.main_metric)
        except (RunChangedError, ServerUnavailableError) as exc:
            log.warning("run %s: left unfinished: %s", run.run_id, exc)
            return False
        except FedGrpcError as exc:  # the site cannot go on: say why, so nobody waits for it
            self._refuse(run, str(exc), connection, verb="withdrew")
            return True
        log.info("run %s: done; waiting for the next run", run.run_id)
        return True

    def _bound(self, connection: Connection) -> None:
        """Hold the run to max_run_time: the polls between rounds stop once it is over."""
        limit = self.policy.max_run_time
        if limit is None:
            return
        deadline, poll = time.monotonic() + limit, connection.next_task

        def bounded(after_round: int, max_wait_s: float = 30.0, *more: Any, **named: Any) -> Assignment:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunTimeLimitError(f"the run went on past this site's max_run_time of {limit:g} s")
            return poll(after_round, min(max_wait_s, max(left, 0.1)), *more, **named)

        connection.next_task = bounded  # type: ignore[method-assign]


def serve(config: ClientConfig, policy: SitePolicy) -> None:
    """fl-client --serve: install the policy's tasks, then wait for runs for ever."""
    SiteAgent(config, policy, install_tasks(policy)).serve()
