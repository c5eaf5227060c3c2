"""What a run leaves in its output folder: history JSON, accuracy/loss curves, the final model.

<out>/history.json        the run's spec and one record per round (rewritten after every round)
<out>/curves.png          test accuracy and loss per round
<out>/final_model.keras   the final global model (Keras' zip format: JSON and HDF5, no pickle)
<out>/updates/round-NNNN/client-K.npz   accepted updates, only with --record-updates
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec


@dataclass(frozen=True)
class ClientReport:
    client_id: int
    num_examples: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class RoundRecord:
    round: int
    accuracy: float | None  # None: not measured, or not a finite number
    loss: float | None
    seconds: float
    bytes_in: int
    bytes_out: int
    clients: list[ClientReport] = field(default_factory=list)
    start_digest: str = ""  # weights_digest of the global weights the round started from
    end_digest: str = ""  # ... and of the new global weights it produced

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        fields = dict(data)
        fields["clients"] = [ClientReport(**c) for c in fields.get("clients", [])]
        return cls(**fields)


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
    """Write, fsync, rename: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


class RunResults:
    """Writes a run's results under one folder."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def history_path(self) -> Path:
        return self.out_dir / "history.json"

    @property
    def model_path(self) -> Path:
        return self.out_dir / "final_model.keras"

    @property
    def curves_path(self) -> Path:
        return self.out_dir / "curves.png"

    def write_history(self, run: RunSpec, records: Sequence[RoundRecord], *, finished: bool) -> None:
        document: dict[str, Any] = {
            "run": asdict(run),
            "finished": finished,
            "rounds": [asdict(r) for r in records],
        }
        write_atomically(self.history_path, (strict_json(document, indent=2) + "\n").encode())

    def record_update(
        self, round_number: int, client_id: int, specs: Sequence[TensorSpec], weights: Sequence[np.ndarray]
    ) -> None:
        path = self.out_dir / "updates" / f"round-{round_number:04d}" / f"client-{client_id}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {f"{i:04d}": w for i, w in enumerate(weights)}
        np.savez(path, **arrays)

    def plot(self, records: Sequence[RoundRecord]) -> None:
        """Accuracy and loss against rounds, side by side, as a PNG a person can glance at."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r.round for r in records]
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(rounds, [_nan_if_none(r.accuracy) for r in records], marker="o")
        left.set(title="Test accuracy", xlabel="round", ylabel="accuracy")
        right.plot(rounds, [_nan_if_none(r.loss) for r in records], marker="o", color="tab:red")
        right.set(title="Test loss", xlabel="round", ylabel="loss")
        for axis in (left, right):
            axis.grid(alpha=0.3)
            axis.set_xticks(rounds)
        figure.tight_layout()
        figure.savefig(self.curves_path, dpi=100)
        plt.close(figure)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value
