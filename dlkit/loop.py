"""`fit` and `evaluate`: the Python loop that ties data, model, step and checkpoints together.

The same function runs from a notebook cell and from `dlkit train`:

    import dlkit
    cfg = dlkit.load_config("digits_mlp", overrides=["train.steps=500"])
    result = dlkit.fit(cfg, workdir="runs/digits")      # resumes if runs/digits has checkpoints
    result.history.last("eval/accuracy"), result.state.params

The loop, in order: build the pieces from the config (this is the only place the config is
read), choose the strategy, create the state shapes-first or restore it from the newest
checkpoint, then for each step: take the next prefetched batch, run the one compiled program
(step + metric accumulation), and on the steps `is_time` picks: fetch and log metrics,
evaluate, checkpoint. A row of train metrics alone is fetched one call late, after the next
call is queued, so the device does not wait while the host logs (`dlkit.callbacks`). The
state, the loader position and the config are all a run needs to continue bit-for-bit, and
all three go into every checkpoint.
"""

import dataclasses
import functools
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto

from dlkit import callbacks as callbacks_lib
from dlkit import checkpoint as checkpoint_lib
from dlkit import (
    compute,
    debugging,
    dispatch,
    distributed,
    interrupt,
    losses,
    models,
    nonfinite,
    optim,
    parallel,
    precision,
    steps,
)
from dlkit import config as config_lib
from dlkit import data as data_lib
from dlkit import metrics as metrics_lib
from dlkit import state as state_lib
from dlkit import workdir as workdir_lib
from dlkit.data import audit as audit_lib
from dlkit.data import augment as augment_lib
from dlkit.data import validate


def is_time(step: int, every: int) -> bool:
    """True on every `every`-th step (step counts from 1 after the first update); 0 = never."""
    return every > 0 and step % every == 0


def example_batch(source) -> dict[str, np.ndarray]:
    """A batch of one real example with its mask: what shape-only tracing needs."""
    batch = data_lib.get_batch(source, np.array([0]))
    batch["mask"] = np.ones((1,), np.float32)
    return batch


def module_for_strategy(module, strategy: parallel.Strategy):
    """`module` as `strategy` must run it, so BatchNorm statistics cover the global batch.

    A module with a field `bn_axis_name` (e.g. `dlkit.models.ResNet`) reduces its BatchNorm
    statistics over that named axis. Under pmap each device holds B/n rows, so the field is set
    to "data" (`parallel.DATA_AXIS`) and the statistics are averaged across devices; under jit
    the batch is one global array, so it is set to None (no named axis is bound there) and the
    statistics are already global. Other modules are returned unchanged.
    """
    if "bn_axis_name" not in {f.name for f in dataclasses.fields(module)}:
        return module
    axis_name = parallel.DATA_AXIS if strategy.name == "pmap" else None
    return module if module.bn_axis_name == axis_name else module.clone(bn_axis_name=axis_name)


def module_for_data(module, source):
    """`module` with `vocab_size` taken from a text source when it is 0 ("from the data").

    A language model's vocabulary is the file's characters, known only once the file is read.
    Raises a ConfigError, before anything compiles, if a set `vocab_size` is too small.
    """
    fields = {f.name for f in dataclasses.fields(module)}
    if "vocab_size" not in fields or not hasattr(source, "vocab_size"):
        return module
    if module.vocab_size == 0:
        return module.clone(vocab_size=source.vocab_size)
    if module.vocab_size < source.vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size: expected 0 (from the data) or >= {source.vocab_size} (the "
            f"characters in the data), got {module.vocab_size}"
        )
    return module


