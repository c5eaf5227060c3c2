"""A big model through fedgrpc over loopback, against the floors of the same machine, same run.

    python bench/transport.py [--mb 100] [--big] [--repeat 3] [--json bench/results/transport.json]

Moves the same bytes three ways, down (server to client) and up (client to server):

- raw TCP socket: sendall / recv_into a preallocated buffer, no framing at all;
- bare gRPC stream: 1 MiB `bytes` messages with no protobuf (identity serializers);
- fedgrpc: GetGlobalWeights (long-poll, header, chunks, decoded into numpy arrays) and
  SubmitUpdate (chunks assembled into numpy arrays, each tensor checked finite as it
  completes, the update counted; its fold into the FedAvg sum runs on the server's fold
  thread after the reply, overlapping the next transfer).

The receiving and sending servers run in a child process, the clients in this one, so no
side shares a GIL with the other. Prints MB/s (best of --repeat) and the ratios; writes JSON.
Targets (issue): fedgrpc >= 0.5x the socket and >= 0.85x the bare gRPC stream, both ways.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

CHUNK = 1 << 20
TENSOR_BYTES = 4 << 20  # the model is cut into 4 MiB float32 tensors


def model(total_mb: int) -> list[np.ndarray]:
    count = max(1, (total_mb << 20) // TENSOR_BYTES)
    rng = np.random.default_rng(0)
    return [rng.standard_normal(TENSOR_BYTES // 4, dtype=np.float32) for _ in range(count)]


# -- server side (child process) -----------------------------------------------------------


def _socket_server(listener: socket.socket, payload: memoryview) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            mode, size = struct.unpack("!cQ", conn.recv(9, socket.MSG_WAITALL))
            if mode == b"D":
                conn.sendall(payload[:size])
            else:
                buffer = bytearray(size)
                view, got = memoryview(buffer), 0
                while got < size:
                    got += conn.recv_into(view[got:])
                conn.sendall(b"k")


def _serve(total_mb: int, repeat: int, ports: mp.Queue) -> None:  # type: ignore[type-arg]
    from fedgrpc.server.memory import limit_malloc_arenas

    limit_malloc_arenas()  # as fl-server does, before any thread starts
    from fedgrpc.common.codec import spec_of
    from fedgrpc.common.config import RunSpec
    from fedgrpc.server.endpoint import EndpointConfig, GrpcEndpoint, server_options
    from fedgrpc.server.limits import Limits
    from fedgrpc.server.rounds import RoundCoordinator
    from fedgrpc.server.strategy import FedAvg

    weights = model(total_mb)
    payload = memoryview(b"".join(w.tobytes() for w in weights))

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_socket_server, args=(listener, payload), daemon=True).start()

    def down(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for offset in range(0, len(payload), CHUNK):
            yield bytes(payload[offset : offset + CHUNK])

    def up(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        buffer, got = bytearray(len(payload)), 0
        for chunk in requests:
            buffer[got : got + len(chunk)] = chunk
            got += len(chunk)
        return b"k"

    bare = grpc.method_handlers_generic_handler(
        "bench.Bare",
        {
            "Down": grpc.unary_stream_rpc_method_handler(down),
            "Up": grpc.stream_unary_rpc_method_handler(up),
        },
    )
    clients = 2 * repeat + 2
    specs = [spec_of(f"t{i}", w) for i, w in enumerate(weights)]
    coordinator = RoundCoordinator(
        RunSpec(rounds=1, num_clients=clients), specs, FedAvg(), max_examples=10**9
    )
    for client in range(1, clients + 1):
        coordinator.next_task(client, after_round=0, timeout=0)
    coordinator.open_round(1, weights)
    # The bare stream on a plain threaded server with the same options; fedgrpc on its own endpoint.
    bare_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=server_options(Limits()))
    bare_server.add_generic_rpc_handlers((bare,))
    bare_port = bare_server.add_insecure_port("127.0.0.1:0")
    bare_server.start()
    endpoint = GrpcEndpoint(coordinator, EndpointConfig(host="127.0.0.1", port=0))
    fedgrpc_port = endpoint.start()
    ports.put((listener.getsockname()[1], bare_port, fedgrpc_port))
    bare_server.wait_for_termination()


# -- client side (this process) -----------------------------------------------------------


def best_of(repeat: int, run: Callable[[int], None]) -> float:
    times = []
    for attempt in range(repeat):
        started = time.perf_counter()
        run(attempt)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=100, help="model size in MB (default 100)")
    p.add_argument("--big", action="store_true", help="a 1 GB model")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "transport.json")
    args = p.parse_args()
    total_mb = 1024 if args.big else args.mb

    from fedgrpc.client.connection import Connection
    from fedgrpc.common.codec import spec_of
    from fedgrpc.common.protocol import Instruction

    ports: mp.Queue = mp.get_context("spawn").Queue()  # type: ignore[type-arg]
    child = mp.get_context("spawn").Process(target=_serve, args=(total_mb, args.repeat, ports), daemon=True)
    child.start()
    socket_port, bare_port, fedgrpc_port = ports.get(timeout=120)
    weights = model(total_mb)
    nbytes = sum(w.nbytes for w in weights)
    payload = memoryview(b"".join(w.tobytes() for w in weights))
    specs = [spec_of(f"t{i}", w) for i, w in enumerate(weights)]
    target = f"127.0.0.1:{fedgrpc_port}"

    def socket_down(_: int) -> None:
        with socket.create_connection(("127.0.0.1", socket_port)) as conn:
            conn.sendall(struct.pack("!cQ", b"D", nbytes))
            buffer = bytearray(nbytes)
            view, got = memoryview(buffer), 0
            while got < nbytes:
                got += conn.recv_into(view[got:])
            np.frombuffer(buffer, dtype=np.float32)

    def socket_up(_: int) -> None:
        with socket.create_connection(("127.0.0.1", socket_port)) as conn:
            conn.sendall(struct.pack("!cQ", b"U", nbytes))
            conn.sendall(payload)
            conn.recv(1)

    channel = grpc.insecure_channel(
        f"127.0.0.1:{bare_port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    bare_down_call = channel.unary_stream("/bench.Bare/Down", None, None)
    bare_up_call = channel.stream_unary("/bench.Bare/Up", None, None)

    def bare_down(_: int) -> None:
        buffer, got = bytearray(nbytes), 0
        for chunk in bare_down_call(b""):
            buffer[got : got + len(chunk)] = chunk
            got += len(chunk)
        np.frombuffer(buffer, dtype=np.float32)

    def bare_up(_: int) -> None:
        bare_up_call(bytes(payload[o : o + CHUNK]) for o in range(0, nbytes, CHUNK))

    def fedgrpc_down(attempt: int) -> None:
        with Connection(target, attempt + 1) as connection:
            task = connection.next_task(after_round=0, max_wait_s=5)
            assert task.instruction is Instruction.TRAIN and len(task.weights) == len(weights)

    def fedgrpc_up(attempt: int) -> None:
        with Connection(target, args.repeat + attempt + 1) as connection:
            connection.submit(1, specs, weights, 10, {})

    rows = {}
    for name, down, up in [
        ("raw TCP socket", socket_down, socket_up),
        ("bare gRPC stream", bare_down, bare_up),
        ("fedgrpc", fedgrpc_down, fedgrpc_up),
    ]:
        rows[name] = {
            "down_MBps": nbytes / 1e6 / best_of(args.repeat, down),
            "up_MBps": nbytes / 1e6 / best_of(args.repeat, up),
        }
    channel.close()
    child.terminate()

    print(f"{nbytes / 1e6:.0f} MB model, {len(weights)} tensors, best of {args.repeat}, loopback")
    print(f"{'path':<18} | {'down MB/s':>9} {'up MB/s':>8} | {'x socket':>8} {'x bare gRPC':>11}")
    print("-" * 64)
    for name, row in rows.items():
        vs_socket = min(
            row["down_MBps"] / rows["raw TCP socket"]["down_MBps"],
            row["up_MBps"] / rows["raw TCP socket"]["up_MBps"],
        )
        vs_bare = min(
            row["down_MBps"] / rows["bare gRPC stream"]["down_MBps"],
            row["up_MBps"] / rows["bare gRPC stream"]["up_MBps"],
        )
        row |= {"worst_x_socket": vs_socket, "worst_x_bare_grpc": vs_bare}
        print(
            f"{name:<18} | {row['down_MBps']:>9.0f} {row['up_MBps']:>8.0f} | "
            f"{vs_socket:>8.2f} {vs_bare:>11.2f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model_bytes": nbytes, "repeat": args.repeat, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    fed = rows["fedgrpc"]
    return 0 if fed["worst_x_socket"] >= 0.5 and fed["worst_x_bare_grpc"] >= 0.85 else 1


if __name__ == "__main__":
    sys.exit(main())
