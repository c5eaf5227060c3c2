"""What a client may report as metrics: a few finite numbers under plain names.

Metrics travel from clients to the server's history, logs and (later) web pages, so they are
untrusted input. A metric name is 1 to 64 characters of ASCII letters, digits and `_ . - /`,
starting with a letter or `_`; a value is a finite number; an update carries at most 32 of
them. Both sides apply the same rule: a client checks before it sends (a clear error where
the mistake is made), the server checks again before anything is stored or shown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .errors import MetricsError

MAX_METRICS = 32
MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]{0,63}")


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics as a plain dict of floats; raises MetricsError naming the first bad entry."""
    if len(metrics) > MAX_METRICS:
        raise MetricsError(f"{len(metrics)} metrics sent; at most {MAX_METRICS} are accepted")
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            shown = repr(name[:MAX_NAME_LENGTH]) if isinstance(name, str) else type(name).__name__
            raise MetricsError(
                f"metric name {shown} is not allowed: use 1-{MAX_NAME_LENGTH} ASCII letters, digits "
                "and _ . - /, starting with a letter or _"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MetricsError(f"metric {name!r} is a {type(value).__name__}, not a number")
        if not math.isfinite(value):
            raise MetricsError(f"metric {name!r} is {value}; metric values must be finite")
        checked[name] = float(value)
    return checked
