"""Receiving one update stream: bounded memory in, checked float arrays out.

Two jobs, both about the bytes of updates that are still arriving:

- `InflightBudget` caps the bytes of updates being received at once. Each stream reserves
  its declared size after its header checks out and before its first chunk is read; a
  stream that does not fit waits, for a bounded time (its client holds its chunks back
  until the server says it is ready), so 50 clients sending a 100 MB model at once cost the
  budget, not 5 GB. It lives on the gRPC event loop; a reservation may be released from any
  thread (the fold thread releases it once the update is in the sum).
- `UpdateIntake` turns the chunks of one stream into the model's arrays, tensor by tensor:
  each tensor is decompressed (fedgrpc.common.compression), then prepared and bounded for
  the strategy (its `UpdatePreparer`: FedAvg makes it a weighted change and refuses NaN, infinity and
  values that could overflow the sum) as soon as its last chunk is in. Chunks are copied in
  on the event loop; the per-tensor work runs where the caller says (`process`), so the
  servicer can move big tensors to worker threads. Tensors are kept in memory or written to
  a `SpooledUpdate` on disk. Nothing is folded into the aggregate until the whole stream
  has passed, so a stream that breaks off or fails a check leaves the round's sum untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..common import compression
from ..common.codec import TensorAssembler, TensorSpec
from ..common.errors import UpdateRejectedError
from .spool import SpooledUpdate
from .strategy import UpdatePreparer
from .validation import check_finite


class InflightBudget:
    """A byte budget shared by the streams being received; one oversized stream may run alone.

    Reserve on the event loop; release from anywhere.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("the in-flight budget must be positive")
        self.max_bytes = max_bytes
        self._used = 0
        self._streams = 0
        self._peak = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def peak_bytes(self) -> int:
        return self._peak

    @property
    def used_bytes(self) -> int:
        return self._used

    async def reserve(self, nbytes: int, timeout: float) -> Reservation | None:
        """Reserve nbytes, waiting up to timeout seconds; None when they never fitted."""
        loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self._streams == 0 or self._used + nbytes <= self.max_bytes):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                return None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._used += nbytes
        self._streams += 1
        self._peak = max(self._peak, self._used)
        return Reservation(self, nbytes)

    def _release(self, nbytes: int) -> None:
        """On the loop: give the bytes back and let every waiter look again."""
        self._used -= nbytes
        self._streams -= 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _release_from_any_thread(self, nbytes: int) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._release(nbytes)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped
            loop.call_soon_threadsafe(self._release, nbytes)


class Reservation:
    """Bytes held in an InflightBudget until release(), which may be called more than once and
    from any thread."""

    def __init__(self, budget: InflightBudget, nbytes: int) -> None:
        self._budget = budget
        self._nbytes = nbytes
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._budget._release_from_any_thread(self._nbytes)


class UpdateIntake:
    """Assembles, decompresses and prepares one update's tensors as their chunks arrive.

    `add` copies a chunk in and returns the bytes of tensors now complete and waiting for
    `process` (decompress, prepare, store), which the caller runs on the loop or on a worker
    thread. `prepare`: applied to each tensor (default: refuse NaN and infinity only).
    `spool_dir`: stage the tensors on disk there instead of in memory. Call `close` when
    the stream is given up.
    """

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        reference: Sequence[np.ndarray],
        method: str,
        scales: Sequence[float],
        *,
        prepare: UpdatePreparer | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        compression.check_scales(len(specs), scales, method)
        self.specs = tuple(specs)
        self.wire_specs = tuple(compression.wire_spec(s, method) for s in specs)
        self.wire_bytes = self.wire_size(specs, method)
        self._reference = reference
        self._method = method
        self._scales = list(scales) or [1.0] * len(specs)
        self._prepare: Callable[[int, np.ndarray], np.ndarray] = prepare or _CheckFinite(self.specs)
        self._store: list[np.ndarray] | SpooledUpdate = []
        if spool_dir is not None:
            try:
                self._store = SpooledUpdate(spool_dir)
            except OSError as exc:
                raise _spool_failed(exc) from exc
        # Complete tensors wait here for `process`. A plain list, not a bound method of this
        # object: an assembler holding a bound method of its owner would be a reference cycle,
        # and the update's buffers would stay in memory until the cyclic collector ran.
        self._pending: list[tuple[int, np.ndarray]] = []
        self._assembler = TensorAssembler(self.wire_specs, on_tensor=_Appender(self._pending), keep=False)

    @staticmethod
    def wire_size(specs: Sequence[TensorSpec], method: str) -> int:
        """Bytes of tensor data a stream of these tensors carries under `method`."""
        return sum(compression.wire_spec(s, method).nbytes for s in specs)

    def add(self, index: int, offset: int, data: bytes | memoryview) -> int:
        """Copy one chunk in; returns the bytes of complete tensors waiting for `process`."""
        self._assembler.add(index, offset, data)
        return sum(array.nbytes for _, array in self._pending)

    def process(self) -> None:
        """Decompress, prepare and store every complete tensor (raises on the first bad one)."""
        while self._pending:
            index, received = self._pending.pop(0)
            spec = self.specs[index]
            array = compression.decode_tensor(
                spec, received, self._reference[index], self._scales[index], self._method
            )
            del received
            array = self._prepare(index, array)
            try:
                self._store.append(array)
            except OSError as exc:  # the spool's disk is full or gone
                raise _spool_failed(exc) from exc

    def finish(self) -> Sequence[np.ndarray]:
        """The update's tensors, every one decoded and prepared (raises if the stream fell
        short). A spooled update must be closed once it has been folded in."""
        self._assembler.finish()
        self.process()
        if len(self._store) != len(self.specs):
            raise UpdateRejectedError("the update stream ended before every tensor was decoded")
        return self._store

    def close(self) -> None:
        """Let go of whatever was staged (the spool file is deleted)."""
        self._pending.clear()
        if isinstance(self._store, SpooledUpdate):
            self._store.close()


class _CheckFinite:
    """The default preparer: refuse NaN and infinity, keep the tensor as it is."""

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self._specs = specs

    def __call__(self, index: int, tensor: np.ndarray) -> np.ndarray:
        check_finite((self._specs[index],), (tensor,))
        return tensor


class _Appender:
    """on_tensor for the assembler: queue (index, array) for UpdateIntake.process."""

    def __init__(self, pending: list[tuple[int, np.ndarray]]) -> None:
        self._pending = pending

    def __call__(self, index: int, array: np.ndarray) -> None:
        self._pending.append((index, array))


def _spool_failed(error: OSError) -> UpdateRejectedError:
    return UpdateRejectedError(
        f"the server could not stage this update on disk ({error.strerror or error}); send it again later",
        code="UNAVAILABLE",
    )
