"""Per-round client settings: what each round's TRAIN tells the clients beside the weights.

Two sources, merged each round when it opens:

- the run file's `[rounds]` table, a schedule: a name and either one value for every round or
  a table "from round N on" (`learning_rate = {1 = 0.01, 5 = 0.005}`: 0.01 in rounds 1-4,
  0.005 from round 5 on; a name is not sent before its first step);
- the strategy's `round_settings(round) -> dict` hook, when it has one.

The run file wins over the strategy where both name a setting (it is the operator's word).
Every value is checked once, before round 1: the well-known names (WELL_KNOWN: learning_rate,
local_epochs, proximal_mu) against their declarations, any other name against the type of the
task's declared parameter of that name; a name neither knows is refused. The strategy's values
are checked the same way each round (a bad one fails the round's opening with a sentence).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import ParamValue
from ..common.errors import ConfigError
from ..common.settings import Setting, by_name
from ..common.words import type_name

#: The settings every task's default training understands (fedgrpc.common.task.fit_model).
WELL_KNOWN = (
    Setting("learning_rate", float, above=0, help="the optimizer's learning rate for the round"),
    Setting("local_epochs", int, low=1, help="epochs of local training in the round"),
    Setting("proximal_mu", float, low=0, help="FedProx's mu for the round (0: no proximal term)"),
)
_WELL_KNOWN = by_name(WELL_KNOWN)


@dataclass(frozen=True)
class RoundSchedule:
    """Each setting's steps, (first round, value), in round order."""

    steps: Mapping[str, tuple[tuple[int, ParamValue], ...]] = field(default_factory=dict)

    def at(self, round_number: int) -> dict[str, ParamValue]:
        """The values in force in `round_number`: each name's last step at or before it."""
        settings: dict[str, ParamValue] = {}
        for name, steps in self.steps.items():
            for first, value in steps:
                if first <= round_number:
                    settings[name] = value
        return settings

    def __bool__(self) -> bool:
        return bool(self.steps)


def schedule_from_table(table: Mapping[str, Any], source: str) -> RoundSchedule:
    """A run file's [rounds] table as a schedule, its shape checked (types come later, once the
    task's parameters are known: `checked_schedule`)."""
    steps: dict[str, tuple[tuple[int, ParamValue], ...]] = {}
    for name, given in table.items():
        where = f"{source}: [rounds] {name}"
        if isinstance(given, Mapping):
            if not given:
                raise ConfigError(f"{where} is an empty table; write {{1 = value}} or a plain value")
            pairs = sorted((_round_of(key, where), value) for key, value in given.items())
        else:
            pairs = [(1, given)]
        for _, value in pairs:
            if not isinstance(value, bool | int | float | str):
                raise ConfigError(
                    f"{where} holds {value!r} ({type_name(type(value))}); a setting is a boolean, "
                    "a number or a string"
                )
        steps[name] = tuple(pairs)
    return RoundSchedule(steps)


def _round_of(key: str, where: str) -> int:
    try:
        number = int(key)
    except ValueError:
        number = 0
    if number < 1 or str(number) != key.strip():
        raise ConfigError(f"{where}: {key!r} is not a round number (1, 2, ...): write {{1 = 0.01, 5 = 0.5}}")
    return number


def check_setting(name: str, value: Any, task_params: Mapping[str, ParamValue], where: str) -> ParamValue:
    """One setting's value, of its declared type (an int is taken for a float), in range."""
    setting = _WELL_KNOWN.get(name)
    if setting is not None:
        checked: ParamValue = setting.check(value, where)
        return checked
    if name not in task_params:
        known = ", ".join([*_WELL_KNOWN, *sorted(task_params)])
        raise ConfigError(
            f"{where}: {name!r} is not a round setting; known: {known} (a task declares more in Task.params)"
        )
    kind = type(task_params[name])
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(
            f"{where} must be {type_name(kind)} (the task's parameter {name!r} is), got {value!r}"
        )
    checked_value: ParamValue = value
    return checked_value


def checked_schedule(schedule: RoundSchedule, task_params: Mapping[str, ParamValue]) -> RoundSchedule:
    """The schedule with every value checked against its declaration: refused before round 1."""
    return RoundSchedule(
        {
            name: tuple(
                (first, check_setting(name, value, task_params, f"[rounds] {name} (from round {first})"))
                for first, value in steps
            )
            for name, steps in schedule.steps.items()
        }
    )


#: The strategy protocol's tensors that go down with a TRAIN: (spec, array) pairs.
Extras = Sequence[tuple[TensorSpec, np.ndarray]]


class RoundPlan:
    """What a round's TRAIN carries beside the weights: its settings and the strategy's extras."""

    def __init__(
        self,
        schedule: RoundSchedule | None = None,
        strategy: object = None,
        task_params: Mapping[str, ParamValue] | None = None,
    ) -> None:
        self._task_params = dict(task_params or {})
        self._schedule = checked_schedule(schedule or RoundSchedule(), self._task_params)
        inner = getattr(strategy, "inner", strategy)  # under secure aggregation, the one inside
        self._hook: Callable[[int], Mapping[str, Any]] | None = getattr(inner, "round_settings", None)
        self._extras: Callable[[], Extras] | None = getattr(inner, "round_tensors", None)

    def settings(self, round_number: int) -> dict[str, ParamValue]:
        merged: dict[str, ParamValue] = {}
        if self._hook is not None:
            for name, value in (self._hook(round_number) or {}).items():
                where = f"the strategy's round_settings({round_number})[{name!r}]"
                merged[name] = check_setting(name, value, self._task_params, where)
        merged.update(self._schedule.at(round_number))
        return merged

    def extras(self) -> Extras:
        return tuple(self._extras()) if self._extras is not None else ()
