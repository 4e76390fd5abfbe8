"""`fit`: the Python loop that ties data, model, step and checkpoints together.

The same function runs from a notebook cell and from `dlkit train`:

    import dlkit
    cfg = dlkit.load_config("digits_mlp", overrides=["train.steps=500"])
    result = dlkit.fit(cfg, workdir="runs/digits")      # resumes if runs/digits has checkpoints
    result.history.last("eval/accuracy"), result.state.params

A run, in order (`fit` reads as this list):
1. open: build the pieces from the config (`dlkit.components`), check the data, claim the workdir,
   and restore the newest valid checkpoint or create the state shapes-first;
2. compile the train program (`dlkit.programs`) and print its compute report;
3. loop: for each call of the program (K steps when `train.steps_per_dispatch` = K) take the
   next prefetched batch, run it, and on the steps `is_time` picks log metrics
   (`dlkit.progress.RowLog`), evaluate (`dlkit.evaluation`) and checkpoint;
4. close: stop the prefetcher and the bar, wait for the last checkpoint, run the callbacks'
   end hooks.

The state, the loader position and the config are all a run needs to continue bit-for-bit,
and all three go into every checkpoint.
"""

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from dlkit import callbacks as callbacks_lib
from dlkit import checkpoint as checkpoint_lib
from dlkit import (
    components,
    compute,
    debugging,
    default_callbacks,
    distributed,
    evaluation,
    finite_json,
    interrupt,
    precision,
    profiling,
    programs,
    run_record,
    storage,
)
from dlkit import config as config_lib
from dlkit import data as data_lib
from dlkit import metrics as metrics_lib
from dlkit import progress as progress_lib
from dlkit import state as state_lib
from dlkit import workdir as workdir_lib
from dlkit.data import audit as audit_lib


