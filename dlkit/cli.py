"""The `dlkit` command: thin, it parses arguments and calls the library.

    dlkit train [EXPERIMENT] [--workdir DIR] [--set KEY=VALUE ...]
    dlkit eval WORKDIR [--step N] [--split NAME]
    dlkit list

`dlkit train` with no experiment runs the default main job, digits_mlp. The same command on the
same workdir resumes from its newest checkpoint.
"""

import argparse
import json
import pathlib
import sys

DEFAULT_EXPERIMENT = "digits_mlp"


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

    ev = sub.add_parser("eval", help="evaluate a workdir's newest checkpoint; JSON on last line")
    ev.add_argument("workdir")
    ev.add_argument("--step", type=int, default=None, help="a saved step (default: newest)")
    ev.add_argument("--split", default=None, help="dataset split (default: the run's eval split)")

    sub.add_parser("list", help="list the experiments")
    return parser


def _train(args) -> int:
    import dlkit

    cfg = dlkit.load_config(args.experiment, args.overrides)
    workdir = pathlib.Path(args.workdir or pathlib.Path("runs") / cfg.name)
    result = dlkit.fit(cfg, workdir, progress=False if args.no_progress else None)
    final = {"step": result.history[-1]["step"]} if result.history else {}
    if result.stopped:
        final["stopped"] = result.stopped
    for row in result.history:
        final.update(row)
    print(json.dumps({"workdir": str(workdir), **final}))
    return 0


def _eval(args) -> int:
    import dlkit

    result = dlkit.evaluate(args.workdir, args.step, split=args.split)
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
        return {"train": _train, "eval": _eval, "list": _list}[args.command](args)
    except (FileNotFoundError, ValueError) as e:  # bad settings, data or paths (ConfigError too)
        print(f"dlkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FloatingPointError) as e:  # the run itself could not go on
        print(f"dlkit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
