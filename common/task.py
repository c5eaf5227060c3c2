"""Your own federated task: the model, how each site loads its data, how it trains and evaluates.

A task is the one thing a user writes. The smallest is a model builder and a data loader::

    import keras
    from fedgrpc.common.task import LocalData, Site, Task

    def build_model(params):
        model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer=keras.optimizers.Adam(params["learning_rate"]),
                      loss="binary_crossentropy", metrics=["accuracy"])
        return model

    def load_data(site: Site) -> LocalData:
        x, y = read_my_files(site.data)        # whatever this site keeps, however it keeps it
        return LocalData(train=(x[:-50], y[:-50]), test=(x[-50:], y[-50:]))

    task = Task("my-task", build_model, load_data, params={"learning_rate": 1e-3})

Run it with `fl-server --task my_task.py` and `fl-client --task my_task.py --data ...`. The same
file must be on both sides: the server tells clients the task's name and a digest of the file
that defines it, and refuses a client whose task differs. Code never travels: each side runs
only the task file its own operator gave it.

A task need not use Keras. Give `get_weights` and `set_weights` (the model's weights as numpy
arrays, out and in) with your own `train` and `evaluate`, and the model is whatever your
`build_model` returns: a torch.nn.Module, a few numpy arrays, anything. fedgrpc then never
imports Keras or TensorFlow for it, on the server or on a site (examples/pytorch).

What each function gets and when it runs:

| function                   | where  | when                                   | default                     |
|----------------------------|--------|----------------------------------------|-----------------------------|
| `build_model(params)`      | both   | once at start: a compiled keras.Model, | (required)                  |
|                            |        | or any model (with get/set_weights)    |                             |
| `load_data(site)`          | client | once at start: this site's LocalData   | (required)                  |
| `load_test_data(site)`     | server | once at start: a central test set      | none: federated evaluation  |
| `train(model, data, ctx)`  | client | each round, from the global weights    | `fit_model` (Keras)         |
| `evaluate(model, data, ctx)`| both  | after rounds, on held-out data         | `evaluate_model` (Keras)    |
| `partition_labels(site)`   | server | once at start: labels of a stand-in    | no partition summary        |
|                            |        | dataset, for the partition summary     |                             |
| `get_weights(model)`       | both   | after build_model and each train: the  | `model.get_weights()`       |
|                            |        | model's weights, a list of numpy arrays| (Keras)                     |
| `set_weights(model, ws)`   | both   | before each train and evaluate: the    | `model.set_weights(ws)`     |
|                            |        | global weights, in get_weights' order  | (Keras)                     |

`params` are the task's own settings: their defaults and types are declared in `Task.params`,
a run may override them (`[task]` in `fl-server --config run.toml`, or `--param key=value`),
and the server sends them to every client, so both sides build the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ParamValue
from .errors import TaskError
from .words import type_name

if TYPE_CHECKING:
    import keras

__all__ = [
    "Dataset",
    "GetWeights",
    "LocalData",
    "ParamValue",
    "Params",
    "RoundContext",
    "SetWeights",
    "Site",
    "Task",
    "apply_settings",
    "evaluate_model",
    "fit_model",
]

#: A task's parameters, typed by the task's declared defaults.
Params = Mapping[str, ParamValue]

#: What `load_data` may return for a split: arrays `(x, y)` (x and y may also be lists or dicts
#: of arrays, for models with several inputs or outputs), or anything `keras.Model.fit` takes
#: as its only input, such as a tf.data.Dataset or keras.utils.PyDataset yielding batches.
#: A framework-free task's splits are whatever its own train and evaluate take.
Dataset = Any


@dataclass(frozen=True)
class LocalData:
    """One site's data: what it trains on and, optionally, what it evaluates on.

    `num_examples` is what this site's updates weigh in FedAvg, and `num_test_examples` what
    its evaluations weigh; each is counted from its split when that is an `(x, y)` pair of
    arrays, and must be given for other kinds of dataset.
    """

    train: Dataset
    test: Dataset | None = None
    num_examples: int | None = None
    num_test_examples: int | None = None

    def __post_init__(self) -> None:
        if self.num_examples is None:
            object.__setattr__(self, "num_examples", count_examples(self.train))
        if self.num_examples is None:
            raise TaskError(
                "LocalData.train is not an (x, y) pair of arrays, so give num_examples: how many "
                "examples one pass over it holds"
            )
        if self.num_examples <= 0:
            raise TaskError(f"LocalData has {self.num_examples} training examples; a site needs some")
        if self.test is None:
            return
        if self.num_test_examples is None:
            object.__setattr__(self, "num_test_examples", count_examples(self.test))
        if self.num_test_examples is None:
            raise TaskError(
                "LocalData.test is not an (x, y) pair of arrays, so give num_test_examples: how many "
                "examples it holds"
            )
        if self.num_test_examples <= 0:
            raise TaskError("LocalData.test holds no examples; leave it out (None) instead")


@dataclass(frozen=True)
class Site:
    """What a client knows about itself when it loads its data.

    `data` is the client's `--data` as its operator gave it (a path, a URL, a table name: the
    task decides what it means). For stand-in federations cut from one dataset (demos,
    benchmarks), `shard` gives this site's part under the run's partitioning.
    """

    client_id: int
    num_clients: int
    data: str | None
    params: Params
    batch_size: int = 32  # the run's (for a task that batches its own input pipeline)
    partition_seed: int = 0
    partition: str = "iid"

    def shard(self, x: Any, y: np.ndarray, *more: Any) -> tuple[Any, ...]:
        """This site's examples of (x, y, *more) under the run's partitioning (seeded, computed
        here from the run spec alone). `y` holds the labels (class ids or one-hot rows)."""
        from .partition import partition_indices

        indices = partition_indices(
            _labels(y), self.num_clients, self.client_id - 1, self.partition_seed, self.partition
        )
        return tuple(_take(a, indices) for a in (x, y, *more))


@dataclass(frozen=True)
class RoundContext:
    """What `train` and `evaluate` know about the round they run in.

    `settings`: the round's client settings, as the server's [rounds] schedule or strategy sent
    them (learning_rate, local_epochs, proximal_mu, or any name of Task.params); `epochs` and
    `proximal_mu` already hold theirs, and `fit_model` applies learning_rate (`apply_settings`).
    `state`: the site's state store for this run (fedgrpc.client.state.StateStore; None where
    there is none), arrays kept on the site's disk across rounds and restarts, never sent."""

    round: int
    params: Params
    batch_size: int
    epochs: int
    proximal_mu: float = 0.0  # FedProx's mu: already applied through the model's optimizer
    settings: Params = field(default_factory=dict)
    state: Any = None