def is_time(step: int, every: int) -> bool:
    """True on every `every`-th step (step counts from 1 after the first update); 0 = never."""
    return every > 0 and step % every == 0


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
      model: the trained model: for an NNX model a new `nnx.Module` holding the final weights
        (EMA weights when the run kept them, as evaluated) and BatchNorm statistics, in eval
        mode; for a Linen model the module itself (its weights are `state.params`).
    """

    state: state_lib.TrainState
    history: metrics_lib.History
    workdir: epath.Path | None
    trace_counts: dict[str, int]
    stopped: str | None = None
    compute_report: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: Any = None


def fit(
    config: config_lib.Config,
    workdir: str | epath.PathLike | None = None,
    *,
    model=None,
    module=None,
    train_source=None,
    eval_source=None,
    strategy=None,
    loss_fn=None,
    metrics=None,
    progress: bool | None = None,
    callbacks: Sequence[callbacks_lib.Callback] = (),
    profile: str | tuple[int, int] | None = None,
) -> FitResult:
    """Trains (or resumes training) according to `config`.

    Args:
      config: the run's `Config`.
      workdir: where config.json, metrics.jsonl and checkpoints/ go: a local path or a
        `gs://bucket/path` URL (`dlkit.storage`). If it holds checkpoints, training resumes
        from the newest valid one. None = keep nothing on disk.
      model: your own model in place of `config.model`: a Linen module, or an `nnx.Module`
        instance (trained from its current weights; `result.model` is the trained module).
      module, train_source, eval_source, strategy: replace the config's choice (see
        `dlkit.components.build`); `module` is the older name of `model`.
      loss_fn: your own loss in place of `config.loss`: `loss_fn(outputs, labels) -> (B,)`,
        one value per example, jax-traceable (see `dlkit.losses.CustomLoss`).
      metrics: {name: fn(outputs, labels) -> (B,)}, logged as train/<name> and eval/<name>.
        Both are called on the model's output shapes before anything compiles.
      progress: show a progress bar; None = `config.train.progress`.
      callbacks: extra `dlkit.Callback`s, run after those the config turns on
        (`dlkit.default_callbacks`).
      profile: "START:STOP" or (START, STOP): trace those steps into WORKDIR/profile/;
        replaces `train.profile_steps` (see `dlkit.profiling`).
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
    # A URL that cannot be served is refused before anything is built or written.
    workdir = storage.resolve(workdir, "workdir") if workdir is not None else None
    fit_start = time.perf_counter()
    if profile is not None:
        steps = profiling.parse_profile_steps(profile)
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, profile_steps=f"{steps[0]}:{steps[1]}")
        )
    cfg, workdir, fast_dev_tmp = debugging.prepare(config, workdir)
    user_callbacks = callbacks_lib.check_callbacks(callbacks)
    record = run_record.describe(
        cfg, model if model is not None else module, train_source, eval_source, loss_fn, metrics
    )
    module = components.resolve_model(model, module)
    c = components.build(
        cfg,
        module=module,
        train_source=train_source,
        eval_source=eval_source,
        strategy=strategy,
        loss_fn=loss_fn,
        metrics=metrics,
    )
    components.check_loss(c)
    is_main = c.strategy.process_index == 0
    log = (lambda text: print(text, flush=True)) if is_main else (lambda text: None)
    checked = components.checked_sources(c, log)
    components.check_data(c, log, checked)
    audit_report = audit_lib.audit_for_fit(
        *checked, cfg.data.audit, log, cfg.data.audit_max_examples
    )
    profiler = profiling.from_config(cfg, workdir)
    cbs = default_callbacks.from_config(cfg, workdir) + user_callbacks
    show = (cfg.train.progress if progress is None else progress) and is_main
    with contextlib.ExitStack() as resources:
        # 1. Open the run.
        ckpt = _open_checkpointer(cfg, workdir, is_main, log, resources)
        # From here on a signal only asks the loop to stop after a step (see dlkit.interrupt).
        stop = resources.enter_context(interrupt.StopRequests())
        state, position = _restore_or_init(c, ckpt, log, workdir if is_main else None)
        data_state = _saved_data_state(c, ckpt, position, log)
        start = int(jax.device_get(state.step))
        _check_resume_step(cfg, start)
        bar = resources.enter_context(
            progress_lib.ProgressBar(show, cfg.train.steps, min(start, cfg.train.steps), is_main)
        )
        history, writer = _open_records(cfg, workdir, is_main, start, audit_report, bar)
        bar.write(f"eval data: {run_record.summary(record['eval'])}")
        if workdir is not None and is_main:
            run_record.write(workdir, record)
        # 2. Compile.
        distributed.barrier("fit_start", cfg.parallel.barrier_timeout_s)
        train_shape = c.abstract_metrics(state)
        compile_start = time.perf_counter()
        train_fn, report = programs.compile_train(c, state, train_shape)
        if is_main:
            # The bar's clock starts after the data and state were built and imports are not
            # in it at all: this line says where start-up went and when compilation ended.
            bar.write(
                f"compiled the train step in {time.perf_counter() - compile_start:.1f} s "
                f"({time.perf_counter() - fit_start:.1f} s since fit started)"
            )
            bar.write(compute.format_report(report))
            if workdir is not None:
                (workdir / "compute.json").write_text(finite_json.dumps(report, indent=2) + "\n")
        run = callbacks_lib.Run(
            config=cfg,
            components=c,
            workdir=workdir,
            checkpointer=ckpt,
            log=bar.write if is_main else (lambda text: None),
            is_main=is_main,
            start_step=start,
            compute_report=report,
            get_state=lambda: loop.state,
            history=history,
        )
        rows = progress_lib.RowLog(bar, history, writer, cbs, run, c.schedule, report, cfg)
        # The prefetcher runs ahead of the loop, so the position saved is counted from here.
        loader = c.train_loader(position, data_state)
        resources.callback(getattr(loader, "close", lambda: None))  # Grain's worker processes
        batches = resources.enter_context(contextlib.closing(_train_batches(c, loader)))
        loop = _Loop(c, ckpt, stop, run, rows, train_fn, train_shape, state, start, position)
        loop.data_state_at = getattr(loader, "state_at", lambda position: None)
        loop.profiler = resources.enter_context(profiler)
        # 3. Loop.
        for cb in cbs:
            cb.on_train_start(run)
        loop.train(batches)
    # 4. Close: the checkpoints are durable now (the checkpointer waited for them).
    distributed.barrier("fit_end", cfg.parallel.barrier_timeout_s)
    trace_counts = dict(c.strategy.trace_counts)
    if trace_counts.get("train", 0) > 1 and is_main:
        print(f"warning: the train step was compiled {trace_counts['train']} times")
    result = FitResult(loop.state, history, workdir, trace_counts, loop.stopped, report)
    result.model = components.trained_model(c.module, evaluation.ema_view(loop.state))
    for cb in cbs:
        result = cb.on_train_end(run, result) or result
    if fast_dev_tmp is not None:
        fast_dev_tmp.cleanup()
        result = dataclasses.replace(result, workdir=None)
    return result


