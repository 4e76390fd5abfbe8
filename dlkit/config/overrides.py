"""Config keys, their types, and `--set key=value` overrides.

    from dlkit import config as config_lib
    cfg = config_lib.Config()
    config_lib.set_value(cfg, "train.steps", "200")        # converted to the key's type: 200
    config_lib.apply_overrides(cfg, ["optim.learning_rate=3e-3", "model.name=cnn"])
    config_lib.valid_keys(cfg)                            # every key that `--set` accepts

A key is `name`, `<section>.<field>` for a section dataclass, or `model.<field>` for a field of
the Flax module named by `model.name`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from dlkit import errors, models

# A `dlkit.config.sections.Config`, read and written by attribute: `sections` imports this
# module (for `Config.from_dict` and the model options' checks), so this one cannot import it.
_Config = Any

_SECTIONS = ("data", "loss", "optim", "train", "parallel", "checkpoint")


def model_fields(model_name: str) -> dict[str, Any]:
    """The configurable fields of the Flax module `model_name`, with their types."""
    module_cls = models.get_model_class(model_name)
    hints = typing.get_type_hints(module_cls)
    return {
        f.name: hints.get(f.name, Any)
        for f in dataclasses.fields(module_cls)
        if f.name not in ("parent", "name") and f.init
    }


def valid_keys(cfg: _Config) -> list[str]:
    """Every key accepted by `set_value` / `--set` for this config (model keys depend on it)."""
    keys = ["name"]
    for section in _SECTIONS:
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(getattr(cfg, section))]
    keys.append("model.name")
    try:
        keys += [f"model.{k}" for k in model_fields(cfg.model.name)]
    except errors.ConfigError:
        pass
    return keys


def _key_type(cfg: _Config, key: str) -> Any:
    parts = key.split(".")
    if key == "name":
        return str
    if len(parts) == 2 and parts[0] == "model":
        if parts[1] == "name":
            return str
        fields = model_fields(cfg.model.name)
        if parts[1] in fields:
            return fields[parts[1]]
    elif len(parts) == 2 and parts[0] in _SECTIONS:
        section = getattr(cfg, parts[0])
        hints = typing.get_type_hints(type(section))
        if parts[1] in hints:
            return hints[parts[1]]
    raise errors.ConfigError(
        f"unknown config key {key!r}. Valid keys:\n  " + "\n  ".join(valid_keys(cfg))
    )


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Converts `value` (a Python value, or a string from the command line) to `typ`."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is Any:
        return _parse_literal(value) if isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except errors.ConfigError:
                pass  # the next type of the union may accept it
        raise errors.ConfigError(f"{key}: expected {type_name(typ)}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            value = (
                _parse_literal(text)
                if text.startswith(("[", "("))
                else ([v for v in text.split(",") if v.strip()] if text else [])
            )
        if not isinstance(value, list | tuple):
            raise errors.ConfigError(f"{key}: expected {type_name(typ)}, got {value!r}")
        item_type = args[0] if args else Any
        items = [coerce(key, v, item_type) for v in value]
        return tuple(items) if origin is tuple else items
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise errors.ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise errors.ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise errors.ConfigError(f"{key}: expected an int, got {value!r}")
    if typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise errors.ConfigError(f"{key}: expected a float, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise errors.ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(value, typ):
        return value
    raise errors.ConfigError(f"{key}: expected {type_name(typ)}, got {value!r}")


def type_name(typ: Any) -> str:
    return getattr(typ, "__name__", None) or str(typ).replace("typing.", "")


def _parse_literal(text: str) -> Any:
    try:
        return json.loads(text.replace("(", "[").replace(")", "]"))
    except json.JSONDecodeError:
        return text


def set_value(cfg: _Config, key: str, value: Any) -> None:
    """Sets `key` (e.g. "train.steps") on `cfg` in place, converting `value` to the key's type.

    Raises:
      ConfigError: unknown key (the message lists the valid keys) or a value of the wrong type.
    """
    typ = _key_type(cfg, key)
    value = coerce(key, value, typ)
    if key == "name":
        cfg.name = value
        return
    section, field = key.split(".")
    if section == "model":
        if field == "name":
            if value != cfg.model.name:
                model_fields(value)  # validates the name
                cfg.model = type(cfg.model)(name=value)
        else:
            cfg.model.options[field] = value
    else:
        setattr(getattr(cfg, section), field, value)


def apply_overrides(cfg: _Config, overrides: typing.Iterable[str]) -> _Config:
    """Applies "key=value" strings (the CLI's `--set`) in order, in place; returns `cfg`."""
    for item in overrides:
        if "=" not in item:
            raise errors.ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value.strip())
    return cfg


def jsonable(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    return x
