"""The `dlkit` command: thin, it parses arguments and calls the library.

    dlkit train [EXPERIMENT] [--workdir DIR] [--set KEY=VALUE ...]
    dlkit train [EXPERIMENT] --find-batch-size [--memory-limit-mb MB]
    dlkit train ... --coordinator-address HOST:PORT --num-processes N --process-id I
    dlkit eval WORKDIR [--step N] [--split NAME]
    dlkit explain WORKDIR [--method ig --method saliency ...] [--num 8] [--out explain.png]
    dlkit list

`dlkit train` with no experiment runs the default main job, digits_mlp. The same command on the
same workdir resumes from its newest checkpoint.
"""

import argparse
import json
import pathlib
import sys

DEFAULT_EXPERIMENT = "digits_mlp"


def train_command(
    experiment: str = DEFAULT_EXPERIMENT, workdir=None, sets=(), progress: bool = False
) -> list[str]:
    """The argv that runs `dlkit train` in a fresh Python process (this interpreter).

    For scripts and tests that start, kill or time training runs as separate processes.
    """
    cmd = [sys.executable, "-m", "dlkit.cli", "train", experiment]
    if workdir is not None:
        cmd += ["--workdir", str(workdir)]
    if not progress:
        cmd.append("--no-progress")
    for item in sets:
        cmd += ["--set", item]
    return cmd


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlkit", description="Train and evaluate JAX models (Flax + Optax + Orbax)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an experiment (resumes in an existing workdir)")
    train.add_argument(
        "experiment",
        nargs="?",
        default=DEFAULT_EXPERIMENT,
        help=f"a name from `dlkit list` or a path to a .py file (default: {DEFAULT_EXPERIMENT})",
    )
    train.add_argument("--workdir", help="run directory (default: runs/<experiment>)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=500 (repeatable)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--find-batch-size",
        action="store_true",
        help="report the largest global batch whose compiled step fits in device memory "
        "(compiles only, trains nothing); JSON on the last line",
    )
    train.add_argument(
        "--memory-limit-mb",
        type=float,
        default=None,
        help="--find-batch-size: per-device budget (default: the device's, or host memory)",
    )
    _add_distributed_arguments(train)

    ev = sub.add_parser("eval", help="evaluate a workdir's newest checkpoint; JSON on last line")
    ev.add_argument("workdir")
    ev.add_argument("--step", type=int, default=None, help="a saved step (default: newest)")
    ev.add_argument("--split", default=None, help="dataset split (default: the run's eval split)")

    ex = sub.add_parser("explain", help="attribution grid of eval examples; JSON on last line")
    ex.add_argument("workdir")
    ex.add_argument(
        "--method",
        dest="methods",
        action="append",
        default=None,
        help="saliency | gradient_x_input | smoothgrad | ig | occlusion (repeatable; "
        "default: saliency and ig)",
    )
    ex.add_argument("--num", type=int, default=8, help="examples from the eval split")
    ex.add_argument("--out", default="explain.png", help="PNG to write (needs matplotlib)")
    ex.add_argument("--step", type=int, default=None, help="a saved step (default: newest)")

    sub.add_parser("list", help="list the experiments")
    return parser


def _add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-host", "start jax.distributed (all three, or none to detect SLURM/MPI/TPU/k8s)"
    )
    group.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's id")
    group.add_argument(
        "--no-distributed", action="store_true", help="do not detect a cluster; one process"
    )


def _start_distributed(args) -> None:
    """Starts jax.distributed before anything touches the devices (see dlkit.distributed)."""
    if args.no_distributed:
        return
    from dlkit import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def _train(args) -> int:
    _start_distributed(args)
    import dlkit

    cfg = dlkit.load_config(args.experiment, args.overrides)
    if args.find_batch_size:
        return _find_batch_size(cfg, args)
    workdir = pathlib.Path(args.workdir or pathlib.Path("runs") / cfg.name)
    result = dlkit.fit(cfg, workdir, progress=False if args.no_progress else None)
    final = {"step": result.history[-1]["step"]} if result.history else {}
    if result.stopped:
        final["stopped"] = result.stopped
    for row in result.history:
        final.update(row)
    if dlkit.distributed.is_main_process():  # only process 0 of a multi-host job prints
        print(json.dumps({"workdir": str(workdir), **final}))
    return 0


def _find_batch_size(cfg, args) -> int:
    import dlkit

    limit = None if args.memory_limit_mb is None else int(args.memory_limit_mb * 2**20)
    result = dlkit.compute.find_batch_size(dlkit.build(cfg), memory_limit_bytes=limit)
    if dlkit.distributed.is_main_process():
        print(
            f"memory per device of the compiled step ({result['limit_source']}: "
            f"{result['memory_limit_bytes'] / 2**20:.1f} MiB):"
        )
        print(dlkit.compute.bytes_summary(result["probes"]))
        print(json.dumps(result))
    return 0


def _eval(args) -> int:
    import dlkit

    result = dlkit.evaluate(args.workdir, args.step, split=args.split)
    print(json.dumps(result))
    return 0


def _explain(args) -> int:
    from dlkit.explain import run

    methods = tuple(args.methods or ("saliency", "ig"))
    result = run.explain_run(
        args.workdir, methods=methods, num=args.num, out=args.out, step=args.step
    )
    print(json.dumps(result))
    return 0


def _list(_args) -> int:
    from dlkit import config

    rows = config.list_experiments()
    width = max((len(n) for n, _ in rows), default=0)
    for name, summary in rows:
        print(f"{name:<{width}}  {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dlkit.checkpoint import CheckpointError

    try:
        return {"train": _train, "eval": _eval, "explain": _explain, "list": _list}[args.command](
            args
        )
    except (FileNotFoundError, ValueError) as e:  # bad settings, data or paths (ConfigError too)
        print(f"dlkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FloatingPointError) as e:  # the run itself could not go on
        print(f"dlkit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
