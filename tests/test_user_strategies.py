"""A user's own strategy: the public API, loading (file, module:attribute, entry point), FedNova
against its paper, and real servers that run, resume and refuse one."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.client.light import light_examples, light_update
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import CheckpointError, ConfigError
from fedgrpc.common.processes import free_port
from fedgrpc.server import strategies
from fedgrpc.server.checkpoint import CheckpointStore
from fedgrpc.server.strategy import CentralDP, StrategySettings, add_update, make_strategy, secure_refusal
from fedgrpc.server.strategy_loader import check_resumable, load_strategy
from helpers import finish, finish_all, server_command, start, start_clients, wait_for_line

ROOT = Path(__file__).resolve().parent.parent
FEDNOVA = ROOT / "examples" / "strategies" / "fednova.py"
LIGHT = ("--insecure", "--light", "--connect-timeout", "120")


def readme_strategy(folder: Path) -> Path:
    """The code block of README's "Write your own strategy", written out as the file it names."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("#### Write your own strategy") :]
    block = re.search(r"```python\n(# my_strategy\.py\n.*?)```", section, re.S)
    assert block is not None, "README's strategy section has no my_strategy.py block"
    path = folder / "my_strategy.py"
    path.write_text(block.group(1))
    return path


# -- the public API ----------------------------------------------------------------------------


def test_the_public_module_says_what_it_exports() -> None:
    for name in strategies.__all__:
        assert hasattr(strategies, name), name
    assert {"MeanStrategy", "UpdatesStrategy", "Update", "RoundTotals"} <= set(strategies.__all__)
    assert strategies.MeanStrategy().round_settings(3) == {}
    assert strategies.ENTRY_POINT_GROUP == "fedgrpc.strategies"


def test_every_built_in_strategy_is_written_on_the_public_api() -> None:
    for name in ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "median", "krum"):
        built = make_strategy(StrategySettings(name))
        assert isinstance(built, strategies.MeanStrategy | strategies.UpdatesStrategy), name


def drive(
    strategy: object, x: list[np.ndarray], rounds: list[list[tuple[list[np.ndarray], int]]]
) -> list[np.ndarray]:
    for updates in rounds:
        strategy.begin_round(x, len(updates))  # type: ignore[attr-defined]
        for weights, n in updates:
            add_update(strategy, weights, x, n)  # type: ignore[arg-type]
        x = strategy.result()  # type: ignore[attr-defined]
    return x


def test_an_updates_strategy_sees_every_update_as_sent() -> None:
    seen: list[list[int]] = []

    class Largest(strategies.UpdatesStrategy):
        name = "largest"

        def aggregate(self, weights, updates):
            seen.append([u.num_examples for u in updates])
            return max(updates, key=lambda u: u.num_examples).weights

    x = [np.zeros(3, np.float32)]
    got = drive(Largest(), x, [[([np.full(3, 1.0, np.float32)], 5), ([np.full(3, 2.0, np.float32)], 9)]])
    assert seen == [[5, 9]]
    np.testing.assert_array_equal(got[0], np.full(3, 2.0, np.float32))


def test_a_result_of_the_wrong_shape_is_refused_with_a_sentence() -> None:
    class Wrong(strategies.MeanStrategy):
        name = "wrong"

        def step(self, weights, mean_change, round):
            return [np.zeros(2)]

    with pytest.raises(ValueError, match="strategy 'wrong' returned tensor 0 of shape"):
        drive(Wrong(), [np.zeros(3, np.float32)], [[([np.ones(3, np.float32)], 1)]])


# -- FedNova against the paper ---------------------------------------------------------------


def test_fednova_is_the_papers_normalized_average() -> None:
    """Wang et al. (2020), eq. 6-7 with local SGD (a_i = tau_i) and tau_eff = sum p_i tau_i,
    written out in float64 for three clients of very different sizes."""
    fednova = load_strategy(str(FEDNOVA))
    fednova.configure(RunSpec(batch_size=32, local_epochs=2))
    x = [np.array([1.0, -2.0, 0.5], np.float32), np.array([[0.25, 4.0]], np.float32)]
    rng = np.random.default_rng(3)
    clients = [([w + rng.normal(0, 0.1, w.shape).astype(np.float32) for w in x], n) for n in (20, 100, 333)]
    got = drive(fednova, x, [clients])

    n = np.array([20, 100, 333], np.float64)
    tau = 2 * np.ceil(n / 32)  # local steps: 2, 8, 22
    p = n / n.sum()
    tau_eff = (p * tau).sum()
    for index, (g, x0) in enumerate(zip(got, x, strict=True)):
        d = [(x0.astype(np.float64) - c[0][index]) / t for c, t in zip(clients, tau, strict=True)]
        want = x0 - tau_eff * sum(pi * di for pi, di in zip(p, d, strict=True))
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)
    fedavg = drive(make_strategy(StrategySettings("fedavg")), x, [clients])
    assert not np.allclose(got[0], fedavg[0], atol=1e-5)  # tau_i differ: not FedAvg


