"""Receiving one update stream: the in-flight budget and the tensor-by-tensor intake."""

import asyncio
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.common import compression
from fedgrpc.common.codec import iter_chunks, spec_of, to_wire
from fedgrpc.common.errors import CodecError, UpdateRejectedError
from fedgrpc.server.aggregate import WeightedSum, weighted_change
from fedgrpc.server.intake import InflightBudget, UpdateIntake
from fedgrpc.server.spool import SpooledUpdate
from fedgrpc.server.strategy import FedAvg, UpdatePreparer

GLOBAL = [np.zeros((64, 8), np.float32), np.zeros(8, np.float32)]
SPECS = [spec_of("w", GLOBAL[0]), spec_of("b", GLOBAL[1])]


def test_the_budget_makes_streams_wait_and_lets_an_oversized_one_run_alone() -> None:
    async def scenario() -> None:
        budget = InflightBudget(100)
        first = await budget.reserve(60, timeout=0)
        assert first is not None
        assert await budget.reserve(60, timeout=0.05) is None  # does not fit next to the first
        waiter = asyncio.create_task(budget.reserve(60, timeout=5))
        await asyncio.sleep(0.1)
        assert not waiter.done()

        # Released from another thread, as the fold thread does once an update is in the sum.
        def release_twice() -> None:  # twice is harmless
            first.release()
            first.release()

        releaser = threading.Thread(target=release_twice)
        releaser.start()
        admitted = await waiter
        releaser.join()
        assert admitted is not None and budget.used_bytes == 60
        admitted.release()
        alone = await budget.reserve(500, timeout=0)  # bigger than the budget, but nothing else in flight
        assert alone is not None and budget.peak_bytes == 500
        alone.release()
        assert budget.used_bytes == 0

    asyncio.run(scenario())


def feed(
    intake: UpdateIntake, arrays: list[np.ndarray], chunk_bytes: int = 100, stop: int | None = None
) -> None:
    for number, chunk in enumerate(iter_chunks((to_wire(a) for a in arrays), chunk_bytes)):
        if stop is not None and number == stop:
            return
        if intake.add(chunk.index, chunk.offset, chunk.data):
            intake.process()  # the servicer does this on the loop, or on a worker for big tensors


