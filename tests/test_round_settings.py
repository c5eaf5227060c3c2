"""Per-round client settings, the client's state store and SCAFFOLD: the pieces against their
definitions, then real fl-server and fl-client processes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedgrpc.client.connection import assignment_from_header
from fedgrpc.client.scaffold import control_delta
from fedgrpc.client.state import StateStore
from fedgrpc.common import wire
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import ConfigError
from fedgrpc.common.processes import free_port
from fedgrpc.common.task import Site
from fedgrpc.server.round_mode import ClearRounds
from fedgrpc.server.round_settings import RoundPlan, RoundSchedule, checked_schedule, schedule_from_table
from fedgrpc.server.scaffold import Scaffold, scaffold_update
from fedgrpc.server.strategy import CentralDP, StrategySettings, add_update, make_strategy, secure_refusal
from fedgrpc.v1 import coordinator_pb2 as pb
from helpers import finish, start, wait_for_line

# -- the schedule --------------------------------------------------------------------------


def test_a_schedule_holds_each_value_from_its_round_on() -> None:
    schedule = schedule_from_table({"learning_rate": {"1": 0.01, "5": 0.005}, "local_epochs": 2}, "run.toml")
    assert schedule.at(1) == schedule.at(4) == {"learning_rate": 0.01, "local_epochs": 2}
    assert schedule.at(5) == schedule.at(50) == {"learning_rate": 0.005, "local_epochs": 2}
    late = schedule_from_table({"proximal_mu": {"3": 0.1}}, "run.toml")
    assert late.at(2) == {} and late.at(3) == {"proximal_mu": 0.1}  # not sent before its first step


def test_a_schedule_refuses_bad_rounds_types_and_names() -> None:
    with pytest.raises(ConfigError, match="'first' is not a round number"):
        schedule_from_table({"learning_rate": {"first": 0.1}}, "run.toml")
    with pytest.raises(ConfigError, match="'0' is not a round number"):
        schedule_from_table({"learning_rate": {"0": 0.1}}, "run.toml")
    with pytest.raises(ConfigError, match=r"\[rounds\] learning_rate \(from round 2\) must be a number"):
        checked_schedule(schedule_from_table({"learning_rate": {"1": 0.1, "2": "fast"}}, "r"), {})
    with pytest.raises(ConfigError, match="local_epochs.* must be at least 1"):
        checked_schedule(schedule_from_table({"local_epochs": 0}, "r"), {})
    with pytest.raises(ConfigError, match="'dropout' is not a round setting; known: learning_rate"):
        checked_schedule(schedule_from_table({"dropout": 0.5}, "r"), {"units": 8})
    # A name the task declares is a setting, of its declared type (an int is taken for a float).
    assert checked_schedule(schedule_from_table({"dropout": 1}, "r"), {"dropout": 0.5}).at(1) == {
        "dropout": 1.0
    }
    with pytest.raises(ConfigError, match="must be an int .*'units'"):
        checked_schedule(schedule_from_table({"units": 2.5}, "r"), {"units": 8})


class _Scheduled:
    """A strategy with the round_settings hook (the public strategy API's)."""

    def round_settings(self, round_number: int) -> dict[str, Any]:
        return {"learning_rate": 0.1 / round_number, "local_epochs": 3}


def test_the_run_file_and_the_strategy_hook_merge_the_run_file_winning() -> None:
    plan = RoundPlan(schedule_from_table({"local_epochs": 1}, "r"), _Scheduled(), {})
    assert plan.settings(2) == {"learning_rate": 0.05, "local_epochs": 1}
    assert RoundPlan(RoundSchedule(), object(), {}).settings(1) == {}  # no hook: nothing


def test_a_trains_settings_and_extras_travel_in_its_answer() -> None:
    specs = [TensorSpec("w", "float32", (2, 2))]
    extra = (TensorSpec("scaffold/c/w", "float32", (2, 2)), np.full((2, 2), 0.5, np.float32))
    messages = list(
        wire.weights_stream(
            3, specs, [np.eye(2, dtype=np.float32)], run_id="r1",
            settings={"learning_rate": 0.01, "local_epochs": 2, "tag": "x", "warm": True}, extras=[extra],
        )
    )  # fmt: skip
    parsed = [m if isinstance(m, pb.WeightsMessage) else pb.WeightsMessage.FromString(m) for m in messages]
    assignment = assignment_from_header(parsed[0])
    assert assignment.settings == {"learning_rate": 0.01, "local_epochs": 2, "tag": "x", "warm": True}
    received = wire.assemble(assignment.all_specs, (m.chunk for m in parsed[1:]))
    done = assignment.with_arrays(received.arrays, received.wire_bytes)
    assert len(done.weights) == 1 and np.array_equal(done.weights[0], np.eye(2))
    assert list(done.extras) == ["scaffold/c/w"] and np.array_equal(done.extras["scaffold/c/w"], extra[1])


# -- the state store -----------------------------------------------------------------------


def test_the_state_store_keeps_arrays_per_run_atomically_and_without_pickle(tmp_path: Path) -> None:
    store = StateStore(tmp_path, "run1")
    assert store.load("scaffold") is None and not (tmp_path / "run1").exists()  # nothing written yet
    store.save("scaffold", {"dense/kernel": np.ones((2, 3)), "dense/bias": np.zeros(3, np.float32)})
    store.save("scaffold", {"dense/kernel": np.full((2, 3), 2.0), "dense/bias": np.ones(3, np.float32)})
    again = StateStore(tmp_path, "run1").load("scaffold")  # a restarted site reads it back
    assert again is not None and np.array_equal(again["dense/kernel"], np.full((2, 3), 2.0))
    assert sorted(p.name for p in (tmp_path / "run1").iterdir()) == ["scaffold.npz"]  # no temporary left
    assert StateStore(tmp_path, "run2").load("scaffold") is None  # another run starts afresh
    with pytest.raises(TypeError, match="Python objects"):
        store.save("bad", {"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ConfigError):
        store.save("../escape", {"x": np.ones(1)})


# -- SCAFFOLD against the paper ------------------------------------------------------------


def test_scaffolds_server_step_is_the_papers_formula_on_hand_made_numbers() -> None:
    x, c = [np.array([1.0, 2.0])], [np.array([0.5, -0.5])]
    ys = [[np.array([2.0, 2.0])], [np.array([0.0, 4.0])]]
    dcs = [[np.array([1.0, 1.0])], [np.array([3.0, -1.0])]]
    new_x, new_c = scaffold_update(x, c, ys, dcs, num_clients=4, server_lr=0.5)
    # x + 0.5 * mean([1, 0], [-1, 2]) = [1, 2] + 0.5 * [0, 1]; c + (2/4) * mean([1, 1], [3, -1]) = c + [1, 0]
    assert np.allclose(new_x[0], [1.0, 2.5]) and np.allclose(new_c[0], [1.5, -0.5])

    strategy = Scaffold(server_lr=0.5)  # on the public API: a MeanStrategy with update tensors
    strategy.configure(RunSpec(num_clients=4))
    specs = [TensorSpec("w", "float64", (2,))]
    strategy.restore({"c/0": c[0]})
    mode = ClearRounds(strategy, specs)  # the update lists the model's tensor, then delta c_i
    assert [s.name for s in mode.update_specs] == ["w", "scaffold/delta_c/w"]
    assert [(s.name, a.tolist()) for s, a in strategy.round_tensors()] == [("scaffold/c/w", [0.5, -0.5])]
    assert strategy.round_settings(1) == {"learning_rate": 0.05}  # the clients' local SGD step
    strategy.begin_round(x, 2)
    reference = mode.reference(tuple(x), 1)
    for y, dc, examples in zip(ys, dcs, (10, 30), strict=True):  # unweighted: examples do not count
        add_update(strategy, [y[0], dc[0]], reference, examples)
    assert np.allclose(strategy.result()[0], new_x[0])
    assert np.allclose(strategy.state()["c/0"], new_c[0])


def test_the_clients_control_variate_is_option_ii() -> None:
    c, ci = np.array([0.2, 0.0]), np.array([0.1, 0.3])
    x, y = np.array([1.0, 1.0]), np.array([0.8, 1.1])
    delta = control_delta([c], [x], [y], steps=4, learning_rate=0.05)[0]
    ci_plus = ci - c + (x - y) / (4 * 0.05)
    assert np.allclose(ci + delta, ci_plus)


def test_scaffold_refuses_what_it_does_not_work_with() -> None:
    from fedgrpc.common.config import SecAggSpec
    from fedgrpc.server.config import FedBuffSettings, ServerConfig
    from fedgrpc.server.startup import make_run_strategy

    settings = StrategySettings("scaffold")
    assert "masked sum carries the model's tensors only" in str(secure_refusal(make_strategy(settings)))
    with pytest.raises(ConfigError, match="secure aggregation"):
        make_run_strategy(ServerConfig(strategy=settings, secagg=SecAggSpec()))
    with pytest.raises(ConfigError, match="--mode fedbuff"):
        make_run_strategy(ServerConfig(strategy=settings, fedbuff=FedBuffSettings()))
    with pytest.raises(ConfigError, match="differential privacy"):
        make_strategy(settings, CentralDP(1.0, 0.5, 3))
    with pytest.raises(ConfigError, match="--proximal-mu"):
        Scaffold().configure(RunSpec(num_clients=3, proximal_mu=0.1))


# -- real runs -----------------------------------------------------------------------------

#: Rows of 6 numbers, the label their sum's sign; plain SGD (SCAFFOLD's option II assumes it),
#: and a train that says which learning rate and epochs its optimizer had.
SGD_TASK = """
import keras
import numpy as np
from fedgrpc.common.task import LocalData, Task, fit_model


def build_model(params):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(params["learning_rate"]), loss="binary_crossentropy",
                  metrics=["accuracy"])
    return model


def load_data(site):
    with np.load(site.data) as npz:
        x, y = npz["x"], npz["y"]
    return LocalData(train=(x[:-40], y[:-40]), test=(x[-40:], y[-40:]))


def train(model, data, ctx):
    metrics = fit_model(model, data, ctx)
    metrics["optimizer_lr"] = float(model.optimizer.learning_rate)
    metrics["epochs_run"] = float(ctx.epochs)
    metrics["optimizer_sgd"] = float(isinstance(model.optimizer, keras.optimizers.SGD))
    return metrics


task = Task("sgd-table", build_model, load_data, train=train, params={"learning_rate": 0.1})
"""


#: The same task compiled as the reference one is, with Adam: SCAFFOLD must train it with SGD.
ADAM_TASK = SGD_TASK.replace("keras.optimizers.SGD(params", "keras.optimizers.Adam(params").replace(
    '"learning_rate": 0.1}', '"learning_rate": 0.001}'
)


def _site(path: Path, rows: int, seed: int, skew: float) -> Path:
    """A site whose inputs lean one way (`skew`): heterogeneous sites for SCAFFOLD."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(rows, 6)) + skew).astype(np.float32)
    y = (x.sum(axis=1, keepdims=True) > 0).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path


def _federation(
    tmp_path: Path, rounds: int, *server_extra: str, source: str = SGD_TASK
) -> tuple[list[str], Any, Path, Path]:
    task = tmp_path / "sgd_task.py"
    task.write_text(textwrap.dedent(source))
    port, log = free_port(), tmp_path / "server.log"
    server = start(
        "fl-server", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--task", str(task),
        "--rounds", str(rounds), "--clients", "2", "--out", str(tmp_path / "out"), "--threads", "1",
        *server_extra, log=log,
    )  # fmt: skip
    client = [
        "fl-client", "--insecure", "--server", f"127.0.0.1:{port}", "--task", str(task), "--threads", "1",
        "--state-dir", str(tmp_path / "state" / "client-{id}"),
    ]  # fmt: skip
    return client, server, log, tmp_path / "out"


def _start_client(tmp_path: Path, client: list[str], k: int) -> tuple[Any, Path]:
    data = tmp_path / f"site_{k}.npz"
    if not data.exists():
        _site(data, 240, seed=k, skew=0.6 if k == 1 else -0.6)
    log = tmp_path / f"client-{k}.log"
    return start(*client, "--id", str(k), "--data", str(data), log=log), log


def _history(out: Path) -> list[dict[str, Any]]:
    document = json.loads((out / "history.json").read_text())
    assert document["finished"] is True
    return list(document["rounds"])


def test_a_per_round_learning_rate_reaches_the_clients_optimizer(tmp_path: Path) -> None:
    run_file = tmp_path / "run.toml"
    run_file.write_text("[rounds]\nlearning_rate = {1 = 0.05, 3 = 0.02}\nlocal_epochs = {2 = 2}\n")
    client, server, log, out = _federation(tmp_path, 3, "--config", str(run_file))
    clients = [_start_client(tmp_path, client, k) for k in (1, 2)]
    for process, client_log in clients:
        assert finish(process, client_log) == 0, client_log.read_text()
    assert finish(server, log) == 0, log.read_text()
    rounds = _history(out)
    for record, rate, epochs in zip(rounds, (0.05, 0.05, 0.02), (1, 2, 2), strict=True):
        for report in record["clients"]:
            assert report["metrics"]["optimizer_lr"] == pytest.approx(rate)  # float32 in the optimizer
            assert report["metrics"]["epochs_run"] == epochs


def test_a_wrong_round_setting_is_refused_before_round_one(tmp_path: Path) -> None:
    run_file = tmp_path / "run.toml"
    run_file.write_text('[rounds]\nlearning_rate = {1 = 0.05, 3 = "slow"}\n')
    _, server, log, _ = _federation(tmp_path, 3, "--config", str(run_file))
    assert finish(server, log, timeout=120) == 2
    assert "[rounds] learning_rate (from round 3) must be a number" in log.read_text()


def test_scaffolds_client_state_survives_a_restart_and_the_run_converges(tmp_path: Path) -> None:
    client, server, log, out = _federation(
        tmp_path, 6, "--strategy", "scaffold", "--min-clients", "1", "--round-timeout", "10",
        "--compression", "fp16",  # the extras travel compressed as the model's tensors do
    )  # fmt: skip
    first, first_log = _start_client(tmp_path, client, 1)
    other = _start_client(tmp_path, client, 2)
    state_files = tmp_path / "state" / "client-1"
    wait_for_line(log, "round 1/6", process=server)
    while not list(state_files.glob("*/scaffold.npz")):  # its c_i after round 1 is on disk
        assert first.poll() is None, first_log.read_text()
    first.kill()  # mid-run, as a site that loses power
    first.wait()
    saved = np.load(next(state_files.glob("*/scaffold.npz")))
    assert saved.files and any(np.any(saved[name] != 0) for name in saved.files)
    again, again_log = _start_client(tmp_path, client, 1)
    for process, client_log in (other, (again, again_log)):
        assert finish(process, client_log) == 0, client_log.read_text()
    assert finish(server, log) == 0, log.read_text()
    assert "SCAFFOLD: this site's control variate c_i taken up from" in again_log.read_text()
    rounds = _history(out)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert 1 in [c["client_id"] for c in rounds[-1]["clients"]]  # the restarted site took part again
    accuracy = [r["federated"]["metrics"]["accuracy"] for r in rounds if r.get("federated")]
    assert accuracy[-1] >= 0.8, accuracy


def test_the_trainer_applies_a_rounds_settings_and_forgets_them_the_next_round(tmp_path: Path) -> None:
    from fedgrpc.client.trainer import LocalTrainer
    from fedgrpc.common.config import RunSpec
    from fedgrpc.common.task_loader import build_model, load_data, load_task

    task = tmp_path / "sgd_task.py"
    task.write_text(textwrap.dedent(SGD_TASK))
    loaded = load_task(str(task))
    params = {"learning_rate": 0.1}
    site = Site(1, 1, str(_site(tmp_path / "site.npz", 80, seed=1, skew=0.0)), params)
    model = build_model(loaded, params)
    trainer = LocalTrainer(loaded, RunSpec(local_epochs=1), params, load_data(loaded, site), model)
    start = model.get_weights()
    tuned = trainer.train(1, start, settings={"learning_rate": 0.02, "local_epochs": 2, "proximal_mu": 0.5})
    assert tuned.metrics["optimizer_lr"] == pytest.approx(0.02) and tuned.metrics["epochs_run"] == 2
    assert hasattr(model.optimizer, "set_anchors")  # FedProx put in for the round that asked for it
    assert float(model.optimizer._mu) == pytest.approx(0.5)
    plain = trainer.train(2, start)
    assert plain.metrics["optimizer_lr"] == pytest.approx(0.1) and plain.metrics["epochs_run"] == 1
    assert float(model.optimizer._mu) == 0.0  # the run's mu again


def test_scaffolds_local_steps_are_corrected_sgd_whatever_the_task_compiled(tmp_path: Path) -> None:
    import keras
    from fedgrpc.client import scaffold
    from fedgrpc.client.trainer import LocalTrainer
    from fedgrpc.common.task_loader import build_model, load_data, load_task

    # One corrected step against numpy: y <- y - lr (g - c_i + c), on a linear model under MSE.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    (w, b), x = model.get_weights(), np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    optimizer = scaffold.install(model, 0.05)
    c, ci = [np.full(w.shape, 0.3), np.full(b.shape, 0.3)], [np.full(w.shape, -0.2), np.full(b.shape, 0.1)]
    optimizer.set_corrections(scaffold.corrections([0, 1], c, ci))
    model.train_on_batch(x, np.ones((8, 2), np.float32))
    g = 2 * (x @ w + b - 1) / 16
    assert np.allclose(model.get_weights()[0], w - 0.05 * (x.T @ g + 0.3 + 0.2), atol=1e-6)
    assert np.allclose(model.get_weights()[1], b - 0.05 * (g.sum(0) + 0.3 - 0.1), atol=1e-6)

    # The trainer: the Adam task trains with SGD at the round's rate, and delta c_i is option II's.
    task = tmp_path / "adam_task.py"
    task.write_text(textwrap.dedent(ADAM_TASK))
    loaded = load_task(str(task))
    params = {"learning_rate": 0.001}
    site = Site(1, 1, str(_site(tmp_path / "site.npz", 104, seed=1, skew=0.5)), params)
    keras_model = build_model(loaded, params)
    trainer = LocalTrainer(loaded, RunSpec(), params, load_data(loaded, site), keras_model)
    start = keras_model.get_weights()
    server_c = [np.full(t.shape, 0.01, np.float32) for t in start]
    extras = {f"scaffold/c/{s.name}": t for s, t in zip(trainer.specs, server_c, strict=True)}
    result = trainer.train(1, start, settings={"learning_rate": 0.05}, extras=extras)
    assert result.metrics["optimizer_sgd"] == 1.0 and result.metrics["optimizer_lr"] == pytest.approx(0.05)
    steps = int(keras_model.optimizer.iterations)
    assert steps == 2  # 64 training rows, batches of 32
    for spec, x0, y, ct in zip(trainer.specs, start, result.weights, server_c, strict=True):
        expected = (x0.astype(np.float64) - y) / (steps * 0.05) - ct  # c_i = 0 before the first round
        assert np.allclose(result.extras[f"scaffold/delta_c/{spec.name}"], expected, rtol=1e-4, atol=1e-4)


def test_scaffold_learns_a_skewed_task_compiled_with_adam(tmp_path: Path) -> None:
    """The reference task's Adam left SCAFFOLD at chance; its local steps are SGD now."""
    client, server, log, out = _federation(tmp_path, 4, "--strategy", "scaffold", source=ADAM_TASK)
    clients = [_start_client(tmp_path, client, k) for k in (1, 2)]
    for process, client_log in clients:
        assert finish(process, client_log) == 0, client_log.read_text()
    assert finish(server, log) == 0, log.read_text()
    rounds = _history(out)
    for record in rounds:
        for report in record["clients"]:
            assert report["metrics"]["optimizer_sgd"] == 1.0
            assert report["metrics"]["optimizer_lr"] == pytest.approx(0.05)  # the strategy's default
    accuracy = [r["federated"]["metrics"]["accuracy"] for r in rounds if r.get("federated")]
    assert accuracy[-1] >= 0.8, accuracy  # chance is 0.5
