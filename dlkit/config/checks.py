"""Checks of single config values, shared by the sections' `check()` and `Config.validate`:
types, finiteness, ranges and choices, each raising a ConfigError that names the key, what it
expects and what it got."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from dlkit import errors

SCALAR_TYPES = (bool, int, float, str)


def field_types(section: Any, prefix: str) -> None:
    """Each field of a section dataclass holds a value of its annotated type; floats are finite.

    `set_value` converts what it is given, but a config built in Python (an experiment's
    `config()`, a notebook) is not converted, and a NaN passes every range check.
    """
    hints = typing.get_type_hints(type(section))
    for field in dataclasses.fields(section):
        key, value, typ = f"{prefix}.{field.name}", getattr(section, field.name), hints[field.name]
        if typ not in SCALAR_TYPES:
            continue
        if typ is bool and not isinstance(value, bool):
            raise errors.ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
        if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise errors.ConfigError(f"{key}: expected an int, got {value!r}")
        if typ is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise errors.ConfigError(f"{key}: expected a float, got {value!r}")
        if typ is str and not isinstance(value, str):
            raise errors.ConfigError(f"{key}: expected a string, got {value!r}")
        finite(key, value)


def finite(key: str, value: Any) -> None:
    """A float (or a float in a list or tuple) must be finite: NaN or Inf in a learning rate,
    a decay or a factor would turn every update into NaN or silently switch a feature off."""
    if isinstance(value, list | tuple):
        for item in value:
            finite(key, item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise errors.ConfigError(f"{key}: expected a finite float, got {value}")


def positive(values: dict[str, int]) -> None:
    for key, value in values.items():
        if value <= 0:
            raise errors.ConfigError(f"{key}: expected a positive int, got {value}")


def non_negative(values: dict[str, int]) -> None:
    for key, value in values.items():
        if value < 0:
            raise errors.ConfigError(f"{key}: expected an int >= 0, got {value}")


def choices(values: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    for key, (value, allowed) in values.items():
        if value not in allowed:
            raise errors.ConfigError(f"{key}: expected one of {' | '.join(allowed)}, got {value!r}")


def metric_mode(metric: str, mode: str, key: str) -> str:
    """`"min"` or `"max"`: `mode` itself, or for "auto" what the metric's name says. A name that
    says neither is an error rather than a guess: a wrong guess returns the worst model as
    the best.

    Args:
      metric: e.g. "eval/accuracy".
      mode: "min", "max" or "auto".
      key: the setting, for the error ("train.early_stopping_mode").
    Raises:
      ConfigError: "auto" for a metric whose name has no loss, error or accuracy in it.
    """
    if mode != "auto":
        return mode
    name = metric.rsplit("/", 1)[-1].lower()
    if "loss" in name or "error" in name:
        return "min"
    if "acc" in name:
        return "max"
    raise errors.ConfigError(
        f"{key}: expected min or max for {metric!r} (auto tells only loss, error and accuracy "
        f"metrics apart), got auto"
    )
