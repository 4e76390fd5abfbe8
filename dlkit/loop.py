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
evaluate, checkpoint. The state, the loader position and the config are all a run needs to
continue bit-for-bit, and all three go into every checkpoint.
"""

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
import tqdm.auto

from dlkit import checkpoint as checkpoint_lib
from dlkit import config as config_lib
from dlkit import data as data_lib
from dlkit import losses, models, optim, parallel, steps
from dlkit import metrics as metrics_lib
from dlkit import state as state_lib


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

    def abstract_state(self) -> state_lib.TrainState:
        """The TrainState's shapes, with each leaf's target sharding attached."""
        example = example_batch(self.train_source)["inputs"]
        abstract = state_lib.abstract_train_state(
            self.module, self.tx, example, self.config.train.seed
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
        )


def _check_config(cfg: config_lib.Config) -> None:
    """Errors a user can cause, raised before anything is compiled."""
    positive = {
        "train.steps": cfg.train.steps,
        "train.batch_size": cfg.train.batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise config_lib.ConfigError(f"{key}: expected a positive int, got {value}")
    non_negative = {
        "train.log_every": cfg.train.log_every,
        "train.eval_every": cfg.train.eval_every,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "data.prefetch": cfg.data.prefetch,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise config_lib.ConfigError(f"{key}: expected an int >= 0, got {value}")
    if cfg.checkpoint.max_to_keep < 1:
        raise config_lib.ConfigError(
            f"checkpoint.max_to_keep: expected an int >= 1, got {cfg.checkpoint.max_to_keep}"
        )


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
    strategy = strategy or parallel.make_strategy(
        cfg.parallel.strategy, cfg.parallel.num_devices, cfg.parallel.sync_every_step
    )
    strategy.check_batch_size(cfg.train.batch_size)
    strategy.check_batch_size(
        cfg.train.eval_batch_size or cfg.train.batch_size, "train.eval_batch_size"
    )
    if module is None:
        module = models.build(cfg.model.name, **cfg.model.options)
    module = module_for_strategy(module, strategy)
    data_options = {
        "data_dir": cfg.data.data_dir or None,
        "path": cfg.data.path or None,
        "seq_len": cfg.data.seq_len,
    }
    if train_source is None:
        train_source = data_lib.load_dataset(cfg.data.name, "train", **data_options)
    if eval_source is None:
        eval_source = data_lib.load_dataset(cfg.data.name, cfg.data.eval_split, **data_options)
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
    return Components(cfg, strategy, module, loss_fn, tx, schedule, train_source, eval_source)


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the final TrainState (on the run's devices).
      history: every metric row of the run, including rows from before a resume.
      workdir: the run's directory, or None.
      trace_counts: times each compiled function was traced; {"train": 1, "eval": 1} means
        no recompilation happened.
    """

    state: state_lib.TrainState
    history: metrics_lib.History
    workdir: pathlib.Path | None
    trace_counts: dict[str, int]


class _Progress:
    """A tqdm bar (terminal or notebook) that is silent where it should be."""

    def __init__(self, enabled: bool, total: int, initial: int, is_main: bool = True):
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


def run_eval(components: Components, state, eval_fn, abstract_metrics) -> dict[str, float]:
    """Evaluates `state` on the whole eval split (every example once; padding masked)."""
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
    batches = data_lib.prefetch(loader.iter_epoch(0), strategy.put_batch, c.config.data.prefetch)
    try:
        for batch in batches:
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


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _write_config(workdir: pathlib.Path, cfg: config_lib.Config, progress: _Progress) -> None:
    """Writes config.json, noting which keys differ from the one already there."""
    path = workdir / "config.json"
    new = cfg.to_dict()
    if path.exists():
        old, flat_new = _flatten(json.loads(path.read_text())), _flatten(new)
        changed = sorted(k for k in old.keys() | flat_new.keys() if old.get(k) != flat_new.get(k))
        if changed:
            progress.write(f"note: config differs from {path} in: {', '.join(changed)}")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(new, indent=2) + "\n")
    tmp.replace(path)


