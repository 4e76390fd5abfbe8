"""Building a run's pieces from its `Config`: the model, data, loss, optimizer and strategy.

    c = dlkit.build(cfg)                      # a `Components`
    state = c.init_state()                    # created directly with its target sharding
    loader = c.train_loader()                 # this process's slice of the training data

This is where the config is read (with `fit` and the small factories it calls): models, losses,
steps and optimizers take explicit arguments. Every error a user can cause here is raised
before anything is compiled.
"""

import dataclasses
import functools
import os
import sys
from typing import Any

import jax
import numpy as np

from dlkit import checkpoint as checkpoint_lib
from dlkit import (
    compute,
    debugging,
    losses,
    models,
    optim,
    parallel,
    precision,
    step_wrappers,
    steps,
    xla_cpu,
)
from dlkit import config as config_lib
from dlkit import data as data_lib
from dlkit import state as state_lib
from dlkit.data import augment as augment_lib
from dlkit.data import validate


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


def resolve_model(model, module=None):
    """The module `fit`/`build` train for `fit(model=...)` (or its older name `module=`): a
    Linen module as it is, an `nnx.Module` instance wrapped once by `NNXAdapter.from_module`."""
    if model is not None and module is not None:
        raise config_lib.ConfigError(
            "fit(model=..., module=...): expected one of them (module is the older name of "
            f"model), got both: {type(model).__name__} and {type(module).__name__}"
        )
    model = module if model is None else model
    if model is None:
        return None
    import flax.linen as nn

    if isinstance(model, nn.Module):
        return model
    # flax.nnx (and the IPython it imports) only for models that may be NNX: importing it costs
    # every run's start-up time (docs/performance.md, "Start-up").
    import flax.nnx as nnx

    from dlkit.models.nnx_adapter import NNXAdapter

    if isinstance(model, NNXAdapter):
        return model
    if isinstance(model, nnx.Module):
        return NNXAdapter.from_module(model)
    if isinstance(model, type) and issubclass(model, (nn.Module, nnx.Module)):
        raise config_lib.ConfigError(
            f"model: expected a module instance, got the class {model.__name__}; pass "
            f"{model.__name__}(...)"
            + (" with rngs=nnx.Rngs(0)" if issubclass(model, nnx.Module) else "")
        )
    raise config_lib.ConfigError(
        f"model: expected a flax.linen.Module or an nnx.Module instance, got {type(model).__name__}"
    )


def trained_model(module, state):
    """What `FitResult.model` holds: for an NNX model a new `nnx.Module` with `state`'s weights
    and statistics; for a Linen module the module itself."""
    # An NNXAdapter exists only if its module was imported; importing it here would load
    # flax.nnx at the end of every Linen run.
    adapter = sys.modules.get("dlkit.models.nnx_adapter")
    if adapter is None or not isinstance(module, adapter.NNXAdapter):
        return module
    variables = {"params": state.params}
    if state.model_state and "state" in state.model_state:
        variables["state"] = state.model_state["state"]
    return module.to_module(variables)