def test_fednova_with_equal_steps_is_fedavg() -> None:
    fednova = load_strategy(str(FEDNOVA))
    fednova.configure(RunSpec(batch_size=10, local_epochs=1))
    x = [np.array([0.5, 1.5], np.float32)]
    clients = [([np.array([1.0, 2.0], np.float32)], 30), ([np.array([0.0, -1.0], np.float32)], 30)]
    got = drive(fednova, x, [clients])
    np.testing.assert_allclose(got[0], [0.5, 0.5], rtol=1e-6)


def test_fednova_weighs_updates_its_own_way_so_secagg_and_dp_are_refused() -> None:
    settings = StrategySettings(str(FEDNOVA))
    assert secure_refusal(make_strategy(settings)) == "it weighs updates its own way"
    with pytest.raises(ConfigError, match="differential privacy weighs every update 1"):
        make_strategy(settings, CentralDP(1.0, 0.5, 3))
    assert secure_refusal(make_strategy(StrategySettings("fedadam"))) is None
    assert secure_refusal(make_strategy(StrategySettings("median"))) == "a robust rule needs every update"

    class Own(strategies.UpdatesStrategy):
        name = "own"

    assert secure_refusal(Own()) == "it needs every update"


# -- loading -----------------------------------------------------------------------------------


def test_a_file_is_loaded_named_and_digested(tmp_path: Path) -> None:
    path = readme_strategy(tmp_path)
    loaded = load_strategy(str(path))
    assert loaded.name == "heavy-ball" and isinstance(loaded, strategies.MeanStrategy)
    import hashlib

    assert loaded.origin is not None
    assert loaded.origin.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    from fedgrpc.server.strategy import strategy_record

    record = strategy_record(StrategySettings(str(path)), loaded)
    assert record == {"name": "heavy-ball", "source": str(path), "digest": loaded.origin.digest}


