"""Typed run configuration, `--set key=value` overrides, and loading experiments.

A run is described by one `Config`: nested dataclasses, one per concern. Experiments are
Python files `experiments/<name>.py` with a `config()` function returning a `Config`.

    import dlkit
    cfg = dlkit.load_config("digits_mlp", overrides=["train.steps=200", "optim.learning_rate=3e-3"])
    cfg.train.steps            # 200
    dlkit.config.valid_keys(cfg)  # every key that `--set` accepts

Model hyperparameters are the fields of the Flax module itself (`dlkit.models.MLP.hidden_sizes`),
so `model.<field>` keys are checked against the module named by `model.name`: there is one place
that defines a model's options and their defaults.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import types
import typing
from typing import Any

# --------------------------------------------------------------------------------------------
# The configuration tree.


@dataclasses.dataclass
class DataConfig:
    name: str = "digits"  # dataset: digits | fashion_mnist | text | kjv
    data_dir: str = ""  # directory with the dataset's files; "" = the dataset's default search
    path: str = ""  # text only: the UTF-8 file to model, character by character
    seq_len: int = 256  # text and kjv: characters per example
    eval_split: str = "test"  # split evaluated periodically and by `dlkit eval`
    shuffle: bool = True  # shuffle training batches, by (seed, epoch)
    last_batch: str = "drop"  # training loader's last partial batch: drop | pad
    prefetch: int = -1  # batches a thread stages ahead of the step (0 = none: the loop reads
    #   the loader itself); -1 = auto: 2, but 0 on CPU with one process and one step per call,
    #   where no batch is copied to a device and the thread's hand-off cost the bench MLP 5-7%
    on_device: bool = False  # hold the training set on the device(s) and gather each step's
    #   rows there from the indices the loader sends (jit strategy, one process, in-memory
    #   arrays); for accelerators: on CPU it was 0.97x (dlkit.loop._data_on_device)
    validate: str = "error"  # input checks before compiling (labels, shapes, NaN/Inf):
    #                          error | warn | off
    audit: str = "warn"  # data audit before compiling (duplicates, leakage, conflicting
    #   labels, NaN/Inf; dlkit.data.audit): warn | fail (raise on errors) | off
    audit_max_examples: int = 200_000  # audit: per split, above this a random sample is audited
    train_examples: int = 0  # use only the first N training examples; 0 = all
    validation_examples: int = 0  # hold out the last N of the train split (never trained on)
    #   as the split "validation" (set eval_split=validation to watch it); 0 = none
    # Augmentation inside the compiled train step (dlkit.data.augment; images only):
    random_crop_padding: int = 0  # zero-pad by N pixels per side, then crop back; 0 = off
    horizontal_flip: bool = False  # mirror left-right with probability 1/2 (not for digits)
    mixup_alpha: float = 0.0  # mixup with Beta(alpha, alpha) weights; 0 = off
    cutmix_alpha: float = 0.0  # cutmix with Beta(alpha, alpha) areas; 0 = off


@dataclasses.dataclass
class ModelConfig:
    """`name` picks a module from `dlkit.models`; `options` are that module's fields."""

    name: str = "mlp"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LossConfig:
    name: str = "softmax_cross_entropy"  # softmax_cross_entropy | squared_error
    label_smoothing: float = 0.0  # softmax_cross_entropy only; 0 = hard labels