def module_for_data(module, source):
    """`module` with `vocab_size` taken from a text source when it is 0 ("from the data").

    A language model's vocabulary is the file's characters (or a token corpus's manifest),
    known only once the data are read.
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
            f"distinct tokens the data may hold, from {_vocab_origin(source)}), got "
            f"{module.vocab_size}"
        )
    return module


def _vocab_origin(source) -> str:
    """Where a text source's vocabulary size comes from, for errors."""
    path = getattr(getattr(source, "vocab", None), "path", None)  # a BPE corpus's tokenizer
    return f"{os.path.dirname(path)}/manifest.json" if path else "the characters of the text"


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

    def train_loader(self, position: int = 0, data_state=None):
        """The training loader the config asks for (this process's slice), at `position`: a
        `dlkit.data.Loader`, or with data.pipeline=grain a `GrainLoader` (close it: it may run
        worker processes) continuing from `data_state` (`GrainLoader.state_at`) when given."""
        cfg = self.config
        if cfg.data.pipeline == "grain":
            from dlkit.data import grain_pipeline

            return grain_pipeline.GrainLoader(
                self.train_source,
                cfg.train.batch_size,
                seed=cfg.train.seed,
                shuffle=cfg.data.shuffle,
                process_index=self.strategy.process_index,
                process_count=self.strategy.process_count,
                workers=cfg.data.grain_workers,
                worker_buffer=cfg.data.grain_worker_buffer,
                read_threads=cfg.data.grain_read_threads,
                read_buffer=cfg.data.grain_read_buffer,
                position=position,
                data_state=data_state,
            )
        return data_lib.Loader(
            self.train_source,
            cfg.train.batch_size,
            seed=cfg.train.seed,
            shuffle=cfg.data.shuffle,
            last_batch=cfg.data.last_batch,
            process_index=self.strategy.process_index,
            process_count=self.strategy.process_count,
            position=position,
        )

    def train_step(self, **overrides) -> step_wrappers.Step:
        """The run's train step, `step(state, batch) -> (state, metrics)`: the core step with
        the wrappers the config turns on (`step_wrappers.make_train_step`), built for this
        strategy's axis. `overrides` replace options (e.g. `grad_accum_steps=1`)."""
        t = self.config.train
        options = dict(
            axis_name=self.strategy.axis_name,
            grad_accum_steps=t.grad_accum_steps,
            loss_scaling=self.policy.loss_scaling,
            loss_spike_factor=t.loss_spike_factor,
            ema_decay=t.ema_decay,
            augment=self.augment,
        )
        return step_wrappers.make_train_step(self.loss_fn, **{**options, **overrides})

    def eval_step(self):
        """`eval(state, batch) -> metrics` for this strategy's axis."""
        return functools.partial(
            steps.eval_step, loss_fn=self.loss_fn, axis_name=self.strategy.axis_name
        )

    def abstract_metrics(self, state) -> Any:
        """The train metrics' structure as replicated `ShapeDtypeStruct`s (an accumulator)."""
        # One example: neither micro-batches nor mixing pairs apply, and neither adds a metric.
        step = self.train_step(axis_name=None, grad_accum_steps=1, augment=None)
        shape = _metrics_shape(lambda s, b: step(s, b)[1], state, self.train_source)
        replicated = self.strategy.replicated
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shape
        )

    def abstract_eval_metrics(self, state) -> Any:
        """The eval metrics' structure (`ShapeDtypeStruct`s), for the eval accumulator."""
        step = functools.partial(steps.eval_step, loss_fn=self.loss_fn)
        return _metrics_shape(step, state, self.eval_source)


def compiler_options(cfg: config_lib.Config) -> dict[str, str]:
    """The XLA:CPU options of `train.xla_cpu_ynn_fusions`; a ConfigError if malformed."""
    try:
        return xla_cpu.compiler_options(cfg.train.xla_cpu_ynn_fusions)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None


