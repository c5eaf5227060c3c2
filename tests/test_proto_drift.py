import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_bindings_match_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_bindings_import_from_the_fedgrpc_namespace() -> None:
    from fedgrpc.v1 import coordinator_pb2, coordinator_pb2_grpc

    assert coordinator_pb2.DESCRIPTOR.package == "fedgrpc.v1"
    assert hasattr(coordinator_pb2_grpc, "CoordinatorServicer")
