"""The configuration tree: one dataclass per concern, each with a `check()`, and `Config`.

    from dlkit import config as config_lib
    cfg = config_lib.Config()
    cfg.train.steps = 200
    cfg.validate()          # each section's check(), then the checks across sections

Every field is commented with what it does and the values it accepts; model hyperparameters are
the fields of the Flax module named by `model.name`, so they are `model.options` here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dlkit import errors, losses, optim, profiling
from dlkit.config import checks, data_settings, overrides


@dataclasses.dataclass
class DataConfig:
    name: str = "digits"  # dataset: digits | fashion_mnist | text | kjv | bpe_corpus |
    #   spoken_digits | arrays | arrayrecord
    data_dir: str = ""  # directory with the dataset's files; "" = the dataset's default search
    path: str = ""  # text: the UTF-8 file; arrays: FILE.npz or X.npy (see dlkit.data.arrays);
    #   arrayrecord: a directory of .array_record files; bpe_corpus: the directory written by
    #   `python -m dlkit.data.tokenize_corpus` (see dlkit.data.bpe)
    seq_len: int = 256  # text and kjv: characters per example; bpe_corpus: tokens per example
    scale: str = (
        "uint8"  # arrays: "uint8" = uint8 inputs / 255 -> float32 [0, 1]; "none" = as stored
    )
    eval_split: str = "test"  # split evaluated periodically and by `dlkit eval`
    shuffle: bool = True  # shuffle training batches, by (seed, epoch)
    last_batch: str = "drop"  # training loader's last partial batch: drop | pad
    prefetch: int = -1  # batches a thread stages ahead of the step (0 = none: the loop reads
    #   the loader itself); -1 = auto: 2, but 0 on CPU with one process and one step per call,
    #   where no batch is copied to a device, so the thread's hand-off costs more than it hides
    pipeline: str = "memory"  # training batches: memory (dlkit.data.Loader, a prefetch thread)
    #   | grain (dlkit.data.grain_pipeline: Grain worker processes, each host reads only its
    #   rows, the iterator state checkpointed; for data beyond memory)
    grain_workers: int = 0  # pipeline=grain: worker processes reading and batching; 0 = none
    grain_worker_buffer: int = 1  # pipeline=grain: batches each worker keeps ready
    grain_read_threads: int = 2  # pipeline=grain: threads reading batches in each process
    #   (the main one, or each worker); 0 = read in the thread that asks for the batch
    grain_read_buffer: int = 4  # pipeline=grain: batches read ahead per process, at most
    #   (bounds memory; Grain's own default, 500, would hold 500 batches); 0 = none ahead
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

    # Named `check`, not `validate`: `validate` is the `data.validate` key above.
    def check(self) -> None:
        """Checks the `data.*` values that need neither the data nor the devices.

        Raises:
          ConfigError: the first bad key, with what it expects and what it got.
        """
        checks.field_types(self, "data")
        checks.positive({"data.audit_max_examples": self.audit_max_examples})
        if self.prefetch < -1:
            raise errors.ConfigError(
                f"data.prefetch: expected an int >= 0, or -1 (auto), got {self.prefetch}"
            )
        checks.choices(
            {
                "data.last_batch": (self.last_batch, ("drop", "pad")),
                "data.validate": (self.validate, ("error", "warn", "off")),
                "data.audit": (self.audit, ("warn", "fail", "off")),
                "data.scale": (self.scale, ("uint8", "none")),
                "data.pipeline": (self.pipeline, ("memory", "grain")),
            }
        )
        defaults = type(self)()
        data_settings.check_grain(self, defaults)
        data_settings.check_read(self, defaults)
        if self.validation_examples < 0:
            raise errors.ConfigError(
                "data.validation_examples: expected an int >= 0 (0 = none), got "
                f"{self.validation_examples}"
            )
        if self.train_examples < 0:
            raise errors.ConfigError(
                f"data.train_examples: expected an int >= 0 (0 = all), got {self.train_examples}"
            )


@dataclasses.dataclass
class ModelConfig:
    """`name` picks a module from `dlkit.models`; `options` are that module's fields."""

    name: str = "mlp"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        """Checks that `name` is a registered model and `options` are fields of its module.

        Raises:
          ConfigError: an unknown model or option, an option of the wrong type, or a
            non-finite float option.
        """
        checks.field_types(self, "model")
        fields = overrides.model_fields(self.name)
        for option, value in self.options.items():
            key = f"model.{option}"
            if option not in fields:
                raise errors.ConfigError(
                    f"{key}: expected one of the fields of model.name={self.name!r} "
                    f"({', '.join(sorted(fields))}), got an unknown option {option!r}"
                )
            # Strict: `overrides.coerce` would also turn the string "8" into 8, which
            # `set_value` wants for the command line but a config built in Python should not need.
            coerced = overrides.coerce(key, value, fields[option])
            if overrides.jsonable(coerced) != overrides.jsonable(value):
                raise errors.ConfigError(
                    f"{key}: expected {overrides.type_name(fields[option])}, got {value!r}"
                )
            checks.finite(key, value)