TrainFunction = Callable[[Any, LocalData, RoundContext], Mapping[str, float] | None]
EvaluateFunction = Callable[[Any, Dataset, RoundContext], Mapping[str, float]]
#: A model's weights as numpy arrays, always in the same order (what travels and is averaged).
GetWeights = Callable[[Any], Sequence[np.ndarray]]
#: Puts weights, in GetWeights' order, into the model.
SetWeights = Callable[[Any, list[np.ndarray]], None]


@dataclass(frozen=True)
class Task:
    """What is federated. Only `name`, `build_model` and `load_data` are required.

    `main_metric` names the metric that round lines, curves and personalization report
    (default: "accuracy" when the model has it, else "loss").

    With `get_weights` and `set_weights` the task is framework-free: its model is whatever
    `build_model` returns, so it must bring its own `train` and `evaluate` too, and its train
    applies FedProx itself (`ctx.proximal_mu`; the weights it starts from are the global ones).
    """

    name: str
    build_model: Callable[[Params], keras.Model | Any]
    load_data: Callable[[Site], LocalData]
    load_test_data: Callable[[Site], Dataset | None] | None = None
    train: TrainFunction | None = None
    evaluate: EvaluateFunction | None = None
    partition_labels: Callable[[Site], np.ndarray] | None = None
    params: Params = field(default_factory=dict)
    main_metric: str | None = None
    get_weights: GetWeights | None = None
    set_weights: SetWeights | None = None

    @property
    def uses_keras(self) -> bool:
        """Whether fedgrpc handles the model as a keras.Model (False: a framework-free task)."""
        return self.get_weights is None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise TaskError("a task needs a name (Task(name=...))")
        for what in ("build_model", "load_data"):
            if not callable(getattr(self, what)):
                raise TaskError(f"task {self.name!r}: {what} must be a function")
        hooks = ("load_test_data", "train", "evaluate", "partition_labels", "get_weights", "set_weights")
        for what in hooks:
            value = getattr(self, what)
            if value is not None and not callable(value):
                raise TaskError(f"task {self.name!r}: {what} must be a function or None")
        self._check_framework_free()
        for key, value in self.params.items():
            if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
                raise TaskError(
                    f"task {self.name!r}: parameter {key!r} has a default of type {type(value).__name__}; "
                    "parameters are bool, int, float or str"
                )

    def _check_framework_free(self) -> None:
        """get_weights and set_weights come together, and then train and evaluate with them:
        the defaults of those two are Keras'."""
        if (self.get_weights is None) != (self.set_weights is None):
            given, absent = ("get_weights", "set_weights")
            if self.get_weights is None:
                given, absent = absent, given
            raise TaskError(f"task {self.name!r} gives {given} but no {absent}: give both, or neither")
        if self.uses_keras:
            return
        missing = [what for what in ("train", "evaluate") if getattr(self, what) is None]
        if missing:
            raise TaskError(
                f"task {self.name!r} has its own get_weights and set_weights, so its model is not a "
                f"keras.Model: give {' and '.join(missing)} too (the defaults call Keras)"
            )

    def __repr__(self) -> str:
        hooks = [h for h in ("load_test_data", "train", "evaluate") if getattr(self, h) is not None]
        framework = "" if self.uses_keras else ", framework-free"
        return f"Task({self.name!r}, params={dict(self.params)!r}, hooks={hooks}{framework})"


