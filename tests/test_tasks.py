"""Users' own tasks: loading, parameters, bad tasks, and real runs of a task written here."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedgrpc.common.errors import TaskError
from fedgrpc.common.processes import free_port
from fedgrpc.common.task import LocalData, Site
from fedgrpc.common.task_loader import (
    ParamOverride,
    build_model,
    check_fits,
    check_params,
    load_data,
    load_task,
    resolve_params,
)
from helpers import BIN, ENV, finish, start, wait_for_line

#: A tabular task with no images: rows of 6 numbers, a label that is their sum's sign.
TABLE_TASK = """
import keras
import numpy as np
from fedgrpc.common.task import LocalData, Task


def build_model(params):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(params["units"], activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(params["learning_rate"]), loss="binary_crossentropy",
                  metrics=["accuracy"])
    return model


def load_data(site):
    with np.load(site.data) as npz:
        x, y = npz["x"], npz["y"]
    return LocalData(train=(x[:-20], y[:-20]), test=(x[-20:], y[-20:]))


task = Task("table", build_model, load_data, params={"learning_rate": 0.01, "units": 8})
"""


def write_task(folder: Path, source: str = TABLE_TASK, name: str = "table_task.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def write_site(path: Path, rows: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)).astype(np.float32)
    y = (x.sum(axis=1, keepdims=True) > 0).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path


def run_table_federation(
    tmp_path: Path, *server_extra: str, sizes: tuple[int, ...] = (80, 140)
) -> dict[str, Any]:
    task = write_task(tmp_path)
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    server = start(
        "fl-server", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--task", str(task),
        "--rounds", "2", "--clients", str(len(sizes)), "--out", str(out), "--threads", "1",
        *server_extra, log=log,
    )  # fmt: skip
    clients = []
    for k, rows in enumerate(sizes, start=1):
        data = write_site(tmp_path / f"site_{k}.npz", rows, seed=k)
        client_log = tmp_path / f"client-{k}.log"
        command = [
            "fl-client",
            "--insecure",
            "--id",
            str(k),
            "--server",
            f"127.0.0.1:{port}",
            "--task",
            str(task),
        ]
        clients.append((start(*command, "--data", str(data), "--threads", "1", log=client_log), client_log))
    for process, client_log in clients:
        assert finish(process, client_log) == 0, client_log.read_text()
    assert finish(server, log) == 0, log.read_text()
    document: dict[str, Any] = json.loads((out / "history.json").read_text())
    document["server_log"] = log.read_text()
    return document


def test_a_task_file_runs_end_to_end_with_a_server_that_holds_no_data(tmp_path: Path) -> None:
    document = run_table_federation(tmp_path, "--personalize-epochs", "1")
    assert document["run"]["task"]["name"] == "table" and document["run"]["task_params"]["units"] == 8
    for record in document["rounds"]:
        assert record["central"] is None  # no test set on the server
        federated = record["federated"]
        reports = federated["reports"]
        assert [r["num_examples"] for r in reports] == [20, 20] and federated["clients"] == 2
        for metric in ("accuracy", "loss", "personalized_accuracy", "personalized_loss"):
            want = sum(r["metrics"][metric] * r["num_examples"] for r in reports) / 40
            assert federated["metrics"][metric] == pytest.approx(want, rel=1e-12)
        assert [c["num_examples"] for c in record["clients"]] == [60, 120]  # trained on all but 20 each
    assert "round 2/2  fed acc" in document["server_log"] and "pers acc" in document["server_log"]


def test_a_client_with_another_task_is_refused_at_join(tmp_path: Path) -> None:
    task = write_task(tmp_path)
    other = write_task(tmp_path, TABLE_TASK.replace('"units": 8', '"units": 9'), name="edited.py")
    port, log = free_port(), tmp_path / "server.log"
    server = start(
        "fl-server", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--task", str(task),
        "--rounds", "1", "--clients", "1", "--out", str(tmp_path / "out"), log=log,
    )  # fmt: skip
    try:
        wait_for_line(log, "listening on port", process=server)
        result = subprocess.run(
            [str(BIN / "fl-client"), "--insecure", "--id", "1", "--server", f"127.0.0.1:{port}",
             "--task", str(other), "--data", str(write_site(tmp_path / "s.npz", 50, 1))],  # fmt: skip
            capture_output=True, text=True, env=ENV, timeout=120,
        )  # fmt: skip
    finally:
        server.kill()
    assert result.returncode == 2
    digest_server, digest_client = load_task(str(task)).ref.digest[:12], load_task(str(other)).ref.digest[:12]
    assert f"client 1 runs task 'table' (file digest {digest_client})" in result.stderr
    assert f"this run's task is 'table' (file digest {digest_server})" in result.stderr
    assert "joined" not in log.read_text()  # nothing was counted for it


# -- bad tasks: each gets a message naming the task, the function and what was wrong ----------


def site(**params: Any) -> Site:
    return Site(client_id=1, num_clients=2, data=None, params=params)


def test_a_file_that_does_not_import(tmp_path: Path) -> None:
    path = write_task(tmp_path, "import keras\ndef build_model(:\n", name="broken.py")
    with pytest.raises(TaskError, match=r"task file .*broken.py could not be imported: .*SyntaxError"):
        load_task(str(path))
    raising = write_task(tmp_path, "import keras\n\nraise RuntimeError('no GPU here')\n", name="raising.py")
    with pytest.raises(TaskError, match=r"RuntimeError: no GPU here \(line 3\)"):
        load_task(str(raising))


def test_a_file_without_a_task(tmp_path: Path) -> None:
    path = write_task(tmp_path, "task = 42\n", name="notask.py")
    with pytest.raises(TaskError, match="defines no task: `task` is int"):
        load_task(str(path))


def test_unknown_task_names_list_the_installed_ones() -> None:
    with pytest.raises(TaskError, match=r"no task named 'resnet'.*cifar10"):
        load_task("resnet")


def test_a_builder_that_returns_no_model(tmp_path: Path) -> None:
    source = TABLE_TASK.replace("    return model\n", "    return None\n", 1)
    loaded = load_task(str(write_task(tmp_path, source)))
    with pytest.raises(TaskError, match="task 'table': build_model returned NoneType, not a keras.Model"):
        build_model(loaded, resolve_params(loaded.task, {}))


def test_a_builder_that_fails_or_forgets_to_compile(tmp_path: Path) -> None:
    failing = load_task(str(write_task(tmp_path, TABLE_TASK.replace('params["units"]', 'params["unit"]'))))
    with pytest.raises(TaskError, match=r"task 'table': build_model failed: KeyError: 'unit'"):
        build_model(failing, resolve_params(failing.task, {}))
    compile_call = TABLE_TASK[TABLE_TASK.index("    model.compile(") : TABLE_TASK.index("    return model")]
    source = TABLE_TASK.replace(compile_call, "")
    uncompiled = load_task(str(write_task(tmp_path, source, name="uncompiled.py")))
    with pytest.raises(TaskError, match="build_model must return a compiled model"):
        build_model(uncompiled, resolve_params(uncompiled.task, {}))


def test_data_whose_shapes_do_not_fit_the_model(tmp_path: Path) -> None:
    loaded = load_task(str(write_task(tmp_path)))
    model = build_model(loaded, resolve_params(loaded.task, {}))
    x = np.zeros((5, 7), np.float32)  # 7 features, the model takes 6
    with pytest.raises(
        TaskError, match="task 'table': the training data from load_data does not fit the model"
    ):
        check_fits(loaded, model, (x, np.zeros((5, 1), np.float32)), "training data")


RETURN_LINE = "return LocalData(train=(x[:-20], y[:-20]), test=(x[-20:], y[-20:]))"


def test_a_loader_that_returns_no_examples_or_no_local_data(tmp_path: Path) -> None:
    empty = TABLE_TASK.replace(RETURN_LINE, "return LocalData(train=(x[:0], y[:0]))")
    loaded = load_task(str(write_task(tmp_path, empty)))
    data = write_site(tmp_path / "s.npz", 30, 1)
    with pytest.raises(
        TaskError, match="task 'table': load_data failed: .*0 training examples; a site needs some"
    ):
        load_data(loaded, Site(1, 2, str(data), {}))
    wrong = load_task(str(write_task(tmp_path, TABLE_TASK.replace(RETURN_LINE, "return x, y"), "w.py")))
    with pytest.raises(
        TaskError, match="task 'table': load_data returned tuple, not fedgrpc.common.task.LocalData"
    ):
        load_data(wrong, Site(1, 2, str(data), {}))


def test_parameters_of_the_wrong_type(tmp_path: Path) -> None:
    task = load_task(str(write_task(tmp_path))).task
    typed = {"units": ParamOverride("16", "--param units", text=True), "learning_rate": 1}
    assert resolve_params(task, typed) == {"units": 16, "learning_rate": 1.0}
    with pytest.raises(
        TaskError,
        match=r"task 'table': parameter 'units' must be an int \(its default is 8\), got 'many' from --param",
    ):
        resolve_params(task, {"units": ParamOverride("many", "--param units", text=True)})
    with pytest.raises(TaskError, match=r"parameter 'units' must be an int .* got 2.5 \(a number\)"):
        resolve_params(task, {"units": 2.5})
    with pytest.raises(
        TaskError, match="task 'table' has no parameter 'layers'; its parameters: learning_rate, units"
    ):
        resolve_params(task, {"layers": 3})
    with pytest.raises(TaskError, match="do not match this client's task"):
        check_params(task, {"units": 8})


def test_local_data_counts_examples_of_arrays_and_asks_for_others() -> None:
    data = LocalData(train=({"a": np.zeros((7, 2)), "b": np.zeros((7, 1))}, [np.zeros(7), np.zeros((7, 3))]))
    assert data.num_examples == 7 and data.num_test_examples is None
    with pytest.raises(TaskError, match="give num_examples"):
        LocalData(train=iter(()))
    with pytest.raises(TaskError, match="differ in length"):
        LocalData(train=(np.zeros((4, 2)), np.zeros(5)))


def test_a_server_with_a_bad_task_stops_before_serving(tmp_path: Path) -> None:
    task = write_task(tmp_path, TABLE_TASK.replace("    return model\n", "    return None\n", 1))
    result = subprocess.run(
        [str(BIN / "fl-server"), "--insecure", "--port", "0", "--task", str(task), "--out", str(tmp_path)],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "fl-server: error: task 'table': build_model returned NoneType, not a keras.Model" in result.stderr
    assert "listening" not in result.stderr


def test_init_model_takes_the_weights_of_a_saved_model_of_the_task(tmp_path: Path) -> None:
    import keras
    from fedgrpc.server.startup import weights_of_saved_model

    loaded = load_task(str(write_task(tmp_path)))
    saved = build_model(loaded, resolve_params(loaded.task, {}))
    saved.set_weights([np.full(w.shape, 0.5, w.dtype) for w in saved.get_weights()])
    saved.save(tmp_path / "start.keras")
    fresh = build_model(loaded, resolve_params(loaded.task, {}))
    for got in weights_of_saved_model(tmp_path / "start.keras", fresh.get_weights()):
        assert np.all(got == 0.5)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.save(tmp_path / "other.keras")
    with pytest.raises(TaskError, match="it is not a saved model of this task"):
        weights_of_saved_model(tmp_path / "other.keras", fresh.get_weights())


def test_several_inputs_and_outputs_with_custom_training_and_evaluation() -> None:
    """Dict inputs, two outputs (a class and a regression target), a task's own training step
    and its own metric: the client trainer runs them as it runs the defaults."""
    import keras
    from fedgrpc.client.trainer import LocalTrainer
    from fedgrpc.common.config import RunSpec, TaskRef
    from fedgrpc.common.task import Task
    from fedgrpc.common.task_loader import LoadedTask

    def build(params: Any) -> Any:
        image = keras.Input((4, 4, 1), name="image")
        table = keras.Input((3,), name="table")
        joined = keras.layers.Concatenate()([keras.layers.Flatten()(image), table])
        hidden = keras.layers.Dense(8, activation="relu")(joined)
        model = keras.Model(
            {"image": image, "table": table},
            [
                keras.layers.Dense(2, activation="softmax", name="kind")(hidden),
                keras.layers.Dense(1, name="size")(hidden),
            ],
        )
        model.compile(optimizer="adam", loss=["sparse_categorical_crossentropy", "mse"])
        return model

    rng = np.random.default_rng(0)
    x = {"image": rng.random((40, 4, 4, 1), dtype=np.float32), "table": rng.random((40, 3), dtype=np.float32)}
    y = [rng.integers(0, 2, 40), rng.random((40, 1), dtype=np.float32)]
    steps: list[int] = []

    def train(model: Any, data: LocalData, ctx: Any) -> dict[str, float]:  # a loop of its own
        inputs, targets = data.train
        for first in range(0, 40, ctx.batch_size):
            part = slice(first, first + ctx.batch_size)
            loss = model.train_on_batch({k: v[part] for k, v in inputs.items()}, [t[part] for t in targets])
            steps.append(first)
        return {"last_loss": float(np.ravel(loss)[0])}

    def evaluate(model: Any, data: Any, ctx: Any) -> dict[str, float]:
        kind, size = model.predict(data[0], verbose=0)
        return {
            "kind_accuracy": float(np.mean(kind.argmax(axis=1) == data[1][0])),
            "size_mae": float(np.mean(np.abs(size - data[1][1]))),
        }

    task = Task(
        "multi", build, lambda site: LocalData(train=(x, y), test=(x, y)), train=train, evaluate=evaluate
    )
    loaded = LoadedTask(task, TaskRef("multi", "0" * 64), "test")
    model = build_model(loaded, {})
    data = LocalData(train=(x, y), test=(x, y))
    check_fits(loaded, model, data.train, "training data")
    trainer = LocalTrainer(loaded, RunSpec(batch_size=16), {}, data, model)
    result = trainer.train(1, model.get_weights())
    assert len(steps) == 3 and set(result.metrics) == {"last_loss", "train_seconds"}
    assert result.num_examples == 40
    evaluation = trainer.evaluate(1, result.weights, personalize_epochs=1)
    assert evaluation.num_examples == 40
    assert set(evaluation.metrics) == {
        "kind_accuracy",
        "size_mae",
        "personalized_kind_accuracy",
        "personalized_size_mae",
    }
