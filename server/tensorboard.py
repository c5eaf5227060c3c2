"""`fl-server --tensorboard DIR`: the run's scalars per round, for `tensorboard --logdir DIR`.

Written with TensorBoard's own event-file writer (the `tensorboard` package, no TensorFlow
needed), one event per scalar, the round as its step:

    central/<metric>                     the server's evaluation of the global model
    federated/<metric>                   the clients' example-weighted evaluation
    round/seconds, round/bytes_in, round/bytes_out, round/clients
    clients/<id>/train/<metric>          each client's training report
    clients/<id>/evaluate/<metric>       each client's own evaluation
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError
from .events import Event, RoundClosed, RunClosed


class TensorBoardWriter:
    """A sink of the run's events (server.events): every closed round's scalars."""

    def __init__(self, logdir: Path) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs the tensorboard package: pip install 'fedgrpc[monitoring]'"
            ) from None
        logdir.mkdir(parents=True, exist_ok=True)
        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writer = EventFileWriter(str(logdir))

    def handle(self, event: Event) -> None:
        if isinstance(event, RoundClosed):
            self.round(asdict(event.record))
        elif isinstance(event, RunClosed):
            self.close()

    def round(self, record: Mapping[str, Any]) -> None:
        """Every scalar of one round's record (as history.json has it)."""
        step = int(record["round"])
        values: dict[str, float] = {
            "round/seconds": record["seconds"],
            "round/bytes_in": record["bytes_in"],
            "round/bytes_out": record["bytes_out"],
            "round/clients": len(record["clients"]),
        }
        values.update({f"central/{k}": v for k, v in (record.get("central") or {}).items()})
        federated = record.get("federated") or {}
        values.update({f"federated/{k}": v for k, v in (federated.get("metrics") or {}).items()})
        for report in record["clients"]:
            values.update(
                {f"clients/{report['client_id']}/train/{k}": v for k, v in report["metrics"].items()}
            )
        for report in federated.get("reports") or []:
            values.update(
                {f"clients/{report['client_id']}/evaluate/{k}": v for k, v in report["metrics"].items()}
            )
        summary = self._summary(
            value=[
                self._summary.Value(tag=tag, simple_value=float(value))
                for tag, value in values.items()
                if value is not None and math.isfinite(value)
            ]
        )
        self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
