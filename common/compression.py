"""Update compression: fewer bytes up, at an accuracy cost measured by bench/compression.py.

Both sides hold the round's global weights, so an update travels as its difference from
them. Each float tensor's difference is divided by a per-tensor scale (its largest absolute
value), which puts it in [-1, 1] whatever the layer's magnitude:

| method | a float value on the wire        | bytes | worst error per value  |
|--------|----------------------------------|-------|------------------------|
| none   | the weight itself                | 4     | 0                      |
| fp16   | float16(delta / scale)           | 2     | scale * 2**-11         |
| int8   | round(127 * delta / scale), int8 | 1     | scale / 254            |

Non-float tensors always travel as they are. Under secure aggregation updates travel as
"secagg" instead: every tensor as uint32 words of the masked ring (fedgrpc.common.secagg),
which the server sums as they are and never decodes one by one.

Pure functions; errors are CodecError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .codec import TensorSpec
from .errors import CodecError, ConfigError

COMPRESSIONS: tuple[str, ...] = ("none", "fp16", "int8")
#: How an update may travel: a compression, or masked ring words under secure aggregation.
ENCODINGS: tuple[str, ...] = (*COMPRESSIONS, "secagg")
_WIRE_DTYPE = {"fp16": "float16", "int8": "int8"}
_INT8_LEVELS = 127.0


def check_compression(name: str) -> str:
    if name not in COMPRESSIONS:
        raise ConfigError(f"unknown compression {name!r}; choose from {', '.join(COMPRESSIONS)}")
    return name


def _compressed(spec: TensorSpec, method: str) -> bool:
    return method in ("fp16", "int8") and np.issubdtype(np.dtype(spec.dtype), np.floating)


def wire_spec(spec: TensorSpec, method: str) -> TensorSpec:
    """The spec of what travels for `spec` under `method` (same name and shape)."""
    if method == "secagg":
        return TensorSpec(spec.name, "uint32", spec.shape)
    if not _compressed(spec, method):
        return spec
    return TensorSpec(spec.name, _WIRE_DTYPE[method], spec.shape)


def encode(
    specs: Sequence[TensorSpec],
    weights: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    method: str,
) -> tuple[list[np.ndarray], list[float]]:
    """The arrays to send for `weights` trained from `reference`, and one scale per tensor."""
    if method == "secagg":  # already masked ring words (fedgrpc.common.secagg)
        return list(weights), []
    check_compression(method)
    if method == "none":
        return list(weights), []
    arrays: list[np.ndarray] = []
    scales: list[float] = []
    for spec, w, g in zip(specs, weights, reference, strict=True):
        if not _compressed(spec, method):
            arrays.append(w)
            scales.append(1.0)
            continue
        delta = np.subtract(w, g, dtype=np.float32)
        scale = float(np.max(np.abs(delta))) if delta.size else 0.0
        if not math.isfinite(scale):
            raise CodecError(f"tensor {spec.name!r} holds NaN or infinite values; it cannot be compressed")
        ratio = delta / np.float32(scale) if scale > 0 else np.zeros_like(delta)
        if method == "fp16":
            arrays.append(ratio.astype(np.float16))
        else:
            arrays.append(np.rint(ratio * _INT8_LEVELS).astype(np.int8))
        scales.append(scale)
    return arrays, scales


def decode_tensor(
    spec: TensorSpec, received: np.ndarray, reference: np.ndarray, scale: float, method: str
) -> np.ndarray:
    """Rebuild one tensor of the model's dtype from what arrived (a new array)."""
    if not _compressed(spec, method):
        return received
    if not (math.isfinite(scale) and scale >= 0):
        raise CodecError(f"tensor {spec.name!r} has scale {scale}; scales must be finite and >= 0")
    step = scale / _INT8_LEVELS if method == "int8" else scale
    out = received.astype(spec.dtype)
    out *= np.asarray(step, dtype=spec.dtype)
    out += reference
    return out


def decode(
    specs: Sequence[TensorSpec],
    received: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    scales: Sequence[float],
    method: str,
) -> list[np.ndarray]:
    """Rebuild every tensor (see decode_tensor); `scales` must have one entry per tensor."""
    check_scales(len(specs), scales, method)
    if method == "none":
        return list(received)
    return [
        decode_tensor(spec, r, g, s, method)
        for spec, r, g, s in zip(specs, received, reference, scales, strict=True)
    ]


def check_scales(num_tensors: int, scales: Sequence[float], method: str) -> None:
    want = 0 if method in ("none", "secagg") else num_tensors
    if len(scales) != want:
        raise CodecError(f"{method} compression needs {want} scales (one per tensor), got {len(scales)}")
