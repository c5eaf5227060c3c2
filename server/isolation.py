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

Floors: no group of a split holds fewer than MIN_GROUP_SIZE clients (a declared size, not
derived from --secagg-threshold: a threshold above half makes every split too small), so the
server never learns a sum of fewer than three updates. When the eligible clients cannot be
split so, the suspects sit the attempt out and the others aggregate as one group, nobody named;
when the suspects are all (or all but one) of them, the suspicion is dropped, the attempt is one
group again, and it counts as a failed attempt (three in a row stop the server): with fewer than
2 x MIN_GROUP_SIZE clients, an offender is not isolated. Suspicion also expires: after
CLEAR_AFTER attempts in a row made while suspecting (split, or with the suspects sitting out)
with no impossible sum, the suspects are cleared and rounds are one group again (an offender
that behaves while suspected is found again if it resumes). A group of a split with fewer than
MIN_GROUP_SIZE masked updates in the end (clients dropped) is not unmasked (fedgrpc.server.secagg).

What it reveals: while suspecting, the server learns each group's sum (about half the clients)
instead of the round's; the honest clients in a spoiled group lose that round's update. With
several offenders working together an honest client could be named (a group test only says
that some member misbehaved); with one, never.

Pure bookkeeping, no locks: the round driver calls it between attempts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("fedgrpc.server")

#: The fewest clients a group of a split may hold (a sum of fewer says too much about each).
MIN_GROUP_SIZE = 3
#: Suspecting attempts in a row without an impossible sum after which the suspects are cleared.
CLEAR_AFTER = 3


@dataclass
class Isolation:
    suspects: frozenset[int] = frozenset()
    excluded: dict[int, str] = field(default_factory=dict)  # client -> why
    clean: int = 0  # suspecting attempts in a row without an impossible sum
    split_made: bool = False  # the last attempt was made while suspecting (split, or suspects out)
    dropped: bool = False  # the last attempt is one group because the suspects could not be split

    def groups(self, eligible: Sequence[int], seed: str) -> list[frozenset[int]]:
        """The groups of the next attempt: none (one group of all) unless suspecting; never a
        group below MIN_GROUP_SIZE (the suspects sit out instead, or the suspicion is dropped)."""
        self.split_made = self.dropped = False
        if not self.suspects:
            return []
        groups = split(eligible, self.suspects, seed)
        if len(groups) == 2 and min(len(g) for g in groups) >= MIN_GROUP_SIZE:
            self.split_made = True
            return groups
        others = frozenset(eligible) - self.suspects
        if len(others) >= 2:
            log.warning(
                "%d clients cannot be split into two groups of at least %d: the suspects %s sit this "
                "attempt out, the %d others aggregate as one group",
                len(eligible), MIN_GROUP_SIZE, sorted(self.suspects)[:10], len(others),
            )  # fmt: skip
            self.split_made = True  # a suspecting attempt all the same: it counts towards clearing
            return [others]
        log.warning(
            "%d clients cannot be split into two groups of at least %d, and too few are not suspected "
            "to aggregate without the suspects %s: the suspicion is dropped (nobody named) and this "
            "attempt is one group; it counts as a failed attempt if its sum is impossible again",
            len(eligible), MIN_GROUP_SIZE, sorted(self.suspects)[:10],
        )  # fmt: skip
        self.suspects = frozenset()
        self.clean = 0
        self.dropped = True
        return []

    def observe(self, number: int, failed: Sequence[frozenset[int]]) -> bool:
        """After an attempt at round `number` whose groups in `failed` had impossible sums:
        narrow the suspects, exclude the last one. True when that made progress (fewer
        suspects, or someone excluded), so the attempt is no failure to count. A suspecting
        attempt without an impossible sum is clean; CLEAR_AFTER in a row clear the suspects."""
        if not failed:
            if self.split_made and self.suspects:
                self.clean += 1
                if self.clean >= CLEAR_AFTER:
                    log.info(
                        "round %d: %d attempts in a row while suspecting gave no impossible sum; "
                        "suspicion of %s cleared, rounds are one group again",
                        number, self.clean, sorted(self.suspects)[:10],
                    )  # fmt: skip
                    self.suspects = frozenset()
                    self.clean = 0
            return False
        self.clean = 0
        dropped, self.dropped = self.dropped, False
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
        if dropped:  # the same impossible sum as before the suspicion was dropped: nothing learned
            return False
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
