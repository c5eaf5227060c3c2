"""The one long-poll helper both waiting RPCs use: bounded, woken by phase changes, deadline-aware
and cancellation-safe."""

from __future__ import annotations

import asyncio
from typing import Any

from fedgrpc.server.longpoll import DEADLINE_MARGIN_S, LongPolls


class _Deadline:
    """The one thing the helper asks of a gRPC call: the time left before its deadline."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def time_remaining(self) -> float | None:
        return self.seconds


def _run(coroutine: Any) -> Any:  # a hung wait fails the test instead of hanging it
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_a_phase_change_wakes_every_waiting_call_which_looks_again() -> None:
    async def scenario() -> tuple[list[str | None], float]:
        polls = LongPolls(max_wait_s=20)
        ready: dict[str, str | None] = {"value": None}
        loop = asyncio.get_running_loop()
        start = loop.time()
        waiting = [
            asyncio.ensure_future(polls.until(lambda: ready["value"], 0, _Deadline(None)))  # type: ignore[arg-type]
            for _ in range(3)
        ]
        await asyncio.sleep(0.1)
        polls.phase_changed()  # nothing there yet: they look and wait again
        await asyncio.sleep(0.1)
        ready["value"] = "task"
        polls.phase_changed()
        return list(await asyncio.gather(*waiting)), loop.time() - start

    found, took = _run(scenario())
    assert found == ["task"] * 3 and took < 5


def test_a_wait_ends_at_the_smallest_of_the_servers_cap_the_clients_wish_and_its_deadline() -> None:
    polls = LongPolls(max_wait_s=30)
    assert polls.bound(0, _Deadline(None)) == 30  # type: ignore[arg-type]
    assert polls.bound(2_000, _Deadline(None)) == 2  # type: ignore[arg-type]
    assert polls.bound(0, _Deadline(10)) == 10 - DEADLINE_MARGIN_S  # type: ignore[arg-type]
    assert polls.bound(0, _Deadline(0.1)) == 0  # type: ignore[arg-type]  # past the margin: answer at once

    async def scenario() -> tuple[object, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        nothing: dict[str, str | None] = {}
        found = await LongPolls(max_wait_s=30).until(lambda: nothing.get("task"), 200, _Deadline(None))  # type: ignore[arg-type]
        return found, loop.time() - start

    found, took = _run(scenario())
    assert found is None and 0.15 <= took < 5


def test_a_cancelled_call_does_not_cancel_the_others_wait() -> None:
    async def scenario() -> str | None:
        polls = LongPolls(max_wait_s=20)
        ready: dict[str, str | None] = {"value": None, "never": None}
        gone = asyncio.ensure_future(polls.until(lambda: ready["never"], 0, _Deadline(None)))  # type: ignore[arg-type]
        staying = asyncio.ensure_future(polls.until(lambda: ready["value"], 0, _Deadline(None)))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        gone.cancel()  # its client went away
        await asyncio.sleep(0.1)
        ready["value"] = "task"
        polls.phase_changed()
        return await staying

    assert _run(scenario()) == "task"
