"""The `dlkit` command: thin, it parses arguments and calls the library.

    dlkit train [EXPERIMENT] [--workdir DIR] [--set KEY=VALUE ...]
    dlkit train [EXPERIMENT] --find-batch-size [--memory-limit-mb MB]
    dlkit train ... --coordinator-address HOST:PORT --num-processes N --process-id I
    dlkit train [EXPERIMENT] --fast-dev-run      # 1 step, 1 eval batch, checkpoint checked
    dlkit eval WORKDIR [--step N] [--split NAME] [--model MODULE:FUNCTION]   # your own model
              [--loss MODULE:FUNCTION] [--metric NAME=MODULE:FUNCTION]   # your own loss
    dlkit sample WORKDIR --prompt TEXT --length N [--temperature T]   # N new chars (BPE: tokens)
    dlkit audit [EXPERIMENT] [--set KEY=VALUE ...] [--json OUT.json]
    dlkit lr-find [EXPERIMENT] [--set KEY=VALUE ...] [--out DIR] [--min-lr A --max-lr B]
    dlkit report WORKDIR [--no-plots]
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
    train.add_argument(
        "--workdir",
        help="run directory: a local path or gs://BUCKET/PATH (default: runs/<experiment>)",
    )
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
        "--fast-dev-run",
        action="store_true",
        help="train.fast_dev_run=true: one train step, one eval batch, one checkpoint saved and "
        "restored, in a temporary directory unless --workdir is given (see dlkit.debugging)",
    )
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
    _add_workdir_argument(ev)
    ev.add_argument(
        "--step",
        type=_step_or_best,
        default=None,
        help="a saved step, or best: the step the run's early stopping (or keep_best) ranks "
        "best (default: newest)",
    )
    ev.add_argument("--split", default=None, help="dataset split (default: the run's eval split)")
    ev.add_argument(
        "--model",
        default=None,
        metavar="MODULE:FUNCTION",
        help="for a run of your own model (fit(model=...)): a function returning an instance "
        "of it, e.g. mypkg.models:make_cnn (imported from the current directory too)",
    )
    ev.add_argument(
        "--loss",
        default=None,
        metavar="MODULE:FUNCTION",
        help="for a run of your own loss (fit(loss_fn=...)): that function, e.g. mypkg:my_loss",
    )
    ev.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME=MODULE:FUNCTION",
        help="for a run of your own metrics (fit(metrics=...)): one per metric",
    )

    sm = sub.add_parser(
        "sample", help="print N new characters (BPE: tokens) from a language model run"
    )
    _add_workdir_argument(sm)
    sm.add_argument("--prompt", required=True, help="the text to continue")
    sm.add_argument("--length", type=int, required=True, help="new characters (BPE: tokens)")
    sm.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    sm.add_argument("--top-k", type=int, default=20, help="0 = all tokens (default 20)")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--step", type=int, default=None, help="a saved step (default: newest)")

    audit = sub.add_parser(
        "audit", help="audit an experiment's data: duplicates, leakage, labels, NaN, ranges"
    )
    audit.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT)
    _add_set_argument(audit)
    audit.add_argument("--json", dest="json_path", help="also write the report as JSON here")

    lr = sub.add_parser(
        "lr-find", help="learning-rate range test: saves lr_find.png/.json, suggests a rate"
    )
    lr.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT)
    _add_set_argument(lr)
    lr.add_argument("--out", help="output directory (default: runs/<experiment>/lr_find)")
    lr.add_argument("--min-lr", type=float, default=1e-7, help="first rate (default 1e-7)")
    lr.add_argument("--max-lr", type=float, default=10.0, help="last rate (default 10)")
    lr.add_argument("--steps", type=int, default=100, help="steps in the sweep (default 100)")

    rep = sub.add_parser(
        "report", help="summarise a run; write curves.png (and confusion_matrix.png)"
    )
    _add_workdir_argument(rep)
    rep.add_argument("--no-plots", action="store_true", help="print the summary only")

    ex = sub.add_parser("explain", help="attribution grid of eval examples; JSON on last line")
    _add_workdir_argument(ex)
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


def _step_or_best(text: str) -> int | str:
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number or best, got {text!r}") from None


def _add_workdir_argument(parser: argparse.ArgumentParser) -> None:
    """WORKDIR, as an argument or as `--workdir`: the option `dlkit train` takes, so the
    command line that trained a run also names it here."""
    parser.add_argument("workdir", nargs="?", default=None, help="the run's directory")
    parser.add_argument(
        "--workdir", dest="workdir_option", default=None, metavar="WORKDIR", help="the same"
    )


def _one_workdir(parser: argparse.ArgumentParser, args) -> None:
    """Sets `args.workdir` from the argument or `--workdir`; exits with a usage error (2) when
    neither or two different ones are given."""
    given = {w for w in (args.workdir, args.workdir_option) if w is not None}
    if not given:
        parser.error(f"{args.command}: the workdir is required: dlkit {args.command} WORKDIR")
    if len(given) > 1:
        parser.error(
            f"{args.command}: two workdirs given, {args.workdir!r} and --workdir "
            f"{args.workdir_option!r}; name one"
        )
    args.workdir = given.pop()


def _add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable)",
    )


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
    from dlkit import storage

    if args.workdir is not None:  # refused before the job starts: never a local "gs:" folder
        storage.resolve(args.workdir, "--workdir")
    _start_distributed(args)
    import dlkit
    from dlkit import finite_json

    cfg = dlkit.load_config(args.experiment, args.overrides)
    if args.find_batch_size:
        return _find_batch_size(cfg, args)
    if args.fast_dev_run:  # a temporary directory unless one is named: never runs/<name>
        cfg.train.fast_dev_run = True
    default_workdir = None if cfg.train.fast_dev_run else pathlib.Path("runs") / cfg.name
    workdir = args.workdir or default_workdir
    own = dlkit.config.experiments.fit_arguments(args.experiment)  # loss_fn, metrics
    result = dlkit.fit(cfg, workdir, progress=False if args.no_progress else None, **own)
    final = {"step": result.history[-1]["step"]} if result.history else {}
    if result.stopped:
        final["stopped"] = result.stopped
    for row in result.history:
        final.update(row)
    if dlkit.distributed.is_main_process():  # only process 0 of a multi-host job prints
        workdir_text = None if workdir is None else str(workdir)
        print(finite_json.dumps({"workdir": workdir_text, **final}))
    return 0


def _audit(args) -> int:
    import dlkit
    from dlkit.data import audit

    cfg = dlkit.load_config(args.experiment, args.overrides)
    c = dlkit.build(cfg)
    report = audit.audit_datasets(
        c.train_source, c.eval_source, max_examples=cfg.data.audit_max_examples
    )
    print(report.format())
    if args.json_path:
        print(f"report written to {report.write(args.json_path)}")
    # Like fit: data.audit=fail turns errors into a failure (exit status 1).
    return 1 if cfg.data.audit == "fail" and report.errors else 0


def _lr_find(args) -> int:
    import dlkit
    from dlkit import lr_finder

    cfg = dlkit.load_config(args.experiment, args.overrides)
    out = pathlib.Path(args.out or pathlib.Path("runs") / cfg.name / "lr_find")
    result = lr_finder.lr_find(
        cfg, out, min_lr=args.min_lr, max_lr=args.max_lr, num_steps=args.steps
    )
    print(result.summary())
    print(json.dumps({"out": str(out), "suggested_lr": result.suggested_lr}))
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
    from dlkit import finite_json

    model = _model_from(args.model) if args.model else None
    loss_fn = _function_from(args.loss, "--loss") if args.loss else None
    metrics = {}
    for spec in args.metric:
        name, sep, target = spec.partition("=")
        if not sep or not name:
            raise ValueError(
                f"--metric: expected NAME=MODULE:FUNCTION, e.g. top2=mypkg:top2, got {spec!r}"
            )
        metrics[name] = _function_from(target, "--metric")
    result = dlkit.evaluate(
        args.workdir,
        args.step,
        split=args.split,
        model=model,
        loss_fn=loss_fn,
        metrics=metrics or None,
    )
    print(finite_json.dumps(result))
    return 0


def _function_from(spec: str, option: str):
    """The function `MODULE:FUNCTION` names (imported from the current directory too)."""
    import importlib

    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise ValueError(
            f"{option}: expected MODULE:FUNCTION, e.g. mypkg.models:make_cnn, got {spec!r}"
        )
    if "" not in sys.path:
        sys.path.insert(0, "")
    fn = getattr(importlib.import_module(module_name), function, None)
    if not callable(fn):
        raise ValueError(f"{option}: expected a function {function} in {module_name}, got {fn!r}")
    return fn


def _model_from(spec: str):
    """The instance `MODULE:FUNCTION` returns (`--model`)."""
    return _function_from(spec, "--model")()


def _sample(args) -> int:
    import dlkit

    text = dlkit.sample(
        args.workdir,
        args.prompt,
        args.length,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        step=args.step,
    )
    sys.stdout.write(text + "\n")
    return 0


def _report(args) -> int:
    import dlkit

    dlkit.report.report(args.workdir, plots=not args.no_plots)
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
    parser = _parser()
    args = parser.parse_args(argv)
    if hasattr(args, "workdir_option"):
        _one_workdir(parser, args)
    from dlkit.checkpoint import CheckpointError

    try:
        commands = {
            "train": _train,
            "eval": _eval,
            "sample": _sample,
            "audit": _audit,
            "lr-find": _lr_find,
            "report": _report,
            "explain": _explain,
            "list": _list,
        }
        return commands[args.command](args)
    except (FileNotFoundError, ValueError) as e:  # bad settings, data or paths (ConfigError too)
        print(f"dlkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FloatingPointError) as e:  # the run itself could not go on
        print(f"dlkit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
