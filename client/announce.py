"""A site agent telling a standing federation who it is (fedgrpc.v1.Sites.Announce): its
fedgrpc version, its installed tasks (name and digest) and a summary of its policy, for the
coordinator's dashboard. The only module of fedgrpc.client that touches sites_pb2.

Shown, never trusted: the coordinator files it under the identity the call proves. A
coordinator that does not serve the call (a one-run fl-server, an older one) or is away is
no error: the agent asks again later.
"""

from __future__ import annotations

import logging
from importlib import metadata

import grpc
from fedgrpc.v1 import sites_pb2 as pb

from .channel import ChannelSecurity
from .policy import SitePolicy

log = logging.getLogger("fedgrpc.client")

ANNOUNCE_TIMEOUT_S = 2.0
#: When the coordinator says nothing of it: how often to announce again while waiting.
DEFAULT_EVERY_S = 30.0
NOT_SERVED_EVERY_S = 300.0
_METHOD = "/fedgrpc.v1.Sites/Announce"


def fedgrpc_version() -> str:
    try:
        return metadata.version("fedgrpc")
    except metadata.PackageNotFoundError:
        return "unknown"


def policy_summary(policy: SitePolicy) -> dict[str, str]:
    """The policy's limits that are set, as text (the task list is announced apart)."""
    summary = {
        "max_rounds": policy.max_rounds, "max_local_epochs": policy.max_local_epochs,
        "max_run_time": policy.max_run_time, "min_dp_noise_multiplier": policy.min_dp_noise_multiplier,
        "require_secagg": policy.require_secagg or None, "require_dp_clip": policy.require_dp_clip or None,
    }  # fmt: skip
    return {key: ("yes" if value is True else f"{value:g}" if isinstance(value, float) else str(value))
            for key, value in summary.items() if value is not None}  # fmt: skip


def announce(
    channel: grpc.Channel, security: ChannelSecurity, client_id: int, policy: SitePolicy
) -> float | None:
    """Announce this site; seconds until the next announcement, or None where it was not heard."""
    request = pb.SiteAnnouncement(
        version=fedgrpc_version(),
        tasks=[pb.AnnouncedTask(name=t.name, digest=t.digest) for t in policy.tasks],
        policy=policy_summary(policy),
        client_id=client_id,
    )
    call = channel.unary_unary(
        _METHOD, request_serializer=pb.SiteAnnouncement.SerializeToString,
        response_deserializer=pb.AnnounceReply.FromString,
    )  # fmt: skip
    try:
        reply = call(request, timeout=ANNOUNCE_TIMEOUT_S, metadata=security.metadata())
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        log.debug("announce: %s", code)
        # a coordinator without the service (a one-run fl-server) will not have it soon
        return NOT_SERVED_EVERY_S if code == grpc.StatusCode.UNIMPLEMENTED else None
    return reply.announce_every_s or DEFAULT_EVERY_S
