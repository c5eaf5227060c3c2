"""Framework-free tasks: a model fedgrpc knows only by get_weights/set_weights, trained by the
task's own functions, with neither Keras nor TensorFlow imported on either side.

The numpy example (logistic regression) needs nothing but numpy; the PyTorch example needs
torch (`pip install 'fedgrpc[torch]'`), and fails under $CI without it (see conftest).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import TaskError
from fedgrpc.common.task import LocalData, Site, Task
from fedgrpc.common.task_loader import build_model, check_fits, load_task, resolve_params, weight_specs
from helpers import BIN, ENV

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NUMPY_TASK = EXAMPLES / "numpy" / "task.py"
TORCH_TASK = EXAMPLES / "pytorch" / "task.py"
NEEDS_TORCH = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="PyTorch is not installed (pip install 'fedgrpc[torch]'; `make install` does)",
)
FRAMEWORKS = ("tensorflow", "keras")


def _noop_function(*args: object) -> Any:
    return None


_noop: Any = _noop_function  # stands for any of a task's functions: only Task's checks run here


def test_get_weights_and_set_weights_come_together_with_train_and_evaluate() -> None:
    with pytest.raises(TaskError, match="gives get_weights but no set_weights"):
        Task("t", _noop, _noop, train=_noop, evaluate=_noop, get_weights=_noop)
    with pytest.raises(TaskError, match="gives set_weights but no get_weights"):
        Task("t", _noop, _noop, train=_noop, evaluate=_noop, set_weights=_noop)
    with pytest.raises(TaskError, match="not a keras.Model: give train and evaluate too"):
        Task("t", _noop, _noop, get_weights=_noop, set_weights=_noop)
    with pytest.raises(TaskError, match="give evaluate too"):
        Task("t", _noop, _noop, train=_noop, get_weights=_noop, set_weights=_noop)
    task = Task("t", _noop, _noop, train=_noop, evaluate=_noop, get_weights=_noop, set_weights=_noop)
    assert not task.uses_keras and "framework-free" in repr(task)


def test_get_weights_must_give_numpy_arrays_the_wire_carries(tmp_path: Path) -> None:
    source = NUMPY_TASK.read_text()
    assert "return [model.w.copy(), model.b.copy()]" in source  # the line each case replaces
    for returned, problem in (
        ("model.w.tolist()", "get_weights returned list of \\['float'\\], not a list of numpy arrays"),
        ("[]", "get_weights returned no arrays"),
        ("[model.w.astype(np.complex64)]", "an array the wire cannot carry"),
    ):
        path = tmp_path / f"task_{len(problem)}.py"
        path.write_text(source.replace("return [model.w.copy(), model.b.copy()]", f"return {returned}"))
        loaded = load_task(str(path))
        with pytest.raises(TaskError, match=problem):
            model = build_model(loaded, resolve_params(loaded.task, {}))
            weight_specs(loaded, model)


def test_a_framework_free_model_is_checked_against_its_data_by_its_own_evaluate() -> None:
    loaded = load_task(str(NUMPY_TASK))
    params = resolve_params(loaded.task, {})
    model = build_model(loaded, params)
    assert [(s.name, s.dtype, s.shape) for s in weight_specs(loaded, model)] == [
        ("weights/0", "float32", (8,)),
        ("weights/1", "float32", (1,)),
    ]
    fits = (np.zeros((5, 8), np.float32), np.zeros(5, np.float32))
    check_fits(loaded, model, fits, "training data", params)
    with pytest.raises(TaskError, match="the training data from load_data does not fit the model"):
        check_fits(loaded, model, (np.zeros((5, 3), np.float32), np.zeros(5)), "training data", params)


def test_the_server_seed_gives_a_framework_free_task_the_same_initial_weights() -> None:
    from fedgrpc.common.models import seed_everything
    from fedgrpc.common.task_loader import get_weights

    loaded = load_task(str(NUMPY_TASK))
    params = resolve_params(loaded.task, {})

    def initial(seed: int) -> list[np.ndarray]:
        seed_everything(loaded.task, seed)
        return get_weights(loaded, build_model(loaded, params))

    assert [w.tolist() for w in initial(3)] == [w.tolist() for w in initial(3)]
    assert initial(3)[0].tolist() != initial(4)[0].tolist()


def test_the_trainer_moves_weights_through_the_task_and_trains() -> None:
    """LocalTrainer on the numpy task: the global weights go in by set_weights, the trained ones
    come out by get_weights, and training on separable data lowers the loss."""
    from fedgrpc.client.trainer import LocalTrainer

    loaded = load_task(str(NUMPY_TASK))
    params = resolve_params(loaded.task, {})
    site = Site(client_id=1, num_clients=2, data=None, params=params)
    data: LocalData = loaded.task.load_data(site)
    run = RunSpec(run_id="r", rounds=1, num_clients=2, local_epochs=2, batch_size=32)
    trainer = LocalTrainer(loaded, run, params, data, build_model(loaded, params))
    start = [np.zeros(8, np.float32), np.zeros(1, np.float32)]
    before = trainer.evaluate(1, start)
    result = trainer.train(1, start)
    assert [w.shape for w in result.weights] == [(8,), (1,)]
    assert result.num_examples == data.num_examples == 480  # 4/5 of 1,200 / 2
    after = trainer.evaluate(1, result.weights)
    assert after.metrics["loss"] < before.metrics["loss"] and after.metrics["accuracy"] > 0.8
    with pytest.raises(TaskError, match="set_weights failed"):
        trainer.train(2, [np.zeros(3, np.float32), np.zeros(1, np.float32)])


def test_init_model_takes_an_npz_of_the_task_models_arrays(tmp_path: Path) -> None:
    """--init-model final_weights.npz: a framework-free run starts where another ended."""
    from fedgrpc.common.models import save_weights
    from fedgrpc.server.startup import weights_of_saved_model

    initial = [np.zeros(8, np.float32), np.zeros(1, np.float32)]
    save_weights(tmp_path / "final_weights.npz", [np.full(8, 0.5, np.float32), np.ones(1, np.float32)])
    started = weights_of_saved_model(tmp_path / "final_weights.npz", initial)
    assert [w.tolist() for w in started] == [[0.5] * 8, [1.0]]
    save_weights(tmp_path / "other.npz", [np.zeros(3, np.float32)])
    with pytest.raises(TaskError, match="it is not a saved model of this task"):
        weights_of_saved_model(tmp_path / "other.npz", initial)


PROBE = """
import atexit, importlib.util, json, os, sys

