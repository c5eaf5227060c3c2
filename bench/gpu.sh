#!/usr/bin/env bash
# The reference job on a GPU machine that has JAX and CUDA but no TensorFlow and no internet:
# Keras on JAX, fl-server + 3 fl-client processes sharing one card, beside the sequential
# in-process reference on the same card (bench/reference_run.py --backend jax).
#
#   bench/gpu.sh fetch   # on a machine with PyPI, from the repository root: what the GPU
#                        # image lacks goes to .gpu/ (wheels for Python 3.12, the CIFAR-10 copy)
#   bench/gpu.sh run     # on the GPU machine, from the repository root (with .gpu/ carried
#                        # there): installs into /tmp/site and runs; JSON to ${OUT:-bench/results}
#
# The GPU image has numpy, grpcio, pillow, matplotlib, prometheus-client, tensorboard and JAX;
# fedgrpc also needs Keras and the exact gRPC/protobuf its bindings were generated with.
set -euo pipefail
here=.gpu
case "${1:-}" in
fetch)
    mkdir -p "$here"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$here" \
        keras==3.15.1 namex==0.1.0 optree==0.20.0 grpcio==1.85.3 protobuf==7.36.2 \
        grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 setuptools
    cp "${FL_DATA:-../shared/data/cifar10-jpeg.tar.gz}" "$here/cifar10-jpeg.tar.gz"
    echo "carry $here to the GPU machine, then: bench/gpu.sh run"
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$here"/*.whl
    PYTHONPATH=/tmp/site python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
    export PYTHONPATH=/tmp/site KERAS_BACKEND=jax
    python3 bench/reference_run.py --backend jax --data "$here/cifar10-jpeg.tar.gz" \
        --json "${OUT:-bench/results}/gpu.json"
    ;;
*)
    echo "usage: bench/gpu.sh fetch|run" >&2
    exit 2
    ;;
esac
