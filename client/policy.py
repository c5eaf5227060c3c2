"""A site's policy: which tasks this site runs, on which data, and the runs it takes part in.

The policy is the site operator's own TOML file (`fl-client --serve --policy site.toml`); the
coordinator never sees it and cannot change it. It is read and checked once, at start, with the
settings machinery every CLI uses (fedgrpc.common.settings), so a bad value is refused in one
line naming the file and key:

    [site]                          # every key optional
    max_rounds = 50                 # refuse a run of more rounds
    max_local_epochs = 5            # refuse a run asking more local epochs per round
    max_run_time = 3600             # seconds: withdraw from a run still going after this
    require_secagg = true           # refuse a run without secure aggregation
    min_dp_noise_multiplier = 1.0   # refuse a run whose central DP adds less noise (or none)
    require_dp_clip = true          # refuse a run in which this site's update is not clipped
    retry_max = 10                  # seconds: the longest wait between two tries to reach the coordinator

    [[task]]                        # one per installed task
    name = "hospitals"              # the task's name, as its file declares it
    file = "tasks/hospitals.py"     # relative paths are read from this file's folder
    digest = "3f1c..."              # optional: the SHA-256 the file must have (checked at start)
    data = "data/hospital_2.csv"    # this site's data for the task
    params = ["learning_rate"]      # optional: the only parameters a run may set away from the
                                    # task's defaults (absent: any)

`check_run` decides, for a run's spec, which installed task runs it or why the site refuses;
the reason is a sentence for the coordinator's operator (sent with Withdraw) and the site's log.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.config import RunSpec
from ..common.errors import ConfigError
from ..common.settings import Setting, by_name
from ..common.words import plural

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

#: The [site] table's keys.
SITE_SETTINGS = (
    Setting("max_rounds", int, None, low=1, help="refuse a run of more rounds"),
    Setting("max_local_epochs", int, None, low=1, help="refuse a run asking more local epochs"),
    Setting("max_run_time", float, None, above=0, help="seconds: withdraw from a run still going after this"),
    Setting("require_secagg", bool, False, help="refuse a run without secure aggregation"),
    Setting("min_dp_noise_multiplier", float, None, above=0, help="refuse a run with less central DP noise"),
    Setting("require_dp_clip", bool, False, help="refuse a run in which clients do not clip their updates"),
    Setting("retry_max", float, 10.0, above=0, high=300, help="seconds: longest wait between tries"),
)  # fmt: skip

#: Each [[task]]'s keys (`params`, a list of names, is checked on its own).
TASK_SETTINGS = (
    Setting("name", str, None),
    Setting("file", Path, None),
    Setting("digest", str, None),
    Setting("data", str, None, maybe_path=True),
)


@dataclass(frozen=True)
class InstalledTask:
    """A task this site runs: its file (whose digest was checked at start) and its data."""

    name: str
    file: Path
    digest: str  # the file's SHA-256, as read at start
    data: str | None = None
    params: frozenset[str] | None = None  # parameters a run may set; None: any


@dataclass(frozen=True)
class SitePolicy:
    tasks: tuple[InstalledTask, ...]
    max_rounds: int | None = None
    max_local_epochs: int | None = None
    max_run_time: float | None = None
    require_secagg: bool = False
    min_dp_noise_multiplier: float | None = None
    require_dp_clip: bool = False
    retry_max: float = 10.0

    def task_named(self, name: str) -> InstalledTask | None:
        return next((t for t in self.tasks if t.name == name), None)


def file_digest(path: Path) -> str:
    """The SHA-256 of a task file, as the task's identity has it (fedgrpc.common.task_loader)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_policy(path: Path) -> SitePolicy:
    """The policy in `path`, every value checked; ConfigError naming the key otherwise."""
    document = _read(path)
    unknown = sorted(set(document) - {"site", "task"})
    if unknown:
        raise ConfigError(f"--policy {path}: unknown table(s) {unknown}; a policy has [site] and [[task]]")
    site = document.get("site", {})
    tasks = document.get("task", [])
    if not isinstance(site, dict):
        raise ConfigError(f"--policy {path}: [site] must be a table")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(
            f"--policy {path}: install at least one task, as a [[task]] table (name, file, data)"
        )
    values = _checked(site, SITE_SETTINGS, path, "[site]")
    installed = tuple(_task(entry, path, k) for k, entry in enumerate(tasks, start=1))
    names = [t.name for t in installed]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ConfigError(f"--policy {path}: task(s) {doubled} installed twice; give each name once")
    return SitePolicy(tasks=installed, **values)


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"--policy {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--policy {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--policy {path} is not valid TOML: {exc}") from None