spec = importlib.util.spec_from_file_location("example_task", {example!r})
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
task = example.task


@atexit.register
def _record_modules():
    path = os.path.join(os.environ["MODULES_DIR"], f"{{os.getpid()}}.json")
    with open(path, "w") as handle:
        json.dump({{"modules": sorted(sys.modules)}}, handle)
"""


@pytest.mark.parametrize(
    ("example", "framework"),
    [(NUMPY_TASK, "numpy"), pytest.param(TORCH_TASK, "torch", marks=NEEDS_TORCH)],
    ids=["numpy", "pytorch"],
)
def test_fl_local_runs_a_framework_free_task_without_keras(
    tmp_path: Path, example: Path, framework: str
) -> None:
    """fl-local (fl-server and two fl-client processes, their CLIs unchanged) on the example:
    it finishes, no process ever imported TensorFlow or Keras (their sys.modules, recorded at
    exit by a task file wrapping the example), and the final weights are the example-weighted
    mean of the last round's updates (FedAvg)."""
    probe, modules, out = tmp_path / "probe_task.py", tmp_path / "modules", tmp_path / "out"
    probe.write_text(PROBE.format(example=str(example)))
    modules.mkdir()
    result = subprocess.run(
        [str(BIN / "fl-local"), "--task", str(probe), "--clients", "2", "--rounds", "2", "--out", str(out),
         "--threads", "1", "--", "--record-updates"],
        env={**ENV, "MODULES_DIR": str(modules)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "devices: the task's own (framework-free, no Keras)" in result.stderr
    recorded = [set(json.loads(p.read_text())["modules"]) for p in modules.glob("*.json")]
    sides = sorted("server" if "fedgrpc.server.startup" in m else "client" for m in recorded)
    assert sides == ["client", "client", "server"]
    for imported in recorded:
        assert framework in imported and not imported & set(FRAMEWORKS), sorted(imported & set(FRAMEWORKS))
    assert all("fedgrpc.client.trainer" in m for m in recorded if "fedgrpc.server.startup" not in m)
    history = json.loads((out / "history.json").read_text())
    last = history["rounds"][-1]
    assert history["finished"] and last["central"]["accuracy"] > 0
    counts = {c["client_id"]: c["num_examples"] for c in last["clients"]}
    updates = {k: np.load(out / "updates" / "round-0002" / f"client-{k}.npz") for k in counts}
    with np.load(out / "final_weights.npz") as final:
        assert final.files == ["0000", "0001", "0002", "0003"][: len(final.files)]
        for name in final.files:
            mean = sum(counts[k] * updates[k][name].astype(np.float64) for k in counts) / sum(counts.values())
            np.testing.assert_allclose(final[name], mean, rtol=1e-5, atol=1e-6)
