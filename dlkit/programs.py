"""The compiled programs of a run: where the step (`steps`, `step_wrappers`) meets the strategy.

    train, report = programs.compile_train(c, state, c.abstract_metrics(state))
    state, acc = train(state, acc, batch)      # K steps when train.steps_per_dispatch = K
    evaluate = programs.compile_eval(c, state)
    acc = evaluate(state, acc, batch)

The train program is the run's step (`Components.train_step`) with its metrics added to a
running sum (`step_wrappers.accumulating`), scanned over K stacked batches when
`train.steps_per_dispatch` is K > 1 (`step_wrappers.k_steps`), compiled ahead of time by the
strategy. Its compute report (FLOPs, memory, state bytes) is read from the same executable.
"""

from typing import Any

from dlkit import components, compute, parallel, step_wrappers
from dlkit import config as config_lib
from dlkit import metrics as metrics_lib


def compile_train(c: components.Components, state, acc_spec) -> tuple[Any, dict[str, Any]]:
    """Compiles the train program ahead of time and reads its compute report.

    Args:
      c: the run's components.
      state: the TrainState (or its abstract shapes with shardings).
      acc_spec: the metric accumulator's structure (`Components.abstract_metrics`).
    Returns:
      (compiled, report): the executable `(state, acc, batch) -> (state, acc)` the loop runs,
      and `compute.analyze`'s report plus what the step was compiled with and the bytes of
      params and optimizer state per device.
    """
    strategy, t = c.strategy, c.config.train
    k = t.steps_per_dispatch
    unroll = config_lib.resolved_scan_unroll(t)
    program = step_wrappers.accumulating(c.train_step())
    state_shardings = strategy.state_shardings(state)
    if k > 1:
        program = step_wrappers.k_steps(program, unroll)
        batch = strategy.stacked_batch_spec(c.example_batch(), t.batch_size, k)
    else:
        batch = strategy.batch_spec(c.example_batch(), t.batch_size)
    train_fn = strategy.compile_train(program, state_shardings, stacked=k > 1)
    compiled = train_fn.lower(state, acc_spec, batch).compile()
    report = compute.analyze(compiled, strategy.devices, c.policy.compute_dtype)
    if t.grad_accum_steps > 1 or k > 1:
        per_device = _plain_step_flops(c, state, acc_spec)
        report["flops_per_step_per_device"] = per_device
        report["flops_per_step"] = per_device * strategy.num_devices
    report["param_sharding"] = strategy.param_sharding
    report["precision"] = c.policy.name
    report["grad_accum_steps"] = t.grad_accum_steps
    report["steps_per_dispatch"] = k
    report["scan_unroll"] = unroll
    # What the step was compiled with: a run's speed on CPU depends on it (`dlkit.xla_cpu`).
    report["compiler_options"] = dict(strategy.compiler_options)
    report["state_bytes_per_device"] = {
        "params": parallel.bytes_per_device(state.params)["max"],
        "opt_state": parallel.bytes_per_device(state.opt_state)["max"],
    }
    return compiled, report


def _plain_step_flops(c: components.Components, state, acc_spec) -> float:
    """FLOPs per device of one plain step (no accumulation loop, no K-step scan).

    XLA's cost analysis counts a loop body once, not once per iteration, and an unrolled
    K-step body's count is off by the unrolled steps, so an accumulating or K-step program's
    FLOPs per step come from the plain step, compiled only (never run, so its trace is not
    counted as a recompilation).
    """
    strategy = c.strategy
    plain = strategy.compile_train(
        step_wrappers.accumulating(c.train_step(grad_accum_steps=1)),
        strategy.state_shardings(state),
    )
    one_batch = strategy.batch_spec(c.example_batch(), c.config.train.batch_size)
    lowered = plain.lower(state, acc_spec, one_batch)
    strategy.trace_counts["train"] -= 1
    return compute.flops_per_device_of(lowered.compile())


def compile_eval(c: components.Components, state=None):
    """The eval program `(state, acc, batch) -> acc`: the eval step with its metrics summed
    into `acc`, compiled by the strategy (traced at its first call).

    Args:
      c: the run's components.
      state: the state whose shardings the program takes; None = replicated.
    """
    strategy = c.strategy
    eval_step = c.eval_step()

    def eval_and_sum(state, acc, batch):
        return metrics_lib.merge(acc, eval_step(state, batch))

    shardings = None if state is None else strategy.state_shardings(state)
    return strategy.compile_eval(eval_and_sum, shardings)