def _open_checkpointer(
    cfg, workdir, is_main: bool, log, resources: contextlib.ExitStack
) -> checkpoint_lib.Checkpointer | None:
    """The run's Checkpointer on `workdir`/checkpoints (None without a workdir), entered into
    `resources`, after process 0 has checked that it can write the workdir, locked it for
    this run (released when `resources` closes) and claimed it for this config."""
    if workdir is None:
        return None
    if is_main:
        workdir_lib.check_writable(workdir)
        resources.enter_context(workdir_lib.lock(workdir, log=log))
        workdir_lib.claim(
            workdir, cfg, archive_mismatched=cfg.checkpoint.archive_mismatched, log=log
        )
    else:
        workdir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_lib.Checkpointer(
        workdir / "checkpoints",
        max_to_keep=cfg.checkpoint.max_to_keep,
        keep_best=cfg.checkpoint.keep_best,
        best_metric=cfg.checkpoint.best_metric,
        # Resolved only when used: keep_best=0 never ranks, whatever best_metric names.
        best_mode=config_lib.metric_mode(
            cfg.checkpoint.best_metric, cfg.checkpoint.best_mode, "checkpoint.best_mode"
        )
        if cfg.checkpoint.keep_best
        else "min",
        async_save=cfg.checkpoint.async_save,
        log=log,
    )
    return resources.enter_context(ckpt)


def _restore_or_init(
    c: components.Components, ckpt, log, workdir
) -> tuple[state_lib.TrainState, int]:
    """(state, data position): from the newest valid checkpoint, or fresh at position 0,
    with `checkpoint.init_from`'s params when it names a run to fine-tune from.

    With no usable step left but quarantined ones, the run stops (CheckpointError listing
    them) unless `checkpoint.on_no_valid_step=restart`; then the old metrics.jsonl is moved
    aside (on process 0, whose `workdir` is given) and training starts from step 0.
    """
    if ckpt is not None and ckpt.latest_step() is not None:
        try:
            return ckpt.restore(c.abstract_state())
        except FileNotFoundError:  # every step was corrupt and quarantined
            pass
    if ckpt is not None and ckpt.quarantined():
        _no_valid_step(c.config, ckpt, log, workdir)
    state = c.init_state()
    ckpt_cfg = c.config.checkpoint
    if ckpt_cfg.init_from:
        state = checkpoint_lib.init_from.apply(
            state, ckpt_cfg.init_from, ckpt_cfg.init_from_map, log=log
        )
    return state, 0


def _saved_data_state(c: components.Components, ckpt, position: int, log):
    """With data.pipeline=grain, the Grain pipeline state saved with the restored step (None
    for a fresh run, or a step saved without one: the pipeline then restarts at `position`)."""
    if c.config.data.pipeline != "grain" or ckpt is None or ckpt.restored_step is None:
        return None
    data_state = ckpt.data_state(ckpt.restored_step)
    if data_state is None:
        log(
            f"data: step {ckpt.restored_step} holds no Grain iterator state; the Grain pipeline "
            f"starts again at batch {position}"
        )
    return data_state


