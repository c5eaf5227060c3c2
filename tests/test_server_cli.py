"""fl-server's flag checks: a wrong size or path is a clear ConfigError before anything starts."""

from pathlib import Path

import pytest
from fedgrpc.common.errors import ConfigError
from fedgrpc.server.cli import check_sizes, parse_args


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chunk-kb", "0"], "--chunk-kb must be in 1..8192"),
        (["--max-inflight-mb", "0"], "--max-inflight-mb must be at least 1"),
        (["--clients", "3", "--clients-per-round", "4"], "--clients-per-round must be in 1..--clients"),
        (["--spool-dir", "/nonexistent/spool"], "is not a writable directory"),
    ],
)
def test_bad_sizes_and_paths_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_sizes(parse_args(flags)[0])


def test_a_writable_spool_dir_is_taken(tmp_path: Path) -> None:
    args, _ = parse_args(["--spool-dir", str(tmp_path)])
    check_sizes(args)
    assert args.spool_dir == tmp_path


def write_run_file(folder: Path, text: str) -> Path:
    path = folder / "run.toml"
    path.write_text(text)
    return path


def test_a_run_file_sets_flags_and_task_parameters_and_flags_win(tmp_path: Path) -> None:
    (tmp_path / "my_task.py").write_text("")
    config = write_run_file(
        tmp_path,
        '[run]\ntask = "my_task.py"\nrounds = 7\nround_timeout = 30\nout = "results"\ninsecure = true\n'
        "[task]\nlearning_rate = 0.01\nunits = 16\n",
    )
    args, params = parse_args(["--config", str(config), "--rounds", "3", "--param", "units=32"])
    assert args.rounds == 3 and args.round_timeout == 30 and args.insecure is True
    assert args.task == str(tmp_path / "my_task.py")  # paths are relative to the run file
    assert args.out == tmp_path / "results"
    # the file's values keep their TOML types; a --param is text, parsed by the task's types later
    assert {key: p.value for key, p in params.items()} == {"learning_rate": 0.01, "units": "32"}
    assert params["units"].text and not params["learning_rate"].text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[run]\nrounds = 3\nround_timout = 5\n", "has no setting 'round_timout'"),
        ("[run]\nrounds = \n", "is not valid TOML"),
        ("[runs]\nrounds = 3\n", r"unknown table\(s\) \['runs'\]"),
    ],
)
def test_a_bad_run_file_is_refused_with_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(write_run_file(tmp_path, text))])


def test_a_param_needs_a_key_and_a_value() -> None:
    with pytest.raises(ConfigError, match="write KEY=VALUE"):
        parse_args(["--param", "units"])
