"""The docker-compose demo (docker/), checked by Compose and run for real on a Docker engine.

The config tests need only the `docker-compose` binary. The demo test needs a Docker engine: it
uses the one that answers, or starts `dockerd` itself (as root) and stops it afterwards. It
builds everything it runs from local material: a Debian base image made by debootstrap from
this machine's apt mirror (cached under /var/cache/fedgrpc-test, outside the repository), the
fedgrpc image on top (pip reaches PyPI through the host network during the build), and a slice
of the offline CIFAR-10 copy mounted read-only. The containers run on networks that Compose
creates for the test, the one between server and clients internal: nothing in the run reaches
out. Containers, networks, volumes and the images built here are removed whatever the outcome.

Without a Docker engine (or the tools to make one) these tests skip, or fail when $CI is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"
COMPOSE_GPU = REPO / "docker" / "compose.gpu.yaml"
COMPOSE_MONITORING = REPO / "docker" / "compose.monitoring.yaml"
COMPOSE_STANDING = REPO / "docker" / "compose.standing.yaml"
DOCKERFILE = "docker/Dockerfile"
OFFLINE_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
CACHE = Path(os.environ.get("FEDGRPC_TEST_CACHE", "/var/cache/fedgrpc-test"))
SUITE = "bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
CLIENTS, ROUNDS = 3, 2
SERVICES = {"data", "server", *(f"client{k}" for k in range(1, CLIENTS + 1))}
STANDING = {"provision", "coordinator", "submit", *(f"site{k}" for k in range(1, CLIENTS + 1))}
RUN = uuid.uuid4().hex[:10]  # names this session's images and compose project


def unavailable(reason: str) -> NoReturn:
    """No Docker here: a failure under CI (which installs it), a skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"docker test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def base_env() -> dict[str, str]:
    """This environment without settings that would change the compose files' meaning."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "COMPOSE_"))}
    env["DOCKER_BUILDKIT"] = "0"  # the classic builder: no buildx plugin needed
    env["COMPOSE_DOCKER_CLI_BUILD"] = "0"
    return env


def sh(
    *args: str | Path, env: dict[str, str], timeout: float = 120, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; on failure, fail the test with its output."""
    argv = [str(a) for a in args]
    try:
        done = subprocess.run(argv, env=env, timeout=timeout, capture_output=True, text=True, **kw)
    except subprocess.TimeoutExpired as exc:
        output = b"".join(o if isinstance(o, bytes) else (o or "").encode() for o in (exc.stdout, exc.stderr))
        pytest.fail(f"{' '.join(argv)} took over {timeout} s:\n{output.decode(errors='replace')[-3000:]}")
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


# ---- the compose files: docker-compose config only, no engine ------------------------------------


def compose_binary() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        unavailable("docker-compose (Compose v1) is not installed")
    return path