@dataclasses.dataclass
class Components:
    """Everything a run is built from, made from a `Config` by `build`."""

    config: config_lib.Config
    strategy: parallel.Strategy
    module: Any
    loss_fn: Any
    tx: Any
    schedule: Any
    train_source: Any
    eval_source: Any
    policy: precision.Policy = dataclasses.field(
        default_factory=lambda: precision.get_policy("float32")
    )
    augment: augment_lib.Augment | None = None  # training augmentation (None = off)
    # `data.on_device`: the training set as host arrays, to be held on the device (None = the
    # loader gathers rows on the host).
    train_arrays: dict[str, np.ndarray] | None = None

    @property
    def ema(self) -> bool:
        """Whether the state keeps `ema_params` (`train.ema_decay` > 0)."""
        return self.config.train.ema_decay > 0

    def abstract_state(self) -> state_lib.TrainState:
        """The TrainState's shapes, with each leaf's target sharding attached."""
        example = example_batch(self.train_source)["inputs"]
        abstract = state_lib.abstract_train_state(
            self.module, self.tx, example, self.config.train.seed, ema=self.ema
        )
        return checkpoint_lib.abstract_with_shardings(
            abstract, self.strategy.state_shardings(abstract)
        )

    def init_state(self) -> state_lib.TrainState:
        """A fresh TrainState, initialised directly with its target sharding."""
        example = example_batch(self.train_source)["inputs"]
        return state_lib.create_train_state(
            self.module,
            self.tx,
            example,
            seed=self.config.train.seed,
            shardings=self.strategy.state_shardings,
            ema=self.ema,
        )

    def example_batch(self) -> dict[str, np.ndarray]:
        """One training example with its mask (shapes and dtypes for tracing)."""
        return example_batch(self.train_source)

    def train_loader(self, position: int = 0, indices: bool = False) -> data_lib.Loader:
        """The training loader the config asks for (this process's slice), at `position`;
        with `indices`, over the examples' indices (`data.IndexSource`: same order, masks and
        positions) for a step that gathers its rows on the device (`data.on_device`)."""
        cfg = self.config
        source = data_lib.IndexSource(len(self.train_source)) if indices else self.train_source
        return data_lib.Loader(
            source,
            cfg.train.batch_size,
            seed=cfg.train.seed,
            shuffle=cfg.data.shuffle,
            last_batch=cfg.data.last_batch,
            process_index=self.strategy.process_index,
            process_count=self.strategy.process_count,
            position=position,
        )

    def abstract_metrics(self, state) -> Any:
        """The train metrics' structure as replicated `ShapeDtypeStruct`s (an accumulator)."""
        shape = _metrics_shape(
            lambda s, b: steps.train_step(s, b, loss_fn=self.loss_fn)[1], state, self.train_source
        )
        replicated = self.strategy.replicated
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shape
        )

    def abstract_eval_metrics(self, state) -> Any:
        """The eval metrics' structure (`ShapeDtypeStruct`s), for the eval accumulator."""
        return _metrics_shape(
            functools.partial(steps.eval_step, loss_fn=self.loss_fn), state, self.eval_source
        )


