"""The built-in task's two input pipelines, timed: tf.data against keras.utils.PyDataset.

    python bench/input_pipeline.py [--data PATH] [--epochs 3]

One client's shard of the reference job (CIFAR-10 from the shared copy cut in 3: 16,666
images), the reference CNN, batch 32: warm epochs (the first, which compiles, is reported
apart) with each pipeline on the TensorFlow backend, and with the PyDataset on JAX and PyTorch
when they are installed (each backend in its own process, as clients run). Prints a table and
writes JSON (bench/results/input_pipeline.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def measure(data: str, pipeline: str, epochs: int) -> dict[str, float]:
    """In this process (its backend already chosen): seconds of each epoch."""
    import keras
    from fedgrpc.common.cifar10 import NUM_CLASSES, ShuffledBatches, input_pipeline
    from fedgrpc.common.data import Examples, load_split
    from fedgrpc.common.models import reference_cnn
    from fedgrpc.common.task import Site

    site = Site(client_id=1, num_clients=3, data=data, params={}, batch_size=32, partition_seed=42)
    train = load_split(data, "train")
    x, y = site.shard(train.x, train.y)
    shard = Examples(x, y)
    batches = (
        input_pipeline(shard, NUM_CLASSES, 32)
        if pipeline == "tf.data"
        else ShuffledBatches(shard, NUM_CLASSES, 32)
    )
    keras.utils.set_random_seed(0)
    model = reference_cnn()
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.fit(batches, epochs=1, verbose=0)
        seconds.append(time.perf_counter() - started)
    return {"first_s": seconds[0], "warm_s": statistics.fmean(seconds[1:]) if epochs > 1 else seconds[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "input_pipeline.json")
    p.add_argument("--one", nargs=2, metavar=("BACKEND", "PIPELINE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a child: one backend, one pipeline
        print(json.dumps(measure(args.data, args.one[1], args.epochs)))
        return 0
    from fedgrpc.common.data import load_split

    load_split(args.data, "train")  # decode into the cache before anything is timed
    rows = []
    for backend, pipeline in [("tensorflow", "tf.data"), ("tensorflow", "PyDataset"), ("jax", "PyDataset"),
                              ("torch", "PyDataset")]:  # fmt: skip
        module = "jax" if backend == "jax" else "torch" if backend == "torch" else "tensorflow"
        if subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode:
            print(f"{backend}: not installed, skipped")
            continue
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        command = [sys.executable, __file__, "--one", backend, pipeline, "--data", args.data,
                   "--epochs", str(args.epochs)]  # fmt: skip
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        rows.append({"backend": backend, "pipeline": pipeline, **json.loads(out.strip().splitlines()[-1])})
    print(f"\none epoch of a 16,666-image shard, reference CNN, batch 32 ({os.cpu_count()} cores)")
    print(f"{'backend':<11} {'pipeline':<10} {'first epoch s':>13} {'warm epoch s':>12}")
    for row in rows:
        print(f"{row['backend']:<11} {row['pipeline']:<10} {row['first_s']:>13.2f} {row['warm_s']:>12.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2)
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
