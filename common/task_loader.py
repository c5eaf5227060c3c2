"""Finding a task, checking its parameters, and calling its functions with errors that help.

A task spec (`--task`) is one of:

- a Python file, `my_task.py`: imported from its path (its folder is put on sys.path so it
  can import its own helpers); it must assign a `fedgrpc.common.task.Task` to `task`;
- `package.module:attribute`: an importable module and the Task in it;
- the name of an installed task: an entry point in the `fedgrpc.tasks` group (the packaging
  convention; fedgrpc registers `cifar10`, the reference job, and uses it by default);
- a saved model, `model.keras`: the server of a federation of training scripts needs no task
  file (fedgrpc.common.saved_task).

The task's identity is its name and the SHA-256 of the source file that defines it: what the
server announces and each client compares. A task is user code and runs only on the machine
of whoever passes it; nothing here ever runs code that arrived over the network.

Every failure is a TaskError naming the task, the function and what was wrong, raised before
any round starts.

A task's model is a compiled keras.Model, or, for a framework-free task (one with its own
`get_weights`/`set_weights`), an object only the task's functions touch. `get_weights`,
`set_weights`, `weight_specs` and `check_fits` here serve both, so that the trainer and the
server never ask which; only for a Keras task is Keras imported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from .codec import TensorSpec, spec_of
from .config import ParamValue, TaskRef
from .errors import FedGrpcError, TaskError
from .source_files import describe, import_file, import_named
from .task import Dataset, LocalData, Params, RoundContext, Site, Task
from .words import type_name

ENTRY_POINT_GROUP = "fedgrpc.tasks"
T = TypeVar("T")


@dataclass(frozen=True)
class LoadedTask:
    task: Task
    ref: TaskRef
    source: str  # where it came from, for messages

    @property
    def name(self) -> str:
        return self.task.name


def load_task(spec: str) -> LoadedTask:
    """The task `spec` names (see the module docstring)."""
    if spec.endswith(".keras"):  # a saved model alone, for a server of training scripts
        from .saved_task import saved_model_task

        return saved_model_task(Path(spec))
    if spec.endswith(".py") or Path(spec).is_file():
        return _from_file(Path(spec))
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        return _from_module(spec, module_name, attribute)
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
    if not found:
        installed = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise TaskError(
            f"no task named {spec!r}: give a task file (my_task.py), module:attribute, or the name of "
            f"an installed task ({', '.join(installed) or 'none installed'})"
        )
    module_name, _, attribute = found[0].value.partition(":")
    return _from_module(spec, module_name, attribute or "task")


def _from_file(path: Path) -> LoadedTask:
    module, path = import_file(path, "task", TaskError)
    return _task_in(module, "task", str(path), path)


def _from_module(spec: str, module_name: str, attribute: str) -> LoadedTask:
    module = import_named(spec, module_name, "task", TaskError)
    file = getattr(module, "__file__", None)
    if file is None:
        raise TaskError(f"task module {module_name!r} has no source file to identify it by")
    return _task_in(module, attribute, spec, Path(file))


def _task_in(module: ModuleType, attribute: str, source: str, file: Path) -> LoadedTask:
    task = getattr(module, attribute, None)
    if not isinstance(task, Task):
        found = type(task).__name__ if task is not None else "nothing"
        raise TaskError(
            f"{source} defines no task: `{attribute}` is {found}; assign a fedgrpc.common.task.Task "
            f"to `{attribute}`"
        )
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    return LoadedTask(task, TaskRef(task.name, digest), source)


# -- parameters --------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamOverride:
    """A task parameter as a run sets it, and where from: text typed on the command line
    (`--param`) is parsed as the parameter's type; a run file's value must have it already."""

    value: Any
    source: str  # said in a refusal: "--param units", "run.toml: [task] units"
    text: bool = False


def resolve_params(task: Task, overrides: Mapping[str, Any]) -> dict[str, ParamValue]:
    """The task's declared defaults with a run's overrides applied, each of its default's type.

    A ParamOverride from the command line is parsed as the default's type; every other value
    (a run file's TOML, a Python caller's) must have it already (an int is taken for a float).
    """
    params: dict[str, ParamValue] = dict(task.params)
    for key, given in overrides.items():
        override = given if isinstance(given, ParamOverride) else ParamOverride(given, "")
        if key not in task.params:
            known = ", ".join(sorted(task.params)) or "none"
            where = f" (from {override.source})" if override.source else ""
            raise TaskError(f"task {task.name!r} has no parameter {key!r}{where}; its parameters: {known}")
        params[key] = _typed(task, key, override.value, parse=override.text, source=override.source)
    return params


def check_params(task: Task, received: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
    """Parameters a client received from the server: exactly this task's, each of its type."""
    missing = sorted(set(task.params) - set(received))
    extra = sorted(set(received) - set(task.params))
    if missing or extra:
        raise TaskError(
            f"the server's parameters for task {task.name!r} do not match this client's task "
            f"(missing {missing or 'none'}, unknown {extra or 'none'}): are both sides on the same task file?"
        )
    return {key: _typed(task, key, value, parse=False) for key, value in received.items()}


def _typed(task: Task, key: str, value: Any, *, parse: bool, source: str = "") -> ParamValue:
    default = task.params[key]
    kind = type(default)
    where = f" from {source}" if source else ""
    problem = (
        f"task {task.name!r}: parameter {key!r} must be {type_name(kind)} "
        f"(its default is {default!r}), got {value!r}{where}"
    )
    if isinstance(value, str) and kind is not str and parse:
        return _parse(kind, value, problem)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise TaskError(f"{problem} ({type_name(type(value))})")
    return value


