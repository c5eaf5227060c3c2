"""Vocabulary both sides of the protocol share, beyond the generated messages.

The instruction a long-poll answers with and the assignment it makes of it, which metrics count
as timings, and the call metadata keys fedgrpc uses. The generated `fedgrpc.v1` enums stay at
the two boundaries (fedgrpc.common.wire and the client's connection map them); everything else
speaks these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from .codec import TensorSpec


class Instruction(Enum):
    """What a client is told to do next (GetGlobalWeights' answer)."""

    TRAIN = "train"  # train on the weights that come with it, then submit an update
    WAIT = "wait"  # nothing to do yet: ask again
    FINISHED = "finished"  # the run is over: exit
    EVALUATE = "evaluate"  # evaluate the weights that come with it on local held-out data


#: A round's client settings: a name and a typed value (bool, int, float or str).
RoundSettings = Mapping[str, bool | int | float | str]


@dataclass(frozen=True)
class Assignment:
    """One long-poll's answer as a client reads it: the instruction, the round it is about, and
    for TRAIN and EVALUATE the global weights (their specs, the arrays, their bytes on the wire).
    `run_id`: the run that sent it, so that a client notices a run replaced under it.

    A TRAIN may also carry the round's client `settings` (learning_rate, local_epochs, ...) and
    the strategy protocol's `extras`, tensors by name (SCAFFOLD's "scaffold/c/..."), whose
    specs are `extra_specs`; their chunks follow the model's on the wire.
    `retry_after_s`: WAIT only, how long to hold no call before asking again (0: at once)."""

    instruction: Instruction
    round: int
    specs: tuple[TensorSpec, ...] = ()
    weights: list[np.ndarray] = field(default_factory=list)
    wire_bytes: int = 0
    run_id: str = ""
    settings: RoundSettings = field(default_factory=dict)
    extra_specs: tuple[TensorSpec, ...] = ()
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)
    retry_after_s: float = 0.0

    @property
    def all_specs(self) -> tuple[TensorSpec, ...]:
        """Every tensor the answer streams, the model's first: what its chunks are assembled into."""
        return self.specs + self.extra_specs

    def with_arrays(self, arrays: Sequence[np.ndarray], wire_bytes: int) -> Assignment:
        """This assignment with the arrays of `all_specs` received: the model's and the extras."""
        count = len(self.specs)
        extras = {spec.name: array for spec, array in zip(self.extra_specs, arrays[count:], strict=True)}
        return replace(self, weights=list(arrays[:count]), extras=extras, wire_bytes=wire_bytes)


#: Metric names that are timings: the only metrics an update may carry under secure
#: aggregation (one client's loss or accuracy would say something about its data).
TIMING_SUFFIX = "_seconds"


def timings(metrics: Mapping[str, float]) -> dict[str, float]:
    """The timings among `metrics` (see TIMING_SUFFIX)."""
    return {name: value for name, value in metrics.items() if name.endswith(TIMING_SUFFIX)}


#: Call metadata that carries a client's token: `authorization: Bearer <token>`.
AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "

#: Initial metadata of SubmitUpdate, sent by the server once the update fits its in-flight
#: budget: clients hold their chunks back until then, so waiting updates do not pile up in
#: the server's memory.
READY_FOR_CHUNKS_KEY = "fedgrpc-ready-for-chunks"
