"""Secure aggregation's side of a run: which strategy may be masked, and a round's collection
under it (keys, shares, then the masked updates); see fedgrpc.server.secagg for the protocol.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..common.errors import ConfigError, SecAggError
from .masked_sum import SecAggStrategy
from .rounds import RoundCoordinator
from .secagg import SecAggRound
from .strategies import MeanStrategy
from .strategy import Strategy, secure_refusal

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger("fedgrpc.server")

#: Under secure aggregation without --round-timeout, the longest the masked input waits for the
#: clients that shared keys (a client that vanished mid-round must not hold the round forever).
MASKED_INPUT_TIMEOUT_S = 600.0


def secure(config: ServerConfig, strategy: Strategy) -> SecAggStrategy:
    """The run's strategy under secure aggregation, or a ConfigError naming what cannot be
    combined with it: whatever needs to see one client's update."""
    cfg = config
    refusals = {
        f"--strategy {cfg.strategy.name} ({secure_refusal(strategy)})": secure_refusal(strategy) is not None,
        f"--compression {cfg.run.compression}": cfg.run.compression != "none",
        "--record-updates": cfg.record_updates,
        "--dp-clip-on server (clients clip instead: --dp-clip-on client)": (
            cfg.privacy is not None and cfg.privacy.clip_on == "server"
        ),
        "--client-sampling poisson (a round of fewer than 2 cannot be masked)": (
            cfg.client_sampling == "poisson" and cfg.clients_per_round is not None
        ),
    }
    refused = [flag for flag, present in refusals.items() if present]
    if refused:
        raise ConfigError(
            "secure aggregation shows the server only the sum of a round's updates, which rules out "
            + "; ".join(refused)
        )
    assert isinstance(strategy, MeanStrategy)
    return SecAggStrategy(strategy)


def secure_collect(
    config: ServerConfig, coordinator: RoundCoordinator, secure: SecAggRound, number: int
) -> int:
    """Keys, shares, then the masked updates of every client that shared (or those in by the
    round timeout); returns how many were expected. SecAggError: the attempt is aborted."""
    stopping = lambda: coordinator.interrupted  # noqa: E731
    if not secure.run_key_stages(config.secagg_timeout_s, stopping):
        raise SecAggError(secure.reason or "stopping")
    expected = len(secure.shared)
    timeout = config.policy.timeout_s or MASKED_INPUT_TIMEOUT_S
    if not coordinator.wait_for_updates(expected, timeout) and not coordinator.interrupted:
        log.info(
            "round %d: closing after %.0f s with %d of %d masked updates",
            number,
            timeout,
            coordinator.received,
            expected,
        )
    if coordinator.interrupted:
        secure.abort("the server is stopping")
        raise SecAggError("the server is stopping")
    if coordinator.received == 0:
        secure.abort("no masked update arrived")
        raise SecAggError(secure.reason)
    return expected
