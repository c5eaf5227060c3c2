"""The server's file descriptors: a reserve that no listener may take.

Every connection, HTTP or gRPC, holds a descriptor, and so does every checkpoint being written.
Under `ulimit -n 1024` a crowd of idle connections once took them all, the next checkpoint
write failed with EMFILE and the run died. So the process's descriptors are shared out:

    RLIMIT_NOFILE (soft, raised to the hard limit at start)
      = reserve                 checkpoints, history, logs, TensorFlow: never given to a peer
      + HTTP connections        at most HttpConfig.max_connections, and only while the open
                                descriptors stay under the limit less the reserve
      + gRPC connections        at most `grpc_connection_quota()` (grpc core closes the rest
                                at once: `grpc.max_allowed_incoming_connections`)
      + what was open at start  the loaded libraries' own

Counting the open descriptors reads /proc/self/fd (Linux); elsewhere the count is unknown and
only the fixed quotas apply.
"""

from __future__ import annotations

import os
import resource

#: Descriptors kept back from every listener, at least: a checkpoint needs a few at once, the
#: libraries some more (TensorFlow opens files lazily).
MIN_RESERVE = 128
#: The dashboard's connections at most (HttpConfig.max_connections), kept out of gRPC's share.
DASHBOARD_CONNECTIONS = 64
#: Connections the plain-text health port (--health-port) may hold.
HEALTH_CONNECTIONS = 64
_FD_DIR = "/proc/self/fd"


def soft_limit() -> int:
    """The process's current limit on open descriptors (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def reserve(limit: int | None = None) -> int:
    """Descriptors no listener may take: an eighth of the limit, at least MIN_RESERVE."""
    limit = soft_limit() if limit is None else limit
    return max(MIN_RESERVE, limit // 8)


def open_count() -> int | None:
    """Descriptors open in this process now; None where the system does not say."""
    try:
        return len(os.listdir(_FD_DIR))
    except OSError:
        return None


def room_for_a_connection() -> bool:
    """Whether one more peer connection leaves the reserve untouched."""
    count = open_count()
    return count is None or count + 1 <= soft_limit() - reserve()


def grpc_connection_quota() -> int:
    """How many connections the gRPC server may hold at once: what the limit leaves after the
    reserve, the descriptors open now, and the dashboard's and health port's connections."""
    limit = soft_limit()
    used = open_count() or 0
    return max(16, limit - reserve(limit) - used - DASHBOARD_CONNECTIONS - HEALTH_CONNECTIONS)
