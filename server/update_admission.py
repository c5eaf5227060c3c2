"""Admitting one update: checked once from its header, prepared as it arrives, then counted.

    admit(header) --> AdmittedUpdate --tensors prepared (by the intake, or whole)--> commit --> fold

`admit` is the one check of an update (its client, round, example count, tensor list,
metrics and encoding; fedgrpc.server.phases.check_open for the round): it hands back an
AdmittedUpdate that carries what the tensors are checked against (`reference`) and the
`preparer` that bounds and prepares each one for the strategy. `commit` counts the update,
under the lock, if the attempt it was admitted to is still open and holds no update of its
client (else it says why, as the check would), and queues the fold on the fold thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..common.codec import TensorSpec
from ..common.errors import MetricsError, UpdateRejectedError
from ..common.metrics import check_metrics
from .fold_thread import FoldThread
from .phases import AcceptedUpdate, OpenRound, Phase, RoundState
from .round_mode import RoundMode
from .strategy import UpdatePreparer
from .validation import check_arrays, check_num_examples, check_specs

UpdateRecorder = Callable[[int, int, Sequence[np.ndarray]], None]
#: Under secure aggregation, the only metrics an update may carry: names ending in this.
TIMING_SUFFIX = "_seconds"


@dataclass(frozen=True)
class UpdateHeader:
    """What an update says of itself before its tensors."""

    client_id: int
    round: int
    num_examples: int
    specs: Sequence[TensorSpec] | None = None  # None: handed over whole, its arrays are checked
    metrics: Mapping[str, float] = field(default_factory=dict)
    session: bytes = b""  # under secure aggregation, the attempt the update was masked for
    encoding: str | None = None  # how its tensors travel; None: handed over decoded, in process


@dataclass(frozen=True)
class AdmittedUpdate:
    """An update that passed the check: prepare its tensors with `preparer`, then `commit`."""

    header: UpdateHeader
    metrics: Mapping[str, float]
    reference: tuple[np.ndarray, ...]  # the round's weights (what compressed tensors are relative to)
    preparer: UpdatePreparer
    prepared: bool  # the preparer returns prepared tensors (else it keeps them as sent)
    attempt: OpenRound
    admission: UpdateAdmission

    def commit(
        self, tensors: Sequence[np.ndarray], wire_bytes: int, on_folded: Callable[[], None] | None = None
    ) -> tuple[int, int]:
        """Count the update, its tensors prepared by `preparer`; returns (received, expected).
        `on_folded` runs once it is in the aggregate (or was refused)."""
        return self.admission.commit(self, tensors, wire_bytes, on_folded)


class UpdateAdmission:
    def __init__(
        self,
        state: RoundState,
        mode: RoundMode,
        folder: FoldThread,
        *,
        max_examples: int,
        recorder: UpdateRecorder | None = None,
    ) -> None:
        self._state = state
        self._mode = mode
        self._folder = folder
        self._max_examples = max_examples
        self._recorder = recorder

    def admit(self, header: UpdateHeader) -> AdmittedUpdate:
        """Everything about an update that can be checked before its tensors are read.

        The preparer is applied to each decoded tensor on the receiving thread. While updates
        are recorded, tensors are kept as sent (the recorder saves them) and prepared again
        on the fold thread."""
        return self._admit(header, keep_as_sent=self._recorder is not None)

    def submit(self, header: UpdateHeader, update: Sequence[np.ndarray], wire_bytes: int) -> tuple[int, int]:
        """An update handed over whole: admitted, its arrays checked through prepared copies
        (the caller's are never overwritten), and committed."""
        admitted = self._admit(header, keep_as_sent=True)
        check_arrays(self._mode.update_specs, update)
        for index, tensor in enumerate(update):
            admitted.preparer(index, tensor)
        return admitted.commit(update, wire_bytes)

    def _admit(self, header: UpdateHeader, *, keep_as_sent: bool) -> AdmittedUpdate:
        state, mode = self._state, self._mode
        state.run.check_client_id(header.client_id)
        with state.changed:
            attempt = state.check_open(header.client_id, header.round, header.session)
        check_num_examples(header.num_examples, self._max_examples)
        if header.specs is not None:
            check_specs(mode.update_specs, header.specs)
        metrics = checked_metrics(header.metrics, secure=mode.secure)
        if header.encoding is not None and header.encoding != state.run.update_encoding:
            how = (
                "masked, with compression SECAGG (RunSpec.secagg is set)"
                if mode.secure
                else f"with compression {state.run.compression!r} (RunSpec.compression)"
            )
            raise UpdateRejectedError(f"this run's updates travel {how}, not {header.encoding!r}")
        reference = mode.reference(attempt.weights, header.round)
        preparer = UpdatePreparer(
            mode.strategy, mode.update_specs, reference, header.num_examples, keep_as_sent=keep_as_sent
        )
        return AdmittedUpdate(header, metrics, reference, preparer, not keep_as_sent, attempt, self)

    def commit(
        self,
        admitted: AdmittedUpdate,
        tensors: Sequence[np.ndarray],
        wire_bytes: int,
        on_folded: Callable[[], None] | None = None,
    ) -> tuple[int, int]:
        state, header = self._state, admitted.header
        queued = False
        try:
            with state.changed:
                current = self._still_open(admitted)
                if self._recorder is not None:  # before the fold is queued: a fold may free the update
                    self._recorder(header.round, header.client_id, tensors)
                reference = self._mode.reference(current.weights, header.round)
                staleness = None  # --mode fedbuff: versions between the update's and its buffer's
                if state.buffered is not None:  # before the fold is queued: the fold reads its weight
                    staleness = state.buffered.committed(header.client_id, header.round, current.number)
                fold = partial(
                    self._mode.fold,
                    current.secure,
                    header.client_id,
                    tensors,
                    reference,
                    header.num_examples,
                    prepared=admitted.prepared,
                )
                self._folder.put(partial(_then, fold, on_folded))  # under the lock: folds keep the order
                queued = True
                current.accepted[header.client_id] = AcceptedUpdate(
                    header.client_id, header.num_examples, admitted.metrics, admitted.preparer.largest,
                    staleness,
                )  # fmt: skip
                current.bytes_in += wire_bytes
                state.changed.notify_all()
                if state.buffered is not None:
                    state.phase_changed.notify_all()  # a training slot is free: waiting clients may start
                answer = len(current.accepted), state.expected(current)
        finally:
            if not queued and on_folded is not None:
                on_folded()  # refused: nothing will be folded
        if state.buffered is not None:
            state.wake()  # a training slot is free: the long-polls ask again
        return answer

    def _still_open(self, admitted: AdmittedUpdate) -> OpenRound:
        """The attempt this update was admitted to, if it still takes it (lock held); else the
        check again, which says why not (or finds the round reopened from the same weights)."""
        state, header = self._state, admitted.header
        attempt = admitted.attempt
        if (
            state.round is attempt
            and state.phase is Phase.TRAINING
            and header.client_id not in attempt.accepted
        ):
            if attempt.secure is not None:
                attempt.secure.may_submit(header.client_id, header.session)
            return attempt
        return state.check_open(header.client_id, header.round, header.session)


def _then(fold: Callable[[], None], on_folded: Callable[[], None] | None) -> None:
    try:
        fold()
    finally:
        if on_folded is not None:
            on_folded()


def checked_metrics(metrics: Mapping[str, float], *, secure: bool = False) -> dict[str, float]:
    """`secure`: an update under secure aggregation, which may carry timings only."""
    try:
        checked = check_metrics(metrics)
    except MetricsError as exc:
        raise UpdateRejectedError(str(exc)) from None
    if secure:
        other = sorted(name for name in checked if not name.endswith(TIMING_SUFFIX))
        if other:
            raise UpdateRejectedError(
                f"under secure aggregation an update may carry timings only (metric names ending in "
                f"{TIMING_SUFFIX!r}), not {other[0]!r}: one client's metrics would say something about "
                "its data; leave them out"
            )
    return checked
