"""A client without TensorFlow or data, so thousands can drive one server from one machine.

It speaks the real protocol through the real client calls (join, long-poll, streamed weights,
compressed updates), but "training" is a small perturbation of the global weights drawn
from a generator seeded by (client id, round). Anyone can recompute what each light client
sent, so tests and bench/scale.py can check the server's aggregate exactly.

Light clients are coroutines on grpc.aio (AioConnection): `run_light_clients` runs any number
of them on one event loop, one channel between them, so a benchmark measures the server and
not thousands of client threads; `run_light_client` runs one (`fl-client --light`). Under
secure aggregation a client's secure steps are SecureRound's blocking calls, run on a thread
of that client's own (a thread per client, as before, but only in such runs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
from fedgrpc.client.aio_connection import AioConnection
from fedgrpc.client.connection import ChannelSecurity, Connection, Task
from fedgrpc.client.secagg import SecureRound
from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import FedGrpcError, RunChangedError, SecAggError, StaleRoundError
from fedgrpc.common.privacy import clip_update
from fedgrpc.common.protocol import Instruction

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
    retried: dict[str, int] = field(default_factory=dict)  # calls retried, by status code (not secure steps)
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
    secure_link: _SecureLink | None = None
    async with AioConnection(
        server,
        client_id,
        connect_timeout_s=settings.connect_timeout_s,
        chunk_bytes=settings.chunk_bytes,
        security=settings.security,
        channel=channel,
    ) as connection:
        try:
            run, _ = await connection.join()
            last_round = 0
            while True:
                task = await connection.next_task(last_round, settings.max_wait_s)
                if task.run_id and task.run_id != run.run_id:
                    raise RunChangedError(f"the server at {server} now runs {task.run_id}, not {run.run_id}")
                if task.instruction is Instruction.FINISHED:
                    break
                if task.instruction is Instruction.WAIT:
                    continue
                if task.instruction is Instruction.EVALUATE:  # no data to evaluate on: say so
                    await connection.submit_evaluation(task.round, 0, {})
                    continue
                stats.bytes_down += task.wire_bytes
                if keep_weights:
                    stats.received[task.round] = task.weights
                weights = light_update(task.weights, client_id, task.round)
                if run.dp_clip > 0:  # the run's DP: updates leave clipped
                    weights = clip_update(weights, task.weights, run.dp_clip)
                started = time.perf_counter()
                try:
                    if run.secagg is not None:
                        secure_link = secure_link or _SecureLink(server, client_id, settings)
                        await secure_link.submit(run, task, weights)
                    else:
                        await connection.submit(
                            task.round,
                            task.specs,
                            weights,
                            light_examples(client_id),
                            {"loss": 0.0},
                            method=run.compression,
                            reference=task.weights,
                        )
                except (StaleRoundError, SecAggError) as exc:
                    log.debug("light client %d: %s", client_id, exc)
                else:
                    stats.submit_seconds.append(time.perf_counter() - started)
                    stats.rounds += 1
                last_round = task.round
        finally:
            if secure_link is not None:
                secure_link.close()
        stats.traffic_sent, stats.traffic_received = connection.traffic.sent, connection.traffic.received
        stats.retried = dict(connection.retries.retried)
        if secure_link is not None:
            stats.traffic_sent += secure_link.connection.traffic.sent
            stats.traffic_received += secure_link.connection.traffic.received
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
) -> tuple[dict[int, LightStats], dict[int, str]]:
    """Many light clients on this event loop until the run finishes: (stats by client id, and
    the error of each client that failed). `shared_channel`: one gRPC channel for all of them;
    otherwise one each (gRPC still lets them share one TCP connection)."""
    channel = settings.security.aio_channel(server) if shared_channel else None
    try:
        outcomes = await asyncio.gather(
            *(
                light_client(server, i, settings, keep_weights=keep_weights(i), channel=channel)
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


class _SecureLink:
    """A light client's secure aggregation steps: SecureRound's blocking calls on a blocking
    Connection, on a thread of this client's own (every client of a round must be able to wait
    in its key stage at once, which a shared pool of threads would not allow)."""

    def __init__(self, server: str, client_id: int, settings: LightSettings) -> None:
        self.client_id = client_id
        self.max_wait_s = settings.max_wait_s
        self.connection = Connection(
            server,
            client_id,
            connect_timeout_s=settings.connect_timeout_s,
            chunk_bytes=settings.chunk_bytes,
            security=settings.security,
        )
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"secagg-{client_id}")

    async def submit(self, run: RunSpec, task: Task, weights: list[np.ndarray]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._steps, run, task, weights)

    def _steps(self, run: RunSpec, task: Task, weights: list[np.ndarray]) -> None:
        secure = SecureRound(self.connection, run, task.round, max_wait_s=self.max_wait_s)
        secure.share_keys()
        secure.submit(task.specs, weights, task.weights, light_examples(self.client_id))
        secure.reveal()

    def close(self) -> None:
        self._thread.shutdown(wait=False)
        self.connection.close()