def _checked(
    table: Mapping[str, Any], settings: tuple[Setting, ...], path: Path, where: str
) -> dict[str, Any]:
    """A table's values checked against their declarations; unknown keys refused."""
    known = by_name(settings)
    checked: dict[str, Any] = {}
    for key, value in table.items():
        setting = known.get(key.replace("-", "_"))
        if setting is None:
            raise ConfigError(f"--policy {path}: {where} has no key {key!r}; keys are {', '.join(known)}")
        checked[setting.name] = setting.check(
            _resolved(path.parent, setting, value), f"{path}: {where} {key}"
        )
    return checked


def _resolved(folder: Path, setting: Setting, value: Any) -> Any:
    """Relative paths from the policy's folder (data only when such a file or folder exists
    there: it may also be a URL or a table name)."""
    if not isinstance(value, str) or Path(value).is_absolute():
        return value
    candidate = folder / value
    if setting.kind is Path or (setting.maybe_path and candidate.exists()):
        return str(candidate)
    return value


def _task(entry: Any, path: Path, number: int) -> InstalledTask:
    where = f"[[task]] #{number}"
    if not isinstance(entry, dict):
        raise ConfigError(f"--policy {path}: {where} must be a table")
    params = entry.get("params")
    values = _checked({k: v for k, v in entry.items() if k != "params"}, TASK_SETTINGS, path, where)
    for required in ("name", "file"):
        if values.get(required) is None:
            raise ConfigError(f"--policy {path}: {where} needs {required} = ...")
    file: Path = values["file"]
    if not file.is_file():
        raise ConfigError(f"--policy {path}: {where} ({values['name']}): task file {file} does not exist")
    digest = file_digest(file)
    pinned = values.get("digest")
    if pinned is not None and pinned.lower() != digest:
        raise ConfigError(
            f"--policy {path}: task {values['name']!r}: file {file} has digest {digest}, not the pinned "
            f"{pinned}: the file changed since it was pinned; check it, then pin the new digest"
        )
    if params is not None and not (isinstance(params, list) and all(isinstance(p, str) for p in params)):
        raise ConfigError(
            f"--policy {path}: {where} params must be a list of parameter names, got {params!r}"
        )
    allowed = None if params is None else frozenset(params)
    return InstalledTask(values["name"], file, digest, values.get("data"), allowed)


# -- deciding on a run ---------------------------------------------------------------------------


def check_run(policy: SitePolicy, run: RunSpec) -> InstalledTask | str:
    """The installed task that takes part in `run`, or the reason this site refuses it."""
    wanted = run.task
    installed = policy.task_named(wanted.name)
    if installed is None:
        runs = ", ".join(repr(t.name) for t in policy.tasks)
        return f"this site does not run task {wanted.name!r} (it runs {runs})"
    if installed.digest != wanted.digest:
        return (
            f"this site's task {wanted.name!r} has file digest {installed.digest[:12]}, the run's "
            f"{wanted.digest[:12] or 'none'}: the site runs only the task file its operator installed"
        )
    return _limits(policy, run) or _privacy(policy, run) or installed


def _limits(policy: SitePolicy, run: RunSpec) -> str | None:
    if policy.max_rounds is not None and run.rounds > policy.max_rounds:
        return (
            f"the run has {plural(run.rounds, 'round')}; this site takes part in at most {policy.max_rounds}"
        )
    if policy.max_local_epochs is not None and run.local_epochs > policy.max_local_epochs:
        return (
            f"the run asks {plural(run.local_epochs, 'local epoch')} a round; this site trains at most "
            f"{policy.max_local_epochs}"
        )
    return None


def _privacy(policy: SitePolicy, run: RunSpec) -> str | None:
    if policy.require_secagg and run.secagg is None:
        return "the run has no secure aggregation, which this site requires"
    if policy.require_dp_clip and not run.dp_clip > 0:
        return "the run does not have clients clip their updates (DP clipping), which this site requires"
    floor = policy.min_dp_noise_multiplier
    if floor is not None and run.dp_noise_multiplier < floor:
        noise = run.dp_noise_multiplier
        return f"the run's DP noise multiplier is {noise:g}; this site requires at least {floor:g}"
    return None


def check_params(installed: InstalledTask, defaults: Mapping[str, Any], run: RunSpec) -> str | None:
    """Why the run's task parameters are refused (one the site does not let a run change, set
    away from the task's default), or None."""
    if installed.params is None:
        return None
    changed = sorted(
        k for k, v in run.task_params.items() if k not in installed.params and defaults.get(k) != v
    )
    if not changed:
        return None
    allowed = ", ".join(sorted(installed.params)) or "none"
    return (
        f"the run sets task parameter(s) {', '.join(changed)}, which this site does not let a run "
        f"change (only: {allowed})"
    )
