"""TensorFlow's view of the hardware, set up once at process start.

On a GPU, memory growth is switched on so that several client processes can share one
card instead of the first one taking all of its memory. On a CPU, the thread pools can be
capped, so that several clients on one machine do not fight over its cores.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def quiet_tensorflow() -> None:
    """Hide TensorFlow's C++ start-up chatter (must run before tensorflow is imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configure(threads: int | None = None) -> str:
    """Set up devices; returns a one-line description such as 'GPU x1' or 'CPU, 2 threads'."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # TensorFlow already initialised the device
            log.warning("could not enable memory growth on %s: %s", gpu.name, exc)
    if threads:
        # One op at a time, each over `threads` cores: several clients sharing a machine then
        # share it evenly (with inter-op pools of the same size, they starved one another).
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    if gpus:
        return f"GPU x{len(gpus)} ({', '.join(g.name for g in gpus)}), memory growth on"
    return f"CPU, {threads or os.cpu_count()} threads"
