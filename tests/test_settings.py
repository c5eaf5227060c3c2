"""Settings declared once: one type and range per setting, whether it comes from a flag, a run
file or --param, refused with a sentence before any round; and a default nobody typed never
overrides a run file, on any CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fedgrpc.common.errors import ConfigError
from fedgrpc.common.processes import free_port
from fedgrpc.common.settings import Setting
from fedgrpc.server.cli import parse_args
from helpers import BIN, ENV, finish, finish_all, server_command, start, start_clients, wait_for_line
from test_tasks import write_site, write_task


def run_file(folder: Path, text: str | bytes, name: str = "run.toml") -> Path:
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('insecure = "false"', r"\[run\] insecure must be a boolean \(true or false, without quotes\), got"),
        ('secagg = "no"', r"\[run\] secagg must be a boolean .* got 'no' \(a string\)"),
        ('rounds = "4"', r"\[run\] rounds must be an int, got '4' \(a string\)"),
        ("max_examples = -1", r"\[run\] max_examples must be at least 1, got -1"),
        ("eval_fraction = 1.5", r"\[run\] eval_fraction must be above 0 and at most 1, got 1.5"),
        ("rounds = 2.5", r"\[run\] rounds must be an int, got 2.5 \(a number\)"),
        ("strategy = 3", r"\[run\] strategy must be a string, got 3"),
        ("port = 70000", r"\[run\] port must be in 0..65535, got 70000"),
    ],
)
def test_a_run_file_value_of_the_wrong_type_or_range_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    path = run_file(tmp_path, f"[run]\n{text}\n")
    with pytest.raises(ConfigError, match=message) as refused:
        parse_args(["--config", str(path)])
    assert str(path) in str(refused.value)  # the message names the file


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-examples", "-1"], "--max-examples must be at least 1, got -1"),
        (["--rounds", "four"], "--rounds must be an int, got 'four'"),
        (["--secagg-threshold", "1"], "--secagg-threshold must be above 0 and below 1, got 1.0"),
        (["--round-timeout", "nan"], "--round-timeout must be a finite number, got nan"),
    ],
)
def test_a_flag_is_held_to_the_same_declaration(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(["--insecure", *flags])


def test_toml_types_are_taken_as_declared(tmp_path: Path) -> None:
    path = run_file(tmp_path, "[run]\ninsecure = true\nsecagg = false\nround_timeout = 30\nmax_examples = 5")
    args, _ = parse_args(["--config", str(path)])
    assert args.insecure is True and args.secagg is False
    assert args.round_timeout == 30.0 and isinstance(args.round_timeout, float) and args.max_examples == 5


def test_one_declaration_gives_the_flag_and_the_file_key() -> None:
    rounds = Setting("rounds", int, 10, low=1)
    assert rounds.option == "--rounds"
    assert rounds.parse("3") == 3 == rounds.check(3, "run.toml: [run] rounds")
    with pytest.raises(ConfigError, match="--rounds must be at least 1, got 0"):
        rounds.parse("0")
    with pytest.raises(ConfigError, match="x must be at least 1, got 0"):
        rounds.check(0, "x")
    with pytest.raises(ConfigError, match=r"x must be an int, got True \(a boolean\)"):
        rounds.check(True, "x")


def fl_server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fl-server"), *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def test_fl_server_refuses_a_bad_run_file_with_a_sentence_not_a_traceback(tmp_path: Path) -> None:
    """The real fl-server: TLS off by a string, a run file that is not UTF-8, a negative limit."""
    cases = {
        run_file(tmp_path, '[run]\ninsecure = "false"\n', "a.toml"): "insecure must be a boolean",
        run_file(tmp_path, b'[run]\ntask = "caf\xe9"\n', "b.toml"): "is not UTF-8 text",
        run_file(tmp_path, "[run]\ninsecure = true\nmax_examples = -1", "c.toml"): "max_examples must be at",
    }
    for path, message in cases.items():
        result = fl_server("--config", str(path), "--port", "0", "--out", str(tmp_path / "out"))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and str(path) in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


def test_a_task_parameter_of_the_wrong_type_in_the_run_file_stops_the_server(tmp_path: Path) -> None:
    """[task] units = "32" for an int parameter: refused before any round, naming the key,
    the type and the file; the same text from --param is parsed as the parameter's type."""
    task = write_task(tmp_path)
    path = run_file(tmp_path, f'[run]\ntask = "{task.name}"\ninsecure = true\n[task]\nunits = "32"\n')
    result = fl_server("--config", str(path), "--port", "0", "--out", str(tmp_path / "out"), timeout=240)
    assert result.returncode == 2, result.stderr
    assert "parameter 'units' must be an int (its default is 8), got '32'" in result.stderr, result.stderr
    assert f"{path}: [task] units" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "history.json").exists()


def fl_local(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedgrpc.server.local", "--threads", "1", *args],
        cwd=cwd, capture_output=True, text=True, env=ENV, timeout=400,
    )  # fmt: skip


