"""Who can take part: the clients that are ready, those that withdrew, and the late joiners.

A client is ready once it has asked for work; it withdraws with a reason (it cannot train,
say) and is ready again when it asks for work again. A client that first appears (with no
earlier round behind it) while a round is open joined late: it sits that round out and takes
part from the next. A client that comes back after a restart of either side says which round
it last finished, and is not late.

Plain bookkeeping without a lock: fedgrpc.server.phases calls it under the round state's lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..common.errors import RunFailedError


@dataclass
class Roster:
    num_clients: int
    min_clients: int = 1  # --min-clients: fewer left than this once some withdrew, and the run fails
    ready: set[int] = field(default_factory=set)
    joined_during: dict[int, int] = field(default_factory=dict)  # late joiner -> the round it sits out
    told_finished: set[int] = field(default_factory=set)
    left_out: set[int] = field(default_factory=set)  # secure aggregation: clients whose shares did not fit
    withdrawn: dict[int, str] = field(default_factory=dict)  # client -> why (until it asks again)
    withdrawals: dict[int, str] = field(default_factory=dict)  # every withdrawal of the run, last reason

    def __post_init__(self) -> None:
        if not 1 <= self.min_clients <= self.num_clients:
            raise ValueError(f"min_clients must be in 1..{self.num_clients}, got {self.min_clients}")

    def asked(self, client_id: int, after_round: int, open_round: int | None) -> bool:
        """The client asked for work (`open_round`: the round training now, if any); True if
        that made it ready."""
        if client_id in self.ready:
            return False
        self.ready.add(client_id)
        self.withdrawn.pop(client_id, None)  # it takes part again
        if after_round == 0 and open_round is not None:
            self.joined_during[client_id] = open_round
        return True

    def withdraw(self, client_id: int, reason: str) -> bool:
        """False if it had withdrawn already (the reason is updated all the same)."""
        new = client_id not in self.withdrawn
        self.withdrawn[client_id] = self.withdrawals[client_id] = reason
        self.ready.discard(client_id)
        return new

    def late_for(self, client_id: int, number: int) -> bool:
        """Whether the client joined while round `number` (or a later one) was open."""
        return self.joined_during.get(client_id, 0) >= number

    def too_few(self) -> bool:
        return self.num_clients - len(self.withdrawn) < self.min_clients

    def too_few_error(self) -> RunFailedError:
        left = self.num_clients - len(self.withdrawn)
        named = "; ".join(f"client {c}: {why}" for c, why in sorted(self.withdrawn.items()))
        return RunFailedError(
            f"only {left} of {self.num_clients} clients can still take part, fewer than "
            f"--min-clients {self.min_clients}, because these withdrew ({named}); stopping. Fix what "
            "they report and start them again, or lower --min-clients; the last checkpoint is intact: "
            "start the server again with the same --out to resume"
        )
