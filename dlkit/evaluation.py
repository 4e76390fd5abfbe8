"""After (or beside) a run: evaluate a model, load a checkpoint into a notebook.

    metrics = dlkit.evaluate("runs/digits")           # the newest step on its eval split
    state, cfg = dlkit.load_checkpoint("runs/digits")  # onto one (CPU) device

`run_eval` is the evaluation `fit` runs on its eval cadence: every example of the eval split
once, padding masked, metrics summed on the device and fetched once at the end.
"""

import os
from typing import Any

import flax.linen as nn
import jax
from etils import epath

from dlkit import checkpoint as checkpoint_lib
from dlkit import components, parallel, programs, run_record, storage
from dlkit import config as config_lib
from dlkit import data as data_lib
from dlkit import metrics as metrics_lib
from dlkit import state as state_lib


def ema_view(state):
    """`state` with its EMA weights as `params` (unchanged when it keeps none): same structure,
    so the compiled eval step takes it without recompiling."""
    if state.ema_params is None:
        return state
    return state.replace(params=state.ema_params)


def run_eval(
    c: components.Components, state, eval_fn, abstract_metrics, max_batches: int | None = None
) -> dict[str, float]:
    """Evaluates `state` on the whole eval split (every example once; padding masked), or on
    its first `max_batches` batches."""

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


