"""The hardware as the Keras backend sees it, set up once at process start.

Keras runs on the backend named by KERAS_BACKEND: `tensorflow` (the default, and the dependency
fedgrpc is built on), `jax` or `torch` (`pip install 'fedgrpc[jax]'`, `'fedgrpc[torch]'`).
Weights travel as plain tensors, so clients on different backends can join one run.

Several client processes can share one GPU:

| backend    | what is done                                                                     |
|------------|----------------------------------------------------------------------------------|
| tensorflow | memory growth on every GPU (not all of it at start); CPU thread pools capped     |
| jax        | XLA_PYTHON_CLIENT_PREALLOCATE=false (no 75% grab at start); CPU threads capped   |
| torch      | its caching allocator takes memory as needed already; CPU threads capped         |

`prepare(threads, gpu)` must run before the backend is imported (JAX reads its settings at
import); `configure(threads)` after, once Keras is importable.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

BACKENDS = ("tensorflow", "jax", "torch")


def backend() -> str:
    """The Keras backend this process will use (KERAS_BACKEND, else tensorflow)."""
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def prepare(threads: int | None = None, gpu: str | None = None) -> None:
    """Environment the frameworks read when imported: quiet start-up, which GPUs, shared memory."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # this process sees these cards only
    if backend() == "jax":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if threads:
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = (
                f"{flags} --xla_cpu_multi_thread_eigen={str(threads > 1).lower()}".strip()
            )
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, str(threads))


def configure(threads: int | None = None) -> str:
    """Set up devices; returns a one-line description such as 'tensorflow: GPU x1' or
    'jax: CPU, 2 threads'."""
    name = backend()
    if name == "jax":
        return f"jax: {_configure_jax()}"
    if name == "torch":
        return f"torch: {_configure_torch(threads)}"
    return f"tensorflow: {_configure_tensorflow(threads)}"


def _configure_tensorflow(threads: int | None) -> str:
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


def _configure_jax() -> str:
    import jax

    devices = jax.devices()
    kinds = sorted({d.platform for d in devices})
    if "gpu" in kinds or "cuda" in kinds:
        return f"GPU x{len(devices)} ({devices[0].device_kind}), preallocation off"
    return f"CPU ({len(devices)} device{'s' if len(devices) > 1 else ''})"


def _configure_torch(threads: int | None) -> str:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"GPU x{count} ({torch.cuda.get_device_name(0)})"
    return f"CPU, {torch.get_num_threads()} threads"


def gpus_present() -> int:
    """NVIDIA GPUs this machine has, without importing a framework (0 when none, or no driver)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
