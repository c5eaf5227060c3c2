"""Protocol rules beyond single calls: a client that withdraws, metrics and retries under secure
aggregation. Real fl-server / fl-client processes, or real gRPC to an in-process coordinator."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from conftest import make_synthetic
from fedgrpc.client.secagg import SecureRound
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.errors import UpdateRejectedError
from fedgrpc.common.processes import free_port
from helpers import finish, server_command, start, start_clients
from test_secagg import _LiveRound


def test_a_client_whose_data_does_not_fit_says_so_and_the_run_goes_on_without_it(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    misfit = tmp_path / "misfit.npz"  # 16 x 16 images for a model of 32 x 32 ones
    x, y = make_synthetic(300, seed=1, size=16)
    np.savez(misfit, x_train=x, y_train=y, x_test=x[:50], y_test=y[:50])
    # A join timeout far beyond the test's bounds: the run must not wait for the client that withdrew.
    flags = ("--min-clients", "2", "--join-timeout", "3600", "--finish-grace", "1")
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=3, extra=flags), log=log)
    ((bad, bad_log),) = start_clients(port, misfit, tmp_path, ids=(1,))
    good = start_clients(port, synthetic_npz, tmp_path, ids=(2, 3))
    assert finish(bad, bad_log) != 0
    assert "does not fit the model" in bad_log.read_text()
    assert finish(server, log) == 0, log.read_text()
    for process, client_log in good:
        assert finish(process, client_log) == 0, client_log.read_text()
    text = log.read_text()
    said = [line for line in text.splitlines() if "client 1 cannot take part" in line]
    assert len(said) == 1 and "does not fit the model" in said[0], text
    history = json.loads((out / "history.json").read_text())
    assert [w["client_id"] for w in history["withdrawn"]] == [1]
    assert "does not fit the model" in history["withdrawn"][0]["reason"]
    assert sorted(c["client_id"] for c in history["rounds"][0]["clients"]) == [2, 3]


class _SendsItsLoss(SecureRound):
    """Sends its training loss with the masked update first (refused), then timings only."""

    refusals: list[UpdateRejectedError] = []

    def submit(
        self,
        specs: Sequence[TensorSpec],
        weights: Sequence[np.ndarray],
        reference: Sequence[np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> tuple[int, int]:
        try:
            super().submit(specs, weights, reference, num_examples, {"train_seconds": 1.0, "loss": 0.3})
        except UpdateRejectedError as exc:
            self.refusals.append(exc)
        return super().submit(specs, weights, reference, num_examples, {"train_seconds": 1.0})


def test_metrics_other_than_timings_are_refused_under_secure_aggregation() -> None:
    weights = [np.full(100, 0.5, np.float32)]
    with _LiveRound({1: SecureRound, 2: SecureRound, 3: _SendsItsLoss}, weights) as live:
        assert [r.code for r in _SendsItsLoss.refusals] == ["INVALID_ARGUMENT"]
        assert "timings only" in str(_SendsItsLoss.refusals[0]) and "'loss'" in str(_SendsItsLoss.refusals[0])
        outcome = live.coordinator.close_round()
    assert {u.client_id: dict(u.metrics) for u in outcome.updates}[3] == {"train_seconds": 1.0}


class _RetriesAfterTheRoundClosed(SecureRound):
    """Sends its masked update again once unmasking has begun (its first reply was lost, say),
    then reveals as the protocol asks for ALREADY_EXISTS."""

    codes: list[str] = []

    def submit(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        connection, sent = self._connection, []
        original = connection.submit

        def keep(*call: Any, **named: Any) -> tuple[int, int]:
            sent.append((call, named))
            return original(*call, **named)

        connection.submit = keep  # type: ignore[method-assign]
        try:
            result = super().submit(*args, **kwargs)
        finally:
            del connection.submit
        self._stage("unmask")  # the round closed: the server is unmasking
        try:
            original(*sent[0][0], **sent[0][1])
        except UpdateRejectedError as exc:
            self.codes.append(exc.code)
        return result


def test_a_masked_update_retried_after_its_round_closed_is_already_exists() -> None:
    weights = [np.full(100, 0.5, np.float32)]
    with _LiveRound({1: SecureRound, 2: _RetriesAfterTheRoundClosed}, weights) as live:
        np.testing.assert_array_equal(live.coordinator.close_round().weights[0], weights[0])
    assert _RetriesAfterTheRoundClosed.codes == ["ALREADY_EXISTS"]