def open_existing(workdir: epath.Path) -> checkpoint_lib.Checkpointer:
    """A Checkpointer on a workdir that must already hold checkpoints (creates nothing)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint in {directory}")
    return checkpoint_lib.Checkpointer(directory, max_to_keep=None, read_only=True)


def build_for(
    workdir,
    cfg,
    strategy,
    *,
    eval_source=None,
    model=None,
    need_data=True,
    loss_fn=None,
    metrics=None,
):
    """The run's Components for evaluating `workdir`: its recorded data and model (see
    `dlkit.run_record`), or `eval_source` / `model` given; RecordError if the run's data or
    model cannot be rebuilt and none is given. `loss_fn` / `metrics`: the run's own, as given
    to `fit` (None = the config's)."""
    run_record.check(workdir, eval_source=eval_source, model=model, need_data=need_data)
    record = run_record.read(workdir) or {}
    python_train = record.get("train", {}).get("kind") == "python"
    # A run trained on Python objects has no training data to rebuild; the eval data stand in
    # (they only give shapes, and a text vocabulary).
    train_source = eval_source if python_train and eval_source is not None else None
    return components.build(
        cfg,
        module=components.resolve_model(model),
        train_source=train_source,
        eval_source=eval_source,
        strategy=strategy,
        loss_fn=loss_fn,
        metrics=metrics,
    )


def load_checkpoint(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    strategy: parallel.Strategy | None = None,
    weights: str = "ema",
    model=None,
) -> tuple[state_lib.TrainState, config_lib.Config]:
    """Loads a run's checkpoint onto this machine, e.g. into a notebook.

    Args:
      workdir: the run's directory (holding checkpoints/): a local path or a `gs://` URL.
      step: which step; None = the newest.
      strategy: where to put the state; default one device (`jit` strategy, 1 device), which
        on a CPU-only machine is the plain CPU. The saving run's device count does not matter.
      weights: "ema" = when the run kept an EMA of the weights (`train.ema_decay` > 0),
        `state.params` are the EMA weights (what the run evaluated); "raw" = the trained
        weights as saved (the state to continue training from).
      model: the model the run trained when it was your own (`fit(model=...)`): a Linen
        module, or an `nnx.Module` instance of the same structure, which is updated in place
        with the checkpoint's weights and BatchNorm statistics (`nnx.update`) and set to eval
        mode. None = the run's `config.model`.
    Returns:
      (state, config): the TrainState and the run's Config.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"load_checkpoint(weights=...): expected ema | raw, got {weights!r}")
    workdir = storage.resolve(workdir, "workdir")
    with open_existing(workdir) as ckpt:
        step = ckpt.valid_step(step)
        cfg = config_lib.Config.from_dict(ckpt.restore_config(step))
        strategy = strategy or parallel.make_strategy("jit", num_devices=1)
        c = build_for(workdir, cfg, strategy, model=model, need_data=False)
        state, _ = ckpt.restore(c.abstract_state(), step)
    state = ema_view(state) if weights == "ema" else state
    if model is not None and not isinstance(model, nn.Module):
        import flax.nnx as nnx

        nnx.update(model, nnx.state(components.trained_model(c.module, state)))
        model.eval()
    return state, cfg


def best_step(ckpt: checkpoint_lib.Checkpointer, cfg: config_lib.Config) -> int:
    """The step on disk that the run's own ranking calls best: by `train.early_stopping_metric`
    (else `checkpoint.best_metric` when `checkpoint.keep_best` is on) and its mode, read from
    the eval metrics each step recorded when it was saved; ties go to the earlier step, as in
    retention and early stopping.

    Raises:
      ValueError: the run ranked nothing, or no step on disk recorded the metric.
    """
    t, c = cfg.train, cfg.checkpoint
    if t.early_stopping_metric:
        metric, mode, key = (
            t.early_stopping_metric,
            t.early_stopping_mode,
            "train.early_stopping_mode",
        )
    elif c.keep_best:
        metric, mode, key = c.best_metric, c.best_mode, "checkpoint.best_mode"
    else:
        raise ValueError(
            f"step: expected a step number for a run that ranked no checkpoints (neither "
            f"train.early_stopping_metric nor checkpoint.keep_best was set), got 'best'; "
            f"saved steps: {ckpt.all_steps()}"
        )
    steps = ckpt.all_steps()
    metrics = {s: checkpoint_lib.retention.step_metrics(ckpt.directory / str(s)) for s in steps}
    best = checkpoint_lib.retention.ranked(
        metrics, metric, config_lib.metric_mode(metric, mode, key)
    )
    if not best:
        raise ValueError(
            f"step: 'best' ranks steps by {metric}, which none of the steps in "
            f"{ckpt.directory} ({steps}) recorded when it was saved"
        )
    return best[0]


def evaluate(
    workdir: str | os.PathLike,
    step: int | str | None = None,
    *,
    split: str | None = None,
    strategy: parallel.Strategy | None = None,
    model=None,
    eval_source=None,
    loss_fn=None,
    metrics=None,
) -> dict[str, Any]:
    """Evaluates a run's checkpoint on the data it evaluated on (recorded in the workdir's
    run.json) or its config's `split`, with its EMA weights when it kept them (as the run's own
    `eval/` metrics). `model`: the run's own model, as for `load_checkpoint`; `eval_source`:
    the data, required when the run was given Python objects (they cannot be rebuilt);
    `loss_fn` / `metrics`: the run's own loss and metrics, required when it was trained with
    them (`fit(loss_fn=..., metrics=...)`, recorded in run.json), so that "loss" is the number
    the run logged as eval/loss, not the config's loss under the same name. `step`: a saved
    step, None for the newest, or "best" for the one the run's early stopping (or keep_best)
    ranks best (`best_step`): after early stopping the newest is the last step trained.

    Returns:
      {"step": int, "split": str, "loss": float, <metrics>: float, "num_examples": int}.
    """
    if isinstance(step, str) and step != "best" or isinstance(step, bool | float):
        raise ValueError(f"step: expected a step number, 'best' or None, got {step!r}")
    workdir = storage.resolve(workdir, "workdir")
    run_record.check_loss(workdir, loss_fn, metrics)
    with open_existing(workdir) as ckpt:
        if step == "best":
            newest = config_lib.Config.from_dict(ckpt.restore_config(ckpt.valid_step()))
            step = best_step(ckpt, newest)
        step = ckpt.valid_step(step)
        cfg = config_lib.Config.from_dict(ckpt.restore_config(step))
        if split is not None:
            cfg.data.eval_split = split
        strategy = strategy or parallel.make_strategy(
            "jit",
            sync_every_step=cfg.parallel.sync_every_step,
            compiler_options=components.compiler_options(cfg),
        )
        c = build_for(
            workdir,
            cfg,
            strategy,
            eval_source=eval_source,
            model=model,
            loss_fn=loss_fn,
            metrics=metrics,
        )
        components.check_loss(c)
        state, _ = ckpt.restore(c.abstract_state(), step)
    eval_fn = programs.compile_eval(c)
    result = run_eval(c, ema_view(state), eval_fn, c.abstract_eval_metrics(state))
    return {
        "step": step,
        "split": cfg.data.eval_split if eval_source is None else "eval_source",
        **result,
        "num_examples": len(c.eval_source),
    }
