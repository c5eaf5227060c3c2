"""A site's policy file (fedgrpc.client.policy): read and checked once, with clear refusals, and
the decision it makes on a run's spec. No processes, no TensorFlow."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fedgrpc.client.policy import InstalledTask, check_params, check_run, load_policy
from fedgrpc.common import wire
from fedgrpc.common.config import RunSpec, SecAggSpec, TaskRef
from fedgrpc.common.errors import ConfigError
from helpers import BIN, ENV

TASK_SOURCE = "# a task file; only its bytes matter here\n"


def write(folder: Path, policy: str, task: str = TASK_SOURCE) -> Path:
    (folder / "alpha.py").write_text(task)
    path = folder / "site.toml"
    path.write_text(policy)
    return path


def digest_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


POLICY = """
[site]
max_rounds = 5
max_local_epochs = 2
require_secagg = false
min_dp_noise_multiplier = 0.8
retry_max = 3

[[task]]
name = "alpha"
file = "alpha.py"
data = "site-1.npz"
params = ["learning_rate"]
"""


def test_a_policy_is_read_with_paths_from_its_folder(tmp_path: Path) -> None:
    (tmp_path / "site-1.npz").write_bytes(b"")
    policy = load_policy(write(tmp_path, POLICY))
    assert policy.max_rounds == 5 and policy.min_dp_noise_multiplier == 0.8 and policy.retry_max == 3.0
    (task,) = policy.tasks
    assert task.name == "alpha" and task.file == tmp_path / "alpha.py"
    assert task.digest == digest_of(TASK_SOURCE)
    assert task.data == str(tmp_path / "site-1.npz") and task.params == frozenset({"learning_rate"})


def test_a_wrong_pinned_digest_is_refused_naming_both(tmp_path: Path) -> None:
    pinned = "0" * 64
    path = write(tmp_path, POLICY.replace('file = "alpha.py"', f'file = "alpha.py"\ndigest = "{pinned}"'))
    with pytest.raises(ConfigError, match="has digest") as refused:
        load_policy(path)
    assert digest_of(TASK_SOURCE) in str(refused.value) and pinned in str(refused.value)


def test_the_right_pinned_digest_is_taken(tmp_path: Path) -> None:
    pinned = digest_of(TASK_SOURCE)
    path = write(tmp_path, POLICY.replace('file = "alpha.py"', f'file = "alpha.py"\ndigest = "{pinned}"'))
    assert load_policy(path).tasks[0].digest == pinned


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("max_rounds = 5", "max_rounds = 0"), "max_rounds must be at least 1, got 0"),
        (("max_rounds = 5", 'max_rounds = "5"'), "max_rounds must be an int, got .5. \\(a string\\)"),
        (("retry_max = 3", "retry_mux = 3"), "has no key 'retry_mux'"),
        (("require_secagg = false", 'require_secagg = "no"'), "true or false"),
        (('file = "alpha.py"', 'file = "missing.py"'), "does not exist"),
        (('params = ["learning_rate"]', 'params = "learning_rate"'), "must be a list"),
        (('name = "alpha"', ""), "needs name"),
        (("[site]", "[sight]"), "unknown table"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_policy(write(tmp_path, POLICY.replace(*change)))


def test_a_policy_without_tasks_or_not_toml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="install at least one task"):
        load_policy(write(tmp_path, "[site]\nmax_rounds = 3\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_policy(write(tmp_path, "[site\n"))


ALPHA = InstalledTask("alpha", Path("alpha.py"), "a" * 64, params=frozenset({"learning_rate"}))


def policy(**limits: object) -> object:
    from fedgrpc.client.policy import SitePolicy

    return SitePolicy(tasks=(ALPHA,), **limits)  # type: ignore[arg-type]


def spec(**fields: object) -> RunSpec:
    base: dict[str, object] = {"task": TaskRef("alpha", "a" * 64), "rounds": 3, "local_epochs": 1}
    return RunSpec(**{**base, **fields})  # type: ignore[arg-type]


def test_a_run_of_an_installed_task_within_the_limits_is_taken() -> None:
    assert check_run(policy(max_rounds=3, max_local_epochs=1), spec()) is ALPHA  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("limits", "run", "reason"),
    [
        ({}, RunSpec(task=TaskRef("beta", "b" * 64)), "does not run task 'beta' (it runs 'alpha')"),
        (
            {},
            RunSpec(task=TaskRef("alpha", "c" * 64)),
            "has file digest aaaaaaaaaaaa, the run's cccccccccccc",
        ),
        ({"max_rounds": 2}, spec(), "the run has 3 rounds; this site takes part in at most 2"),
        (
            {"max_local_epochs": 1},
            spec(local_epochs=3),
            "asks 3 local epochs a round; this site trains at most 1",
        ),
        ({"require_secagg": True}, spec(), "no secure aggregation"),
        ({"require_dp_clip": True}, spec(), "clip their updates"),
        ({"min_dp_noise_multiplier": 1.0}, spec(dp_clip=1.0, dp_noise_multiplier=0.5), "is 0.5; this site"),
    ],
)
def test_a_run_outside_the_policy_is_refused_with_its_reason(
    limits: dict[str, object], run: RunSpec, reason: str
) -> None:
    decision = check_run(policy(**limits), run)  # type: ignore[arg-type]
    assert isinstance(decision, str) and reason in decision, decision


def test_the_privacy_floor_is_met_by_a_run_that_meets_it() -> None:
    floor = policy(require_secagg=True, require_dp_clip=True, min_dp_noise_multiplier=1.0)
    run = spec(secagg=SecAggSpec(), dp_clip=1.0, dp_noise_multiplier=1.0)
    assert check_run(floor, run) is ALPHA  # type: ignore[arg-type]


def test_only_the_allowed_parameters_may_move_from_the_tasks_defaults() -> None:
    defaults = {"learning_rate": 0.1, "units": 8}
    assert check_params(ALPHA, defaults, spec(task_params={"learning_rate": 0.5, "units": 8})) is None
    reason = check_params(ALPHA, defaults, spec(task_params={"units": 16}))
    assert reason is not None and "units" in reason and "only: learning_rate" in reason


def test_the_noise_multiplier_travels_in_the_run_spec() -> None:
    run = spec(dp_clip=1.0, dp_noise_multiplier=1.3)
    assert wire.run_from_pb(wire.run_to_pb(run)).dp_noise_multiplier == 1.3


def test_fl_client_refuses_a_wrong_digest_at_start(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY.replace('file = "alpha.py"', f'file = "alpha.py"\ndigest = "{"1" * 64}"'))
    done = subprocess.run(
        [str(BIN / "fl-client"), "--id", "1", "--insecure", "--serve", "--policy", str(path)],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "fl-client: error:" in done.stderr and "not the pinned" in done.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--serve"], "--serve needs the site's policy"),
        (["--policy", "site.toml"], "add --serve"),
        (["--serve", "--policy", "site.toml", "--data", "x.csv"], "from --policy: drop --data"),
    ],
)
def test_serve_and_policy_go_together(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [str(BIN / "fl-client"), "--id", "1", "--insecure", *flags],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_example_policy_and_the_kits_example_are_valid(tmp_path: Path) -> None:
    from fedgrpc.server.kits import Member, _site_policy_example

    example = load_policy(Path(__file__).resolve().parents[1] / "examples/site-policy/site.toml")
    assert [t.name for t in example.tasks] == ["hospitals", "stations"] and example.max_run_time == 3600
    (tmp_path / "my_task.py").write_text(TASK_SOURCE)
    kit = tmp_path / "site.toml"
    kit.write_text(_site_policy_example(Member("site", "hospital-a", "cn", "ab", client_id=1)))
    assert load_policy(kit).tasks[0].name == "my-task"


def _nothing(_: Any) -> Any:
    return None


def test_the_server_announces_its_central_dp_noise_in_the_run_spec() -> None:
    from fedgrpc.common.task import Task
    from fedgrpc.common.task_loader import LoadedTask
    from fedgrpc.server.config import PrivacySettings, ServerConfig
    from fedgrpc.server.startup import _run_spec

    loaded = LoadedTask(Task("alpha", _nothing, _nothing), TaskRef("alpha", "a" * 64), "alpha.py")
    noisy = ServerConfig(privacy=PrivacySettings(clip=1.0, noise_multiplier=1.1))
    assert _run_spec(noisy, loaded, {}, has_central=True).dp_noise_multiplier == 1.1
    assert _run_spec(ServerConfig(), loaded, {}, has_central=True).dp_noise_multiplier == 0.0