def compose_config(*files: Path, **variables: str) -> dict[str, Any]:
    """`docker-compose config` of the files, as data (it validates them on the way)."""
    env = {**base_env(), **variables}
    argv: list[str | Path] = [compose_binary()]
    for f in files:
        argv += ["-f", f]
    text = sh(*argv, "config", env=env).stdout
    return load_yaml(text)


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port. docker-compose v1 prints
    the short form it was given ("127.0.0.1:9090:9090"), Compose v2 the long form (a mapping)."""
    found = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            found.append((entry.get("host_ip", ""), int(entry["published"]), int(entry["target"])))
        else:
            *host, published, target = str(entry).split("/")[0].split(":")
            found.append((":".join(host), int(published), int(target)))
    return found


def load_yaml(text: str) -> dict[str, Any]:
    """PyYAML when this environment has it, else the interpreter docker-compose (v1) runs on."""
    try:
        import yaml

        return dict(yaml.safe_load(text))
    except ImportError:
        pass
    first_line = Path(compose_binary()).read_bytes()[:200].split(b"\n")[0].decode(errors="replace")
    interpreter = first_line[2:].strip().split()[0] if first_line.startswith("#!") else ""
    if "python" not in interpreter:
        pytest.skip("no YAML parser here to read docker-compose's output")
    code = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    done = sh(interpreter, "-c", code, env=base_env(), input=text)
    return dict(json.loads(done.stdout))


def test_compose_files_are_valid() -> None:
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_GPU), (COMPOSE, COMPOSE_MONITORING)):
        for variables in ({}, {"FL_DATA": "/srv/data/cifar10-jpeg.tar.gz", "FL_ROUNDS": "2"}):
            config = compose_config(*files, **variables)
            extra = {"prometheus", "grafana"} if COMPOSE_MONITORING in files else set()
            assert set(config["services"]) == SERVICES | extra, files


def test_monitoring_overlay_scrapes_the_server_and_keeps_it_internal() -> None:
    """Prometheus and Grafana images cannot be pulled here (no Docker Hub): the overlay is checked
    by Compose, its Prometheus target against the server's --http port, and the Grafana
    dashboard's queries against the metrics a live server exports (tests/test_observability.py)."""
    config = compose_config(COMPOSE, COMPOSE_MONITORING, FL_ROUNDS="3")
    services, networks = config["services"], config["networks"]
    server = services["server"]
    assert "--http=8080" in server["command"] and "--rounds=3" in server["command"]
    assert "ports" not in server and set(server["networks"]) == {"fl", "monitoring"}
    assert networks["fl"]["internal"] is True and networks["monitoring"]["internal"] is True
    assert set(services["prometheus"]["networks"]) == {"monitoring", "ui"}
    for name, port in (("prometheus", 9090), ("grafana", 3000)):
        assert published_ports(services[name]) == [("127.0.0.1", port, port)], services[name]
    prometheus = load_yaml((REPO / "docker" / "monitoring" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["server:8080"]


def test_compose_demo_wiring() -> None:
    config = compose_config(COMPOSE, FL_DATA="/srv/data/cifar10.npz", FL_ROUNDS="4")
    services = config["services"]
    assert config["networks"]["fl"]["internal"] is True
    server = services["server"]
    assert "--rounds=4" in server["command"] and "--out=/results" in server["command"]
    health = server["healthcheck"]["test"]
    assert health[0] == "CMD" and "fedgrpc.v1.Coordinator" in health[-1] and "SERVING" in health[-1]
    assert any(v.startswith("results:/results") for v in server["volumes"])
    for k in range(1, CLIENTS + 1):
        client = services[f"client{k}"]
        assert f"--id={k}" in client["command"] and "--server=server:50051" in client["command"]
        assert client["depends_on"]["server"]["condition"] == "service_healthy"
        assert client["restart"] == "on-failure:5"
    for name in SERVICES - {"data"}:
        assert list(services[name]["networks"]) == ["fl"], name
    for name in SERVICES:  # FL_DATA: read-only at the same path, and given as --data
        assert "/srv/data/cifar10.npz:/srv/data/cifar10.npz:ro" in services[name]["volumes"], name
        assert "/srv/data/cifar10.npz" in " ".join(services[name]["command"]), name
    # without FL_DATA only the data service downloads CIFAR-10; the others read its copy
    default = compose_config(COMPOSE)["services"]
    assert default["data"]["command"][-1] == "cifar10"
    for name in SERVICES - {"data"}:
        assert "--data=/cache/cifar10.npz" in default[name]["command"], name
    assert default["data"]["network_mode"] == "bridge" and "deploy" not in default["client1"]


def test_gpu_overlay_reserves_nvidia_gpus_for_clients() -> None:
    services = compose_config(COMPOSE, COMPOSE_GPU)["services"]
    for k in range(1, CLIENTS + 1):
        devices = services[f"client{k}"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}], devices
    assert "deploy" not in services["server"]
    images = {s["image"] for s in services.values()}
    assert images == {"fedgrpc:gpu"}, images
    assert services["client1"]["build"]["args"]["EXTRAS"] == "gpu"


def test_standing_compose_gives_each_participant_its_own_kit() -> None:
    """The standing mode: provisioning alone sees the CA's state and every kit; each other
    service mounts only its own kit, read-only; the coordinator runs in federation mode."""
    config = compose_config(COMPOSE_STANDING)
    services = config["services"]
    assert set(services) == STANDING
    assert config["networks"]["fl"]["internal"] is True
    provision = services["provision"]
    assert provision["network_mode"] == "none" and "networks" not in provision
    assert "fl-provision /config/project.toml --out /pki" in provision["command"][-1]

    def volume_sources(name: str) -> set[str]:
        found = set()
        for v in services[name]["volumes"]:
            source = v["source"] if isinstance(v, dict) else str(v).split(":")[0]
            found.add(source.rsplit("/", 1)[-1] if source.startswith("/") else source)
        return found

    kits = {f"site{k}": f"kit-site{k}" for k in range(1, CLIENTS + 1)}
    kits |= {"coordinator": "kit-coordinator", "submit": "kit-admin"}
    for name, kit in kits.items():
        assert list(services[name]["networks"]) == ["fl"], name
        mounted = volume_sources(name)
        assert kit in mounted and not (mounted & ({"pki"} | set(kits.values()) - {kit})), (name, mounted)
        assert any(str(v).startswith(f"{kit}:/kit:ro") for v in services[name]["volumes"]), name
    assert volume_sources("provision") >= {"pki", *kits.values()}
    coordinator = services["coordinator"]["command"]
    assert coordinator[:2] == ["/kit/start.sh", "--federation=/federation"], coordinator
    for k in range(1, CLIENTS + 1):
        command = services[f"site{k}"]["command"]
        assert command[:3] == ["/kit/start.sh", "--serve", f"--policy=/config/site-{k}.toml"], command
    assert services["submit"]["depends_on"]["coordinator"]["condition"] == "service_healthy"


def test_standing_configuration_is_what_the_programs_accept(tmp_path: Path) -> None:
    """docker/standing's project file provisions, each site's policy loads (its task installed),
    and the job's run file is one fl-server --config reads, with the task the sites install."""
    from fedgrpc.client.policy import load_policy
    from fedgrpc.server import cli

    standing = REPO / "docker" / "standing"
    provision = [sys.executable, "-m", "fedgrpc.server.provision", str(standing / "project.toml")]
    sh(*provision, "--out", tmp_path / "pki", env=base_env(), timeout=60)
    sites = sorted(p.name for p in (tmp_path / "pki" / "kits" / "sites").iterdir())
    assert sites == [f"site-{k}" for k in range(1, CLIENTS + 1)]
    assert 'server = "coordinator:50051"' in (tmp_path / "pki/kits/admins/admin/kit.toml").read_text()
    run = (standing / "run.toml").read_text().replace("/tasks/numpy/", str(REPO / "examples" / "numpy") + "/")
    (tmp_path / "run.toml").write_text(run)
    args, _ = cli.parse_args(["--config", str(tmp_path / "run.toml"), "--insecure"])
    cli.config_from(args, {})
    for k in range(1, CLIENTS + 1):
        text = (standing / f"site-{k}.toml").read_text()
        (tmp_path / f"site-{k}.toml").write_text(text.replace("/tasks/numpy/", f"{REPO}/examples/numpy/"))
        policy = load_policy(tmp_path / f"site-{k}.toml")
        assert [t.name for t in policy.tasks] == ["numpy-logistic-regression"]


# ---- the engine, the images, the data ----------------------------------------------------------


def engine_answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def docker_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment for docker commands, with an engine behind it (started here if need be)."""
    env = base_env()
    compose_binary()
    if shutil.which("docker") is None:
        unavailable("the docker command is not installed")
    if engine_answers(env):
        yield env
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        unavailable("no Docker engine answers and dockerd is not installed")
    if os.geteuid() != 0:
        unavailable("no Docker engine answers, and starting dockerd needs root")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    socket = "unix:///var/run/docker.sock"
    env["DOCKER_HOST"] = socket
    with log.open("ab") as out:
        daemon = subprocess.Popen(
            [dockerd, "--host", socket], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while not engine_answers(env):
            if daemon.poll() is not None:
                unavailable(f"dockerd exited {daemon.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                unavailable(f"dockerd did not answer within 90 s:\n{tail(log)}")
            time.sleep(1)
        yield env
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses for the suite (deb822 or one-line sources)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*")) + [Path("/etc/apt/sources.list")]
    for path in sources:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (m.group(1).lower(), m.group(2).split())
                    for m in re.finditer(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.MULTILINE)
                )
                if SUITE in fields.get("suites", []) and "deb" in fields.get("types", ["deb"]):
                    return str(fields["uris"][0])
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and m.group(2) == SUITE:
                    return m.group(1)
    return FALLBACK_MIRROR


def debian_rootfs_tar(work: Path) -> Path:
    """A tar of a minimal Debian with python3, from the cache or made by debootstrap now."""
    name = f"debian-{SUITE}-minbase-{BASE_PACKAGES.replace(',', '+')}.tar"
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        cached = CACHE / name
        if cached.exists():
            return cached
    except OSError:
        cached = work / name
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        unavailable("debootstrap is not installed (it makes the test's base image)")
    if os.geteuid() != 0:
        unavailable("debootstrap needs root")
    root = work / "rootfs"
    mirror = debian_mirror()
    argv = [debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, str(root), mirror]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        pytest.fail(f"debootstrap from {mirror} exited {done.returncode}:\n{output}")
    for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):  # not needed in an image
        for p in (root / leftovers).glob("*"):
            if p.is_file():
                p.unlink()
    partial = cached.with_name(f"{cached.name}.{RUN}.tmp")
    subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True, timeout=300)
    os.replace(partial, cached)  # atomic: a concurrent run never imports half a tar
    shutil.rmtree(root, ignore_errors=True)
    return cached


def image_ids(env: dict[str, str]) -> set[str]:
    return set(sh("docker", "image", "ls", "-aq", "--no-trunc", env=env).stdout.split())


@pytest.fixture(scope="module")
def image_janitor(docker_env: dict[str, str]) -> Iterator[None]:
    """After the images' own tags are gone, removes the untagged images this module left behind
    (intermediate images of a build that failed half-way), newest first."""
    before = image_ids(docker_env)
    try:
        yield
    finally:
        left = image_ids(docker_env) - before
        if left:
            details = json.loads(
                sh("docker", "image", "inspect", *left, env=docker_env, check=False).stdout or "[]"
            )
            untagged = [d for d in details if not d.get("RepoTags")]
            for d in sorted(untagged, key=lambda d: str(d["Created"]), reverse=True):
                sh("docker", "image", "rm", d["Id"], env=docker_env, check=False)


@pytest.fixture(scope="module")
def base_image(
    docker_env: dict[str, str], image_janitor: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A Debian image with python3, made here (no registry involved)."""
    tag = f"fedgrpc-test-base:{RUN}"
    rootfs = debian_rootfs_tar(tmp_path_factory.mktemp("debootstrap"))
    sh("docker", "import", rootfs, tag, env=docker_env, timeout=300)
    try:
        yield tag
    finally:
        sh("docker", "image", "rm", tag, env=docker_env, check=False)


def build_context(dest: Path) -> Path:
    """The repository's working tree (tracked and new files, not ignored ones) plus the host's
    CA bundle, so that nothing is written into the checkout."""
    try:
        listing = (
            subprocess.run(
                ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                capture_output=True,
                check=True,
                timeout=60,
            )
            .stdout.decode()
            .split("\0")
        )
    except (OSError, subprocess.CalledProcessError):
        listing = []
    if listing:
        for name in filter(None, listing):
            src = REPO / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:
        skip = shutil.ignore_patterns(".git", ".venv", "build", "results", "__pycache__", "*_cache")
        shutil.copytree(REPO, dest, ignore=skip, dirs_exist_ok=True)
    if HOST_CA.exists():
        (dest / "docker").mkdir(exist_ok=True)
        shutil.copyfile(HOST_CA, dest / "docker" / "ca.crt")
    return dest


@pytest.fixture(scope="module")
def fedgrpc_image(
    docker_env: dict[str, str], base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The image of docker/Dockerfile on the Debian base (the build stage is tagged too, so that
    both stages' layers go when the tags do)."""
    context = build_context(tmp_path_factory.mktemp("context"))
    log = tmp_path_factory.mktemp("build") / "build.log"
    image, stage = f"fedgrpc-test:{RUN}", f"fedgrpc-test-build:{RUN}"
    args = ["--network", "host", "--force-rm", "-f", str(context / DOCKERFILE)]
    args += ["--build-arg", f"BASE={base_image}"]
    if HOST_CA.exists():
        args += ["--build-arg", "PIP_CERT=/src/ca.crt"]
    try:
        for tag, target in ((stage, ["--target", "build"]), (image, [])):
            with log.open("a") as out:
                done = subprocess.run(
                    ["docker", "build", *args, *target, "-t", tag, str(context)],
                    env=docker_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=900,
                )
            if done.returncode != 0:
                pytest.fail(f"docker build of {tag} exited {done.returncode}:\n{tail(log, 6000)}")
        yield image
    finally:
        sh("docker", "image", "rm", image, stage, env=docker_env, check=False)


@pytest.fixture(scope="module")
def cifar_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 training and 500 test images of the offline CIFAR-10 copy, as an .npz (a seeded
    draw: the archive is sorted by class). Synthetic images stand in where there is no copy."""
    from fedgrpc.common.data import load_split

    path = tmp_path_factory.mktemp("data") / "cifar10-slice.npz"
    rng = np.random.default_rng(0)
    if OFFLINE_CIFAR.exists():
        decoded = CACHE / "decoded" if os.access(CACHE, os.W_OK) else path.parent / "decoded"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FEDGRPC_CACHE", str(decoded))  # decode the JPEGs once per machine
            train, test = load_split(str(OFFLINE_CIFAR), "train"), load_split(str(OFFLINE_CIFAR), "test")
        i, j = rng.choice(len(train), 1500, replace=False), rng.choice(len(test), 500, replace=False)
        arrays = {"x_train": train.x[i], "y_train": train.y[i], "x_test": test.x[j], "y_test": test.y[j]}
    else:
        from conftest import make_synthetic

        (x_train, y_train), (x_test, y_test) = make_synthetic(1500, seed=1), make_synthetic(500, seed=2)
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    u8 = {k: np.ascontiguousarray(v, dtype=np.uint8) for k, v in arrays.items()}
    np.savez(path, x_train=u8["x_train"], y_train=u8["y_train"], x_test=u8["x_test"], y_test=u8["y_test"])
    path.chmod(0o644)  # the containers' user (uid 10001) reads it through the bind mount
    return path


def test_image_runs_unprivileged_without_build_material(
    docker_env: dict[str, str], fedgrpc_image: str
) -> None:
    """The final stage holds the virtual environment only: no sources, no CA bundle, no PIP_CERT."""
    (info,) = json.loads(sh("docker", "image", "inspect", fedgrpc_image, env=docker_env).stdout)
    print(f"{fedgrpc_image}: {info['Size'] / 1e9:.2f} GB")  # shown with pytest -rP
    assert info["Config"]["User"] not in ("", "0", "root"), info["Config"]["User"]
    assert not [e for e in info["Config"]["Env"] if e.startswith("PIP_")], info["Config"]["Env"]
    probe = "import os, sys; sys.exit(os.getuid() == 0 or os.path.exists('/src'))"
    sh("docker", "run", "--rm", "--network", "none", fedgrpc_image, "python3", "-c", probe, env=docker_env)
    for cli in ("fl-server", "fl-client"):
        sh("docker", "run", "--rm", "--network", "none", fedgrpc_image, cli, "--help", env=docker_env)


# ---- the demo ----------------------------------------------------------------------------------


def containers(project: str, env: dict[str, str]) -> list[dict[str, Any]]:
    ids = sh("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}", env=env)
    if not ids.stdout.split():
        return []
    return list(json.loads(sh("docker", "inspect", *ids.stdout.split(), env=env).stdout))


def test_compose_demo_runs_three_clients_two_rounds(
    docker_env: dict[str, str], fedgrpc_image: str, cifar_slice: Path, tmp_path: Path
) -> None:
    project = f"fedgrpctest{RUN}"
    env = {
        **docker_env,
        "FL_IMAGE": fedgrpc_image,
        "FL_DATA": str(cifar_slice),
        "FL_DATA_NETWORK": "none",  # the data is local: the data service needs no network at all
        "FL_ROUNDS": str(ROUNDS),
        "FL_CLIENTS": str(CLIENTS),
    }
    compose = [compose_binary(), "-p", project, "-f", str(COMPOSE)]
    logs = tmp_path / "compose.log"

    def report() -> str:
        done = sh(*compose, "logs", "--no-color", "--timestamps", env=env, check=False)
        logs.write_text(done.stdout + done.stderr)
        return f"compose logs ({logs}):\n{tail(logs, 8000)}"

    try:
        # up -d returns once data has finished, the server is healthy and the clients started
        up = sh(*compose, "up", "-d", "--no-build", env=env, timeout=420, check=False)
        assert up.returncode == 0, f"compose up exited {up.returncode}:\n{up.stdout}{up.stderr}\n{report()}"
        deadline = time.monotonic() + 300
        while True:
            states = containers(project, env)
            if states and all(c["State"]["Status"] == "exited" for c in states):
                break
            assert time.monotonic() < deadline, f"the run did not finish in 300 s\n{report()}"
            time.sleep(2)

        by_service = {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in states}
        assert set(by_service) == SERVICES, report()
        outcome = {s: (c["State"]["ExitCode"], c["RestartCount"]) for s, c in by_service.items()}
        assert all(v == (0, 0) for v in outcome.values()), f"(exit code, restarts): {outcome}\n{report()}"

        server_log = sh("docker", "logs", by_service["server"]["Id"], env=env)
        server_text = server_log.stdout + server_log.stderr
        for r in range(1, ROUNDS + 1):
            assert re.search(rf"round {r}/{ROUNDS}\s+acc \d\.\d+", server_text), f"no round {r}\n{report()}"

        # nothing but the internal network (and no network at all for the data service)
        fl_network = f"{project}_fl"
        internal = sh("docker", "network", "inspect", "-f", "{{.Internal}}", fl_network, env=env).stdout
        assert internal.strip() == "true", internal
        for service, c in by_service.items():
            attached = set(c["NetworkSettings"]["Networks"])
            assert attached == ({"none"} if service == "data" else {fl_network}), (service, attached)

        volume = f"{project}_results"
        peek = ["docker", "run", "--rm", "--network", "none", "-v", f"{volume}:/results:ro", fedgrpc_image]
        listing = sh(*peek, "ls", "/results", env=env).stdout.split()
        assert {"history.json", "final_model.keras"} <= set(listing), listing
        history = json.loads(sh(*peek, "cat", "/results/history.json", env=env).stdout)
        assert history, "empty history.json"
    finally:
        sh(*compose, "down", "-v", "--remove-orphans", "--timeout", "10", env=env, timeout=180, check=False)


def test_standing_compose_runs_a_submitted_job_on_three_site_agents(
    docker_env: dict[str, str], fedgrpc_image: str, tmp_path: Path
) -> None:
    """compose.standing.yaml for real: provisioning, the coordinator in federation mode, three
    agents from their kits and policies, and fl-job submitting a job and following it to its end
    (the numpy task: seconds of training). The agents stay up; the submit service's exit is the
    verdict."""
    project = f"fedgrpcstanding{RUN}"
    env = {**docker_env, "FL_IMAGE": fedgrpc_image, "FL_THREADS": "1"}
    compose = [compose_binary(), "-p", project, "-f", str(COMPOSE_STANDING)]
    logs = tmp_path / "compose.log"
    run_file = (REPO / "docker" / "standing" / "run.toml").read_text()
    rounds = int(next(line.split("=")[1] for line in run_file.splitlines() if line.startswith("rounds")))

    def report() -> str:
        done = sh(*compose, "logs", "--no-color", "--timestamps", env=env, check=False)
        logs.write_text(done.stdout + done.stderr)
        return f"compose logs ({logs}):\n{tail(logs, 8000)}"

    try:
        up = sh(*compose, "up", "-d", "--no-build", env=env, timeout=300, check=False)
        assert up.returncode == 0, f"compose up exited {up.returncode}:\n{up.stdout}{up.stderr}\n{report()}"
        deadline = time.monotonic() + 180
        while True:
            by_service = {
                c["Config"]["Labels"]["com.docker.compose.service"]: c for c in containers(project, env)
            }
            if "submit" in by_service and by_service["submit"]["State"]["Status"] == "exited":
                break
            assert time.monotonic() < deadline, f"the job did not finish in 180 s\n{report()}"
            time.sleep(2)

        assert set(by_service) == STANDING, report()
        exits = {
            s: (c["State"]["Status"], c["State"]["ExitCode"], c["RestartCount"])
            for s, c in by_service.items()
        }
        one_shot = {s: exits[s] for s in ("provision", "submit")}
        assert one_shot == {s: ("exited", 0, 0) for s in one_shot}, f"{exits}\n{report()}"
        standing = {s: v for s, v in exits.items() if s not in one_shot}
        assert all(v == ("running", 0, 0) for v in standing.values()), f"{exits}\n{report()}"

        def logs_of(service: str) -> str:
            done = sh("docker", "logs", by_service[service]["Id"], env=env)
            return done.stdout + done.stderr

        submitted = logs_of("submit")
        assert re.search(rf"round {rounds}/{rounds}\s+acc \d\.\d+", submitted), submitted
        assert "submit: job-1 finished" in submitted, submitted
        assert "mutual TLS" in logs_of("coordinator"), report()
        for k in range(1, CLIENTS + 1):
            assert "run job-1: done; waiting for the next run" in logs_of(f"site{k}"), report()

        volume = f"{project}_results"
        peek = ["docker", "run", "--rm", "--network", "none", "-v", f"{volume}:/results:ro", fedgrpc_image]
        history = json.loads(sh(*peek, "cat", "/results/job-1/history.json", env=env).stdout)
        assert history["finished"] is True and len(history["rounds"]) == rounds, history
    finally:
        sh(*compose, "down", "-v", "--remove-orphans", "--timeout", "10", env=env, timeout=180, check=False)