def _check_config(cfg: config_lib.Config) -> None:
    """Errors a user can cause, raised before anything is compiled."""
    positive = {
        "train.steps": cfg.train.steps,
        "train.batch_size": cfg.train.batch_size,
        "data.audit_max_examples": cfg.data.audit_max_examples,
    }
    for key, value in positive.items():
        if value <= 0:
            raise config_lib.ConfigError(f"{key}: expected a positive int, got {value}")
    non_negative = {
        "train.log_every": cfg.train.log_every,
        "train.eval_every": cfg.train.eval_every,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "train.overfit_batches": cfg.train.overfit_batches,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise config_lib.ConfigError(f"{key}: expected an int >= 0, got {value}")
    if cfg.data.prefetch < -1:
        raise config_lib.ConfigError(
            f"data.prefetch: expected an int >= 0, or -1 (auto), got {cfg.data.prefetch}"
        )
    choices = {
        "train.nan_policy": (cfg.train.nan_policy, ("raise", "skip")),
        "checkpoint.best_mode": (cfg.checkpoint.best_mode, ("min", "max")),
        "data.last_batch": (cfg.data.last_batch, ("drop", "pad")),
        "data.validate": (cfg.data.validate, ("error", "warn", "off")),
        "data.audit": (cfg.data.audit, ("warn", "fail", "off")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise config_lib.ConfigError(
                f"{key}: expected one of {' | '.join(allowed)}, got {value!r}"
            )
    if cfg.train.max_consecutive_nonfinite < 1:
        raise config_lib.ConfigError(
            "train.max_consecutive_nonfinite: expected an int >= 1, got "
            f"{cfg.train.max_consecutive_nonfinite}"
        )
    if cfg.train.loss_spike_factor != 0 and cfg.train.loss_spike_factor <= 1:
        raise config_lib.ConfigError(
            "train.loss_spike_factor: expected 0 (off) or a float > 1, got "
            f"{cfg.train.loss_spike_factor}"
        )
    if cfg.train.grad_accum_steps < 1:
        raise config_lib.ConfigError(
            f"train.grad_accum_steps: expected an int >= 1, got {cfg.train.grad_accum_steps}"
        )
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise config_lib.ConfigError(
            f"train.ema_decay: expected a float in [0, 1) (0 = off), got {cfg.train.ema_decay}"
        )
    if cfg.data.validation_examples < 0:
        raise config_lib.ConfigError(
            "data.validation_examples: expected an int >= 0 (0 = none), got "
            f"{cfg.data.validation_examples}"
        )
    if cfg.data.train_examples < 0:
        raise config_lib.ConfigError(
            f"data.train_examples: expected an int >= 0 (0 = all), got {cfg.data.train_examples}"
        )
    if cfg.checkpoint.max_to_keep < 1:
        raise config_lib.ConfigError(
            f"checkpoint.max_to_keep: expected an int >= 1, got {cfg.checkpoint.max_to_keep}"
        )
    dispatch.check_config(cfg)


def _compiler_options(cfg: config_lib.Config) -> dict[str, str]:
    """The XLA:CPU options of `train.xla_cpu_ynn_fusions` and `train.xla_cpu_vector_width`; a
    ConfigError if either is malformed."""
    try:
        return parallel.cpu_compiler_options(
            cfg.train.xla_cpu_ynn_fusions, cfg.train.xla_cpu_vector_width
        )
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None


def build(
    cfg: config_lib.Config,
    *,
    module=None,
    train_source=None,
    eval_source=None,
    strategy: parallel.Strategy | None = None,
) -> Components:
    """Makes the run's pieces from `cfg`; any piece passed in replaces the config's choice.

    Args:
      cfg: the run's config.
      module: a Flax module to train instead of `cfg.model` (e.g. your own, from a notebook).
      train_source, eval_source: random-access datasets (dicts with "inputs" and "labels")
        instead of `cfg.data`.
      strategy: a `parallel.Strategy` instead of `cfg.parallel`.
    """
    _check_config(cfg)
    policy = precision.get_policy(cfg.train.precision)
    if cfg.train.compilation_cache_dir:
        compute.enable_compilation_cache(cfg.train.compilation_cache_dir)
    compiler_options = _compiler_options(cfg)  # checked even when a strategy is given
    strategy = strategy or parallel.make_strategy(
        cfg.parallel.strategy,
        cfg.parallel.num_devices,
        cfg.parallel.sync_every_step,
        param_sharding=cfg.parallel.param_sharding,
        fsdp_min_size=cfg.parallel.fsdp_min_size,
        compiler_options=compiler_options,
    )
    strategy.check_batch_size(cfg.train.batch_size)
    _check_grad_accum(cfg, strategy)
    strategy.check_batch_size(
        cfg.train.eval_batch_size or cfg.train.batch_size, "train.eval_batch_size"
    )
    if module is None:
        module = models.build(cfg.model.name, **cfg.model.options)
    if policy.name != "float32":
        module = precision.apply_to_module(policy, module)
    module = module_for_strategy(module, strategy)
    data_options = {
        "data_dir": cfg.data.data_dir or None,
        "path": cfg.data.path or None,
        "seq_len": cfg.data.seq_len,
    }
    held_out = cfg.data.validation_examples
    if held_out and cfg.data.eval_split == "validation" and eval_source is None:
        full = train_source or data_lib.load_dataset(cfg.data.name, "train", **data_options)
        eval_source = data_lib.Subset(
            full, held_out, len(full) - held_out, what="data.validation_examples"
        )
    if train_source is None:
        train_source = data_lib.load_dataset(cfg.data.name, "train", **data_options)
    if held_out:
        if not 0 < held_out < len(train_source):
            raise config_lib.ConfigError(
                f"data.validation_examples: expected 0..{len(train_source) - 1}, got {held_out}"
            )
        train_source = data_lib.Subset(train_source, len(train_source) - held_out)
    if cfg.data.train_examples:
        train_source = data_lib.Subset(train_source, cfg.data.train_examples)
    if eval_source is None:
        if cfg.data.eval_split == "validation":
            raise config_lib.ConfigError(
                "data.eval_split: 'validation' needs data.validation_examples > 0 (the last "
                "N train examples held out), got data.validation_examples=0"
            )
        eval_source = data_lib.load_dataset(cfg.data.name, cfg.data.eval_split, **data_options)
    if cfg.train.overfit_batches:
        train_source, eval_source = debugging.overfit_sources(
            train_source, cfg.train.overfit_batches, cfg.train.batch_size
        )
    module = module_for_data(module, train_source)
    loss_fn = losses.make_loss(cfg.loss.name, label_smoothing=cfg.loss.label_smoothing)
    o = cfg.optim
    tx, schedule = optim.make_optimizer(
        o.name,
        o.learning_rate,
        total_steps=cfg.train.steps,
        schedule=o.schedule,
        warmup_steps=o.warmup_steps,
        end_learning_rate_factor=o.end_learning_rate_factor,
        momentum=o.momentum,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        grad_clip_norm=o.grad_clip_norm,
    )
    if policy.loss_scaling:
        tx = precision.with_loss_scaling(tx)
    augment = _make_augment(cfg, strategy, train_source, loss_fn)
    return Components(
        cfg,
        strategy,
        module,
        loss_fn,
        tx,
        schedule,
        train_source,
        eval_source,
        policy,
        augment,
        train_arrays=_data_on_device(cfg, strategy, train_source),
    )


def _data_on_device(cfg, strategy, train_source) -> dict[str, np.ndarray] | None:
    """The training set's arrays when `data.on_device` holds it on the device, else None.

    What it is for: a step that gathers its own rows from a dataset already on the device
    leaves the host only the batch's indices to send, so an accelerator's steps need no
    host-side row gather and no host-to-device copy of the rows. On CPU it does not pay: the
    bench MLP at K=50 (2 cores) ran 0.97x with it (2807 vs 2891 steps/s, 8 alternating
    rounds), because XLA:CPU's gather of 50 x 128 rows (61-102 us) is no faster than numpy's
    (59 us), and in the program it sits on the step's path where the loader's gather ran on
    the prefetch thread beside it. Off by default; not measured on a GPU yet.
    Raises:
      ConfigError: not a bool, or on where it does not apply (saying why).
    """
    on = cfg.data.on_device
    if not isinstance(on, bool):
        raise config_lib.ConfigError(f"data.on_device: expected true or false, got {on!r}")
    if not on:
        return None
    arrays = data_lib.in_memory_arrays(train_source)
    if strategy.name != "jit":
        why = f"parallel.strategy={strategy.name} (pmap feeds each device its rows)"
    elif strategy.process_count > 1:
        why = f"{strategy.process_count} processes (each would need the whole training set)"
    elif arrays is None:
        why = (
            f"a training source that is not in-memory arrays ({type(train_source).__name__}; "
            "expected a data.ArraySource or a Subset of one)"
        )
    else:
        return arrays
    raise config_lib.ConfigError(f"data.on_device: expected false with {why}, got true")


def _make_augment(cfg, strategy, train_source, loss_fn) -> augment_lib.Augment | None:
    """The config's `data.*` augmentation, checked against the data before compiling."""
    d = cfg.data
    try:
        augment = augment_lib.Augment(
            random_crop_padding=d.random_crop_padding,
            horizontal_flip=d.horizontal_flip,
            mixup_alpha=d.mixup_alpha,
            cutmix_alpha=d.cutmix_alpha,
        )
        if not augment.enabled:
            return None
        shape = np.shape(example_batch(train_source)["inputs"])
        augment.check(shape, cfg.train.batch_size // strategy.num_devices)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    if augment.mixes and not isinstance(loss_fn, losses.SoftmaxCrossEntropy):
        raise config_lib.ConfigError(
            "data.mixup_alpha / cutmix_alpha: expected loss.name=softmax_cross_entropy "
            f"(mixing blends class labels), got loss.name={cfg.loss.name!r}"
        )
    return augment


def _check_grad_accum(cfg: config_lib.Config, strategy: parallel.Strategy) -> None:
    """Each micro-batch must still split evenly over the devices."""
    n, devices = cfg.train.grad_accum_steps, strategy.num_devices
    if n > 1 and cfg.train.batch_size % (n * devices):
        raise config_lib.ConfigError(
            f"train.grad_accum_steps: expected a divisor of train.batch_size="
            f"{cfg.train.batch_size} leaving micro-batches divisible by the {devices} device(s) "
            f"(batch_size % (grad_accum_steps * {devices}) == 0), got {n}"
        )


def _compile_train(c: Components, state, acc_spec) -> tuple[Any, dict[str, Any]]:
    """Compiles the train step ahead of time and reads its compute report.

    `acc_spec` is the metric accumulator's structure (`Components.abstract_metrics`).

    Returns:
      (compiled, report): the executable `(state, acc, batch) -> (state, acc)` the loop runs,
      and `compute.analyze`'s report plus the bytes of params and optimizer state per device.
    """
    strategy = c.strategy
    k = c.config.train.steps_per_dispatch
    unroll = dispatch.scan_unroll(c.config)
    on_device = c.train_arrays is not None
    train_fn = strategy.compile_train(
        c.loss_fn,
        strategy.state_shardings(state),
        grad_accum_steps=c.config.train.grad_accum_steps,
        loss_spike_factor=c.config.train.loss_spike_factor,
        augment=c.augment,
        ema_decay=c.config.train.ema_decay,
        steps_per_dispatch=k,
        scan_unroll=unroll,
        data_on_device=on_device,
    )
    example = c.example_batch()
    if on_device:
        example = {"index": np.zeros((1,), np.int32), "mask": example["mask"]}
    if k > 1:
        batch = strategy.stacked_batch_spec(example, c.config.train.batch_size, k)
    else:
        batch = strategy.batch_spec(example, c.config.train.batch_size)
    if on_device:
        data = strategy.put_data(c.train_arrays)
        compiled = _WithData(train_fn.lower(state, acc_spec, batch, data).compile(), data)
    else:
        compiled = train_fn.lower(state, acc_spec, batch).compile()
    report = compute.analyze(compiled, strategy.devices)
    if c.config.train.grad_accum_steps > 1 or k > 1:
        # XLA's cost analysis counts a loop body once, not once per iteration (and an
        # unrolled K-step body's count was 3-8% off `unroll` steps, measured), so the FLOPs
        # of an accumulating or K-step program come from one plain step (compiled only).
        plain = strategy.compile_train(
            c.loss_fn,
            strategy.state_shardings(state),
            augment=c.augment,
            ema_decay=c.config.train.ema_decay,
        )
        one_batch = strategy.batch_spec(c.example_batch(), c.config.train.batch_size)
        lowered = plain.lower(state, acc_spec, one_batch)
        strategy.trace_counts["train"] -= 1  # a trace for counting FLOPs, never run
        per_device = compute.flops_per_device_of(lowered.compile())
        report["flops_per_step_per_device"] = per_device
        report["flops_per_step"] = per_device * strategy.num_devices
    report["param_sharding"] = strategy.param_sharding
    report["precision"] = c.policy.name
    report["grad_accum_steps"] = c.config.train.grad_accum_steps
    report["steps_per_dispatch"] = k
    report["scan_unroll"] = unroll
    # What the step was compiled with (a run's speed on CPU depends on it; see dlkit.parallel).
    report["compiler_options"] = dict(strategy.compiler_options)
    report["data_on_device"] = on_device
    report["state_bytes_per_device"] = {
        "params": parallel.bytes_per_device(state.params)["max"],
        "opt_state": parallel.bytes_per_device(state.opt_state)["max"],
    }
    return compiled, report


class _WithData:
    """A compiled `data_on_device` train step with the data bound: called as
    `(state, acc, batch)` like any other; the rest (`as_text`, `cost_analysis`, ...) is the
    compiled executable's."""

    def __init__(self, compiled, data):
        self._compiled, self.data = compiled, data

    def __call__(self, state, acc, batch):
        return self._compiled(state, acc, batch, self.data)

    def __getattr__(self, name):
        return getattr(self._compiled, name)


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the final TrainState (on the run's devices).
      history: every metric row of the run, including rows from before a resume.
      workdir: the run's directory, or None.
      trace_counts: times each compiled function was traced; {"train": 1, "eval": 1} means
        no recompilation happened.
      stopped: None if the run reached train.steps; else what stopped it ("SIGTERM",
        "SIGINT", "preemption", or the reason a callback gave to `Run.request_stop`, e.g.
        "early_stopping").
      compute_report: FLOPs per step, memory analysis and state bytes per device of the
        compiled train step (see `dlkit.compute`); also in the workdir's compute.json.
    """

    state: state_lib.TrainState
    history: metrics_lib.History
    workdir: pathlib.Path | None
    trace_counts: dict[str, int]
    stopped: str | None = None
    compute_report: dict[str, Any] = dataclasses.field(default_factory=dict)


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython is only looked at if already imported)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _bar_renders() -> bool:
    """A progress bar redraws in place only in a terminal or a notebook; in a log file or a
    pipe each redraw would be another line, so there the loop prints metric rows instead."""
    return _in_notebook() or sys.stderr.isatty()


class _Progress:
    """A tqdm bar (terminal or notebook) that is silent where it should be."""

    def __init__(self, enabled: bool, total: int, initial: int, is_main: bool = True):
        enabled = enabled and _bar_renders()
        self.bar = tqdm.auto.tqdm(
            total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled
        )
        self.enabled = enabled
        self.is_main = is_main

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def show(self, **values: float) -> None:
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)
        elif self.is_main:
            print(text, flush=True)

    def close(self) -> None:
        self.bar.close()


def _format(row: dict[str, Any]) -> str:
    parts = [f"step {row['step']}"]
    parts += [f"{k}={v:.4f}" for k, v in row.items() if k != "step" and isinstance(v, float)]
    return "  ".join(parts)


def ema_view(state):
    """`state` with its EMA weights as `params` (unchanged when it keeps none): same structure,
    so the compiled eval step takes it without recompiling."""
    if state.ema_params is None:
        return state
    return state.replace(params=state.ema_params)


def run_eval(
    components: Components, state, eval_fn, abstract_metrics, max_batches: int | None = None
) -> dict[str, float]:
    """Evaluates `state` on the whole eval split (every example once; padding masked), or on
    its first `max_batches` batches."""
    c = components
    strategy = c.strategy
    batch_size = c.config.train.eval_batch_size or c.config.train.batch_size
    loader = data_lib.Loader(
        c.eval_source,
        batch_size,
        shuffle=False,
        last_batch="pad",
        process_index=strategy.process_index,
        process_count=strategy.process_count,
    )
    acc = strategy.zeros(abstract_metrics)
    batches = strategy.batches(loader.iter_epoch(0), c.config.data.prefetch)
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            acc = eval_fn(state, acc, batch)
            if strategy.sync_every_step:
                jax.block_until_ready(acc)
    finally:
        batches.close()
    return metrics_lib.compute(jax.device_get(acc))


def _metrics_shape(step_fn, state, source) -> Any:
    """The structure of a step's metrics (ShapeDtypeStructs), from `jax.eval_shape`.

    Traced with the "data" axis bound (a vmap of size 1), since under pmap the model may reduce
    over it (cross-device BatchNorm, see `module_for_strategy`).
    """
    batch = jax.tree.map(lambda x: x[None], example_batch(source))  # (1, 1, ...)
    mapped = jax.vmap(step_fn, in_axes=(None, 0), axis_name=parallel.DATA_AXIS)
    shapes = jax.eval_shape(mapped, state, batch)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), shapes)


def _num_outputs(c: Components) -> int | None:
    """The model's output size (last axis), from `jax.eval_shape`: no FLOPs, no compile."""
    abstract = c.abstract_state()
    example = example_batch(c.train_source)["inputs"]
    out = jax.eval_shape(
        lambda s, x: s.apply_fn({"params": s.params, **s.model_state}, x, train=False),
        abstract,
        example,
    )
    return int(out.shape[-1]) if out.ndim >= 1 else None


def _check_data(c: Components, log) -> None:
    """`data.validate`: the input checks of `dlkit.data.validate`, before compiling."""
    policy = c.config.data.validate
    if policy == "off":
        return
    try:
        warnings = validate.check_datasets(
            c.train_source,
            c.eval_source,
            num_outputs=lambda: _num_outputs(c),  # only once the inputs look right
            classification=isinstance(c.loss_fn, losses.SoftmaxCrossEntropy),
            batch_size=c.config.train.batch_size,
            last_batch=c.config.data.last_batch,
        )
    except validate.DataError as e:
        if policy == "error":
            raise
        warnings = [str(e)]
    for w in warnings:
        log(f"warning: {w}")


def _check_health(state, cfg: config_lib.Config) -> int:
    """Applies train.nan_policy to the state's guard; returns the number of skipped steps."""
    return _enforce_health(jax.device_get(state.guard), cfg)


def _enforce_health(guard, cfg: config_lib.Config) -> int:
    """Applies train.nan_policy to fetched guard counters; returns the skipped steps."""
    nonfinite.enforce(
        guard, policy=cfg.train.nan_policy, max_consecutive=cfg.train.max_consecutive_nonfinite
    )
    return int(guard.skipped)


@jax.jit
def _copy(tree):
    """Fresh device copies of `tree`'s arrays, queued behind the step that made them."""
    return jax.tree.map(jnp.copy, tree)


def fit(
    config: config_lib.Config,
    workdir: str | pathlib.Path | None = None,
    *,
    module=None,
    train_source=None,
    eval_source=None,
    strategy: parallel.Strategy | None = None,
    progress: bool | None = None,
    callbacks: Sequence[callbacks_lib.Callback] = (),
) -> FitResult:
    """Trains (or resumes training) according to `config`.

    Args:
      config: the run's `Config`.
      workdir: where config.json, metrics.jsonl and checkpoints/ go. If it holds checkpoints,
        training resumes from the newest valid one. None = keep nothing on disk.
      module, train_source, eval_source, strategy: replace the config's choice (see `build`).
      progress: show a progress bar; None = `config.train.progress`.
      callbacks: extra `dlkit.Callback`s, run after those the config turns on
        (see `dlkit.callbacks`).
    Returns:
      A `FitResult` with the final state and the metric history. After SIGTERM/SIGINT (or
      Ctrl-C in a notebook) it returns early, with a checkpoint of the last step written and
      `stopped` naming the signal.
    Raises:
      ConfigError / DataError (ValueErrors): bad settings or data, before anything compiles
        (including leakage, conflicting labels or NaN/Inf found with data.audit=fail).
      FloatingPointError: `train.nan_policy` stopped the run.

    `train.fast_dev_run` and `train.overfit_batches` adjust the run (see `dlkit.debugging`); a
    fast_dev_run without a workdir uses a temporary one, and `result.workdir` is then None.
    """
    cfg, workdir, fast_dev_tmp = debugging.prepare(config, workdir)
    user_callbacks = callbacks_lib.check_callbacks(callbacks)
    c = build(
        cfg, module=module, train_source=train_source, eval_source=eval_source, strategy=strategy
    )
    strategy = c.strategy
    is_main = strategy.process_index == 0
    total = cfg.train.steps
    show = (cfg.train.progress if progress is None else progress) and is_main
    log = (lambda text: print(text, flush=True)) if is_main else (lambda text: None)
    _check_data(c, log)
    audit_report = audit_lib.audit_for_fit(
        c.train_source, c.eval_source, cfg.data.audit, log, cfg.data.audit_max_examples
    )

    workdir = pathlib.Path(workdir) if workdir is not None else None
    cbs = callbacks_lib.default_callbacks(cfg, workdir) + user_callbacks
    ckpt = writer = None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        if is_main:
            workdir_lib.claim(
                workdir, cfg, archive_mismatched=cfg.checkpoint.archive_mismatched, log=log
            )
        ckpt = checkpoint_lib.Checkpointer(
            workdir / "checkpoints",
            max_to_keep=cfg.checkpoint.max_to_keep,
            keep_best=cfg.checkpoint.keep_best,
            best_metric=cfg.checkpoint.best_metric,
            best_mode=cfg.checkpoint.best_mode,
            async_save=cfg.checkpoint.async_save,
            log=log,
        )
    bar = batches = None
    stopped = None
    # From here on a signal only asks the loop to stop after a step (see dlkit.interrupt).
    stop = interrupt.StopRequests().__enter__()
    try:
        history = metrics_lib.History()
        if ckpt is not None and ckpt.latest_step() is not None:
            try:
                state, position = ckpt.restore(c.abstract_state())
            except FileNotFoundError:  # every step was corrupt and quarantined
                state, position = c.init_state(), 0
        else:
            state, position = c.init_state(), 0
        if position == 0 and cfg.checkpoint.init_from:  # a fresh run: fine-tuning starts here
            state = checkpoint_lib.init_from.apply(
                state, cfg.checkpoint.init_from, cfg.checkpoint.init_from_map, log=log
            )
        start = int(jax.device_get(state.step))
        k = dispatch.check_config(cfg, start)
        bar = _Progress(show, total, min(start, total), is_main)
        if workdir is not None and is_main:
            writer = metrics_lib.JsonlWriter(workdir / "metrics.jsonl")
            history = writer.truncate_after(start)
            workdir_lib.write_config(workdir, cfg, bar.write)
            if audit_report is not None:
                audit_report.write(workdir / "audit.json")
            if start:
                bar.write(f"resuming from step {start} in {workdir}")

        distributed.barrier("fit_start", cfg.parallel.barrier_timeout_s)
        train_shape = c.abstract_metrics(state)
        train_fn, report = _compile_train(c, state, train_shape)
        if is_main:
            bar.write(compute.format_report(report))
            if workdir is not None:
                (workdir / "compute.json").write_text(json.dumps(report, indent=2) + "\n")
        eval_fn = strategy.compile_eval(c.loss_fn, strategy.state_shardings(state))
        eval_shape = c.abstract_eval_metrics(state)
        loader = c.train_loader(position, indices=c.train_arrays is not None)
        # The prefetcher runs ahead of the loop, so the position saved is counted here.
        if k > 1:
            stacked = dispatch.stack(iter(loader), k)
            batches = strategy.batches(stacked, cfg.data.prefetch, stacked=True)
        else:
            batches = strategy.batches(iter(loader), cfg.data.prefetch)
        acc = strategy.zeros(train_shape)
        interval_start, interval_steps, paused = time.perf_counter(), 0, 0.0
        last_eval: dict[str, float] = {}

        def save(step: int) -> None:
            nonlocal paused
            t = time.perf_counter()
            _check_health(state, cfg)  # never checkpoint past a step the policy rejects
            ckpt.save(
                step,
                state,
                data_position=position + step - start,
                config=cfg.to_dict(),
                metrics=last_eval,
            )
            paused += time.perf_counter() - t

        run = callbacks_lib.Run(
            config=cfg,
            components=c,
            workdir=workdir,
            checkpointer=ckpt,
            log=bar.write if is_main else (lambda text: None),
            is_main=is_main,
            start_step=start,
            compute_report=report,
            get_state=lambda: state,
            history=history,
        )
        for cb in cbs:
            cb.on_train_start(run)

        if stop.signal_name is not None:  # asked to stop before the first step: nothing to save
            stopped = stop.signal_name
            bar.write(f"stopped by {stopped} before training started")
        last = total if stopped is None else start

        def train_row(step: int, acc_now, guard, steps: int) -> dict[str, Any]:
            """The logged train metrics of the `steps` steps up to `step`, read from the
            device (this waits for them) with the guard counters they ended on."""
            nonlocal interval_start, paused
            acc_host, guard_host = jax.device_get((acc_now, guard))
            row = metrics_lib.compute(acc_host, prefix="train/")
            row["train/skipped_steps"] = _enforce_health(guard_host, cfg)
            elapsed = time.perf_counter() - interval_start - paused
            row["train/learning_rate"] = float(c.schedule(step - 1))
            row["perf/steps_per_s"] = steps / max(elapsed, 1e-9)
            row.update(compute.perf_metrics(report, row["perf/steps_per_s"]))
            bar.show(loss=row["train/loss"])
            interval_start, paused = time.perf_counter(), 0.0
            return row

        def emit(row: dict[str, Any]) -> None:
            history.append(row)
            if writer is not None:
                writer.write(row)
            # With a bar, train metrics show in it and only evals get a line; without one
            # (logs, batch jobs), every logged row is a line.
            if "eval/loss" in row or not bar.enabled:
                bar.write(_format(row))
            for cb in cbs:
                cb.on_row(run, row)

        # A row of train metrics alone is read one call late: its metrics and guard counters
        # are set aside when it is due and fetched right after the next call is queued, so
        # the device never waits on the host's logging (the MLP at K=50 logs every second
        # call; docs/performance.md). Rows with an eval, a checkpoint, a stop or the last
        # step are read at once, so none is left set aside when the loop ends.
        deferred: tuple[int, Any, Any, int] | None = None
        # `step` is the last of the k steps each call runs (k = train.steps_per_dispatch).
        for step in range(start + k, last + 1, k):
            state, acc = train_fn(state, acc, next(batches))
            if strategy.sync_every_step:
                jax.block_until_ready(acc)
            interval_steps += k
            bar.update(k)
            if deferred is not None:
                emit({"step": deferred[0], **train_row(*deferred)})
                deferred = None
            stop_now = stop.requested(step) or run.stop_reason is not None
            due = ckpt is not None and (is_time(step, cfg.checkpoint.every_steps) or step == total)
            eval_due = is_time(step, cfg.train.eval_every) or step == total
            row: dict[str, Any] = {}
            if is_time(step, cfg.train.log_every) or step == total:
                if not (eval_due or due or stop_now or step == total):
                    # The step donates `state`: the counters the row needs get copies.
                    deferred = (step, acc, _copy(state.guard), interval_steps)
                else:
                    row.update(train_row(step, acc, state.guard, interval_steps))
                acc = strategy.zeros(train_shape)
                interval_steps = 0
            if eval_due:
                t = time.perf_counter()
                # With an EMA, eval/ is the EMA weights and eval_raw/ the trained ones.
                eval_batches = 1 if cfg.train.fast_dev_run else None
                last_eval = {
                    f"eval/{k}": v
                    for k, v in run_eval(
                        c, ema_view(state), eval_fn, eval_shape, eval_batches
                    ).items()
                }
                if state.ema_params is not None:
                    raw = run_eval(c, state, eval_fn, eval_shape, eval_batches)
                    last_eval.update({f"eval_raw/{k}": v for k, v in raw.items()})
                paused += time.perf_counter() - t
                row.update(last_eval)
            if row:
                emit({"step": step, **row})
            stop_now = stop_now or run.stop_reason is not None
            if ckpt is not None and (due or stop_now):
                save(step)
            if stop_now:
                stopped = stop.signal_name or run.stop_reason
                bar.write(
                    f"stopped by {stopped} after step {step}"
                    + (f"; checkpoint written to {ckpt.directory}" if ckpt else "")
                )
                break
    finally:
        stop.__exit__(None, None, None)
        if batches is not None:
            batches.close()
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
    distributed.barrier("fit_end", cfg.parallel.barrier_timeout_s)
    trace_counts = dict(strategy.trace_counts)
    if trace_counts.get("train", 0) > 1 and is_main:
        print(f"warning: the train step was compiled {trace_counts['train']} times")
    result = FitResult(
        state, history, workdir, trace_counts, stopped=stopped, compute_report=report
    )
    for cb in cbs:  # the checkpoints are durable now (ckpt.close waited for them)
        result = cb.on_train_end(run, result) or result
    if fast_dev_tmp is not None:
        fast_dev_tmp.cleanup()
        result = dataclasses.replace(result, workdir=None)
    return result


def _open_existing(workdir: pathlib.Path) -> checkpoint_lib.Checkpointer:
    """A Checkpointer on a workdir that must already hold checkpoints (creates nothing)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint in {directory}")
    return checkpoint_lib.Checkpointer(directory, max_to_keep=None, read_only=True)


def load_checkpoint(
    workdir: str | pathlib.Path,
    step: int | None = None,
    *,
    strategy: parallel.Strategy | None = None,
    weights: str = "ema",
) -> tuple[state_lib.TrainState, config_lib.Config]:
    """Loads a run's checkpoint onto this machine, e.g. into a notebook.

    Args:
      workdir: the run's directory (holding checkpoints/).
      step: which step; None = the newest.
      strategy: where to put the state; default one device (`jit` strategy, 1 device), which
        on a CPU-only machine is the plain CPU. The saving run's device count does not matter.
      weights: "ema" = when the run kept an EMA of the weights (`train.ema_decay` > 0),
        `state.params` are the EMA weights (what the run evaluated); "raw" = the trained
        weights as saved (the state to continue training from).
    Returns:
      (state, config): the TrainState and the run's Config.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"load_checkpoint(weights=...): expected ema | raw, got {weights!r}")
    workdir = pathlib.Path(workdir)
    with _open_existing(workdir) as ckpt:
        step = ckpt.valid_step(step)
        cfg = config_lib.Config.from_dict(ckpt.restore_config(step))
        strategy = strategy or parallel.make_strategy("jit", num_devices=1)
        c = build(cfg, strategy=strategy)
        state, _ = ckpt.restore(c.abstract_state(), step)
    return (ema_view(state) if weights == "ema" else state), cfg


def evaluate(
    workdir: str | pathlib.Path,
    step: int | None = None,
    *,
    split: str | None = None,
    strategy: parallel.Strategy | None = None,
) -> dict[str, Any]:
    """Evaluates a run's checkpoint on its eval split (or `split`), with its EMA weights when
    it kept them (as the run's own `eval/` metrics).

    Returns:
      {"step": int, "split": str, "loss": float, <metrics>: float, "num_examples": int}.
    """
    workdir = pathlib.Path(workdir)
    with _open_existing(workdir) as ckpt:
        step = ckpt.valid_step(step)
        cfg = config_lib.Config.from_dict(ckpt.restore_config(step))
        if split is not None:
            cfg.data.eval_split = split
        strategy = strategy or parallel.make_strategy(
            "jit",
            sync_every_step=cfg.parallel.sync_every_step,
            compiler_options=_compiler_options(cfg),
        )
        c = build(cfg, strategy=strategy)
        state, _ = ckpt.restore(c.abstract_state(), step)
    eval_fn = strategy.compile_eval(c.loss_fn)
    result = run_eval(c, ema_view(state), eval_fn, c.abstract_eval_metrics(state))
    return {
        "step": step,
        "split": cfg.data.eval_split,
        **result,
        "num_examples": len(c.eval_source),
    }
