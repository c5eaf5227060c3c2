"""Update compression: each method's error bound, and what it refuses."""

import numpy as np
import pytest
from fedgrpc.common import compression
from fedgrpc.common.codec import TensorSpec, spec_of
from fedgrpc.common.errors import CodecError, ConfigError

RNG = np.random.default_rng(7)
GLOBAL: list[np.ndarray] = [
    RNG.standard_normal((40, 30)).astype(np.float32),
    np.arange(6, dtype=np.int32),
    np.array(0.5, np.float32),
]
SPECS = [spec_of(f"t{i}", np.asarray(g)) for i, g in enumerate(GLOBAL)]
UPDATE = [
    GLOBAL[0] + RNG.standard_normal((40, 30)).astype(np.float32) * 0.02,
    GLOBAL[1] + 3,
    np.float32(0.25),
]
BOUND = {"none": 0.0, "fp16": 2.0**-11, "int8": 1 / 254}  # times the tensor's largest change


@pytest.mark.parametrize("method", compression.COMPRESSIONS)
def test_decoded_updates_stay_within_the_bound(method: str) -> None:
    sent, scales = compression.encode(SPECS, UPDATE, GLOBAL, method)
    got = compression.decode(
        SPECS, [np.asarray(s) for s in sent], [np.asarray(g) for g in GLOBAL], scales, method
    )
    for spec, out, want, ref in zip(SPECS, got, UPDATE, GLOBAL, strict=True):
        assert out.dtype == np.dtype(spec.dtype) and out.shape == spec.shape
        largest = float(np.max(np.abs(np.asarray(want) - ref)))
        tolerance = BOUND[method] * largest * 1.01 + 1e-7  # + the float32 rounding of the rebuilt value
        np.testing.assert_allclose(out, want, rtol=0, atol=tolerance)
    np.testing.assert_array_equal(got[1], UPDATE[1])  # integers travel as they are


@pytest.mark.parametrize(("method", "itemsize"), [("none", 4), ("fp16", 2), ("int8", 1)])
def test_float_tensors_shrink_and_others_do_not(method: str, itemsize: int) -> None:
    sent, _ = compression.encode(SPECS, UPDATE, GLOBAL, method)
    assert np.asarray(sent[0]).itemsize == itemsize
    assert compression.wire_spec(SPECS[0], method).nbytes == SPECS[0].size * itemsize
    assert compression.wire_spec(SPECS[1], method) == SPECS[1]


def test_an_unchanged_tensor_has_scale_zero_and_decodes_exactly() -> None:
    sent, scales = compression.encode(SPECS[:1], GLOBAL[:1], GLOBAL[:1], "int8")
    assert scales == [0.0]
    out = compression.decode(SPECS[:1], sent, GLOBAL[:1], scales, "int8")
    np.testing.assert_array_equal(out[0], GLOBAL[0])


def test_bad_scales_and_methods_are_refused() -> None:
    spec = TensorSpec("w", "float32", (2,))
    ref, q = np.zeros(2, np.float32), np.ones(2, np.int8)
    for scale in (float("nan"), float("inf"), -1.0):
        with pytest.raises(CodecError, match="scale"):
            compression.decode_tensor(spec, q, ref, scale, "int8")
    with pytest.raises(CodecError, match="1 scales"):
        compression.decode([spec], [q], [ref], [], "int8")
    with pytest.raises(ConfigError, match="zstd"):
        compression.encode([spec], [ref], [ref], "zstd")
    with pytest.raises(CodecError, match="NaN"):
        compression.encode([spec], [np.array([np.nan, 0], np.float32)], [ref], "fp16")
