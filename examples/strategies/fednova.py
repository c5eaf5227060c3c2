"""FedNova: normalized averaging (Wang et al., "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020).

Clients with more data take more local steps in an epoch, so under FedAvg their updates are
longer and the federation drifts toward their objective. FedNova divides each client's change
by its number of local steps tau_i before averaging, then scales the average back up by an
effective step count tau_eff:

    d_i     = (x - x_i) / tau_i                  the normalized update (local SGD: a_i = tau_i)
    p_i     = n_i / sum_j n_j                    each client's share of the examples
    tau_eff = sum_i p_i tau_i
    x'      = x - tau_eff * sum_i p_i d_i

On fedgrpc's streamed sum this is a MeanStrategy: each update weighs n_i / tau_i instead of
n_i (`weight`), which makes the mean change sum_i p_i (x_i - x) / tau_i, and `step` multiplies
it by tau_eff. tau_i = local_epochs x ceil(n_i / batch_size), the steps a client of this run
takes with plain local SGD (what the run spec says; a task that trains otherwise should not use
this file as it is).

    fl-server --strategy examples/strategies/fednova.py ...

Secure aggregation and central DP fix every update's weight themselves, so the server refuses
to combine them with FedNova.
"""

from __future__ import annotations

import math

from fedgrpc.server.strategies import MeanStrategy, RoundTotals, Weights, apply_change


class FedNova(MeanStrategy):
    name = "fednova"

    def __init__(self, batch_size: int | None = None, local_epochs: int | None = None) -> None:
        """batch_size, local_epochs: the run's unless given (they decide each client's tau_i)."""
        self.batch_size = batch_size
        self.local_epochs = local_epochs

    def local_steps(self, num_examples: int) -> int:
        """tau_i: the SGD steps a client with `num_examples` examples takes in a round."""
        batch_size = self.batch_size or (self.run.batch_size if self.run else None)
        local_epochs = self.local_epochs or (self.run.local_epochs if self.run else None)
        if batch_size is None or local_epochs is None:
            raise RuntimeError("FedNova needs the run's batch_size and local_epochs (or give them)")
        return local_epochs * math.ceil(num_examples / batch_size)

    def weight(self, num_examples: int) -> float:
        return num_examples / self.local_steps(num_examples)

    def step(self, weights: Weights, mean_change: Weights, round: RoundTotals) -> Weights:
        tau_eff = sum(n * self.local_steps(n) for n in round.counts) / round.examples
        for change in mean_change:
            change *= change.dtype.type(tau_eff)
        return apply_change(weights, mean_change, in_place=True)


strategy = FedNova()
