"""What a run leaves in its output folder: history JSON, curves, the final model.

<out>/history.json        the run's spec and one record per round (rewritten after every round)
<out>/curves.png          the main metric and loss per round: central, federated, personalized
<out>/final_model.keras   the final global model (Keras' zip format: JSON and HDF5, no pickle)
<out>/final_weights.npz   ... of a framework-free task: its weights, arrays 0000, 0001, ... in order
<out>/partition.json      stand-in federations: each client's example count and label histogram
<out>/partition.png       ... as stacked bars, one per client
<out>/updates/round-NNNN/client-K.npz   accepted updates, only with --record-updates
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import RunSpec
from ..common.errors import RunFailedError
from .events import Event, RoundClosed, RunFinished

log = logging.getLogger("fedgrpc.server")

#: A write that fails (EMFILE, ENOSPC, EIO) is tried again this many times, waiting twice as long each time.
WRITE_ATTEMPTS = 4
FIRST_RETRY_S = 1.0


@dataclass(frozen=True)
class ClientReport:
    client_id: int
    num_examples: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class FederatedRecord:
    """The clients' evaluation of the global model, example-weighted (see server.evaluation)."""

    clients: int
    num_examples: int
    metrics: Mapping[str, float]
    reports: list[ClientReport] = field(default_factory=list)  # each client's own


@dataclass(frozen=True)
class RoundRecord:
    round: int
    seconds: float
    bytes_in: int
    bytes_out: int
    clients: list[ClientReport] = field(default_factory=list)  # the training reports
    central: Mapping[str, float] | None = None  # on the server's test set, if it has one
    federated: FederatedRecord | None = None  # on the clients' held-out data, when asked
    privacy: Mapping[str, float] | None = None  # DP: epsilon spent so far, for delta
    secagg: Mapping[str, float] | None = None  # secure aggregation: who took each step, and its cost
    start_digest: str = ""  # weights_digest of the global weights the round started from
    end_digest: str = ""  # ... and of the new global weights it produced
    lost: str | None = None  # why the round produced no new weights (secure aggregation), if so
    staleness: Mapping[str, int] | None = None  # --mode fedbuff: client id -> its update's staleness

    def to_dict(self) -> dict[str, Any]:
        """For history.json and the checkpoint: `lost` only where the round was lost, `staleness`
        only under --mode fedbuff (a synchronous run's history stays as it was)."""
        out = asdict(self)
        for optional in ("lost", "staleness"):
            if out[optional] is None:
                del out[optional]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        """A record read back from JSON, where a metric that was not finite is null (NaN here)."""
        fields = dict(data)
        fields["clients"] = [ClientReport(**c) for c in fields.get("clients", [])]
        if fields.get("central") is not None:
            fields["central"] = _nan_for_null(fields["central"])
        federated = fields.get("federated")
        if federated is not None:
            federated = dict(federated)
            federated["metrics"] = _nan_for_null(federated["metrics"])
            federated["reports"] = [ClientReport(**c) for c in federated.get("reports", [])]
            fields["federated"] = FederatedRecord(**federated)
        return cls(**fields)

    def metric(self, name: str, *, source: str = "central") -> float | None:
        """One metric of this round's central or federated evaluation (None where not measured)."""
        metrics = self.central if source == "central" else self.federated.metrics if self.federated else None
        value = metrics.get(name) if metrics else None
        return None if value is None or not math.isfinite(value) else float(value)


def strict_json(document: Any, **options: Any) -> str:
    """JSON that every parser reads: a non-finite float becomes null instead of NaN/Infinity
    (which Python writes by default and strict parsers refuse)."""
    return json.dumps(_finite_or_null(document), allow_nan=False, **options)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


def write_atomically(path: Path, data: bytes) -> None:
    """Write, fsync, rename: a reader sees the old file or the new one, never half of one.
    A write that fails takes its temporary file with it: tried again on a full disk, it must
    not leave one more behind each time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        try:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
            os.replace(tmp.name, path)
        except BaseException:
            remove_quietly(Path(tmp.name))
            raise


def remove_quietly(path: Path) -> None:
    """Remove a temporary file a failed write left; the write's own error is the one to report."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("could not remove the temporary file %s: %s", path, exc)