def test_module_attribute_and_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed strategy: a module on sys.path and a dist-info naming it in fedgrpc.strategies."""
    write_installed(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_strategy("halfway_strategy:strategy")
    by_name = load_strategy("halfway")
    assert by_module.name == by_name.name == "halfway"
    assert by_name.origin is not None and by_name.origin.source == "halfway"
    assert StrategySettings("halfway").built_in is False  # accepted as the flags are read


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("x = 1\n", "defines no strategy: `strategy` is nothing"),
        ("from fedgrpc.server.strategies import MeanStrategy\nclass S(MeanStrategy): pass\nstrategy = S\n",
         r"`strategy` is the class S; assign an instance \(`strategy = S\(\)`\)"),
        ("raise ValueError('oops')\n", r"could not be imported: ValueError: oops \(line 1\)"),
    ],
)  # fmt: skip
def test_a_file_that_is_not_a_strategy_is_refused(tmp_path: Path, source: str, message: str) -> None:
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(ConfigError, match=message):
        make_strategy(StrategySettings(str(path)))


def test_an_unknown_name_is_refused_as_the_flags_are_read() -> None:
    with pytest.raises(
        ConfigError, match="no strategy named 'fedsgd': choose from fedavg, .*krum, scaffold, or give"
    ):
        StrategySettings("fedsgd")


# -- checkpoints -------------------------------------------------------------------------------


def test_the_checkpoint_keeps_the_strategy_record_and_refuses_state_it_could_not_read(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoint")
    record = {"name": "heavy-ball", "source": "my_strategy.py", "digest": "ab" * 32}
    state = {"velocity/0000": np.arange(3, dtype=np.float32)}
    store.save(RunSpec(), 1, [np.zeros(3, np.float32)], [], state, record)
    loaded = store.load()
    assert loaded is not None and loaded.strategy == record
    np.testing.assert_array_equal(loaded.strategy_state["velocity/0000"], state["velocity/0000"])
    for bad in ({"v": [1.0, 2.0]}, {"v": np.array([object()], dtype=object)}):
        with pytest.raises(CheckpointError, match="a checkpoint keeps only numpy arrays of numbers"):
            store.save(RunSpec(), 2, [np.zeros(3, np.float32)], [], bad, record)  # type: ignore[arg-type]


def test_resuming_with_another_or_a_changed_strategy_is_refused() -> None:
    saved = {"name": "heavy-ball", "source": "my_strategy.py", "digest": "a" * 64}
    check_resumable(saved, dict(saved))
    check_resumable({"name": "fedavg"}, {"name": "fedadam", "server_lr": 0.01})  # built-ins: as before
    check_resumable(None, saved)  # a checkpoint from before strategies were recorded
    with pytest.raises(ConfigError, match="has changed since this run began .*Put the file back as it was"):
        check_resumable(saved, {**saved, "digest": "b" * 64})
    with pytest.raises(ConfigError, match="aggregated by strategy 'heavy-ball', not 'fedavg'"):
        check_resumable(saved, {"name": "fedavg"})


# -- real servers ------------------------------------------------------------------------------


def write_installed(folder: Path) -> None:
    """A strategy installed as a package would be: its module and a dist-info with the entry point."""
    (folder / "halfway_strategy.py").write_text(
        "from fedgrpc.server.strategies import MeanStrategy, apply_change\n\n\n"
        "class Halfway(MeanStrategy):\n"
        '    name = "halfway"\n\n'
        "    def step(self, weights, mean_change, round):\n"
        "        return apply_change(weights, [c / 2 for c in mean_change])\n\n\n"
        "strategy = Halfway()\n"
    )
    info = folder / "halfway_strategy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: halfway-strategy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fedgrpc.strategies]\nhalfway = halfway_strategy:strategy\n")


def initial_model(folder: Path) -> tuple[Path, list[np.ndarray]]:
    """A small saved model to start the run from (--init-model), and its weights."""
    import keras

    keras.utils.set_random_seed(7)
    from fedgrpc.common.models import reference_cnn

    model = reference_cnn()
    path = folder / "initial.keras"
    model.save(path)
    return path, model.get_weights()


def trajectory(
    strategy_file: str, start_weights: list[np.ndarray], rounds: int, clients: int
) -> list[np.ndarray]:
    """What the server must end with: light clients 1..N through the strategy, in-process, uninterrupted."""
    strategy, x = load_strategy(strategy_file), start_weights
    for number in range(1, rounds + 1):
        strategy.begin_round(x, clients)
        for client in range(1, clients + 1):
            add_update(strategy, light_update(x, client, number), x, light_examples(client))
        x = strategy.result()
    return x


def final_weights(out: Path) -> list[np.ndarray]:
    import keras

    return keras.models.load_model(out / "final_model.keras").get_weights()  # type: ignore[no-any-return]


def test_readme_strategy_runs_as_written(tmp_path: Path, synthetic_npz: Path) -> None:
    path = readme_strategy(tmp_path)
    initial, weights = initial_model(tmp_path)
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--strategy", str(path), "--init-model", str(initial))
    server = start(*server_command(port, synthetic_npz, out, rounds=2, clients=3, extra=extra), log=log)
    finish_all(start_clients(port, synthetic_npz, tmp_path, extra=LIGHT))
    assert finish(server, log) == 0, log.read_text()
    record = json.loads((out / "history.json").read_text())["run"]["strategy"]
    digest = load_strategy(str(path)).origin.digest  # type: ignore[union-attr]
    assert record == {"name": "heavy-ball", "source": str(path), "digest": digest}
    assert f"strategy: heavy-ball (source {path}, digest {digest[:12]})" in log.read_text()
    for got, want in zip(final_weights(out), trajectory(str(path), weights, 2, 3), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)  # float32 sums in arrival order


def test_a_killed_server_resumes_a_user_strategy_exactly_and_refuses_it_changed(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    """kill -9 after round 2 of 4 and restarted: the final weights are those of an uninterrupted
    run (the strategy's velocity came back from the checkpoint). Then the file is edited and a
    restart asking for more rounds is refused, saying what to do."""
    path = readme_strategy(tmp_path)
    initial, weights = initial_model(tmp_path)
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--strategy", str(path), "--init-model", str(initial))
    command = server_command(port, synthetic_npz, out, rounds=4, clients=3, extra=extra)
    server = start(*command, log=log)
    clients = start_clients(port, synthetic_npz, tmp_path, extra=LIGHT)
    wait_for_line(log, "round 2/4", process=server)
    server.send_signal(signal.SIGKILL)
    server.wait()
    restarted = start(*command, log=log)
    finish_all(clients)
    assert finish(restarted, log) == 0, log.read_text()
    assert "resuming run" in log.read_text()
    for got, want in zip(final_weights(out), trajectory(str(path), weights, 4, 3), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)

    path.write_text(path.read_text().replace("beta=0.5", "beta=0.9"))
    refused_log = tmp_path / "refused.log"
    more = server_command(port, synthetic_npz, out, rounds=6, clients=3, extra=extra)
    assert finish(start(*more, log=refused_log), refused_log, timeout=120) != 0
    said = refused_log.read_text()
    assert "strategy 'heavy-ball'" in said and "has changed since this run began" in said, said
    assert "Put the file back as it was" in said and "another --out" in said, said


def test_an_installed_strategy_is_found_by_its_entry_point(tmp_path: Path, synthetic_npz: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    write_installed(site)
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    command = server_command(port, synthetic_npz, out, rounds=1, clients=2, extra=("--strategy", "halfway"))
    server = start(*command, log=log, env={"PYTHONPATH": str(site)})
    finish_all(start_clients(port, synthetic_npz, tmp_path, ids=(1, 2), extra=LIGHT))
    assert finish(server, log) == 0, log.read_text()
    record = json.loads((out / "history.json").read_text())["run"]["strategy"]
    assert record["name"] == "halfway" and record["source"] == "halfway" and len(record["digest"]) == 64
    assert sys.path[0] != str(site)  # the test's own interpreter untouched
