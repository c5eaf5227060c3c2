"""fl-server's flag checks: a wrong size or path is a clear ConfigError before anything starts."""

from dataclasses import replace
from pathlib import Path

import pytest
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import ConfigError
from fedgrpc.server.cli import build_parser, check_sizes, config_from, parse_args
from fedgrpc.server.config import PrivacySettings, RoundPolicy, ServerConfig


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chunk-kb", "0"], "--chunk-kb must be in 1..8192"),
        (["--max-inflight-mb", "0"], "--max-inflight-mb must be at least 1"),
        (["--clients", "3", "--clients-per-round", "4"], r"--clients-per-round must be in 1..3 \(at most"),
        (["--spool-dir", "/nonexistent/spool"], "is not a writable directory"),
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
        (["--dp-noise-multiplier", "1"], "--dp-clip and --dp-noise-multiplier go together"),
    ],
)
def test_bad_sizes_and_paths_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from(*parse_args(["--insecure", *flags]))


def test_a_writable_spool_dir_is_taken(tmp_path: Path) -> None:
    args, _ = parse_args(["--spool-dir", str(tmp_path)])
    check_sizes(args)
    assert args.spool_dir == tmp_path


def test_no_flags_give_the_server_config_defaults() -> None:
    """ServerConfig's defaults are its flags' defaults: the flags not given and the config not
    told build the same run (all but the run's random id)."""
    built = config_from(*parse_args(["--insecure"]))
    assert isinstance(built, ServerConfig)
    assert replace(built, run=replace(built.run, run_id="x")) == ServerConfig(run=RunSpec(run_id="x"))


def test_a_config_built_in_code_is_held_to_the_flags_ranges() -> None:
    """The same rule, and the same message, as the flag's."""
    with pytest.raises(ConfigError, match="--dp-clip-on must be one of client, server, got 'nobody'"):
        PrivacySettings(clip=1.0, noise_multiplier=1.0, clip_on="nobody")
    with pytest.raises(ConfigError, match="--round-timeout must be above 0, got 0"):
        RoundPolicy(timeout_s=0)
    with pytest.raises(
        ConfigError, match=r"--clients-per-round must be in 1..3 \(at most --clients\), got 4"
    ):
        ServerConfig(clients_per_round=4)


def test_without_tls_or_insecure_the_server_is_refused() -> None:
    with pytest.raises(ConfigError, match="no TLS: give --tls-cert and --tls-key, or pass --insecure to run"):
        config_from(*parse_args([]))


def test_help_starts_with_about_ten_essentials_and_lists_every_fixed_set_of_names() -> None:
    """The first section holds what a newcomer needs; each flag that takes names lists them."""
    from fedgrpc.client.cli import SETTINGS as CLIENT
    from fedgrpc.client.cli import build_parser as client_parser
    from fedgrpc.server.flags import SETTINGS

    for declared, parser in ((SETTINGS, build_parser()), (CLIENT, client_parser())):
        essentials = [s for s in declared if s.flag and not s.group]
        assert 6 <= len(essentials) <= 12, [s.name for s in essentials]
        text = " ".join(parser.format_help().split())
        assert "options: -h, --help show this help message and exit the essentials: --config RUN.toml" in text
        for setting in declared:
            if setting.choices:
                assert ", ".join(setting.choices) in text, setting.name
    text = " ".join(build_parser().format_help().split())
    assert "iid, dirichlet:ALPHA, classes:K, quantity:ALPHA" in text  # names with a parameter


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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--log-format", "xml"], "--log-format must be one of text, json, got 'xml'"),
        (["--rounds"], r"argument --rounds: expected one argument \(see fl-server --help\)"),
        (["--round", "3"], "ambiguous option: --round could match --rounds, --round-timeout"),
    ],
)
def test_what_argparse_refuses_is_a_config_error_too(flags: list[str], message: str) -> None:
    """A name outside a flag's set is refused with the run file's message; a flag argparse cannot
    read is a ConfigError too, said in one line like every other refusal."""
    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


def test_a_param_needs_a_key_and_a_value() -> None:
    with pytest.raises(ConfigError, match="write KEY=VALUE"):
        parse_args(["--param", "units"])