def test_intake_rebuilds_compressed_updates() -> None:
    update = [GLOBAL[0] + 0.5, GLOBAL[1] - 0.25]
    sent, scales = compression.encode(SPECS, update, GLOBAL, "int8")
    intake = UpdateIntake(SPECS, GLOBAL, "int8", scales)
    assert intake.wire_bytes == sum(s.size for s in SPECS)  # one byte a value
    feed(intake, sent)
    for got, want in zip(intake.finish(), update, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_nan_is_caught_when_its_tensor_completes_before_the_rest_arrives() -> None:
    update = [GLOBAL[0].copy(), GLOBAL[1]]
    update[0][3, 3] = np.nan
    intake = UpdateIntake(SPECS, GLOBAL, "none", [])
    chunks_of_first = SPECS[0].nbytes // 100 + 1
    with pytest.raises(UpdateRejectedError, match="'w' holds NaN"):
        feed(intake, update, stop=chunks_of_first + 1)


def test_a_short_stream_is_refused() -> None:
    intake = UpdateIntake(SPECS, GLOBAL, "none", [])
    feed(intake, GLOBAL, stop=3)
    with pytest.raises(CodecError, match="incomplete"):
        intake.finish()


def test_scales_must_match_the_tensors() -> None:
    with pytest.raises(CodecError, match="2 scales"):
        UpdateIntake(SPECS, GLOBAL, "fp16", [1.0])


def test_a_spooled_intake_holds_its_tensors_on_disk_until_closed(tmp_path: Path) -> None:
    update = [GLOBAL[0] + 1.5, GLOBAL[1] - 2.0]
    intake = UpdateIntake(SPECS, GLOBAL, "none", [], spool_dir=tmp_path)
    feed(intake, update)
    staged = intake.finish()
    assert isinstance(staged, SpooledUpdate) and staged.nbytes == sum(s.nbytes for s in SPECS)
    for got, want in zip(staged, update, strict=True):
        np.testing.assert_array_equal(got, want)
    intake.close()
    with pytest.raises(ValueError):
        staged[0]  # the file is closed (and, unlinked from the start, gone)


def test_the_spool_keeps_every_dtype_and_shape(tmp_path: Path) -> None:
    arrays: list[np.ndarray] = [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array(7, dtype=np.int64),  # 0-d
        np.zeros((0, 5), np.float16),  # empty
        np.array([True, False, True]),
        np.arange(6, dtype=np.float64)[::2],  # not contiguous
    ]
    spool = SpooledUpdate(tmp_path)
    for a in arrays:
        spool.append(a)
    assert len(spool) == len(arrays)
    assert spool.shapes == [a.shape for a in arrays]
    for got, want in zip(spool, arrays, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    spool.close()


def fedavg_preparer(num_examples: int, max_updates: int = 3) -> UpdatePreparer:
    strategy = FedAvg()
    strategy.begin_round(GLOBAL, max_updates)
    return UpdatePreparer(strategy, SPECS, GLOBAL, num_examples)


def test_the_intake_prepares_each_tensor_and_refuses_an_overflowing_change() -> None:
    preparer = fedavg_preparer(10**6)
    intake = UpdateIntake(SPECS, GLOBAL, "none", [], prepare=preparer)
    feed(intake, [GLOBAL[0] + 2.0, GLOBAL[1] + 3.0])
    got = intake.finish()
    np.testing.assert_array_equal(got[0], np.full(SPECS[0].shape, 2e6, np.float32))
    np.testing.assert_array_equal(got[1], np.full(SPECS[1].shape, 3e6, np.float32))
    assert preparer.largest == 3e6
    huge = UpdateIntake(SPECS, GLOBAL, "none", [], prepare=fedavg_preparer(10**6))
    with pytest.raises(UpdateRejectedError, match="'w' holds NaN or infinite values, or values so large"):
        feed(huge, [GLOBAL[0] + 1e35, GLOBAL[1]])  # finite as sent, infinite times 10**6


def test_no_update_may_add_more_than_its_share_of_the_largest_float() -> None:
    # Three updates a round: each weighted change at most float32 max / 6, so even three at the
    # bound sum to half the largest float32. Both of these are finite as sent and as prepared.
    bound = float(np.finfo(np.float32).max) / 6
    for weights, n in (([GLOBAL[0] + 3e31, GLOBAL[1]], 10**7), ([GLOBAL[0] + 3e38, GLOBAL[1]], 1)):
        intake = UpdateIntake(SPECS, GLOBAL, "none", [], prepare=fedavg_preparer(n))
        with pytest.raises(UpdateRejectedError, match=re.escape(f"above this round's bound of {bound:.3g}")):
            feed(intake, weights)
    fits = UpdateIntake(SPECS, GLOBAL, "none", [], prepare=fedavg_preparer(1))
    feed(fits, [GLOBAL[0] + 5e37, GLOBAL[1]])
    assert fits.finish()[0].max() == np.float32(5e37)


def test_a_spooled_update_folds_like_one_in_memory(tmp_path: Path) -> None:
    changes = [weighted_change(g + 0.5, g, 3) for g in GLOBAL]
    spool = SpooledUpdate(tmp_path)
    for change in changes:
        spool.append(change)
    from_disk, in_memory = WeightedSum(GLOBAL), WeightedSum(GLOBAL)
    from_disk.add_change(spool, 3)
    in_memory.add_change(changes, 3)
    for a, b in zip(from_disk.take_mean(), in_memory.take_mean(), strict=True):
        np.testing.assert_array_equal(a, b)
    spool.close()
