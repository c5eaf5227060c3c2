"""A client without TensorFlow or data, so thousands can drive one server from one machine.

It speaks the real protocol through the real client calls (join, long-poll, streamed weights,
compressed updates), but "training" is a small perturbation of the global weights drawn
from a generator seeded by (client id, round). Anyone can recompute what each light client
sent, so tests and bench/scale.py can check the server's aggregate exactly.

Light clients are coroutines on grpc.aio (AioConnection): `run_light_clients` runs any number
of them on one event loop, one channel between them, so a benchmark measures the server and
not thousands of client threads; `run_light_client` runs one (`fl-client --light`). Each is a
client session (fedgrpc.client.session) awaited on that loop, as fl-client's is run blocking:
the same steps in the same order, secure aggregation's included (keys shared before the
update is made), and no thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

import grpc
import numpy as np

from ..common.codec import DEFAULT_CHUNK_BYTES
from ..common.errors import FedGrpcError
from ..common.protocol import Instruction
from .aio_connection import AioConnection
from .channel import ChannelSecurity
from .session import Session
from .steps import exchange_steps

log = logging.getLogger("fedgrpc.client")

NOISE = 0.01  # standard deviation of a light update's change to each float weight


def light_examples(client_id: int) -> int:
    """The example count a light client claims: uneven on purpose, so weighting matters."""
    return 100 + 10 * (client_id % 7)


def light_update(weights: Sequence[np.ndarray], client_id: int, round_number: int) -> list[np.ndarray]:
    """What light client `client_id` sends for `round_number`, given the round's weights."""
    rng = np.random.default_rng([client_id, round_number])
    out = []
    for w in weights:
        if np.issubdtype(w.dtype, np.floating):
            noise = rng.standard_normal(w.shape, dtype=np.float32) * np.float32(NOISE)
            out.append((w + noise).astype(w.dtype))
        else:
            out.append(np.array(w))
    return out


@dataclass
class LightStats:
    rounds: int = 0
    submit_seconds: list[float] = field(default_factory=list)
    bytes_down: int = 0
    traffic_sent: int = 0  # every message's protobuf bytes (the connections' traffic), all calls
    traffic_received: int = 0
    retried: dict[str, int] = field(default_factory=dict)  # calls retried, by status code
    polls: int = 0  # GetGlobalWeights calls made (check-ins)
    received: dict[int, list[np.ndarray]] = field(default_factory=dict)  # with keep_weights only


@dataclass(frozen=True)
class LightSettings:
    """How light clients reach the server and pace themselves (one set for all of a loop's clients)."""

    security: ChannelSecurity = field(default_factory=ChannelSecurity)
    connect_timeout_s: float = 60.0
    max_wait_s: float = 30.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


async def light_client(
    server: str,
    client_id: int,
    settings: LightSettings = LightSettings(),
    *,
    keep_weights: bool = False,
    channel: grpc.aio.Channel | None = None,
) -> LightStats:
    """Take part in a run until it finishes; returns what this client did and how long submits took
    (and, with keep_weights, the global weights it was sent each round, to check the aggregate).
    `channel`: one shared by the light clients of this loop (None: a channel of its own)."""
    stats = LightStats()
    async with AioConnection(
        server,
        client_id,
        connect_timeout_s=settings.connect_timeout_s,
        chunk_bytes=settings.chunk_bytes,
        security=settings.security,
        channel=channel,
    ) as connection:
        run, _ = await connection.join()
        steps = exchange_steps(connection, run, max_wait_s=settings.max_wait_s)
        session = Session(
            connection,
            run,
            steps,
            server=server,
            max_wait_s=settings.max_wait_s,
            lost_round_level=logging.DEBUG,
        )
        while (assignment := await session.next()) is not None:
            if assignment.instruction is Instruction.EVALUATE:  # no data to evaluate on: say so
                await session.report(assignment, 0, {})
                continue
            stats.bytes_down += assignment.wire_bytes
            if keep_weights:
                stats.received[assignment.round] = assignment.weights
            weights = light_update(assignment.weights, client_id, assignment.round)
            started = time.perf_counter()
            answer = await session.submit(assignment, weights, light_examples(client_id), {"loss": 0.0})
            if answer is not None:
                stats.submit_seconds.append(time.perf_counter() - started)
                stats.rounds += 1
        stats.traffic_sent, stats.traffic_received = connection.traffic.sent, connection.traffic.received
        stats.retried = dict(connection.retries.retried)
        stats.polls = session.polls
    return stats


def run_light_client(
    server: str,
    client_id: int,
    *,
    security: ChannelSecurity | None = None,
    connect_timeout_s: float = 60.0,
    max_wait_s: float = 30.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    keep_weights: bool = False,
) -> LightStats:
    """One light client, on an event loop of its own, until the run finishes (see light_client)."""
    settings = LightSettings(security or ChannelSecurity(), connect_timeout_s, max_wait_s, chunk_bytes)
    return asyncio.run(light_client(server, client_id, settings, keep_weights=keep_weights))


async def run_light_clients(
    server: str,
    client_ids: Collection[int],
    settings: LightSettings = LightSettings(),
    *,
    shared_channel: bool = True,
    keep_weights: Callable[[int], bool] = lambda client_id: False,
    token_of: Callable[[int], str] | None = None,
) -> tuple[dict[int, LightStats], dict[int, str]]:
    """Many light clients on this event loop until the run finishes: (stats by client id, and
    the error of each client that failed). `shared_channel`: one gRPC channel for all of them;
    otherwise one each (gRPC still lets them share one TCP connection). `token_of`: each
    client's own token (else the settings' one, if any)."""
    channel = settings.security.aio_channel(server) if shared_channel else None

    def own(client_id: int) -> LightSettings:
        if token_of is None:
            return settings
        return replace(settings, security=replace(settings.security, token=token_of(client_id)))

    try:
        outcomes = await asyncio.gather(
            *(
                light_client(server, i, own(i), keep_weights=keep_weights(i), channel=channel)
                for i in client_ids
            ),
            return_exceptions=True,
        )
    finally:
        if channel is not None:
            await channel.close(None)
    done: dict[int, LightStats] = {}
    failed: dict[int, str] = {}
    for client_id, outcome in zip(client_ids, outcomes, strict=True):
        if isinstance(outcome, LightStats):
            done[client_id] = outcome
        elif isinstance(outcome, FedGrpcError):
            failed[client_id] = f"{type(outcome).__name__}: {outcome}"
        else:
            raise outcome
    return done, failed
