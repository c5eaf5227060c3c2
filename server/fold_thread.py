"""The fold thread: accepted updates are added to the aggregate one after another, off the handlers.

A client's reply does not wait for the arithmetic of folding its update in; the round's close
waits for every queued fold (`drain`) before it asks the strategy for the result.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("fedgrpc.server.rounds")


class FoldThread:
    """Runs folds one after another on a daemon thread, in the order they were accepted."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def put(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fedgrpc-fold", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    @property
    def depth(self) -> int:
        """Folds queued or running."""
        return self._jobs.unfinished_tasks

    def drain(self) -> None:
        """Wait until every fold put so far is done; re-raise the first one that failed."""
        self._jobs.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"folding an accepted update failed: {error}") from error

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException as exc:  # kept for drain(): a fold must never fail silently
                log.exception("folding an accepted update failed")
                self._error = self._error or exc
            finally:
                del job  # the fold holds an update's arrays: let them go now, not at the next job
                self._jobs.task_done()