@dataclasses.dataclass
class OptimConfig:
    name: str = "adam"  # sgd | momentum | adam | adamw
    learning_rate: float = 1e-3  # peak learning rate
    schedule: str = "constant"  # constant | warmup_cosine | warmup_linear
    warmup_steps: int = 0  # linear warm-up from 0 to the peak (all schedules)
    end_learning_rate_factor: float = 0.0  # final rate as a fraction of the peak (decays)
    momentum: float = 0.9  # momentum only
    b1: float = 0.9  # adam/adamw
    b2: float = 0.999  # adam/adamw
    eps: float = 1e-8  # adam/adamw
    weight_decay: float = 0.0  # decoupled for adamw, added to the gradient otherwise; skips
    #                            biases and normalisation scales
    grad_clip_norm: float = 0.0  # clip gradients to this global norm; 0 = off


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in the run
    batch_size: int = 128  # global batch size, over all devices and processes
    seed: int = 0  # seeds the init, dropout and data order
    log_every: int = 100  # fetch, print and write train metrics every N steps
    eval_every: int = 500  # evaluate every N steps (and always at the end); 0 = only at the end
    eval_batch_size: int = 0  # 0 = same as batch_size
    progress: bool = True  # show a progress bar
    nan_policy: str = "raise"  # non-finite loss/gradients: raise | skip (the update is never
    #                            applied either way; see dlkit.nonfinite)
    max_consecutive_nonfinite: int = 10  # skip: stop after this many skipped steps in a row
    loss_spike_factor: float = 0.0  # skip updates whose loss > factor x running mean; 0 = off
    precision: str = "float32"  # float32 | bfloat16 | float16 (dynamic loss scaling): the
    #   compute dtype; params and optimizer state stay float32
    grad_accum_steps: int = 1  # micro-batches per step, summed inside the compiled step
    compilation_cache_dir: str = ""  # JAX persistent compilation cache directory; "" = off
    xla_cpu_ynn_fusions: str = "individual_dot,reduce"  # CPU: what XLA may hand to YNNPACK:
    #   a comma list of dot | eltwise | individual_convolution | individual_dot | reduce,
    #   none, or xla (XLA's default); convolutions stay XLA's (dlkit.parallel, performance.md)
    xla_cpu_vector_width: int = 0  # CPU: SIMD bits XLA's own kernels prefer: 128 | 256 |
    #   512; 0 = auto (512 on AMD CPUs with AVX-512, else XLA's 256); -1 = no option passed
    fast_dev_run: bool = False  # 1 train step, 1 eval batch, 1 checkpoint saved and restored,
    #   then stop (dlkit.debugging); into a temporary directory when there is no workdir
    overfit_batches: int = 0  # train (and evaluate) on the first N batches only, unshuffled;
    #   0 = off (dlkit.debugging)
    summary: bool = True  # print the model summary at the start; WORKDIR/summary.txt
    tensorboard: bool = False  # also write TensorBoard event files to WORKDIR/tensorboard/
    plots: bool = True  # write WORKDIR/curves.png at the end of a run (needs matplotlib)
    ema_decay: float = 0.0  # keep an EMA of the weights (e.g. 0.999) and evaluate on it; 0 = off
    early_stopping_metric: str = ""  # e.g. eval/loss; stop when it stops improving; "" = off
    early_stopping_mode: str = "min"  # min | max: whether lower or higher is better
    early_stopping_patience: int = 5  # evaluations without improvement before stopping
    early_stopping_min_delta: float = 0.0  # an improvement must beat the best by more than this
    diagnosis: bool = True  # at the end, print and save diagnosis.json (dlkit.diagnosis)
    steps_per_dispatch: int = 1  # K optimizer steps per compiled call (lax.scan over K
    #   batches); steps and every cadence must be multiples of K (see dlkit.dispatch)
    scan_unroll: int = 0  # K > 1: steps per iteration of the compiled K-step loop; must
    #   divide K; 0 = auto: the largest divisor of K up to 10 (see dlkit.dispatch)