def build(
    cfg: config_lib.Config,
    *,
    module=None,
    train_source=None,
    eval_source=None,
    strategy: parallel.Strategy | None = None,
    loss_fn=None,
    metrics=None,
) -> Components:
    """Makes the run's pieces from `cfg`; any piece passed in replaces the config's choice.

    Args:
      cfg: the run's config.
      module: a Flax module to train instead of `cfg.model` (e.g. your own, from a notebook).
      train_source, eval_source: random-access datasets (dicts with "inputs" and "labels")
        instead of `cfg.data`.
      strategy: a `parallel.Strategy` instead of `cfg.parallel`.
      loss_fn, metrics: your own loss `loss_fn(outputs, labels) -> (B,)` instead of
        `cfg.loss`, and metrics {name: fn(outputs, labels) -> (B,)}
        (see `dlkit.losses.CustomLoss`); checked on the model's output shapes by `check_loss`.
    Raises:
      ConfigError: a setting that cannot work, before anything is compiled.
    """
    cfg.validate()
    policy = precision.get_policy(cfg.train.precision)
    cache = compute.compilation_cache_dir(cfg.train.compilation_cache_dir)
    if cache:
        compute.enable_compilation_cache(cache)
    strategy = _strategy(cfg, strategy)
    train_source, eval_source = _sources(cfg, train_source, eval_source)
    if module is None:
        module = models.from_config(cfg.model)
    if policy.name != "float32":
        module = precision.apply_to_module(policy, module)
    module = module_for_data(module_for_strategy(module, strategy), train_source)
    loss_fn = losses.custom(loss_fn, metrics, default=losses.from_config(cfg.loss))
    tx, schedule = optim.from_config(cfg.optim, cfg.train.steps)
    if policy.loss_scaling:
        tx = precision.with_loss_scaling(tx)
    augment = _make_augment(cfg, strategy, train_source, loss_fn)
    if cfg.data.pipeline == "grain":
        from dlkit.data import grain_pipeline

        grain_pipeline.check_config(cfg, strategy, train_source)
    return Components(
        cfg, strategy, module, loss_fn, tx, schedule, train_source, eval_source, policy, augment
    )


def check_loss(c: "Components") -> None:
    """Raises ConfigError, before anything compiles, when a custom loss or metric cannot take
    the model's outputs and the labels or does not return one value per example."""
    if not isinstance(c.loss_fn, losses.CustomLoss):
        return
    # Two examples, so a batch axis is told apart from a size-1 axis.
    batch = data_lib.get_batch(c.train_source, np.arange(min(2, len(c.train_source))))
    state = c.abstract_state()

    def outputs_of(state, x):
        return state.apply_fn({"params": state.params, **state.model_state}, x, train=False)

    outputs = jax.eval_shape(outputs_of, state, batch["inputs"])
    labels = jax.ShapeDtypeStruct(batch["labels"].shape, batch["labels"].dtype)
    own_metrics = getattr(c.loss_fn.loss_fn, "metrics", None)
    if own_metrics is not None and c.loss_fn.metric_fns:
        taken = jax.eval_shape(own_metrics, outputs, labels).keys()
        for name, _ in c.loss_fn.metric_fns:
            if name in taken:
                raise config_lib.ConfigError(
                    f"metrics: expected a name other than those the loss logs itself "
                    f"({', '.join(sorted(taken))}), got {name!r}: yours would replace its "
                    f"train/{name} and eval/{name}"
                )
    checks = [("loss_fn", c.loss_fn.loss_fn)] + list(c.loss_fn.metric_fns)
    for name, fn in checks:
        where = (
            f"{name}(outputs {outputs.shape} {outputs.dtype}, labels {labels.shape} {labels.dtype})"
        )
        try:
            result = jax.eval_shape(fn, outputs, labels)
        except Exception as e:  # any error of the user's function, before compiling
            raise config_lib.ConfigError(f"{name}: calling {where} failed: {e}") from e
        shape = getattr(result, "shape", None)
        if shape is None or shape not in {labels.shape, labels.shape[:1]}:
            raise config_lib.ConfigError(
                f"{name}: expected one value per example, shape {labels.shape[:1]} (or "
                f"{labels.shape}, one per label), from {where}; got "
                f"{shape if shape is not None else type(result).__name__}"
            )


