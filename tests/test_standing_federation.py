"""The standing federation end to end, every piece real and started once: fl-provision's kits
(three sites, an admin), `fl-server --federation DIR` under mutual TLS, and one site agent
(`fl-client --serve --policy`) per site that stays up across jobs. Two jobs of two tasks run
with the results one-run processes give; a site's policy leaves it out of one job; the
coordinator is killed with SIGKILL mid-job and the same agents finish the job with it; a
revoked site and a site calling the admin service are refused.

The tasks are test_agent's: tiny, trained without shuffling, so a run's weights are a pure
function of its settings and digests compare across processes."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedgrpc.client.connection import ChannelSecurity, Connection
from fedgrpc.common.errors import AuthError
from fedgrpc.common.processes import free_port
from helpers import finish, start, wait_for_line
from test_agent import TASK, run_to_the_end
from test_federation import federation, fl_job, run_file, wait_state
from test_provision import SITES, provision, provisioned, start_kit


def tasks_and_policies(folder: Path) -> None:
    """alpha (4 features, a second's pause a round: long enough to kill the coordinator in) and
    beta (6); each site's data for both; sites 1 and 2 run both tasks, site 3 only alpha."""
    for name, features, pause in (("alpha", 4, 1.0), ("beta", 6, 0)):
        (folder / f"{name}.py").write_text(TASK.format(name=name, features=features, pause=pause))
        for client in SITES:
            rng = np.random.default_rng(10 * client + features)
            x = rng.normal(size=(40, features)).astype(np.float32)
            np.savez(folder / f"{name}-{client}.npz", x=x, y=(x.sum(axis=1) > 0).astype(np.float32)[:, None])
    for client in SITES:
        names = ("alpha", "beta") if client != 3 else ("alpha",)
        entries = "".join(
            f'\n[[task]]\nname = "{t}"\nfile = "{t}.py"\ndata = "{t}-{client}.npz"\n' for t in names
        )
        (folder / f"site-{client}.toml").write_text(f"[site]\nretry_max = 1\n{entries}")


def agents(out: Path, folder: Path) -> dict[int, tuple[subprocess.Popen[bytes], Path]]:
    """Each site's agent, from its kit."""
    started = {}
    for client, name in SITES.items():
        log = folder / f"agent-{client}.log"
        process = start_kit(
            out / "kits/sites" / name, "--serve", "--policy", str(folder / f"site-{client}.toml"),
            "--threads", "1", "--connect-timeout", "90", log=log,
        )  # fmt: skip
        started[client] = (process, log)
    return started


def plain_client(folder: Path, port: int, client: int, task: str, tag: str) -> tuple[Any, Path]:
    log = folder / f"{tag}-{client}.log"
    return start(
        "fl-client", "--insecure", "--id", str(client), "--server", f"127.0.0.1:{port}",
        "--task", str(folder / f"{task}.py"), "--data", str(folder / f"{task}-{client}.npz"),
        "--threads", "1", "--connect-timeout", "90", log=log,
    ), log  # fmt: skip


def alone(
    folder: Path, run: Path, tag: str, agent_policy: Path | None = None
) -> Callable[[], dict[str, Any]]:
    """The same run file in a one-run fl-server with one-run fl-clients (cold), started now;
    `agent_policy`: site 3 as a fresh agent with that policy instead. Returns what waits for
    the run's end and gives its history."""
    port = free_port()
    server = start(
        "fl-server", "--config", str(run), "--insecure", "--host", "127.0.0.1", "--port", str(port),
        "--out", str(folder / tag), "--threads", "1", log=folder / f"{tag}.log",
    )  # fmt: skip
    clients = [plain_client(folder, port, k, run.stem, tag) for k in ((1, 2) if agent_policy else (1, 2, 3))]
    refusing = None
    if agent_policy is not None:
        refusing = start(
            "fl-client", "--insecure", "--id", "3", "--server", f"127.0.0.1:{port}", "--serve",
            "--policy", str(agent_policy), "--threads", "1", log=folder / f"{tag}-3.log",
        )  # fmt: skip

    def history() -> dict[str, Any]:
        ended = run_to_the_end(folder, tag, server, *clients)
        if refusing is not None:
            refusing.terminate()
            refusing.wait(timeout=30)
        return ended

    return history


def test_a_standing_federation_runs_jobs_with_the_same_agents_throughout(tmp_path: Path) -> None:
    port = free_port()
    out = provisioned(tmp_path, port)
    alice = out / "kits/admins/alice"
    tasks_and_policies(tmp_path)
    common = "clients = 3\nbatch_size = 16\nfinish_grace = 1\n"
    alpha = run_file(tmp_path, "alpha", f'[run]\ntask = "alpha.py"\nrounds = 3\n{common}')
    beta = run_file(tmp_path, "beta", f'[run]\ntask = "beta.py"\nrounds = 2\nmin_clients = 2\n{common}')
    # The same run files in one-run processes, meanwhile (on ports of their own).
    references = (
        alone(tmp_path, alpha, "alone-alpha"),
        alone(tmp_path, beta, "alone-beta", tmp_path / "site-3.toml"),
    )
    log = tmp_path / "federation.log"
    server = federation(out, tmp_path / "fed", log)
    sites = agents(out, tmp_path)

    for path, job_id in ((alpha, "job-1"), (beta, "job-2")):
        submitted = fl_job(alice, "submit", str(path))
        assert submitted.returncode == 0 and f"{job_id}  queued" in submitted.stdout, submitted.stderr
    # SIGKILL mid-job: no checkpoint written on the way out, no state saved.
    wait_for_line(log, "round 2/3", process=server)
    server.kill()
    server.wait()
    jobs = (tmp_path / "fed/jobs").glob("*/job.json")
    states = {p.parent.name: json.loads(p.read_text())["state"] for p in jobs}
    assert states == {"job-1": "running", "job-2": "queued"}
    again = tmp_path / "federation-again.log"
    server = federation(out, tmp_path / "fed", again)
    wait_for_line(again, "resuming run job-1 after round", process=server)
    assert wait_state(port, alice, "job-1", "finished").rounds_done == 3
    job = wait_state(port, alice, "job-2", "finished")
    assert "client 3" in job.detail and "this site does not run task 'beta'" in job.detail, job.detail
    status = fl_job(alice, "status", "job-2")
    assert "this site does not run task 'beta'" in status.stdout, status.stdout

    # A site's identity may not manage jobs; a revoked site is refused at its next call.
    site = out / "kits/sites" / SITES[1]
    refused = fl_job(
        site, "submit", str(alpha), "--cert", str(site / "site.crt"), "--key", str(site / "site.key")
    )
    assert refused.returncode == 2 and "PERMISSION_DENIED" in refused.stderr, refused.stderr
    assert provision("revoke", str(tmp_path / "project.toml"), "--site", "3").returncode == 0
    wait_for_line(sites[3][1], "client 3's identity was revoked", timeout=30, process=sites[3][0])
    kit = out / "kits/sites" / SITES[3]
    security = ChannelSecurity(kit / "ca.crt", kit / "site.crt", kit / "site.key")
    with (
        Connection(f"localhost:{port}", 3, connect_timeout_s=10, security=security) as connection,
        pytest.raises(AuthError) as error,
    ):
        connection.join()
    assert error.value.code == "UNAUTHENTICATED"

    assert all(process.poll() is None for process, _ in sites.values())  # the same agents all along
    for process, agent_log in sites.values():
        process.terminate()
        process.wait(timeout=30)
        assert agent_log.read_text().count("site agent for") == 1
    server.send_signal(signal.SIGTERM)
    assert finish(server, again, timeout=30) == 0

    first = json.loads((tmp_path / "fed/jobs/job-1/history.json").read_text())
    second = json.loads((tmp_path / "fed/jobs/job-2/history.json").read_text())
    assert [r["round"] for r in first["rounds"]] == [1, 2, 3]
    assert [sorted(c["client_id"] for c in r["clients"]) for r in first["rounds"]] == [[1, 2, 3]] * 3
    assert [sorted(c["client_id"] for c in r["clients"]) for r in second["rounds"]] == [[1, 2]] * 2
    (withdrawn,) = second["withdrawn"]
    assert withdrawn["client_id"] == 3 and "this site does not run task 'beta'" in withdrawn["reason"]
    # The results one-run processes give for the same run files, to the last digit.
    assert [outcome(first), outcome(second)] == [outcome(history()) for history in references]


def outcome(history: dict[str, Any]) -> list[Any]:
    """Each round's central evaluation and each client's training metrics and example count.
    (Not the weights' digests: the server folds updates in the order they arrive, so the last
    bit of a weight may differ between two runs of the same settings.)"""

    def trained(client: dict[str, Any]) -> tuple[int, int, dict[str, float]]:
        metrics = {k: v for k, v in client["metrics"].items() if k != "train_seconds"}
        return client["client_id"], client["num_examples"], metrics

    return [
        (r["round"], r["central"], [trained(c) for c in sorted(r["clients"], key=lambda c: c["client_id"])])
        for r in history["rounds"]
    ]