def fit(
    config: config_lib.Config,
    workdir: str | pathlib.Path | None = None,
    *,
    module=None,
    train_source=None,
    eval_source=None,
    strategy: parallel.Strategy | None = None,
    progress: bool | None = None,
) -> FitResult:
    """Trains (or resumes training) according to `config`.

    Args:
      config: the run's `Config`.
      workdir: where config.json, metrics.jsonl and checkpoints/ go. If it holds checkpoints,
        training resumes from the newest. None = keep nothing on disk.
      module, train_source, eval_source, strategy: replace the config's choice (see `build`).
      progress: show a progress bar; None = `config.train.progress`.
    Returns:
      A `FitResult` with the final state and the metric history.
    """
    cfg = config
    c = build(
        cfg, module=module, train_source=train_source, eval_source=eval_source, strategy=strategy
    )
    strategy = c.strategy
    is_main = strategy.process_index == 0
    total = cfg.train.steps
    show = (cfg.train.progress if progress is None else progress) and is_main

    workdir = pathlib.Path(workdir) if workdir is not None else None
    ckpt = writer = None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        ckpt = checkpoint_lib.Checkpointer(
            workdir / "checkpoints",
            max_to_keep=cfg.checkpoint.max_to_keep,
            async_save=cfg.checkpoint.async_save,
        )
    bar = None
    batches = None
    try:
        history = metrics_lib.History()
        if ckpt is not None and ckpt.latest_step() is not None:
            state, position = ckpt.restore(c.abstract_state())
        else:
            state, position = c.init_state(), 0
        start = int(jax.device_get(state.step))
        bar = _Progress(show, total, min(start, total), is_main)
        if workdir is not None and is_main:
            writer = metrics_lib.JsonlWriter(workdir / "metrics.jsonl")
            history = writer.truncate_after(start)
            _write_config(workdir, cfg, bar)
            if start:
                bar.write(f"resuming from step {start} in {workdir}")

        train_fn = strategy.compile_train(c.loss_fn)
        eval_fn = strategy.compile_eval(c.loss_fn)
        train_shape = _metrics_shape(
            lambda s, b: steps.train_step(s, b, loss_fn=c.loss_fn)[1], state, c.train_source
        )
        eval_shape = _metrics_shape(
            functools.partial(steps.eval_step, loss_fn=c.loss_fn), state, c.eval_source
        )
        loader = data_lib.Loader(
            c.train_source,
            cfg.train.batch_size,
            seed=cfg.train.seed,
            shuffle=cfg.data.shuffle,
            last_batch=cfg.data.last_batch,
            process_index=strategy.process_index,
            process_count=strategy.process_count,
            position=position,
        )
        # The prefetcher runs ahead of the loop, so the position saved is counted here.
        batches = data_lib.prefetch(iter(loader), strategy.put_batch, cfg.data.prefetch)
        acc = strategy.zeros(train_shape)
        interval_start, interval_steps, paused = time.perf_counter(), 0, 0.0

        def evaluate_now(step: int) -> dict[str, float]:
            nonlocal paused
            t = time.perf_counter()
            result = run_eval(c, state, eval_fn, eval_shape)
            paused += time.perf_counter() - t
            return {f"eval/{k}": v for k, v in result.items()}

        for step in range(start + 1, total + 1):
            state, acc = train_fn(state, acc, next(batches))
            if strategy.sync_every_step:
                jax.block_until_ready(acc)
            interval_steps += 1
            bar.update()
            row: dict[str, Any] = {}
            if is_time(step, cfg.train.log_every) or step == total:
                row.update(metrics_lib.compute(jax.device_get(acc), prefix="train/"))
                elapsed = time.perf_counter() - interval_start - paused
                row["train/learning_rate"] = float(c.schedule(step - 1))
                row["perf/steps_per_s"] = interval_steps / max(elapsed, 1e-9)
                bar.show(loss=row["train/loss"])
                acc = strategy.zeros(train_shape)
                interval_start, interval_steps, paused = time.perf_counter(), 0, 0.0
            if is_time(step, cfg.train.eval_every) or step == total:
                row.update(evaluate_now(step))
            if row:
                row = {"step": step, **row}
                history.append(row)
                if writer is not None:
                    writer.write(row)
                # With a bar, train metrics show in it and only evals get a line; without one
                # (logs, batch jobs), every logged row is a line.
                if "eval/loss" in row or not bar.enabled:
                    bar.write(_format(row))
            if ckpt is not None and (is_time(step, cfg.checkpoint.every_steps) or step == total):
                t = time.perf_counter()
                ckpt.save(step, state, data_position=position + step - start, config=cfg.to_dict())
                paused += time.perf_counter() - t
    finally:
        if batches is not None:
            batches.close()
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
    trace_counts = dict(strategy.trace_counts)
    if trace_counts.get("train", 0) > 1 and is_main:
        print(f"warning: the train step was compiled {trace_counts['train']} times")
    return FitResult(state, history, workdir, trace_counts)


def load_checkpoint(
    workdir: str | pathlib.Path,
    step: int | None = None,
    *,
    strategy: parallel.Strategy | None = None,
) -> tuple[state_lib.TrainState, config_lib.Config]:
    """Loads a run's checkpoint onto this machine, e.g. into a notebook.

    Args:
      workdir: the run's directory (holding checkpoints/).
      step: which step; None = the newest.
      strategy: where to put the state; default one device (`jit` strategy, 1 device), which
        on a CPU-only machine is the plain CPU. The saving run's device count does not matter.
    Returns:
      (state, config): the TrainState and the run's Config.
    """
    workdir = pathlib.Path(workdir)
    with checkpoint_lib.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        cfg = config_lib.Config.from_dict(ckpt.restore_config(step))
        strategy = strategy or parallel.make_strategy("jit", num_devices=1)
        c = build(cfg, strategy=strategy)
        state, _ = ckpt.restore(c.abstract_state(), step)
    return state, cfg


def evaluate(
    workdir: str | pathlib.Path,
    step: int | None = None,
    *,
    split: str | None = None,
    strategy: parallel.Strategy | None = None,
) -> dict[str, Any]:
    """Evaluates a run's checkpoint on its eval split (or `split`).

    Returns:
      {"step": int, "split": str, "loss": float, <metrics>: float, "num_examples": int}.
    """
    workdir = pathlib.Path(workdir)
    with checkpoint_lib.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        step = ckpt.resolve_step(step)
        cfg = config_lib.Config.from_dict(ckpt.restore_config(step))
        if split is not None:
            cfg.data.eval_split = split
        strategy = strategy or parallel.make_strategy(
            "jit", sync_every_step=cfg.parallel.sync_every_step
        )
        c = build(cfg, strategy=strategy)
        state, _ = ckpt.restore(c.abstract_state(), step)
    eval_fn = strategy.compile_eval(c.loss_fn)
    eval_shape = _metrics_shape(
        functools.partial(steps.eval_step, loss_fn=c.loss_fn), state, c.eval_source
    )
    result = run_eval(c, state, eval_fn, eval_shape)
    return {
        "step": step,
        "split": cfg.data.eval_split,
        **result,
        "num_examples": len(c.eval_source),
    }