def _strategy(cfg: config_lib.Config, strategy: parallel.Strategy | None) -> parallel.Strategy:
    """The config's strategy (or `strategy`), checked against the batch sizes."""
    options = compiler_options(cfg)  # checked even when a strategy is given
    strategy = strategy or parallel.make_strategy(
        cfg.parallel.strategy,
        cfg.parallel.num_devices,
        cfg.parallel.sync_every_step,
        param_sharding=cfg.parallel.param_sharding,
        fsdp_min_size=cfg.parallel.fsdp_min_size,
        compiler_options=options,
    )
    strategy.check_batch_size(cfg.train.batch_size)
    _check_grad_accum(cfg, strategy)
    strategy.check_batch_size(
        cfg.train.eval_batch_size or cfg.train.batch_size, "train.eval_batch_size"
    )
    return strategy


def _sources(cfg: config_lib.Config, train_source, eval_source) -> tuple[Any, Any]:
    """The train and eval sources: the config's datasets unless given, with the held-out
    validation split, `data.train_examples` and `train.overfit_batches` applied."""
    d = cfg.data
    data_options = {
        "data_dir": d.data_dir or None,
        "path": d.path or None,
        "seq_len": d.seq_len,
        "scale": d.scale,
    }
    held_out = d.validation_examples
    if train_source is not None and eval_source is None and not held_out:
        # The config's dataset is other data than train_source: evaluate on a held-out tenth
        # of train_source instead (fit names it in the log), never on the config's dataset.
        held_out = len(train_source) // 10
        if not held_out:
            raise config_lib.ConfigError(
                f"eval_source: expected your own eval data, or data.validation_examples=N; got "
                f"neither, and train_source has {len(train_source)} examples, too few to hold "
                "out a tenth (the config's dataset is other data, so it is not used)"
            )
    if (
        held_out
        and eval_source is None
        and (d.eval_split == "validation" or train_source is not None)
    ):
        full = train_source or data_lib.load_dataset(d.name, "train", **data_options)
        eval_source = data_lib.Subset(
            full, held_out, len(full) - held_out, what="data.validation_examples"
        )
    if train_source is None:
        train_source = data_lib.load_dataset(d.name, "train", **data_options)
    if held_out:
        if not 0 < held_out < len(train_source):
            raise config_lib.ConfigError(
                f"data.validation_examples: expected 0..{len(train_source) - 1}, got {held_out}"
            )
        train_source = data_lib.Subset(train_source, len(train_source) - held_out)
    if d.train_examples:
        train_source = data_lib.Subset(train_source, d.train_examples)
    if eval_source is None:
        if d.eval_split == "validation":
            raise config_lib.ConfigError(
                "data.eval_split: 'validation' needs data.validation_examples > 0 (the last "
                "N train examples held out), got data.validation_examples=0"
            )
        eval_source = data_lib.load_dataset(d.name, d.eval_split, **data_options)
    if cfg.train.overfit_batches:
        train_source, eval_source = debugging.overfit_sources(
            train_source, cfg.train.overfit_batches, cfg.train.batch_size
        )
    return train_source, eval_source


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


def checked_sources(c: Components, log) -> tuple[Any, Any]:
    """The (train, eval) sources `data.validate` and `data.audit` read: the sources, or with
    data.pipeline=grain (data that may not fit in memory) a bounded seeded sample of each,
    with a line saying what they cover."""
    d = c.config.data
    if d.pipeline != "grain" or (d.validate == "off" and d.audit == "off"):
        return c.train_source, c.eval_source
    from dlkit.data import grain_pipeline

    train = grain_pipeline.Sample(c.train_source, seed=c.config.train.seed)
    eval_ = grain_pipeline.Sample(c.eval_source, seed=c.config.train.seed)
    log(f"data checks (data.pipeline=grain): {train.describe('train')}; {eval_.describe('eval')}")
    return train, eval_


def check_data(c: Components, log, checked=None) -> None:
    """`data.validate`: the input checks of `dlkit.data.validate`, before compiling, on
    `checked` (`checked_sources`) when given."""
    policy = c.config.data.validate
    if policy == "off":
        return
    train, eval_ = checked or (c.train_source, c.eval_source)
    try:
        warnings = validate.check_datasets(
            train,
            eval_,
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
