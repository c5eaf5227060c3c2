"""Vocabulary both sides of the protocol share, beyond the generated messages.

The instruction a long-poll answers with, and the call metadata keys fedgrpc uses. The
generated `fedgrpc.v1` enums stay at the two boundaries (fedgrpc.common.wire maps them);
everything else speaks these.
"""

from __future__ import annotations

from enum import Enum


class Instruction(Enum):
    """What a client is told to do next (GetGlobalWeights' answer)."""

    TRAIN = "train"  # train on the weights that come with it, then submit an update
    WAIT = "wait"  # nothing to do yet: ask again
    FINISHED = "finished"  # the run is over: exit
    EVALUATE = "evaluate"  # evaluate the weights that come with it on local held-out data


#: Call metadata that carries a client's token: `authorization: Bearer <token>`.
AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "

#: Initial metadata of SubmitUpdate, sent by the server once the update fits its in-flight
#: budget: clients hold their chunks back until then, so waiting updates do not pile up in
#: the server's memory.
READY_FOR_CHUNKS_KEY = "fedgrpc-ready-for-chunks"
