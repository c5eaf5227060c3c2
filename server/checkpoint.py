"""Crash-safe checkpoints of a run: written after every round, checked in full when read.

    <out>/checkpoint/state.json          run spec, last complete round, history, checksums
    <out>/checkpoint/weights-NNNN.npz    the global weights after round NNNN (no pickle)
    <out>/checkpoint/strategy-NNNN.npz   the strategy's state then (server optimizers' moments, a
                                         user strategy's arrays), which state.json names with the
                                         strategy itself (a user's: its name, source and SHA-256)

A checkpoint is written weights and strategy state first, then state.json, each to a temporary file that is
fsynced and renamed over the old one, so a crash at any moment leaves either the new
checkpoint or the previous one, never a mix. state.json carries a SHA-256 of itself and of
the weights file; anything that does not match, a truncated file, a flipped byte, a missing
weights file, is refused with a CheckpointError that says what to do, rather than resuming
from weights nobody can vouch for.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..common.codec import to_wire
from ..common.config import RunSpec
from ..common.errors import CheckpointError, FedGrpcError, RunFailedError
from .events import Event, RoundClosed, RunStarted
from .results import RoundRecord, persist, remove_quietly, strict_json, write_atomically

FORMAT_VERSION = 2  # 2: run specs name a task and its parameters


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """SHA-256 over every tensor's dtype, shape and little-endian bytes: the identity of a model state."""
    digest = hashlib.sha256()
    for w in weights:
        digest.update(f"{w.dtype.name}{list(w.shape)}".encode())
        digest.update(to_wire(w))
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(document: dict[str, Any]) -> bytes:
    return strict_json(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Checkpoint:
    run: RunSpec
    round: int
    weights: list[np.ndarray]
    history: list[RoundRecord]
    digest: str
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    strategy: dict[str, Any] | None = None  # the strategy record (None in checkpoints from before it)


def checked_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A strategy's state as the checkpoint keeps it: named numpy arrays of numbers, nothing that
    would need pickle to be read back. A strategy that returns anything else is told what to fix."""
    checked: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key:
            raise CheckpointError(
                f"the strategy's state() has the key {key!r}: keys must be non-empty strings"
            )
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            raise CheckpointError(
                f"the strategy's state() holds {key!r} as {type(value).__name__}"
                f"{' of objects' if isinstance(value, np.ndarray) else ''}: a checkpoint keeps only "
                "numpy arrays of numbers (no pickle); convert it with np.asarray"
            )
        checked[key] = value
    return checked


class CheckpointStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    def save(
        self,
        run: RunSpec,
        round_number: int,
        weights: Sequence[np.ndarray],
        history: Sequence[RoundRecord],
        strategy_state: Mapping[str, np.ndarray] | None = None,
        strategy: Mapping[str, Any] | None = None,
    ) -> str:
        """Write the checkpoint of a completed round; returns the weights' digest."""
        state = checked_state(strategy_state or {})
        self.directory.mkdir(parents=True, exist_ok=True)
        weights_path = self._write_npz(
            f"weights-{round_number:04d}.npz", {f"{i:04d}": w for i, w in enumerate(weights)}
        )
        strategy_path = self._write_npz(f"strategy-{round_number:04d}.npz", state)
        digest = weights_digest(weights)
        body: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "run": run.to_dict(),
            "round": round_number,
            "weights_file": weights_path.name,
            "weights_file_sha256": _file_sha256(weights_path),
            "weights_digest": digest,
            "strategy_file": strategy_path.name,
            "strategy_file_sha256": _file_sha256(strategy_path),
            "history": [r.to_dict() for r in history],
        }
        if strategy is not None:
            body["strategy"] = dict(strategy)
        document = {**body, "state_sha256": hashlib.sha256(_canonical(body)).hexdigest()}
        write_atomically(self.state_path, strict_json(document, indent=1).encode())
        self._fsync_directory()
        for pattern, keep in (("weights-*.npz", weights_path), ("strategy-*.npz", strategy_path)):
            for old in self.directory.glob(pattern):
                if old.name != keep.name:
                    old.unlink()
        return digest

    def _write_npz(self, name: str, arrays: Mapping[str, np.ndarray]) -> Path:
        path = self.directory / name
        tmp = path.with_name(f".{name}.tmp")
        try:
            with tmp.open("wb") as handle:
                np.savez(handle, **{key: np.asarray(value) for key, value in arrays.items()})  # type: ignore[arg-type]
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)  # a full disk must not keep a half-written copy
            raise
        return path

    def load(self) -> Checkpoint | None:
        """The last complete checkpoint, None when there is none; raises CheckpointError if it is damaged."""
        if not self.state_path.exists():
            return None
        where = f"checkpoint {self.state_path}"
        advice = "move the folder away to start a new run, or restore it from a backup"
        try:
            document = json.loads(self.state_path.read_bytes())
            claimed = document.pop("state_sha256")
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise CheckpointError(f"{where} is unreadable or truncated ({exc}); {advice}") from None
        if hashlib.sha256(_canonical(document)).hexdigest() != claimed:
            raise CheckpointError(f"{where} does not match its checksum (corrupted); {advice}")
        if document.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"{where} has format {document.get('format')}, this fedgrpc reads {FORMAT_VERSION}"
            )
        stored = self._read_npz(document, "weights", where, advice)
        weights = [stored[name] for name in sorted(stored)]
        strategy_state = self._read_npz(document, "strategy", where, advice)
        weights_path = self.directory / document["weights_file"]
        if weights_digest(weights) != document["weights_digest"]:
            raise CheckpointError(f"{weights_path} holds other weights than {where} recorded; {advice}")
        try:
            run = RunSpec.from_dict(document["run"])
        except (TypeError, KeyError, ValueError, FedGrpcError) as exc:
            raise CheckpointError(
                f"{where} holds a run spec this fedgrpc cannot read ({exc}); {advice}"
            ) from None
        return Checkpoint(
            run=run,
            round=int(document["round"]),
            weights=weights,
            history=[RoundRecord.from_dict(r) for r in document["history"]],
            digest=document["weights_digest"],
            strategy_state=strategy_state,
            strategy=document.get("strategy"),
        )

    def _read_npz(
        self, document: Mapping[str, Any], what: str, where: str, advice: str
    ) -> dict[str, np.ndarray]:
        """The arrays of the file state.json names for `what`, checked against its checksum."""
        path = self.directory / document[f"{what}_file"]
        if not path.exists():
            raise CheckpointError(f"{where} names {path.name}, which is missing; {advice}")
        if _file_sha256(path) != document[f"{what}_file_sha256"]:
            raise CheckpointError(f"{path} does not match its checksum (truncated or corrupted); {advice}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} cannot be read ({exc}); {advice}") from None

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointSink:
    """A new run's identity (id, spec, initial weights) on disk before any client can join it,
    which the run cannot go on without (RunFailedError): a server killed at any moment from then
    on, round 1 included, resumes this same run, and its clients carry on with it. Then the
    checkpoint after every round; one not written is reported, and the next round's holds it too.
    """

    def __init__(
        self, store: CheckpointStore, stop: threading.Event, strategy: Mapping[str, Any] | None = None
    ) -> None:
        self.store, self._stop = store, stop
        self._strategy = strategy  # the strategy record, kept with every checkpoint

    def handle(self, event: Event) -> None:
        if isinstance(event, RunStarted) and not event.resumed:
            save = partial(
                self.store.save, event.run, 0, event.weights, [], event.strategy_state, self._strategy
            )
            if not persist("the run's first checkpoint", save, stop=self._stop):
                raise RunFailedError(
                    f"no checkpoint can be written in {self.store.directory.parent} (see above)"
                )
        elif isinstance(event, RoundClosed):
            number, state = event.record.round, event.strategy_state
            save = partial(
                self.store.save, event.run, number, event.weights, event.history, state, self._strategy
            )
            persist(f"the checkpoint after round {number}", save, stop=self._stop)
