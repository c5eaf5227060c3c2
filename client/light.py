"""A client without TensorFlow or data, so hundreds can drive one server from one machine.

It speaks the real protocol through the real Connection (join, long-poll, streamed weights,
compressed updates), but "training" is a small perturbation of the global weights drawn
from a generator seeded by (client id, round). Anyone can recompute what each light client
sent, so tests and bench/scale.py can check the server's aggregate exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fedgrpc.client.connection import ChannelSecurity, Connection
from fedgrpc.client.secagg import SecureRound
from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES
from fedgrpc.common.errors import RunChangedError, SecAggError, StaleRoundError
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
    traffic_sent: int = 0  # every message's protobuf bytes (Connection.traffic), all calls
    traffic_received: int = 0
    received: dict[int, list[np.ndarray]] = field(default_factory=dict)  # with keep_weights only


def run_light_client(
    server: str,
    client_id: int,
    *,
    security: ChannelSecurity | None = None,
    connect_timeout_s: float = 60.0,
    max_wait_s: float = 30.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    keep_weights: bool = False,
    channel: Any = None,
) -> LightStats:
    """Take part in a run until it finishes; returns what this client did and how long submits took
    (and, with keep_weights, the global weights it was sent each round, to check the aggregate)."""
    stats = LightStats()
    with Connection(
        server,
        client_id,
        connect_timeout_s=connect_timeout_s,
        chunk_bytes=chunk_bytes,
        security=security,
        channel=channel,  # shared by the light clients of one process, if given
    ) as connection:
        run, _ = connection.join()
        last_round = 0
        while True:
            task = connection.next_task(last_round, max_wait_s)
            if task.run_id and task.run_id != run.run_id:
                raise RunChangedError(f"the server at {server} now runs {task.run_id}, not {run.run_id}")
            if task.instruction is Instruction.FINISHED:
                stats.traffic_sent, stats.traffic_received = (
                    connection.traffic.sent,
                    connection.traffic.received,
                )
                return stats
            if task.instruction is Instruction.WAIT:
                continue
            if task.instruction is Instruction.EVALUATE:  # no data to evaluate on: say so
                connection.submit_evaluation(task.round, 0, {})
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
                    secure = SecureRound(connection, run, task.round, max_wait_s=max_wait_s)
                    secure.share_keys()
                    secure.submit(task.specs, weights, task.weights, light_examples(client_id))
                    secure.reveal()
                else:
                    connection.submit(
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
