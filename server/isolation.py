"""Finding the client behind an impossible secure-aggregation sum, without seeing any update.

Under secure aggregation the server sees only sums, so a client that submits ring words that
are no encoded update (a count out of range, values beyond the bound) makes the sum impossible
without showing who it was. Group testing narrows it down:

    clear --impossible sum--> suspecting --one suspect left--> clear (that client excluded)
                                  |  ^
                                  +--+ each attempt: two groups, suspects spread over both

- clear: one group, the protocol as usual.
- suspecting: every attempt splits its clients into two groups of about half each, each its
  own secure aggregation; the suspects are dealt alternately to the two groups and the others
  fill them up. A group whose sum is possible is used; the suspects become those also in a
  group whose sum was impossible (an honest client never spoils a sum, so with one offender
  the set always holds it, and roughly halves each time it misbehaves).
- one suspect left: it is excluded for the rest of the run, and the reason logged.

What it reveals: while suspecting, the server learns each group's sum (about half the clients)
instead of the round's; the honest clients in a spoiled group lose that round's update. With
several offenders working together an honest client could be named (a group test only says
that some member misbehaved); with one, never. Three clients: the groups are a pair and one
client who sits the attempt out.

Pure bookkeeping, no locks: the round driver calls it between attempts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("fedgrpc.server")


@dataclass
class Isolation:
    suspects: frozenset[int] = frozenset()
    excluded: dict[int, str] = field(default_factory=dict)  # client -> why

    def groups(self, eligible: Sequence[int], seed: str) -> list[frozenset[int]]:
        """The groups of the next attempt: none (one group of all) unless suspecting."""
        if not self.suspects:
            return []
        return split(eligible, self.suspects, seed)

    def observe(self, number: int, failed: Sequence[frozenset[int]]) -> bool:
        """After an attempt at round `number` whose groups in `failed` had impossible sums:
        narrow the suspects, exclude the last one. True when that made progress (fewer
        suspects, or someone excluded), so the attempt is no failure to count."""
        if not failed:
            return False
        spoiled = frozenset().union(*failed)
        before = self.suspects
        narrowed = before & spoiled
        self.suspects = narrowed if narrowed else spoiled
        if len(self.suspects) == 1:
            (culprit,) = self.suspects
            self.excluded[culprit] = (
                f"its masked updates spoiled every group sum found impossible while it was a suspect, "
                f"last in round {number}"
            )
            log.error(
                "round %d: client %d is left out of secure aggregation from now on: %s",
                number, culprit, self.excluded[culprit],
            )  # fmt: skip
            self.suspects = frozenset()
            return True
        log.warning(
            "round %d: %d group sum(s) impossible (members %s); suspects now %s; the next attempts "
            "aggregate in two groups to narrow them down",
            number, len(failed), [sorted(g) for g in failed], sorted(self.suspects),
        )  # fmt: skip
        return not before or len(self.suspects) < len(before)

    def state(self) -> list[int]:
        """Excluded clients, for the checkpoint (suspicions start again after a restart)."""
        return sorted(self.excluded)

    def restore(self, excluded: Iterable[int]) -> None:
        for client in excluded:
            self.excluded[int(client)] = "excluded before the server restarted (see its earlier log)"


def split(eligible: Sequence[int], suspects: frozenset[int], seed: str) -> list[frozenset[int]]:
    """Two groups of about half of `eligible` each, the suspects among them dealt alternately
    (in a seeded order) so that each group holds half of them, the others filling up."""
    rng = random.Random(seed)
    suspected = sorted(c for c in eligible if c in suspects)
    cleared = sorted(c for c in eligible if c not in suspects)
    rng.shuffle(suspected)
    rng.shuffle(cleared)
    first: list[int] = []
    second: list[int] = []
    for position, client in enumerate(suspected):
        (first if position % 2 == 0 else second).append(client)
    for client in cleared:
        (first if len(first) <= len(second) else second).append(client)
    return [frozenset(g) for g in (first, second) if g]