def table_sites(folder: Path, count: int) -> None:
    write_task(folder)
    for k in range(1, count + 1):
        write_site(folder / f"site_{k}.npz", 60, seed=k)


@pytest.mark.parametrize("form", ["--config", "after --"])
def test_fl_local_takes_a_run_file_and_its_defaults_do_not_override_it(tmp_path: Path, form: str) -> None:
    """fl-local's own --rounds default (10) and --clients default (3) lose to the run file's 2
    and 2; its data's {id} gives each client its own file, taken from the run file's folder."""
    table_sites(tmp_path, 2)
    text = '[run]\ntask = "table_task.py"\nclients = 2\nrounds = 2\ndata = "site_{id}.npz"\nout = "out"\n'
    path = run_file(tmp_path, text)
    flags = ["--config", str(path)] if form == "--config" else ["--", "--config", str(path)]
    result = fl_local(*flags, cwd=tmp_path.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert len(history["rounds"]) == 2 and history["run"]["num_clients"] == 2
    assert history["rounds"][-1]["federated"]["clients"] == 2


def test_log_lines_count_in_words_and_a_first_answer_is_not_a_return(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    """A client started before its server logs that the server answered, not that it "is back";
    one round of one client reads "1 round", "1 client"."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    (client,) = start_clients(port, synthetic_npz, tmp_path, ids=(1,), extra=("--insecure", "--light"))
    wait_for_line(client[1], "INSECURE", process=client[0])  # the client is up and dialling
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=1), log=log)
    finish_all([client])
    assert finish(server, log) == 0, log.read_text()
    assert ": 1 round, 1 client, listening on port" in log.read_text(), log.read_text()
    said = client[1].read_text()
    assert "light client: 1 round submitted" in said and "server at" in said and "answered" in said, said
    assert "is back" not in said and "1 rounds" not in said, said


def test_fl_server_and_fl_client_refuse_a_bad_value_alike(tmp_path: Path) -> None:
    """One declaration, one message, one exit code (2) on both sides; no traceback."""
    said = {}
    runs = {
        "fl-server": ["--insecure", "--chunk-kb", "0", "--out", str(tmp_path)],
        "fl-client": ["--id", "1", "--insecure", "--chunk-kb", "0"],
    }
    for program, flags in runs.items():
        result = subprocess.run(
            [str(BIN / program), *flags], capture_output=True, text=True, env=ENV, timeout=120
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        said[program] = result.stderr.strip().splitlines()[-1].split("error: ", 1)[1]
    expected = "--chunk-kb must be in 1..8192 (messages stay under 16 MiB), got 0"
    assert said["fl-server"] == said["fl-client"] == expected
    command = [str(BIN / "fl-client"), "--id", "0", "--insecure"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 2 and "--id must be at least 1, got 0" in result.stderr, result.stderr


def test_fl_client_reads_a_run_file_as_fl_server_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[run] holds fl-client's flags without dashes, paths from the file's folder; a flag typed
    wins over the file, and the file over $FL_CLIENT_ID; its values are held to their types."""
    from fedgrpc.client.cli import parse_args as client_args

    monkeypatch.setenv("FL_CLIENT_ID", "5")
    path = run_file(
        tmp_path, '[run]\nclient_id = 2\nserver = "coordinator:443"\nca = "ca.pem"\nchunk_kb = 64\n'
    )
    args = client_args(["--config", str(path), "--chunk-kb", "128"])
    assert (args.client_id, args.server, args.ca, args.chunk_kb) == (
        2,
        "coordinator:443",
        tmp_path / "ca.pem",
        128,
    )
    cases = {
        "[run]\nchunk_kb = 0\n": r"\[run\] chunk_kb must be in 1..8192 \(messages stay under 16 MiB\), got 0",
        "[run]\nrounds = 3\n": "has no setting 'rounds'",
        "[task]\nunits = 3\n": "a client's run file has no \\[task\\]",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            client_args(["--config", str(run_file(tmp_path, text))])


def test_fl_client_without_an_id_or_tls_is_refused_in_one_line_as_fl_server_is() -> None:
    """Same shape as fl-server's refusals: `PROG: error: SENTENCE`, exit 2, no usage, no traceback."""
    env = {key: value for key, value in ENV.items() if key != "FL_CLIENT_ID"}
    runs = {
        (
            "fl-client",
            "--insecure",
        ): "fl-client: error: which client is this? give --id N, or set $FL_CLIENT_ID",
        ("fl-client", "--id", "1"): "fl-client: error: no TLS: give --ca (the server's CA certificate), or "
        "pass --insecure to talk without TLS on a network you trust",
        ("fl-server",): "fl-server: error: no TLS: give --tls-cert and --tls-key, or pass --insecure to run "
        "without TLS on a network you trust",
        ("fl-client", "--tsl"): "fl-client: error: unrecognized arguments: --tsl (see fl-client --help)",
        ("fl-server", "--strategy", "fedsgd"): "fl-server: error: no strategy named 'fedsgd': choose from "
        "fedavg, fedprox, fedavgm, fedadagrad, fedadam, fedyogi, median, trimmed-mean, krum, scaffold, or "
        "give your own as a file (my_strategy.py), module:attribute or the name of an installed strategy "
        "(none installed; see docs/strategies.md)",
    }
    for (program, *flags), said in runs.items():
        result = subprocess.run(
            [str(BIN / program), *flags], capture_output=True, text=True, env=env, timeout=120
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1] == said, result.stderr
        assert "usage:" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_linger_is_refused_without_the_dashboard_and_held_to_its_range() -> None:
    """--linger keeps the dashboard up: without --http it would be ignored, so it is refused;
    its range is its declaration's, one message wherever it is set."""
    result = fl_server("--linger", "5")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        "fl-server: error: --linger keeps the dashboard up after the run, and there is none without "
        "--http: add --http PORT, or drop --linger" in result.stderr
    ), result.stderr
    with pytest.raises(ConfigError, match="--linger must be in 0..86400, got 90000.0"):
        parse_args(["--insecure", "--http", "0", "--linger", "90000"])


def test_threads_zero_means_every_core_as_the_compose_files_pass_it() -> None:
    """docker/compose.yaml passes --threads=${FL_THREADS:-0} to the server and every client."""
    from fedgrpc.client.cli import parse_args as client_args

    assert parse_args(["--threads=0", "--insecure"])[0].threads == 0
    assert client_args(["--id=1", "--threads=0", "--insecure"]).threads == 0
    with pytest.raises(ConfigError, match="threads"):
        parse_args(["--threads=-1", "--insecure"])


@pytest.mark.parametrize("value", ["abc", "0"])
def test_an_unusable_fl_client_id_is_ignored_when_id_is_given_and_named_when_used(value: str) -> None:
    """$FL_CLIENT_ID is a default: `--id 3` runs whatever it holds (the run stops here at a bad
    --chunk-kb, after the id was taken); without --id, its bad value is refused naming it."""
    env = ENV | {"FL_CLIENT_ID": value}
    command = [str(BIN / "fl-client"), "--insecure", "--chunk-kb", "0"]
    given = subprocess.run([*command, "--id", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert given.returncode == 2 and "--chunk-kb must be in 1..8192" in given.stderr, given.stderr
    assert "FL_CLIENT_ID" not in given.stderr, given.stderr
    used = subprocess.run(command[:2], capture_output=True, text=True, env=env, timeout=120)
    assert used.returncode == 2 and "Traceback" not in used.stderr, used.stderr
    assert "$FL_CLIENT_ID must be " in used.stderr, used.stderr
    assert "give --id, or fix or unset $FL_CLIENT_ID" in used.stderr, used.stderr


def test_an_environment_default_yields_to_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedgrpc.client.cli import parse_args as client_args

    monkeypatch.setenv("FL_CLIENT_ID", "4")
    monkeypatch.setenv("FL_TASK", "my_task.py")
    assert client_args(["--insecure"]).client_id == 4
    assert client_args(["--insecure"]).task == "my_task.py"
    taken = client_args(["--insecure", "--id", "2", "--task", "cifar10"])
    assert (taken.client_id, taken.task) == (2, "cifar10")
    monkeypatch.delenv("FL_TASK")
    assert client_args(["--insecure"]).task == "cifar10"


def test_fl_local_refuses_a_run_file_before_and_after_the_dashes(tmp_path: Path) -> None:
    """fl-local reads one run file and the server would keep the other: refused, nothing started."""
    first = run_file(tmp_path, '[run]\ntask = "missing_task.py"\nclients = 1\n', "a.toml")
    second = run_file(tmp_path, '[run]\ntask = "missing_task.py"\nclients = 1\n', "b.toml")
    result = fl_local("--config", str(first), "--", "--config", str(second), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--config {first} and --config {second} after --: give the run file once" in result.stderr
    assert not (tmp_path / "results").exists()  # no run began


def test_fl_local_leaves_the_task_to_the_server_when_none_is_chosen(tmp_path: Path) -> None:
    """`fl-local -- --task model.keras`: no --task of fl-local's default reaches the server after
    it, so the saved model is the task. fl-client, having no script, is then refused, and fl-local
    ends the run saying so (it used to poll only the server while that ran)."""
    from test_saved_task import MODEL

    (tmp_path / "model.py").write_text(MODEL)
    saved, log = tmp_path / "model.keras", tmp_path / "fl-local.log"
    subprocess.run([sys.executable, str(tmp_path / "model.py"), str(saved)], check=True, env=ENV, timeout=120)
    command = [
        sys.executable, "-m", "fedgrpc.server.local", "--threads", "1", "--clients", "1", "--rounds", "1",
        "--out", str(tmp_path / "out"), "--", "--task", str(saved), "--join-timeout", "60",
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
    try:
        wait_for_line(log, "server    task ", process=process)
        wait_for_line(log, "this run's task is 'saved:model.keras'", process=process)
        assert finish(process, log) == 1
        assert "fl-local: fl-client 1 exited 2" in log.read_text(), log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):  # fl-local and the processes it started
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