def _parse(kind: type, text: str, problem: str) -> ParamValue:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise TaskError(problem)
    try:
        return kind(text)  # type: ignore[no-any-return]
    except ValueError:
        raise TaskError(problem) from None


# -- calling the task's functions ------------------------------------------------------------


def call(loaded: LoadedTask, what: str, function: Callable[..., T], *args: Any) -> T:
    """Call one of the task's functions; anything it raises becomes a TaskError naming it."""
    try:
        return function(*args)
    except FedGrpcError as exc:  # ours, raised inside the task (LocalData's checks, data loaders)
        raise TaskError(f"task {loaded.name!r}: {what} failed: {exc}") from exc
    except Exception as exc:
        raise TaskError(f"task {loaded.name!r}: {what} failed: {describe(exc)}") from exc


def build_model(loaded: LoadedTask, params: Params) -> Any:
    """The task's model, checked: a compiled keras.Model with its weights built, or for a
    framework-free task anything whose get_weights gives a list of numpy arrays."""
    model = call(loaded, "build_model", loaded.task.build_model, params)
    if not loaded.task.uses_keras:
        get_weights(loaded, model)  # arrays the wire carries, or a TaskError now
        return model
    import keras

    if not isinstance(model, keras.Model):
        raise TaskError(
            f"task {loaded.name!r}: build_model returned {type(model).__name__}, not a keras.Model "
            "(a model of another framework needs the task's own get_weights and set_weights)"
        )
    if not model.built:
        raise TaskError(
            f"task {loaded.name!r}: build_model returned a model whose weights do not exist yet; "
            "give it an input shape (keras.Input(shape=...)) so both sides can agree on its weights"
        )
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", False):
        raise TaskError(
            f"task {loaded.name!r}: build_model must return a compiled model (call model.compile(...))"
        )
    return model


def get_weights(loaded: LoadedTask, model: Any) -> list[np.ndarray]:
    """The model's weights as numpy arrays, in their fixed order."""
    function = loaded.task.get_weights
    if function is None:
        return list(model.get_weights())
    weights = call(loaded, "get_weights", function, model)
    if not isinstance(weights, list | tuple) or not all(isinstance(w, np.ndarray) for w in weights):
        kinds = sorted({type(w).__name__ for w in weights}) if isinstance(weights, list | tuple) else None
        raise TaskError(
            f"task {loaded.name!r}: get_weights returned {type(weights).__name__}"
            f"{f' of {kinds}' if kinds else ''}, not a list of numpy arrays"
        )
    if not weights:
        raise TaskError(f"task {loaded.name!r}: get_weights returned no arrays; a model needs some")
    return list(weights)


def set_weights(loaded: LoadedTask, model: Any, weights: list[np.ndarray]) -> None:
    """Put `weights` (get_weights' order) into the model; ValueError when they do not fit it."""
    function = loaded.task.set_weights
    if function is None:
        model.set_weights(weights)
        return
    call(loaded, "set_weights", function, model, weights)


def weight_specs(loaded: LoadedTask, model: Any) -> list[TensorSpec]:
    """Name, dtype and shape of every weight, in get_weights order: what updates must match.
    A Keras weight is named by its path; a framework-free task's by its place, weights/0, ..."""
    if loaded.task.uses_keras:
        from .models import weight_specs as keras_weight_specs

        return keras_weight_specs(model)
    try:
        return [spec_of(f"weights/{i}", w) for i, w in enumerate(get_weights(loaded, model))]
    except FedGrpcError as exc:
        raise TaskError(
            f"task {loaded.name!r}: get_weights gave an array the wire cannot carry: {exc}"
        ) from None


def load_data(loaded: LoadedTask, site: Site) -> LocalData:
    data = call(loaded, "load_data", loaded.task.load_data, site)
    if not isinstance(data, LocalData):
        raise TaskError(
            f"task {loaded.name!r}: load_data returned {type(data).__name__}, not "
            "fedgrpc.common.task.LocalData(train=..., test=...)"
        )
    return data


def load_test_data(loaded: LoadedTask, site: Site) -> Dataset | None:
    function = loaded.task.load_test_data
    return None if function is None else call(loaded, "load_test_data", function, site)


def check_fits(
    loaded: LoadedTask, model: Any, dataset: Dataset, what: str, params: Params | None = None
) -> None:
    """Run the model on a couple of examples of `dataset`: shapes that do not fit fail here,
    with the task's name, before any round, rather than in the middle of one. A framework-free
    task is checked by its own evaluate, given `params`, when the dataset is an (x, y) pair."""
    sample = _sample(dataset)
    try:
        if not loaded.task.uses_keras:
            _check_own_evaluate(loaded, model, sample, params)
        elif isinstance(sample, tuple) and len(sample) == 2:
            model.evaluate(sample[0], sample[1], verbose=0)
        else:
            model.evaluate(sample, verbose=0, steps=1)
    except Exception as exc:
        source = "load_test_data" if what == "test set" else "load_data"
        raise TaskError(
            f"task {loaded.name!r}: the {what} from {source} does not fit the model from "
            f"build_model: {describe(exc)}"
        ) from exc


def _check_own_evaluate(loaded: LoadedTask, model: Any, sample: Any, params: Params | None) -> None:
    evaluate = loaded.task.evaluate
    if params is None or evaluate is None or not (isinstance(sample, tuple) and len(sample) == 2):
        return  # no sample to take (a dataset of its own kind), or no parameters to call it with
    evaluate(model, sample, RoundContext(round=0, params=params, batch_size=2, epochs=1))


def _sample(dataset: Dataset) -> Any:
    from .task import _split

    x, y = _split(dataset)
    if y is None:
        return dataset
    return (_head(x), _head(y))


def _head(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _head(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_head(item) for item in value]
    return value[:2]