def _no_valid_step(cfg, ckpt, log, workdir) -> None:
    """Stops the run, or (with on_no_valid_step=restart) archives its metric history."""
    listed = "\n  ".join(f"{name}: {reason}" for name, reason in ckpt.quarantined())
    if cfg.checkpoint.on_no_valid_step != "restart":
        raise checkpoint_lib.CheckpointError(
            f"no usable checkpoint is left in {ckpt.directory}; these steps are quarantined "
            f"in {ckpt.directory / checkpoint_lib.QUARANTINE}:\n  {listed}\nNothing was "
            "trained. To start over from step 0, --set checkpoint.on_no_valid_step=restart."
        )
    log(
        f"checkpoint: no usable step left in {ckpt.directory} (quarantined:\n  {listed}\n); "
        "checkpoint.on_no_valid_step=restart: training from step 0"
    )
    metrics_path = None if workdir is None else workdir / "metrics.jsonl"
    if metrics_path is not None and metrics_path.exists():
        dst = workdir / f"metrics.archived-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        metrics_path.rename(dst)
        log(f"workdir: moved the previous run's metrics.jsonl to {dst.name}")


def _check_resume_step(cfg: config_lib.Config, start: int) -> None:
    """The loop stops only between calls of K steps, so it resumes only at a multiple of K."""
    k = cfg.train.steps_per_dispatch
    if start % k:
        raise config_lib.ConfigError(
            f"train.steps_per_dispatch: expected a divisor of the resume step {start} "
            f"(the checkpoint this run continues from), got {k}"
        )


def _open_records(cfg, workdir, is_main: bool, start: int, audit_report, bar):
    """The run's metric history (rows up to `start` of a resumed run) and its metrics.jsonl
    writer (None without a workdir or off the main process); writes config.json and
    audit.json."""
    if workdir is None or not is_main:
        return metrics_lib.History(), None
    writer = metrics_lib.JsonlWriter(workdir / "metrics.jsonl")
    history = writer.truncate_after(start, log=bar.write)
    workdir_lib.write_config(workdir, cfg, bar.write)
    if audit_report is not None:
        audit_report.write(workdir / "audit.json")
    if start:
        bar.write(f"resuming from step {start} in {workdir}")
    return history, writer


def _train_batches(c: components.Components, loader: data_lib.Loader):
    """The loader's batches as the train program takes them (K stacked per call when
    `train.steps_per_dispatch` = K), prefetched; a `dlkit.data.Prefetcher` (close it)."""
    k, prefetch = c.config.train.steps_per_dispatch, c.config.data.prefetch
    if k > 1:
        return c.strategy.batches(data_lib.stacked(loader, k), prefetch, stacked=True)
    return c.strategy.batches(iter(loader), prefetch)


