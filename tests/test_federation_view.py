"""The federation view of the dashboard with real processes on 127.0.0.1: `fl-server --federation
DIR --http PORT`, a site agent announcing itself (fedgrpc.v1.Sites), three jobs (one finished,
one the agent refused by its policy, one running, one queued), hostile announcements, and the
page in Debian's chromium."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fedgrpc.client.admin_connection import AdminConnection
from fedgrpc.client.channel import ChannelSecurity
from fedgrpc.common.processes import free_port
from fedgrpc.server.auth import hash_token
from fedgrpc.v1 import sites_pb2
from helpers import finish, start, wait_for_line
from prometheus_client.parser import text_string_to_metric_families
from test_agent import TASK
from test_observability import get

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "federation.png"
XSS = "<img src=x onerror=document.title='pwned'>"
TOKENS = {1: "token-1", 7: "token-7"}  # the sites' tokens: the agent is client 1


def state(http: int) -> dict[str, Any]:
    status, _, body = get(http, "/api/state")
    assert status == 200
    document: dict[str, Any] = json.loads(body)
    return document


def wait_for(condition: Any, bound_s: float = 120.0) -> None:
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {bound_s} s"
        time.sleep(0.1)


def jobs_by_id(http: int) -> dict[str, dict[str, Any]]:
    return {job["id"]: job for job in state(http)["federation"]["jobs"]}


@contextlib.contextmanager
def federation(folder: Path) -> Iterator[dict[str, Any]]:
    """A federation with one agent (max_rounds 5) and four jobs: job-1 finished (1 round),
    job-2 failed (10 rounds: the agent withdrew, by its policy), job-3 running (waiting for
    more clients), job-4 queued."""
    import numpy as np

    task = textwrap.dedent(TASK.format(name="alpha", features=4, pause=0))
    (folder / "alpha.py").write_text(task)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    np.savez(folder / "alpha-1.npz", x=x, y=(x.sum(axis=1) > 0).astype(np.float32)[:, None])
    policy = folder / "site.toml"
    policy.write_text(
        '[site]\nretry_max = 1\nmax_rounds = 5\n\n[[task]]\nname = "alpha"\nfile = "alpha.py"\n'
        'data = "alpha-1.npz"\n'
    )
    (folder / "admins.json").write_text(json.dumps({"admins": {"bob": hash_token("s3cret")}}))
    sites = {str(client): hash_token(token) for client, token in TOKENS.items()}
    (folder / "tokens.json").write_text(json.dumps({"clients": sites}))
    port, http = free_port(), free_port()
    server_log, agent_log = folder / "federation.log", folder / "agent.log"
    server = start(
        "fl-server", "--federation", str(folder / "fed"), "--insecure", "--host", "127.0.0.1",
        "--port", str(port), "--admin-tokens", str(folder / "admins.json"), "--threads", "1",
        "--tokens", str(folder / "tokens.json"), "--http", str(http), log=server_log,
    )  # fmt: skip
    agent = start(
        "fl-client", "--insecure", "--id", "1", "--server", f"127.0.0.1:{port}", "--serve", "--policy",
        str(policy), "--token", TOKENS[1], "--threads", "1", log=agent_log,
    )  # fmt: skip
    try:
        wait_for_line(server_log, f"dashboard on http://127.0.0.1:{http}/", process=server)
        with AdminConnection(f"127.0.0.1:{port}", ChannelSecurity(token="s3cret"), timeout_s=10) as bob:
            run = '[run]\ntask = "alpha.py"\nclients = {clients}\nrounds = {rounds}\nbatch_size = 8\n'
            bob.submit("short", run.format(clients=1, rounds=1).encode(), task.encode())
            wait_for(lambda: jobs_by_id(http)["job-1"]["state"] == "finished")
            bob.submit("long", run.format(clients=2, rounds=10).encode(), task.encode())
            bob.submit("wide", run.format(clients=3, rounds=1).encode(), task.encode())
            bob.submit("later", run.format(clients=2, rounds=1).encode(), task.encode())
            wait_for(lambda: state(http)["federation"]["running"] == "job-3")  # its run view is up
        yield {"port": port, "http": http, "folder": folder}
    finally:
        for process, log in ((agent, agent_log), (server, server_log)):
            process.terminate()
            finish(process, log, timeout=30)


def announce(
    port: int, request: sites_pb2.SiteAnnouncement, token: str | None = TOKENS[7]
) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            "/fedgrpc.v1.Sites/Announce", sites_pb2.SiteAnnouncement.SerializeToString,
            sites_pb2.AnnounceReply.FromString,
        )  # fmt: skip
        try:
            call(request, timeout=10, metadata=(("authorization", f"Bearer {token}"),) if token else ())
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK


def test_the_federation_view_lists_sites_and_jobs_and_shows_them_as_text(tmp_path: Path) -> None:
    """/api/state lists the announced site and the jobs, /metrics labels the running job's
    metrics with it, hostile announcements are refused, and the page (in chromium) shows
    everything as text."""
    with federation(tmp_path) as running:
        the_state_lists_the_sites_and_jobs_and_metrics_carry_the_job(running)
        if CHROMIUM is None and not os.environ.get("CI"):
            pytest.skip("no chromium (apt-get install chromium): the page was not looked at")
        the_federation_view_in_a_real_browser(running)


def the_state_lists_the_sites_and_jobs_and_metrics_carry_the_job(federation: dict[str, Any]) -> None:
    http, port = federation["http"], federation["port"]
    wait_for(lambda: bool(jobs_by_id(http)["job-2"]["withdrawals"]))
    document = state(http)
    (site,) = [s for s in document["federation"]["sites"] if s["client_id"] == 1]
    task_digest = hashlib.sha256((federation["folder"] / "alpha.py").read_bytes()).hexdigest()
    assert site["tasks"] == [{"name": "alpha", "digest": task_digest}]
    assert site["policy"] == {"max_rounds": "5"} and site["online"] and site["version"]
    jobs = jobs_by_id(http)
    states = [jobs[j]["state"] for j in ("job-1", "job-2", "job-3", "job-4")]
    assert states == ["finished", "failed", "running", "queued"]
    assert jobs["job-1"]["rounds_done"] == 1 and jobs["job-1"]["started_at"] and jobs["job-1"]["ended_at"]
    (withdrawal,) = jobs["job-2"]["withdrawals"]
    assert withdrawal["client_id"] == 1 and "at most 5" in withdrawal["reason"]
    assert "withdrew" in jobs["job-2"]["detail"]
    assert document["federation"]["running"] == "job-3" and document["run"]["run_id"] == "job-3"

    status, _, body = get(http, "/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("fedgrpc_federation_sites_online", ())] == 1
    for name, count in (("queued", 1), ("running", 1), ("finished", 1), ("failed", 1), ("stopped", 0)):
        assert samples[("fedgrpc_federation_jobs", (("state", name),))] == count
    assert samples[("fedgrpc_withdrawals_total", (("job", "job-3"),))] == 0
    assert ("fedgrpc_round", (("job", "job-3"),)) in samples
    assert not any(name.startswith("fedgrpc_round") and not labels for name, labels in samples)
    assert sum(name == "process_resident_memory_bytes" for name, _ in samples) == 1

    # An announcement is filed under the identity the call proved, whatever id it names.
    assert (
        announce(port, sites_pb2.SiteAnnouncement(client_id=1), token=None) == grpc.StatusCode.UNAUTHENTICATED
    )
    assert announce(port, sites_pb2.SiteAnnouncement(client_id=1, version="impostor")) == grpc.StatusCode.OK
    announced = {s["client_id"]: s["version"] for s in state(http)["federation"]["sites"]}
    assert announced == {1: site["version"], 7: "impostor"}
    # Hostile announcements: past a bound, or unprintable, refused; nothing of them is kept.
    many = sites_pb2.SiteAnnouncement(
        client_id=9, tasks=[sites_pb2.AnnouncedTask(name=f"t{i}", digest="x") for i in range(10_000)]
    )
    assert announce(port, many) == grpc.StatusCode.INVALID_ARGUMENT
    for bad in ("\x1b[31mred", "a\nb", "v" * 65):
        assert (
            announce(port, sites_pb2.SiteAnnouncement(client_id=9, version=bad))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
    huge_policy = sites_pb2.SiteAnnouncement(client_id=9, policy={"k": "v" * 201})
    assert announce(port, huge_policy) == grpc.StatusCode.INVALID_ARGUMENT
    assert {s["client_id"]: s["version"] for s in state(http)["federation"]["sites"]} == announced


def the_federation_view_in_a_real_browser(federation: dict[str, Any]) -> None:
    """A site announcing markup for its version, task and policy: shown as text, never as markup."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "CI installs chromium (.ci/run)"
    http, port, folder = federation["http"], federation["port"], federation["folder"]
    hostile = sites_pb2.SiteAnnouncement(
        client_id=7, version=XSS[:64], tasks=[sites_pb2.AnnouncedTask(name=XSS[:64], digest="<b>bold</b>")],
        policy={"<script>alert(1)</script>": XSS},
    )  # fmt: skip
    assert announce(port, hostile) == grpc.StatusCode.OK
    wait_for(lambda: bool(jobs_by_id(http)["job-2"]["withdrawals"]))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"http://127.0.0.1:{http}/")
        page.wait_for_selector("#sites tr[data-site='7']", timeout=30_000)
        page.wait_for_selector("#jobs tr[data-job='job-4']", timeout=30_000)
        assert "alpha" in (page.text_content("#sites tr[data-site='1']") or "")
        assert "online" in (page.text_content("#sites tr[data-site='1']") or "")
        assert "max_rounds = 5" in (page.text_content("#sites tr[data-site='1']") or "")
        hostile_row = page.text_content("#sites tr[data-site='7']") or ""
        assert XSS[:64] in hostile_row and "<script>alert(1)</script>" in hostile_row  # text ...
        assert page.query_selector("#sites img") is None and page.query_selector("#sites b") is None
        assert page.query_selector("#sites script") is None  # ... never markup
        jobs = page.text_content("#jobs tbody") or ""
        for word in ("finished", "failed", "running", "queued", "at most 5"):
            assert word in jobs
        assert "1 / 1" in (page.text_content("#jobs tr[data-job='job-1']") or "")
        assert page.is_visible("#federation-view") and not page.is_visible("#run-view")
        page.screenshot(path=str(folder / "federation.png"), full_page=True)
        assert (folder / "federation.png").stat().st_size > 10_000
        if os.environ.get("FEDGRPC_UPDATE_SCREENSHOT"):
            shutil.copy(folder / "federation.png", SCREENSHOT)
        page.click("#tab-run")  # the run view: the running job's run, as a one-run server shows it
        page.wait_for_selector("#run-view:not([hidden])")
        assert "job-3" in (page.text_content("#run") or "")
        assert page.title() == "fedgrpc dashboard"
        browser.close()
