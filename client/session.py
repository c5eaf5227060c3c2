"""One client's protocol life in a run, written once for every kind of client.

fl-client (fedgrpc.client.app), the script API (fedgrpc.client.api), light clients
(fedgrpc.client.light) and fl-sim's actors are drivers over a Session: they train or evaluate
what it hands them, and hand back the result. The Session owns the rest:

                 +---------------- WAIT ----------------+
                 v                                      |
    joined --> polling --next()---------------------> (poll) --FINISHED--> finished (None)
                 ^     |                                |
                 |     +--TRAIN: steps prepare--> training --submit()--> (exchange) --+
                 |     |   (keys lost: log, poll)                                     |
                 |     +--EVALUATE--> evaluating --report()------------------------+  |
                 +---------------------------------------------------------------+----+
    another run's answer at any poll: RunChangedError (the client was not resumed)

- next(): long-polls after the last round it took part in, skips WAIT (after a WAIT with a
  retry-after, it first holds no call that long, at most `max_pause_s`), returns a TRAIN or
  EVALUATE assignment, or None once the run is finished. Before it returns a TRAIN one, the
  exchange's steps prepare for it (secure aggregation shares its keys then, before training);
  a round lost there is logged and the session polls on.
- submit(): the update through the exchange's steps (fedgrpc.client.steps: the run's DP clip
  or local DP, compression, secure aggregation) to the server. A round lost on the way (closed,
  or its secure aggregation aborted) is logged, and submit answers None.
- report(): an evaluation's answer (0 examples: the client has no held-out data).

The core is async, over a Link (fedgrpc.client.link): light clients await it on one event loop,
thousands of sessions at once. BlockingSession runs the same coroutines over a blocking
Connection, one call at a time, without an event loop (fedgrpc.client.link.run_blocking).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from ..common.config import RunSpec
from ..common.errors import RunChangedError, SecAggError, StaleRoundError
from ..common.protocol import Assignment, Instruction
from .link import Link, run_blocking
from .steps import Step, Transport, Update, chain

log = logging.getLogger("fedgrpc.client")
#: The longest a WAIT's retry-after keeps a client away, whatever the server says.
MAX_PAUSE_S = 600.0


class Session:
    """A joined run's protocol life (see the module's docstring), as coroutines over `link`."""

    def __init__(
        self,
        link: Link,
        run: RunSpec,
        steps: Sequence[Step] = (),
        *,
        server: str,
        max_wait_s: float = 30.0,
        max_pause_s: float = MAX_PAUSE_S,
        lost_round_level: int = logging.WARNING,
    ) -> None:
        """`steps`: the exchange's (fedgrpc.client.steps.exchange_steps); `server`: the address
        joined, for messages; `max_pause_s`: the longest a WAIT's retry-after keeps this client
        away; `lost_round_level`: how loud a lost round is logged (light clients by the
        thousand: DEBUG)."""
        self.link, self.run, self.server = link, run, server
        self.max_wait_s = max_wait_s
        self.max_pause_s = max_pause_s
        self.polls = 0  # GetGlobalWeights calls made (check-ins)
        self.lost_round_level = lost_round_level
        self._steps = tuple(steps)
        self._send = chain(self._steps, Transport(link, run.num_clients))
        self.last_round = 0  # the last round this client trained for, or lost
        self.trained = 0  # rounds whose update went through
        self.finished_after = 0  # the run's rounds, once it said FINISHED

    async def next(self) -> Assignment | None:
        """The next TRAIN or EVALUATE assignment, or None once the run is finished."""
        while True:
            self.polls += 1
            assignment = await self.link.next_task(self.last_round, self.max_wait_s)
            if assignment.run_id and assignment.run_id != self.run.run_id:
                raise RunChangedError(
                    f"the server at {self.server} now runs {assignment.run_id}, not the run "
                    f"{self.run.run_id} this client joined (it was replaced, not resumed); start the "
                    "client again to join the new run"
                )
            if assignment.instruction is Instruction.FINISHED:
                self.finished_after = assignment.round
                return None
            if assignment.instruction is Instruction.EVALUATE:
                return assignment
            if assignment.instruction is Instruction.TRAIN and await self._prepared(assignment):
                return assignment
            if assignment.instruction is Instruction.WAIT and assignment.retry_after_s > 0:
                await self.link.pause(min(assignment.retry_after_s, self.max_pause_s))

    async def submit(
        self,
        assignment: Assignment,
        weights: Sequence[np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float],
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[int, int] | None:
        """Send the update trained on `assignment` through the exchange: (updates the round has
        received, updates it expects), or None when the round was lost on the way. `extras`: the
        strategy protocol's tensors that go with it (SCAFFOLD's delta c_i)."""
        update = Update(
            assignment.round, assignment.specs, list(weights), num_examples, metrics, assignment.weights,
            extras=dict(extras or {}),
        )  # fmt: skip
        self.last_round = assignment.round
        try:
            answer = await self._send(update)
        except (StaleRoundError, SecAggError) as exc:
            self._lost(assignment.round, exc)
            return None
        self.trained += 1
        return answer

    async def report(
        self, assignment: Assignment, num_examples: int, metrics: Mapping[str, float]
    ) -> tuple[int, int]:
        """Answer an EVALUATE assignment: (reports the server holds, reports it expects)."""
        return await self.link.submit_evaluation(assignment.round, num_examples, metrics)

    async def _prepared(self, assignment: Assignment) -> bool:
        try:
            for step in self._steps:
                await step.prepare(assignment)
        except (StaleRoundError, SecAggError) as exc:
            self.last_round = assignment.round
            self._lost(assignment.round, exc)
            return False
        return True

    def _lost(self, round_number: int, exc: Exception) -> None:
        log.log(self.lost_round_level, "round %d: this client's update is not in it: %s", round_number, exc)


class BlockingSession:
    """A Session over a blocking Connection (a BlockingLink): the same calls, each run to its end
    on the calling thread."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def next(self) -> Assignment | None:
        return run_blocking(self.session.next())

    def submit(
        self,
        assignment: Assignment,
        weights: Sequence[np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float],
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[int, int] | None:
        return run_blocking(self.session.submit(assignment, weights, num_examples, metrics, extras))

    def report(
        self, assignment: Assignment, num_examples: int, metrics: Mapping[str, float]
    ) -> tuple[int, int]:
        return run_blocking(self.session.report(assignment, num_examples, metrics))