class _Loop:
    """`fit`'s loop over calls of the train program: the state, the data position it started
    from, the latest eval metrics, and what stopped the run."""

    def __init__(self, c, ckpt, stop, run, rows, train_fn, train_shape, state, start, position):
        self.c, self.cfg = c, c.config
        self.ckpt, self.stop, self.run, self.rows = ckpt, stop, run, rows
        self.train_fn, self.train_shape = train_fn, train_shape
        self.state, self.start, self.position = state, start, position
        self.stopped: str | None = None
        self.profiler = profiling.NO_PROFILE
        self.data_state_at = lambda position: None  # the loader's state for checkpoints
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1  # the step last_eval measured
        self.last_save_time = 0.0  # time.monotonic() of the last save (checkpoint.every_seconds)
        self.eval_fn = programs.compile_eval(c, state)
        self.eval_shape = c.abstract_eval_metrics(state)

    def train(self, batches) -> None:
        """Trains from `start` to `train.steps` (or until a stop is asked for)."""
        cfg, strategy, k = self.cfg, self.c.strategy, self.cfg.train.steps_per_dispatch
        total = cfg.train.steps
        if self.stop.signal_name is not None:  # asked to stop before the first step
            self.stopped = self.stop.signal_name
            self.rows.bar.write(f"stopped by {self.stopped} before training started")
            return
        acc = strategy.zeros(self.train_shape)
        self.last_save_time = time.monotonic()  # a run's start counts as its last save
        for step in range(self.start + k, total + 1, k):
            # The annotation holds the batch fetch too: a step that waits on input shows it.
            with self.profiler.step(step, k):
                self.state, acc = self.train_fn(self.state, acc, next(batches))
            self.profiler.after(step, acc)
            if strategy.sync_every_step:
                jax.block_until_ready(acc)
            self.rows.count(k)
            self.rows.emit_deferred()
            last = step == total
            stop_now = self.stop.requested(step) or self.run.stop_reason is not None
            log_due = is_time(step, cfg.train.log_every)
            save_due = self.ckpt is not None and (
                is_time(step, cfg.checkpoint.every_steps)
                or last
                or (log_due and self._time_to_save())
            )
            eval_due = is_time(step, cfg.train.eval_every) or last
            row: dict[str, Any] = {}
            if log_due or last:
                # A row of train metrics alone is read one call late, so the device never
                # waits on the host's logging; rows with an eval, a checkpoint, a stop or the
                # last step are read at once, so none is left set aside when the loop ends.
                if eval_due or save_due or stop_now or last:
                    row.update(self.rows.train_row(step, acc, self.state.guard))
                else:
                    self.rows.defer(step, acc, self.state.guard)
                acc = strategy.zeros(self.train_shape)
            if eval_due:
                with self.rows.pause():
                    self.last_eval, self.last_eval_step = self.evaluate(), step
                row.update(self.last_eval)
            if row:
                self.rows.emit({"step": step, **row})
            stop_now = stop_now or self.run.stop_reason is not None
            if self.ckpt is not None and (save_due or stop_now):
                with self.rows.pause():
                    self.save(step)
            if stop_now:
                self.stopped = self.stop.signal_name or self.run.stop_reason
                where = f"; checkpoint written to {self.ckpt.directory}" if self.ckpt else ""
                self.rows.bar.write(f"stopped by {self.stopped} after step {step}{where}")
                return

    def _time_to_save(self) -> bool:
        """`checkpoint.every_seconds` (when set) have passed since the last save. Process 0's
        clock decides for every process: a save is collective, so a process whose own clock
        said otherwise would leave the others waiting in it."""
        every = self.cfg.checkpoint.every_seconds
        if not every:
            return False
        due = time.monotonic() - self.last_save_time >= every
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def evaluate(self) -> dict[str, float]:
        """eval/ metrics of the current state (its EMA weights when it keeps them, with the
        trained weights' as eval_raw/); one batch in a fast_dev_run."""
        max_batches = 1 if self.cfg.train.fast_dev_run else None
        args = (self.eval_fn, self.eval_shape, max_batches)
        view = evaluation.ema_view(self.state)
        metrics = {f"eval/{k}": v for k, v in evaluation.run_eval(self.c, view, *args).items()}
        if self.state.ema_params is not None:
            raw = evaluation.run_eval(self.c, self.state, *args)
            metrics.update({f"eval_raw/{k}": v for k, v in raw.items()})
        return metrics

    def save(self, step: int) -> None:
        """A checkpoint of `step`, never past a step that `train.nan_policy` rejects, and never
        of a state holding NaN or Inf (one reduction on the device): retention would then
        delete an older good step to make room for a poisoned one."""
        progress_lib.enforce_health(jax.device_get(self.state.guard), self.cfg)
        if not bool(_finite_state(self.state)):
            raise FloatingPointError(
                f"step {step}: the state holds NaN or Inf values (params, optimizer or model "
                "state); no checkpoint was written for it, and the older ones are kept. Lower "
                "optim.learning_rate, set optim.grad_clip_norm, or check the data."
            )
        position = self.position + step - self.start
        self.ckpt.save(
            step,
            self.state,
            data_position=position,
            config=self.cfg.to_dict(),
            # Only this step's own eval: retention (keep_best) ranks a step by these numbers.
            metrics=self.last_eval if self.last_eval_step == step else {},
            data_state=self.data_state_at(position),
        )
        self.last_save_time = time.monotonic()


@jax.jit
def _finite_state(state) -> jax.Array:
    """bool scalar: every float array of the state that a checkpoint holds is finite."""
    arrays = (state.params, state.opt_state, state.model_state, state.ema_params)
    leaves = [
        x for x in jax.tree.leaves(arrays) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)
    ]
    return precision.all_finite(leaves)