def apply_settings(model: keras.Model, ctx: RoundContext) -> None:
    """The round's learning_rate setting, if sent, into the model's optimizer (a task's own
    `train` may call it too). The optimizer is put back to its compiled state before each round,
    so a round without the setting trains at the compiled learning rate."""
    rate = ctx.settings.get("learning_rate")
    if rate is not None and not isinstance(rate, bool | str):
        model.optimizer.learning_rate = float(rate)


def fit_model(model: keras.Model, data: LocalData, ctx: RoundContext) -> dict[str, float]:
    """The default training: `ctx.epochs` epochs of `model.fit` on `data.train`, shuffled,
    returning the last epoch's metrics; the round's learning_rate setting applied first."""
    apply_settings(model, ctx)
    x, y = _split(data.train)
    kwargs: dict[str, Any] = {"epochs": ctx.epochs, "verbose": 0}
    if y is not None or _is_array_input(x):
        kwargs.update(batch_size=ctx.batch_size, shuffle=True)
    history = model.fit(x, y, **kwargs)
    return {name: float(values[-1]) for name, values in history.history.items()}


def evaluate_model(model: keras.Model, data: Dataset, ctx: RoundContext) -> dict[str, float]:
    """The default evaluation: `model.evaluate` on `data`, every compiled metric by name."""
    x, y = _split(data)
    kwargs: dict[str, Any] = {"verbose": 0, "return_dict": True}
    if y is not None or _is_array_input(x):
        kwargs["batch_size"] = max(ctx.batch_size, 256)
    result = model.evaluate(x, y, **kwargs)
    return {name: float(value) for name, value in result.items()}


# -- helpers ----------------------------------------------------------------------------


def count_examples(dataset: Dataset) -> int | None:
    """Examples in an (x, y) pair of arrays (lists and dicts of arrays too); None for others."""
    x, y = _split(dataset)
    if y is None:
        return None
    lengths = {len(a) for a in _leaves(x)} | {len(a) for a in _leaves(y)}
    if len(lengths) != 1:
        raise TaskError(f"the arrays of a dataset differ in length: {sorted(lengths)}")
    return lengths.pop()


def _split(dataset: Dataset) -> tuple[Any, Any]:
    if isinstance(dataset, tuple) and len(dataset) == 2:
        return dataset[0], dataset[1]
    return dataset, None


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    else:
        if not hasattr(value, "__len__"):
            raise TaskError(f"a dataset holds {type_name(type(value))} where arrays were expected")
        yield value


def _is_array_input(x: Any) -> bool:
    return isinstance(x, np.ndarray | list | dict)


def _labels(y: Any) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim == 2 and labels.shape[1] > 1:  # one-hot
        labels = np.argmax(labels, axis=1)
    return labels.reshape(len(labels))


def _take(array: Any, indices: np.ndarray) -> Any:
    if isinstance(array, Mapping):
        return {key: _take(value, indices) for key, value in array.items()}
    if isinstance(array, list):
        return [_take(value, indices) for value in array]
    return np.asarray(array)[indices]