def persist(
    what: str,
    write: Callable[[], object],
    *,
    stop: threading.Event | None = None,
    attempts: int = WRITE_ATTEMPTS,
    first_retry_s: float = FIRST_RETRY_S,
) -> bool:
    """Run `write`; on OSError say so and try again, waiting 1, 2, 4 s. False when every try
    failed (reported; the caller decides whether the run can go on without it): a full disk or
    a moment without free descriptors must not end a run with a traceback."""
    wait = first_retry_s
    last_try = attempts
    tries = 0
    while True:
        tries += 1
        try:
            write()
            return True
        except OSError as exc:
            error = exc
        if tries >= last_try:
            break
        log.error(
            "%s could not be written: %s; trying again in %.0f s (free disk space or descriptors)",
            what, error, wait,
        )  # fmt: skip
        if stop is None:
            threading.Event().wait(wait)
        elif stop.wait(wait):  # stopping: one last try, at once
            last_try = tries + 1
        wait *= 2
    log.error("%s could not be written (%d tries): %s", what, tries, error)
    return False


class RunResults:
    """Writes a run's results under one folder."""

    #: The clients that said they cannot take part, and why (the server hands in its coordinator's).
    withdrawals: Callable[[], Mapping[int, str]] = dict

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.strategy: Mapping[str, Any] | None = None  # recorded in history.json's "run"
        out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def history_path(self) -> Path:
        return self.out_dir / "history.json"

    @property
    def model_path(self) -> Path:
        return self.out_dir / "final_model.keras"

    @property
    def weights_path(self) -> Path:
        return self.out_dir / "final_weights.npz"

    @property
    def curves_path(self) -> Path:
        return self.out_dir / "curves.png"

    def write_history(self, run: RunSpec, records: Sequence[RoundRecord], *, finished: bool) -> None:
        described = run.to_dict()
        if self.strategy is not None:
            described["strategy"] = dict(self.strategy)
        document: dict[str, Any] = {
            "run": described,
            "finished": finished,
            "rounds": [r.to_dict() for r in records],
            "withdrawn": [{"client_id": k, "reason": why} for k, why in self.withdrawals().items()],
        }
        write_atomically(self.history_path, (strict_json(document, indent=2) + "\n").encode())

    def record_update(
        self, round_number: int, client_id: int, specs: Sequence[TensorSpec], weights: Sequence[np.ndarray]
    ) -> None:
        path = self.out_dir / "updates" / f"round-{round_number:04d}" / f"client-{client_id}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {f"{i:04d}": w for i, w in enumerate(weights)}
        np.savez(path, **arrays)

    def write_partition(self, run: RunSpec, labels: np.ndarray) -> dict[str, Any]:
        """The run's stand-in partition, from the labels of the dataset it cuts: what each client
        will train on (computed as every client computes its own shard)."""
        from ..common.partition import all_partitions

        classes = int(labels.max()) + 1 if len(labels) else 0
        shards = all_partitions(labels, run.num_clients, run.partition_seed, run.partition)
        summary: dict[str, Any] = {
            "partition": run.partition,
            "seed": run.partition_seed,
            "examples": len(labels),
            "clients": [
                {
                    "client_id": k,
                    "examples": len(shard),
                    "labels": np.bincount(labels[shard].astype(np.int64), minlength=classes).tolist(),
                }
                for k, shard in enumerate(shards, start=1)
            ],
        }
        write_atomically(self.out_dir / "partition.json", (strict_json(summary, indent=1) + "\n").encode())
        self._plot_partition(summary, classes)
        return summary

    def _plot_partition(self, summary: Mapping[str, Any], classes: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        clients = summary["clients"]
        figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(clients) + 2), 4))
        bottom = np.zeros(len(clients))
        colors = plt.get_cmap("tab10" if classes <= 10 else "tab20")
        for label in range(classes):
            counts = np.array([c["labels"][label] for c in clients], dtype=np.float64)
            axis.bar(
                [c["client_id"] for c in clients],
                counts,
                bottom=bottom,
                color=colors(label % 20),
                label=str(label),
            )
            bottom += counts
        axis.set_xticks([c["client_id"] for c in clients])
        axis.set(
            title=f"partition {summary['partition']} (seed {summary['seed']})",
            xlabel="client",
            ylabel="training examples",
        )
        if classes <= 20:
            axis.legend(title="label", fontsize=7, ncols=2)
        figure.tight_layout()
        figure.savefig(self.out_dir / "partition.png", dpi=100)
        plt.close(figure)

    def plot(self, records: Sequence[RoundRecord], main: str = "accuracy") -> None:
        """The main metric and the loss against rounds, side by side: central evaluation,
        federated evaluation and personalized (after local fine-tuning), where measured."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r.round for r in records]
        private = any(r.privacy for r in records)
        figure, axes = plt.subplots(1, 3 if private else 2, figsize=(15 if private else 10, 4))
        left, right = axes[0], axes[1]
        lines = (
            ("central (server's test set)", "central", "", "tab:blue"),
            ("federated (clients' held-out data)", "federated", "", "tab:orange"),
            ("personalized (after local fine-tuning)", "federated", "personalized_", "tab:green"),
        )
        for axis, metric in ((left, main), (right, "loss")):
            for label, source, prefix, color in lines:
                values = [_nan_if_none(r.metric(prefix + metric, source=source)) for r in records]
                if any(not math.isnan(v) for v in values):
                    axis.plot(rounds, values, marker="o", label=label, color=color)
            axis.set(title=metric, xlabel="round", ylabel=metric)
            axis.grid(alpha=0.3)
            axis.set_xticks(rounds)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=8)
        if private:
            spent = [_nan_if_none((r.privacy or {}).get("epsilon")) for r in records]
            delta = next(r.privacy["delta"] for r in records if r.privacy)
            axes[2].plot(rounds, spent, marker="o", color="tab:purple")
            axes[2].set(title=f"privacy spent (delta {delta:g})", xlabel="round", ylabel="epsilon")
            axes[2].grid(alpha=0.3)
            axes[2].set_xticks(rounds)
        figure.tight_layout()
        figure.savefig(self.curves_path, dpi=100)
        plt.close(figure)


class ResultsSink:
    """history.json after every round (a write that fails is reported and left to the next
    round's); at the end the final model, history.json marked finished, and the curves, which
    the run cannot finish without (RunFailedError)."""

    def __init__(self, results: RunResults, model: Any, stop: threading.Event) -> None:
        self.results, self._model, self._stop = results, model, stop

    def handle(self, event: Event) -> None:
        if isinstance(event, RoundClosed):
            history = partial(self.results.write_history, event.run, event.history, finished=False)
            persist("history.json", history, stop=self._stop)
        elif isinstance(event, RunFinished) and not persist(
            "the final model and history.json", partial(self._save_final, event)
        ):
            raise RunFailedError(
                f"the results could not be written to {self.results.out_dir} (see above); the checkpoint "
                "after the last round is intact: free what is missing and start the server again"
            )

    def _save_final(self, event: RunFinished) -> None:
        from ..common.models import is_keras_model, save_weights

        model = self._model
        if not is_keras_model(model):  # a framework-free task's: its weights are all we know of it
            save_weights(self.results.weights_path, event.weights)
        else:
            model.set_weights(list(event.weights))
            if getattr(model, "optimizer", None) is not None:
                model.optimizer.build(model.trainable_variables)  # saved with fresh slots: loads cleanly
            model.save(self.results.model_path)
        self.results.write_history(event.run, event.history, finished=True)
        self.results.plot(event.history, event.main_metric)


def _nan_for_null(metrics: Mapping[str, float | None]) -> dict[str, float]:
    return {name: math.nan if value is None else float(value) for name, value in metrics.items()}


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value
