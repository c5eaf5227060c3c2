"""Finding the client behind an impossible secure-aggregation sum, without seeing any update.

Under secure aggregation the server sees only sums, so a client that submits ring words that
are no encoded update (a count out of range, values beyond the bound) makes the sum impossible
without showing who it was. Group testing narrows it down:

    clear --impossible sum--> suspecting --one suspect left--> clear (that client excluded)
                                 |  ^
                                 +--+ each attempt: a split, or one group with suspects out

    and, with fewer than 2 x MIN_GROUP_SIZE eligible: impossible sum --> the round is lost

- clear: one group, the protocol as usual.
- suspecting, with 2 x MIN_GROUP_SIZE eligible clients or more (split): two groups of about
  half each, each its own secure aggregation; the suspects are dealt alternately to both and
  the others fill them up. A possible group sum is used.
- suspecting, with MIN_GROUP_SIZE + 1 to 2 x MIN_GROUP_SIZE - 1 eligible (sit-out): ONE group
  of at least MIN_GROUP_SIZE: every cleared client, and about half the suspects; the other
  suspects sit the attempt out (they are not harmed, their update is simply not asked for).
  Who sits out rotates: the suspects that sat out least since the suspects last changed.
  A possible sum is used for the round.
- either way, an impossible sum narrows the suspects to those inside the spoiled group(s) (an
  honest client never spoils a sum, so with one offender the set always holds it); a possible
  sum narrows nothing (an offender may behave when it likes: counting the clients that sat out
  as the suspects would let one that behaves while in the group get an honest one named).
- one suspect left: it is excluded for the rest of the run, and the reason logged.
- MIN_GROUP_SIZE eligible clients or fewer: no attempt can leave anyone out without unmasking
  a sum of fewer than MIN_GROUP_SIZE, so an impossible sum is not narrowed and nobody is named.

The round is lost (`lost` says why; the round driver records it, weights unchanged, and goes on
to the next round, no failure counted) after an impossible sum among fewer than 2 x
MIN_GROUP_SIZE eligible clients. The server has unmasked that sum, and the values of one whose
count alone is out of range are the members' true sum: another attempt at the same round (the
same weights, so about the same updates) over a different set of them would give a sum whose
difference with it is the sum of the one or two clients in one but not the other (all but the
suspects sitting out, among four or five; all but a client that dropped, among three). With
2 x MIN_GROUP_SIZE or more, the attempt after an impossible sum splits its members into two
groups of three or more (their two sums add up to the one before): nothing smaller is revealed,
and the round is trained again.

Floors: no group of an attempt while suspecting holds fewer than MIN_GROUP_SIZE clients (a
declared size, not derived from --secagg-threshold), and such a group left with fewer masked
updates in the end (clients dropped) is not unmasked (fedgrpc.server.secagg), so the server
never learns a sum of fewer than three updates from a suspecting attempt. Suspicion expires:
after CLEAR_AFTER suspecting attempts in a row with no impossible sum, the suspects are cleared
and rounds are one group again (an offender that behaves while suspected is found again if it
resumes). Suspects not eligible this round (sampling) leave the attempt one group of all.

What it reveals: while suspecting, the server learns the sum of each group (about half the
clients, or all but the suspects sitting out) instead of the round's; the honest clients in a
spoiled group lose that attempt's update, those sitting out that round's. With several offenders
working together an honest client could be named (a group test only says that some member
misbehaved); with one, never.

Pure bookkeeping, no locks: the round driver calls it between attempts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("fedgrpc.server")

#: The fewest clients a group of a suspecting attempt may hold (a sum of fewer says too much about each).
MIN_GROUP_SIZE = 3
#: Suspecting attempts in a row without an impossible sum after which the suspects are cleared.
CLEAR_AFTER = 3


@dataclass
class Isolation:
    suspects: frozenset[int] = frozenset()
    excluded: dict[int, str] = field(default_factory=dict)  # client -> why
    clean: int = 0  # suspecting attempts in a row without an impossible sum
    suspecting: bool = False  # the last attempt was made while suspecting (split or sit-out)
    eligible: int = 0  # clients the last attempt was made among
    lost: str = ""  # why the last attempt's round is lost ("": it is not)
    sat_out: dict[int, int] = field(default_factory=dict)  # suspect -> attempts it sat out

    def groups(self, eligible: Sequence[int], seed: str) -> list[frozenset[int]]:
        """The groups of the next attempt: none (one group of all) unless suspecting; never a
        group below MIN_GROUP_SIZE."""
        self.suspecting, self.eligible, self.lost = False, len(eligible), ""
        present = self.suspects & frozenset(eligible)
        if not present or len(eligible) <= MIN_GROUP_SIZE:
            return []
        self.suspecting = True
        if len(eligible) >= 2 * MIN_GROUP_SIZE:
            return split(eligible, self.suspects, seed)
        return [self._sit_out(eligible, present, seed)]

    def _sit_out(self, eligible: Sequence[int], present: frozenset[int], seed: str) -> frozenset[int]:
        """One group: every cleared client and about half the suspects (enough to make
        MIN_GROUP_SIZE), the suspects that sat out least so far sitting this one out."""
        cleared = frozenset(eligible) - present
        keep = max((len(present) + 1) // 2, MIN_GROUP_SIZE - len(cleared))
        if len(present) > 1:
            keep = min(keep, len(present) - 1)  # someone sits out, or nothing can be learned
        rng = random.Random(seed)
        order = sorted(present)
        rng.shuffle(order)
        order.sort(key=lambda c: self.sat_out.get(c, 0), reverse=True)  # stable: ties stay shuffled
        inside, out = order[:keep], order[keep:]
        for client in out:
            self.sat_out[client] = self.sat_out.get(client, 0) + 1
        if out:  # none: the one suspect present is in, the others are not eligible this round
            log.warning(
                "%d clients cannot be split into two groups of at least %d: suspect(s) %s sit this "
                "attempt out, the %d others aggregate as one group",
                len(eligible), MIN_GROUP_SIZE, sorted(out)[:10], len(cleared) + len(inside),
            )  # fmt: skip
        return cleared | frozenset(inside)

    def observe(self, number: int, failed: Sequence[frozenset[int]]) -> bool:
        """After an attempt at round `number` whose groups in `failed` had impossible sums:
        narrow the suspects, exclude the last one. True when that made progress (fewer
        suspects, or someone excluded), so the attempt is no failure to count. A suspecting
        attempt without an impossible sum is clean; CLEAR_AFTER in a row clear the suspects."""
        if not failed:
            self._clean(number)
            return False
        self.clean = 0
        spoiled = frozenset().union(*failed)
        if self.eligible < 2 * MIN_GROUP_SIZE:
            self.lost = _why_lost(self.eligible)
        said = (
            f"round {number}: {len(failed)} group sum(s) impossible (members {[sorted(g) for g in failed]})"
        )
        if self.eligible <= MIN_GROUP_SIZE:
            log.warning(
                "%s; among %d clients its sender cannot be isolated, nobody is named", said, self.eligible
            )
            return False
        before = self.suspects
        narrowed = before & spoiled
        self.suspects = narrowed if narrowed else spoiled
        if self.suspects != before:
            self.sat_out = {}
        if len(self.suspects) == 1:
            log.warning("%s; one suspect left", said)
            self._exclude(number)
            return True
        log.warning(
            "%s; suspects now %s; the next attempts aggregate in groups that narrow them down",
            said, sorted(self.suspects),
        )  # fmt: skip
        return not before or len(self.suspects) < len(before)

    def _exclude(self, number: int) -> None:
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

    def _clean(self, number: int) -> None:
        if not (self.suspecting and self.suspects):
            return
        self.clean += 1
        if self.clean >= CLEAR_AFTER:
            log.info(
                "round %d: %d attempts in a row while suspecting gave no impossible sum; "
                "suspicion of %s cleared, rounds are one group again",
                number, self.clean, sorted(self.suspects)[:10],
            )  # fmt: skip
            self.suspects = frozenset()
            self.sat_out = {}
            self.clean = 0

    def state(self) -> list[int]:
        """Excluded clients, for the checkpoint (suspicions start again after a restart)."""
        return sorted(self.excluded)

    def restore(self, excluded: Iterable[int]) -> None:
        for client in excluded:
            self.excluded[int(client)] = "excluded before the server restarted (see its earlier log)"


def _why_lost(eligible: int) -> str:
    if eligible <= MIN_GROUP_SIZE:
        return (
            f"its secure-aggregation sum was impossible, and among {eligible} clients the sender cannot "
            f"be isolated without unmasking a sum of fewer than {MIN_GROUP_SIZE} updates; nobody is named"
        )
    return (
        f"its secure-aggregation sum was impossible, and among {eligible} clients another attempt at "
        f"this round would reveal the sum of fewer than {MIN_GROUP_SIZE} updates (its difference with "
        "this one)"
    )


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
