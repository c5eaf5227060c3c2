"""Starting local processes for fl-local and fl-sim: a free port, a child with its output
filtered of frameworks' start-up noise."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

#: TensorFlow's C++ start-up lines, printed before logging is set up; noise in a demo.
_NOISE = re.compile(
    r"absl::InitializeLog|cudart_stub|cuda_platform|cpu_feature_guard|rebuild TensorFlow|"
    r"oneDNN custom operations|computation placer already registered|Unable to register cu|"
    r"Unable to initialize backend 'tpu'|An NVIDIA GPU may be present on this machine"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pump(stream: IO[str], sink: IO[str]) -> None:
    for line in stream:
        if not _NOISE.search(line):
            sink.write(line)
            sink.flush()


def spawn(command: Sequence[str], log_file: Path | None) -> tuple[subprocess.Popen[str], threading.Thread]:
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert process.stdout is not None
    sink: IO[str] = open(log_file, "w") if log_file else sys.stderr  # noqa: SIM115 (closed by the pump's owner)
    pump = threading.Thread(target=_pump, args=(process.stdout, sink), daemon=True)
    pump.start()
    return process, pump