@dataclasses.dataclass
class LossConfig:
    name: str = "softmax_cross_entropy"  # softmax_cross_entropy | squared_error
    label_smoothing: float = 0.0  # softmax_cross_entropy only; 0 = hard labels

    def check(self) -> None:
        """Checks the `loss.*` values (the messages `losses.make_loss` gives).

        Raises:
          ConfigError: the first bad key, with what it expects and what it got.
        """
        checks.field_types(self, "loss")
        if self.name not in losses.LOSSES:
            raise errors.ConfigError(
                f"loss.name: expected one of {sorted(losses.LOSSES)}, got {self.name!r}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise errors.ConfigError(
                f"loss.label_smoothing: expected a float in [0, 1), got {self.label_smoothing}"
            )


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

    def check(self) -> None:
        """Checks the `optim.*` values (the messages `optim.make_optimizer` gives);
        `optim.warmup_steps` against `train.steps` is `Config.validate`'s.

        Raises:
          ConfigError: the first bad key, with what it expects and what it got.
        """
        checks.field_types(self, "optim")
        if self.name not in optim.OPTIMIZERS:
            raise errors.ConfigError(
                f"optim.name: expected one of {list(optim.OPTIMIZERS)}, got {self.name!r}"
            )
        if self.schedule not in optim.SCHEDULES:
            raise errors.ConfigError(
                f"optim.schedule: expected one of {list(optim.SCHEDULES)}, got {self.schedule!r}"
            )
        if self.learning_rate <= 0:
            raise errors.ConfigError(
                f"optim.learning_rate: expected a positive float, got {self.learning_rate}"
            )
        for key, value in {
            "optim.weight_decay": self.weight_decay,
            "optim.grad_clip_norm": self.grad_clip_norm,
        }.items():
            if value < 0:
                raise errors.ConfigError(f"{key}: expected a float >= 0, got {value}")


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
    compilation_cache_dir: str = "auto"  # JAX persistent compilation cache: a directory,
    #   auto = ~/.cache/dlkit/jax (or $DLKIT_CACHE_DIR/jax; DLKIT_CACHE_DIR="" = off), "" = off
    profile_steps: str = ""  # START:STOP: jax.profiler trace of steps START..STOP-1 into
    #   WORKDIR/profile/ (dlkit.profiling); "" = off
    xla_cpu_ynn_fusions: str = "individual_dot,reduce"  # CPU: what XLA may hand to YNNPACK:
    #   a comma list of dot | eltwise | individual_convolution | individual_dot | reduce,
    #   none, or xla (XLA's default); convolutions stay XLA's (dlkit.parallel, performance.md)
    fast_dev_run: bool = False  # 1 train step, 1 eval batch, 1 checkpoint saved and restored,
    #   then stop (dlkit.debugging); into a temporary directory when there is no workdir
    overfit_batches: int = 0  # train (and evaluate) on the first N batches only, unshuffled;
    #   0 = off (dlkit.debugging)
    summary: bool = True  # print the model summary at the start; WORKDIR/summary.txt
    tensorboard: bool = False  # also write TensorBoard event files to WORKDIR/tensorboard/
    plots: bool = True  # write WORKDIR/curves.png at the end of a run (needs matplotlib)
    ema_decay: float = 0.0  # keep an EMA of the weights (e.g. 0.999) and evaluate on it; 0 = off
    early_stopping_metric: str = ""  # e.g. eval/loss; stop when it stops improving; "" = off
    early_stopping_mode: str = "auto"  # min | max: whether lower or higher is better; auto =
    #   from the metric's name (loss, error: min; accuracy: max; others must say)
    early_stopping_patience: int = 5  # evaluations without improvement before stopping
    early_stopping_min_delta: float = 0.0  # an improvement must beat the best by more than this
    diagnosis: bool = True  # at the end, print and save diagnosis.json (dlkit.diagnosis)
    steps_per_dispatch: int = 1  # K optimizer steps per compiled call (lax.scan over K
    #   batches); steps and every cadence must be multiples of K (see dlkit.step_wrappers.k_steps)
    scan_unroll: int = 0  # K > 1: steps per iteration of the compiled K-step loop; must
    #   divide K; 0 = auto: the largest divisor of K up to 10 (see resolved_scan_unroll)

    def check(self) -> None:
        """Checks the `train.*` values on their own; the cadences against
        `train.steps_per_dispatch` are `Config.validate`'s (one is `checkpoint.every_steps`).

        Raises:
          ConfigError: the first bad key, with what it expects and what it got.
        """
        checks.field_types(self, "train")
        checks.positive({"train.steps": self.steps, "train.batch_size": self.batch_size})
        checks.non_negative(
            {
                "train.log_every": self.log_every,
                "train.eval_every": self.eval_every,
                "train.eval_batch_size": self.eval_batch_size,
                "train.overfit_batches": self.overfit_batches,
            }
        )
        checks.choices({"train.nan_policy": (self.nan_policy, ("raise", "skip"))})
        profiling.parse_profile_steps(self.profile_steps)
        if self.max_consecutive_nonfinite < 1:
            raise errors.ConfigError(
                "train.max_consecutive_nonfinite: expected an int >= 1, got "
                f"{self.max_consecutive_nonfinite}"
            )
        if self.loss_spike_factor != 0 and self.loss_spike_factor <= 1:
            raise errors.ConfigError(
                "train.loss_spike_factor: expected 0 (off) or a float > 1, got "
                f"{self.loss_spike_factor}"
            )
        if self.grad_accum_steps < 1:
            raise errors.ConfigError(
                f"train.grad_accum_steps: expected an int >= 1, got {self.grad_accum_steps}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise errors.ConfigError(
                f"train.ema_decay: expected a float in [0, 1) (0 = off), got {self.ema_decay}"
            )
        _check_dispatch(self)


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

    def check(self) -> None:
        """Checks the `parallel.*` value types; the choices need the devices and are
        `dlkit.parallel`'s.

        Raises:
          ConfigError: a value of the wrong type or a non-finite float.
        """
        checks.field_types(self, "parallel")


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 500  # save every N steps (and always at the end); 0 = only at the end
    every_seconds: float = 0.0  # also save at the first logged row (train.log_every) this many
    #   seconds or more after the previous save, by process 0's clock; 0 = off
    max_to_keep: int = 3  # keep the newest N checkpoints
    async_save: bool = True  # write in the background; always waited for before returning
    keep_best: int = 0  # also keep the best N steps by best_metric (0 = off)
    best_metric: str = "eval/loss"  # metric ranking steps for keep_best
    best_mode: str = "auto"  # min | max | auto, as train.early_stopping_mode
    archive_mismatched: bool = False  # a workdir holding another experiment's checkpoints:
    #   False = refuse to start; True = move them to checkpoints.archived-<time>/ and start over
    init_from: str = ""  # fine-tuning: initialise params (and model_state) of a fresh run from a
    #   dlkit workdir, a dlkit step directory or an Orbax PyTree directory; "" = off
    init_from_map: str = ""  # "REGEX=REPLACEMENT;..." renames of the saved leaves' paths
    #   (e.g. params/Dense_0/kernel) to this model's; an empty replacement drops a leaf
    on_no_valid_step: str = "error"  # every step is corrupt (quarantined): error = stop, listing
    #   them; restart = train from step 0 (the old metrics.jsonl is moved aside)

    def check(self) -> None:
        """Checks the `checkpoint.*` values on their own.

        Raises:
          ConfigError: the first bad key, with what it expects and what it got.
        """
        checks.field_types(self, "checkpoint")
        checks.non_negative({"checkpoint.every_steps": self.every_steps})
        if self.every_seconds < 0:
            raise errors.ConfigError(
                f"checkpoint.every_seconds: expected a float >= 0 (0 = off), "
                f"got {self.every_seconds}"
            )
        checks.choices(
            {
                "checkpoint.best_mode": (self.best_mode, ("min", "max", "auto")),
                "checkpoint.on_no_valid_step": (self.on_no_valid_step, ("error", "restart")),
            }
        )
        if self.max_to_keep < 1:
            raise errors.ConfigError(
                f"checkpoint.max_to_keep: expected an int >= 1, got {self.max_to_keep}"
            )


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

    def validate(self) -> None:
        """Checks every value that needs neither the data nor the devices: each section's
        own `check()`, then the checks across sections. Call it before building a run, so a
        bad value is an error before anything is loaded or compiled; `load_config` and
        `apply_overrides` only check keys and types.

        Raises:
          ConfigError: the first bad key, with what it expects and what it got.
        """
        if not isinstance(self.name, str):
            raise errors.ConfigError(f"name: expected a string, got {self.name!r}")
        for section in ("data", "model", "loss", "optim", "train", "parallel", "checkpoint"):
            getattr(self, section).check()
        if not 0 <= self.optim.warmup_steps <= self.train.steps:
            raise errors.ConfigError(
                f"optim.warmup_steps: expected an int in [0, train.steps={self.train.steps}], "
                f"got {self.optim.warmup_steps}"
            )
        if self.checkpoint.every_seconds > 0 and self.train.log_every == 0:
            raise errors.ConfigError(
                f"checkpoint.every_seconds: expected 0 when train.log_every=0 (the time since "
                f"the last save is checked at logged rows), got {self.checkpoint.every_seconds}"
            )
        _check_cadences(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `model` is flattened to `{"name": ..., <option>: ...}`."""
        out = dataclasses.asdict(self)
        out["model"] = {"name": self.model.name, **overrides.jsonable(self.model.options)}
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
                    overrides.set_value(cfg, f"model.{opt}", v)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    overrides.set_value(cfg, f"{key}.{sub}", v)
            else:
                overrides.set_value(cfg, key, value)
        return cfg


# --------------------------------------------------------------------------------------------
# Validation: the checks behind `Config.validate` and the sections' `check()`.

# `train.scan_unroll=0` picks the largest divisor of K up to this: XLA:CPU pays a fixed cost per
# loop iteration, large next to a small model's step, while past about ten steps per iteration
# the program outgrows the instruction cache and compiles for much longer
# (docs/performance.md, "The MLP now").
MAX_AUTO_SCAN_UNROLL = 10


def _check_dispatch(train: TrainConfig) -> None:
    """`train.steps_per_dispatch` (K) and `train.scan_unroll` on their own and together."""
    k, unroll = train.steps_per_dispatch, train.scan_unroll
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise errors.ConfigError(f"train.steps_per_dispatch: expected an int >= 1, got {k!r}")
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 0:
        raise errors.ConfigError(
            f"train.scan_unroll: expected an int >= 0 (0 = auto), got {unroll!r}"
        )
    if k > 1 and unroll and k % unroll:
        raise errors.ConfigError(
            f"train.scan_unroll: expected a divisor of train.steps_per_dispatch={k}, got {unroll}"
        )


def _check_cadences(cfg: Config) -> None:
    """With K steps per dispatch the loop sees only every Kth step, so every cadence and the
    run's length must be multiples of K."""
    k = cfg.train.steps_per_dispatch
    if k == 1:
        return
    cadences = {
        "train.steps": cfg.train.steps,
        "train.log_every": cfg.train.log_every,
        "train.eval_every": cfg.train.eval_every,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
    }
    for key, value in cadences.items():
        if value % k:
            raise errors.ConfigError(
                f"{key}: expected a multiple of train.steps_per_dispatch={k} (the loop sees "
                f"only every {k}th step), got {value}"
            )


def resolved_scan_unroll(train: TrainConfig) -> int:
    """The optimizer steps per iteration of the compiled K-step loop.

    `train.scan_unroll` when set; auto (0) is the largest divisor of K up to
    `MAX_AUTO_SCAN_UNROLL`; 1 when K = 1 (there is no loop). A divisor of K, so that every
    iteration is alike and the compute report's FLOPs per step stay exact.

    Args:
      train: the `train` section (only `steps_per_dispatch` and `scan_unroll` are read).
    Returns:
      The unroll, an int in [1, K].
    Raises:
      ConfigError: K not an int >= 1, or scan_unroll not an int >= 0 dividing K.
    """
    _check_dispatch(train)
    k, unroll = train.steps_per_dispatch, train.scan_unroll
    if k == 1:
        return 1
    if unroll:
        return unroll
    return max(d for d in range(1, min(k, MAX_AUTO_SCAN_UNROLL) + 1) if k % d == 0)
