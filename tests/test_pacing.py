"""Check-in pacing: a client the server does not need now is told when to come back (WAIT with a
retry-after, spread over a window) and holds no call meanwhile; with a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from fedgrpc.client.aio_connection import AioConnection
from fedgrpc.client.session import Session
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec
from fedgrpc.common.protocol import Assignment, Instruction
from fedgrpc.server.endpoint import GrpcEndpoint
from fedgrpc.server.limits import Limits
from fedgrpc.server.pacing import MIN_WINDOW_S, Pacer, point
from fedgrpc.server.phases import Phase, PhaseChange
from fedgrpc.server.rounds import RoundCoordinator
from fedgrpc.server.strategy import FedAvg
from fedgrpc.v1 import coordinator_pb2 as pb
from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc
from helpers import serving
from prometheus_client import generate_latest

SPECS = [TensorSpec("w", "float32", (3,))]
GLOBAL = [np.arange(3, dtype=np.float32)]
CLIENTS = 4


def test_the_clients_sent_away_come_back_spread_over_a_window_at_the_check_in_rate() -> None:
    pacer = Pacer(checkin_rate=1000, max_delay_s=30)
    assert pacer.window_s(10_000) == 10 and pacer.window_s(3) == MIN_WINDOW_S
    retries = [pacer.retry_after(client, 4, 10_000).retry_after_s for client in range(1, 10_001)]
    assert all(0 <= r < 10 for r in retries)
    per_second = np.histogram(retries, bins=10, range=(0, 10))[0]
    assert per_second.min() > 850 and per_second.max() < 1150, per_second  # ~1000 a second, no herd
    assert pacer.retry_after(7, 4, 10_000) == pacer.retry_after(7, 4, 10_000)  # the same if asked twice
    assert point(7, 4) != point(7, 5) and point(7, 4) != point(8, 4)


def test_the_next_round_is_expected_one_mean_interval_after_the_open_round_opened() -> None:
    now = [100.0]
    pacer = Pacer(checkin_rate=1000, max_delay_s=30, clock=lambda: now[0])
    assert pacer.until_next_round_s() == 0  # no round yet: whenever it opens, be there
    pacer.phase(PhaseChange(Phase.TRAINING, 1))
    now[0] += 4
    assert pacer.until_next_round_s() == 0  # no round closed yet: within the window
    pacer.phase(PhaseChange(Phase.AGGREGATING, 1))
    assert pacer.until_next_round_s() == 0  # between rounds: the next opens any moment
    now[0] += 2
    pacer.phase(PhaseChange(Phase.TRAINING, 2))  # interval 6 s
    now[0] += 1
    assert pacer.until_next_round_s() == pytest.approx(5)
    now[0] += 60
    assert pacer.until_next_round_s() == 0  # overdue: come back within the window
    assert Pacer(1000, 30, clock=lambda: now[0]).until_next_round_s() <= 30
    assert pacer.away_s() == 0  # nobody told to come back yet
    told = pacer.retry_after(3, 2, 10_000).retry_after_s
    assert pacer.away_s() == pytest.approx(told + 1)  # the run's end waits for it to come back


@contextlib.contextmanager
def paced_round(per_round: int = 1) -> Iterator[tuple[RoundCoordinator, GrpcEndpoint, str]]:
    """CLIENTS ready clients, `per_round` of them sampled for round 1, which is open."""
    coordinator = RoundCoordinator(
        RunSpec(rounds=2, num_clients=CLIENTS), SPECS, FedAvg(), clients_per_round=per_round
    )
    for client in range(1, CLIENTS + 1):
        coordinator.next_task(client, after_round=0, timeout=0)
    with serving(coordinator, limits=Limits(max_wait_s=5)) as endpoint:
        coordinator.open_round(1, GLOBAL)
        yield coordinator, endpoint, f"127.0.0.1:{endpoint.port}"


def _raw_poll(
    target: str, client: int, *, accepts: bool, max_wait_ms: int = 3000
) -> tuple[pb.WeightsHeader, float]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        started = time.monotonic()
        request = pb.GetGlobalWeightsRequest(
            client_id=client, after_round=0, max_wait_ms=max_wait_ms, accepts_retry_after=accepts
        )
        messages = list(stub.GetGlobalWeights(request, timeout=10))
    return messages[0].header, time.monotonic() - started


def test_a_raw_client_that_accepts_a_retry_after_is_answered_at_once_an_old_one_is_held() -> None:
    with paced_round() as (coordinator, _, target):
        sampled = next(iter(coordinator.participants(1)))
        others = [c for c in range(1, CLIENTS + 1) if c != sampled]
        header, took = _raw_poll(target, others[0], accepts=True)
        assert header.instruction == pb.WAIT and header.round == 1 and took < 2
        assert 0 < header.retry_after_ms <= 5000 + MIN_WINDOW_S * 1000
        old, held = _raw_poll(target, others[0], accepts=False, max_wait_ms=600)
        assert old.instruction == pb.WAIT and old.retry_after_ms == 0 and held >= 0.5  # as before
        train, _ = _raw_poll(target, sampled, accepts=True)
        assert train.instruction == pb.TRAIN and train.retry_after_ms == 0
        spread = {_raw_poll(target, c, accepts=True)[0].retry_after_ms for c in others}
        assert len(spread) == len(others)  # each its own point in the window


def _open_long_polls(endpoint: GrpcEndpoint) -> float:
    text = generate_latest(endpoint.monitor.registry).decode()
    line = next(
        li for li in text.splitlines() if li.startswith('fedgrpc_open_calls_by_kind{kind="long_poll"}')
    )
    return float(line.split()[1])


def test_an_unsampled_light_client_holds_no_call_and_comes_back_for_the_round_that_samples_it() -> None:
    with paced_round() as (coordinator, endpoint, target):
        ready = range(1, CLIENTS + 1)
        first, second = coordinator.sampler.trainers(1, ready), coordinator.sampler.trainers(2, ready)
        assert first is not None and second is not None
        client = next(c for c in ready if c not in first and c in second)
        answers: list[tuple[float, Assignment]] = []

        async def take_part() -> tuple[Assignment | None, Session]:
            async with AioConnection(target, client) as connection:
                run, _ = await connection.join()
                asking = connection.next_task

                async def recorded(after_round: int, max_wait_s: float = 30.0) -> Assignment:
                    answer = await asking(after_round, max_wait_s)
                    answers.append((time.monotonic(), answer))
                    return answer

                connection.next_task = recorded  # type: ignore[method-assign]
                session = Session(connection, run, server=target)
                return await session.next(), session

        async def scenario() -> tuple[Assignment | None, Session, list[float]]:
            taking_part = asyncio.ensure_future(take_part())
            held = []
            while len(answers) < 3:  # paced while round 1 is open: looks at the server meanwhile
                await asyncio.sleep(0.05)
                if answers and answers[-1][1].instruction is Instruction.WAIT:
                    held.append(await asyncio.to_thread(_open_long_polls, endpoint))
            for trainer in first:  # round 1's sample sends its update (in process), the round closes
                coordinator.submit(trainer, 1, 10, {}, GLOBAL, wire_bytes=12)
            await asyncio.to_thread(coordinator.close_round)
            await asyncio.to_thread(coordinator.open_round, 2, GLOBAL)
            assignment, session = await asyncio.wait_for(taking_part, 30)
            return assignment, session, held

        assignment, session, held = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert assignment is not None and assignment.instruction is Instruction.TRAIN and assignment.round == 2
    waits = [(at, a) for at, a in answers if a.instruction is Instruction.WAIT]
    assert len(waits) >= 2 and all(a.retry_after_s > 0 for _, a in waits)
    for (at, answer), (back_at, _) in zip(answers, answers[1:], strict=False):
        assert back_at - at >= answer.retry_after_s * 0.9  # it stayed away as long as it was told
    assert held and max(held) == 0  # no long-poll open while it stayed away
    assert session.polls == len(answers)


def test_the_end_of_the_run_waits_for_the_clients_told_to_come_back_later() -> None:
    coordinator = RoundCoordinator(RunSpec(rounds=1, num_clients=2), SPECS, FedAvg(), clients_per_round=1)
    coordinator.on_pacing(lambda: 0.5)  # a client told to come back is due in 0.5 s
    coordinator.finish()
    started = time.monotonic()
    assert not coordinator.wait_told_finished([1, 2], timeout=0)
    assert time.monotonic() - started >= 0.45