@dataclasses.dataclass
class ParallelConfig:
    strategy: str = "jit"  # jit (a Mesh with NamedSharding) | pmap (mapped over local devices)
    num_devices: int = 0  # devices to use; 0 = all local devices
    sync_every_step: str = "auto"  # auto | true | false: wait for each step before the next.
    #   auto = true on CPU with several devices, where queued collectives can deadlock.
    param_sharding: str = "replicated"  # replicated | fsdp: split params and optimizer state
    #   over the devices by their largest divisible dimension (jit only)
    fsdp_min_size: int = 1024  # fsdp: arrays with fewer elements than this stay replicated
    barrier_timeout_s: float = 600.0  # multi-host: how long a process waits for the others


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 500  # save every N steps (and always at the end); 0 = only at the end
    max_to_keep: int = 3  # keep the newest N checkpoints
    async_save: bool = True  # write in the background; always waited for before returning
    keep_best: int = 0  # also keep the best N steps by best_metric (0 = off)
    best_metric: str = "eval/loss"  # metric ranking steps for keep_best
    best_mode: str = "min"  # min | max
    archive_mismatched: bool = False  # a workdir holding another experiment's checkpoints:
    #   False = refuse to start; True = move them to checkpoints.archived-<time>/ and start over
    init_from: str = ""  # fine-tuning: initialise params (and model_state) of a fresh run from a
    #   dlkit workdir, a dlkit step directory or an Orbax PyTree directory; "" = off
    init_from_map: str = ""  # "REGEX=REPLACEMENT;..." renames of the saved leaves' paths
    #   (e.g. params/Dense_0/kernel) to this model's; an empty replacement drops a leaf


@dataclasses.dataclass
class Config:
    name: str = "unnamed"  # experiment name, recorded in the workdir
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `model` is flattened to `{"name": ..., <option>: ...}`."""
        out = dataclasses.asdict(self)
        out["model"] = {"name": self.model.name, **_jsonable(self.model.options)}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of `to_dict` (e.g. a workdir's config.json); values are type-checked."""
        cfg = cls()
        for key, value in d.items():
            if key == "model":
                value = dict(value)
                cfg.model = ModelConfig(name=value.pop("name", "mlp"))
                for opt, v in value.items():
                    set_value(cfg, f"model.{opt}", v)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    set_value(cfg, f"{key}.{sub}", v)
            else:
                set_value(cfg, key, value)
        return cfg


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    return x


class ConfigError(ValueError):
    """A bad key or value in a configuration or an override."""


# --------------------------------------------------------------------------------------------
# Keys, types and overrides.

_SECTIONS = ("data", "loss", "optim", "train", "parallel", "checkpoint")


def _model_fields(model_name: str) -> dict[str, Any]:
    """The configurable fields of the Flax module `model_name`, with their types."""
    from dlkit import models  # imported here: config is read at the edges, models import flax

    module_cls = models.get_model_class(model_name)
    hints = typing.get_type_hints(module_cls)
    return {
        f.name: hints.get(f.name, Any)
        for f in dataclasses.fields(module_cls)
        if f.name not in ("parent", "name") and f.init
    }


def valid_keys(cfg: Config) -> list[str]:
    """Every key accepted by `set_value` / `--set` for this config (model keys depend on it)."""
    keys = ["name"]
    for section in _SECTIONS:
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(getattr(cfg, section))]
    keys.append("model.name")
    try:
        keys += [f"model.{k}" for k in _model_fields(cfg.model.name)]
    except ConfigError:
        pass
    return keys


def _key_type(cfg: Config, key: str) -> Any:
    parts = key.split(".")
    if key == "name":
        return str
    if len(parts) == 2 and parts[0] == "model":
        if parts[1] == "name":
            return str
        fields = _model_fields(cfg.model.name)
        if parts[1] in fields:
            return fields[parts[1]]
    elif len(parts) == 2 and parts[0] in _SECTIONS:
        section = getattr(cfg, parts[0])
        hints = typing.get_type_hints(type(section))
        if parts[1] in hints:
            return hints[parts[1]]
    raise ConfigError(f"unknown config key {key!r}. Valid keys:\n  " + "\n  ".join(valid_keys(cfg)))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Converts `value` (a Python value, or a string from the command line) to `typ`."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is Any:
        return _parse_literal(value) if isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(typ)}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            value = (
                _parse_literal(text)
                if text.startswith(("[", "("))
                else ([v for v in text.split(",") if v.strip()] if text else [])
            )
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_type_name(typ)}, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(key, v, item_type) for v in value]
        return tuple(items) if origin is tuple else items
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(value, typ):
        return value
    raise ConfigError(f"{key}: expected {_type_name(typ)}, got {value!r}")


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", None) or str(typ).replace("typing.", "")


