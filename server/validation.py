"""Checks an update must pass before it may touch the aggregate: pure functions that raise.

Every failure raises UpdateRejectedError with a message that tells the client what was
wrong, so a hostile or broken client learns why and the global model is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..common.codec import TensorSpec
from ..common.errors import UpdateRejectedError


def check_specs(expected: Sequence[TensorSpec], declared: Sequence[TensorSpec]) -> None:
    """The update declares exactly the model's tensors: same count, names, dtypes and shapes."""
    if len(declared) != len(expected):
        raise UpdateRejectedError(f"update has {len(declared)} tensors, the model has {len(expected)}")
    for i, (want, got) in enumerate(zip(expected, declared, strict=True)):
        if got != want:
            raise UpdateRejectedError(
                f"tensor #{i} is {got.name!r} {got.dtype}{list(got.shape)}, "
                f"expected {want.name!r} {want.dtype}{list(want.shape)}"
            )


def check_arrays(expected: Sequence[TensorSpec], arrays: Sequence[np.ndarray]) -> None:
    """Decoded arrays have the model's dtypes and shapes (names travel in the header only)."""
    if len(arrays) != len(expected):
        raise UpdateRejectedError(f"update has {len(arrays)} tensors, the model has {len(expected)}")
    check_specs(
        expected,
        [TensorSpec(s.name, a.dtype.name, tuple(a.shape)) for s, a in zip(expected, arrays, strict=True)],
    )


def check_num_examples(num_examples: int, max_examples: int) -> None:
    if num_examples <= 0:
        raise UpdateRejectedError(
            "num_examples must be positive: an update must come from some training data"
        )
    if num_examples > max_examples:
        raise UpdateRejectedError(
            f"num_examples {num_examples} is above this server's limit of {max_examples}"
        )


def check_finite(specs: Sequence[TensorSpec], arrays: Sequence[np.ndarray]) -> None:
    """No NaN or infinity anywhere: one such value would poison every later round."""
    for spec, array in zip(specs, arrays, strict=True):
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise UpdateRejectedError(f"tensor {spec.name!r} holds NaN or infinite values")