def _parse_literal(text: str) -> Any:
    try:
        return json.loads(text.replace("(", "[").replace(")", "]"))
    except json.JSONDecodeError:
        return text


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Sets `key` (e.g. "train.steps") on `cfg` in place, converting `value` to the key's type.

    Raises:
      ConfigError: unknown key (the message lists the valid keys) or a value of the wrong type.
    """
    typ = _key_type(cfg, key)
    value = _coerce(key, value, typ)
    if key == "name":
        cfg.name = value
        return
    section, field = key.split(".")
    if section == "model":
        if field == "name":
            if value != cfg.model.name:
                _model_fields(value)  # validates the name
                cfg.model = ModelConfig(name=value)
        else:
            cfg.model.options[field] = value
    else:
        setattr(getattr(cfg, section), field, value)


def apply_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """Applies "key=value" strings (the CLI's `--set`) in order, in place; returns `cfg`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value.strip())
    return cfg


# --------------------------------------------------------------------------------------------
# Experiments.


def experiment_dirs() -> list[pathlib.Path]:
    """Where experiment names are looked up, in order."""
    dirs = []
    if os.environ.get("DLKIT_EXPERIMENTS_DIR"):
        dirs.append(pathlib.Path(os.environ["DLKIT_EXPERIMENTS_DIR"]))
    # The repository's experiments/ next to the package (an editable install), then the cwd's.
    dirs.append(pathlib.Path(__file__).resolve().parent.parent / "experiments")
    dirs.append(pathlib.Path.cwd() / "experiments")
    seen, out = set(), []
    for d in dirs:
        if d.resolve() not in seen and d.is_dir():
            seen.add(d.resolve())
            out.append(d)
    return out


def find_experiment(name_or_path: str) -> pathlib.Path:
    """Resolves an experiment name (`digits_mlp`) or a path to a .py file."""
    path = pathlib.Path(name_or_path)
    if path.suffix == ".py":
        if not path.is_file():
            raise ConfigError(f"experiment: no such file {str(path)!r}")
        return path
    for d in experiment_dirs():
        candidate = d / f"{name_or_path}.py"
        if candidate.is_file():
            return candidate
    known = [n for n, _ in list_experiments()]
    raise ConfigError(
        f"experiment: expected a name from {known} or a path to a .py file, got {name_or_path!r}"
    )


def _load_module(path: pathlib.Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"dlkit_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "config", None)):
        raise ConfigError(f"experiment {str(path)!r}: expected a function config(), found none")
    return module


def load_config(name_or_path: str, overrides: typing.Iterable[str] = ()) -> Config:
    """Loads an experiment's `config()` and applies "key=value" overrides.

    Args:
      name_or_path: a name under experiments/ (see `dlkit list`) or a path to a .py file.
      overrides: "key=value" strings, applied in order.
    Returns:
      The `Config`; its `name` is the experiment's file name unless the experiment set one.
    """
    path = find_experiment(name_or_path)
    cfg = _load_module(path).config()
    if not isinstance(cfg, Config):
        raise ConfigError(
            f"experiment {str(path)!r}: config() must return dlkit.Config, got {type(cfg)}"
        )
    if cfg.name == "unnamed":
        cfg.name = path.stem
    return apply_overrides(cfg, overrides)


def list_experiments() -> list[tuple[str, str]]:
    """(name, first line of the docstring) for every experiment found."""
    found: dict[str, str] = {}
    for d in experiment_dirs():
        for path in sorted(d.glob("*.py")):
            if path.stem.startswith("_") or path.stem in found:
                continue
            found[path.stem] = _docstring_summary(path)
    return sorted(found.items())


def _docstring_summary(path: pathlib.Path) -> str:
    import ast

    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except SyntaxError:
        return "(does not parse)"
    return doc.strip().splitlines()[0] if doc else ""
