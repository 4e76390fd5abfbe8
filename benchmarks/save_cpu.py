"""CPU per checkpoint save: `python -m benchmarks.save_cpu [--saves 20] [--rounds 3] [--dir D]`.

Saves the bench MLP's TrainState (`benchmarks.mlp_breakdown`'s model: 29 leaves, 1 MiB) again
and again and prints, per way of saving, the median CPU of one save: `time.process_time` (all
threads, user + system) around `save` + `wait`, `--saves` saves after 2 untimed warm-up saves,
the ways alternating for `--rounds` rounds, in a rotated order each round. The user and system
parts are shown apart (`resource.getrusage`): the system part is mostly the file system
creating the step's files, and it varies with what else the machine's disk is doing.

Rows:
- `Checkpointer`: what `dlkit.fit` pays, `Checkpointer.save` + `wait` with `max_to_keep=3`
  (retention deletes a step per save, as in a long run);
- `saver`: `store.make_saver` + `store.save` with the manifest hook, no retention;
- `saver, ...`: the same Orbax items under one other Orbax option each, or (`saver, sync`)
  written by Orbax's synchronous `Checkpointer` in place of its `AsyncCheckpointer`;
- `Orbax v1 save, state only`: the TrainState alone (no data or config item, no
  manifest) through Orbax's v1 API (`orbax.checkpoint.experimental.v1`) with the state item's
  options, against `PyTreeCheckpointer, state only`, the same through the v0 API;
- `TensorStore alone`: the 29 arrays written as zarr3 arrays by TensorStore directly, the
  files the state item holds and nothing else: the floor of this on-disk format.
"""

import argparse
import os
import resource
import statistics
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

import dlkit
import dlkit.data
from benchmarks import mlp_breakdown
from dlkit.checkpoint import Checkpointer, commit, store

WARMUP_SAVES = 2


def bench_state():
    """The bench MLP's TrainState and its config, built as `benchmarks.mlp_breakdown` builds
    them."""
    x, y = mlp_breakdown._digits()  # noqa: SLF001
    source = dlkit.data.ArraySource(inputs=x, labels=y)
    cfg = mlp_breakdown._config(1, 0)  # noqa: SLF001
    return dlkit.build(cfg, train_source=source, eval_source=source).init_state(), cfg.to_dict()


def _manifest_hook(tmp_dir, final_dir) -> None:
    """What `Checkpointer` runs before each async save is published."""
    commit.write_manifest(tmp_dir, int(final_dir.name), {}, parallel=False)


def _orbax_saver(state_options=None, *, on_commit=_manifest_hook, **checkpointer_options):
    """`store.make_saver(async_save=True, ...)` with other Orbax options."""
    handler = ocp.CompositeCheckpointHandler(
        **{
            store.STATE: ocp.PyTreeCheckpointHandler(
                **{**store.STATE_OPTIONS, **(state_options or {})}
            ),
            store.DATA: ocp.JsonCheckpointHandler(),
            store.CONFIG: ocp.JsonCheckpointHandler(),
        }
    )
    tmp_class = commit.temporary_path_class(on_commit) if on_commit else None
    return ocp.AsyncCheckpointer(handler, temporary_path_class=tmp_class, **checkpointer_options)


class SaverWay:
    """Saves with an Orbax checkpointer through `store.save`, no retention."""

    def __init__(self, make):
        self.make = make

    def open(self, directory: epath.Path):
        self.saver, self.directory = self.make(), directory

    def save(self, step: int, state, config: dict) -> None:
        store.save(self.saver, self.directory / str(step), state, data_position=step, config=config)
        self.saver.wait_until_finished()

    def close(self) -> None:
        self.saver.close()


class SyncSaverWay(SaverWay):
    """`SaverWay` with a synchronous Orbax checkpointer: `store.save` returns when it is done."""

    def save(self, step: int, state, config: dict) -> None:
        store.save(self.saver, self.directory / str(step), state, data_position=step, config=config)


class StateOnlyWay:
    """The TrainState alone as an Orbax PyTree, through Orbax's v1 API or its v0 one."""

    def __init__(self, api: str):
        self.api = api

    def open(self, directory: epath.Path):
        from orbax.checkpoint.experimental import v1 as ocp_v1

        self.directory, self.v1 = directory, ocp_v1
        saving = ocp_v1.options.ArrayOptions.Saving(**store.STATE_OPTIONS)
        self.context = ocp_v1.Context(array_options=ocp_v1.options.ArrayOptions(saving=saving))
        self.v0 = ocp.PyTreeCheckpointer(**store.STATE_OPTIONS) if self.api == "v0" else None

    def save(self, step: int, state, config: dict) -> None:
        if self.v0 is not None:
            self.v0.save(self.directory / str(step), args=ocp.args.PyTreeSave(state))
        else:
            with self.context:
                self.v1.save(self.directory / str(step), state)

    def close(self) -> None:
        if self.v0 is not None:
            self.v0.close()


class CheckpointerWay:
    """Saves with dlkit's `Checkpointer` (manifest, retention), as `fit` does."""

    def open(self, directory: epath.Path):
        self.ckpt = Checkpointer(directory, max_to_keep=3, log=lambda _: None)

    def save(self, step: int, state, config: dict) -> None:
        self.ckpt.save(step, state, data_position=step, config=config)
        self.ckpt.wait()

    def close(self) -> None:
        self.ckpt.close()


class TensorStoreWay:
    """Writes the state's leaves as zarr3 arrays with TensorStore alone (no Orbax)."""

    def open(self, directory: epath.Path):
        self.directory = directory
        self.context = ts.Context({"file_io_concurrency": {"limit": 128}})

    def save(self, step: int, state, config: dict) -> None:
        writes = []
        for i, leaf in enumerate(jax.tree.leaves(state)):
            array = np.asarray(leaf)
            spec = {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": os.fspath(self.directory / f"{step}/{i}")},
                "metadata": {
                    "shape": list(array.shape),
                    "data_type": array.dtype.name,
                    "chunk_grid": {
                        "name": "regular",
                        "configuration": {"chunk_shape": [max(n, 1) for n in array.shape]},
                    },
                },
            }
            opened = ts.open(spec, create=True, context=self.context).result()
            writes.append(opened.write(array))
        for write in writes:
            write.result()

    def close(self) -> None:
        pass


WAYS = {
    "Checkpointer (HEAD: manifest, retention keeps 3)": CheckpointerWay,
    "saver (HEAD: store.make_saver, manifest hook)": lambda: SaverWay(
        lambda: store.make_saver(async_save=True, on_commit=_manifest_hook)
    ),
    "saver, no manifest hook": lambda: SaverWay(lambda: _orbax_saver(on_commit=None)),
    "saver, AsyncOptions(create_directories_asynchronously=False)": lambda: SaverWay(
        lambda: _orbax_saver(
            async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False)
        )
    ),
    "saver, FileOptions(skip_sync_file_validations=True)": lambda: SaverWay(
        lambda: _orbax_saver(file_options=ocp.options.FileOptions(skip_sync_file_validations=True))
    ),
    "saver, state item save_concurrent_gb=1": lambda: SaverWay(
        lambda: _orbax_saver({"save_concurrent_gb": 1})
    ),
    "saver, state item MultiprocessingOptions(primary_host=None)": lambda: SaverWay(
        lambda: _orbax_saver(
            {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=None)}
        )
    ),
    "saver, use_ocdbt=True (another layout)": lambda: SaverWay(
        lambda: _orbax_saver({"use_ocdbt": True})
    ),
    "saver, sync (ocp.Checkpointer)": lambda: SyncSaverWay(
        lambda: store.make_saver(async_save=False, on_commit=_manifest_hook)
    ),
    "PyTreeCheckpointer, state only (v0 API)": lambda: StateOnlyWay("v0"),
    "Orbax v1 save, state only": lambda: StateOnlyWay("v1"),
    "TensorStore alone (the 29 zarr3 arrays)": TensorStoreWay,
}


def _cpu() -> tuple[float, float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.process_time(), usage.ru_utime, usage.ru_stime


def measure(way, directory: epath.Path, state, config: dict, saves: int) -> list[tuple]:
    """[(CPU, user, system) seconds] of `saves` timed saves, after the warm-up saves."""
    way.open(directory)
    out = []
    try:
        for step in range(WARMUP_SAVES + saves):
            before = _cpu()
            way.save(step, state, config)
            after = _cpu()
            if step >= WARMUP_SAVES:
                out.append(tuple(b - a for a, b in zip(before, after, strict=True)))
    finally:
        way.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saves", type=int, default=20, help="timed saves per way and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds alternating the ways")
    ap.add_argument("--only", default="", help="comma-separated substrings of row names")
    ap.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = ap.parse_args()
    ways = {
        name: make
        for name, make in WAYS.items()
        if not args.only or any(part in name for part in args.only.split(","))
    }
    state, config = bench_state()
    leaves = jax.tree.leaves(state)
    print(
        f"state: {len(leaves)} leaves, {sum(x.nbytes for x in leaves) / 2**20:.2f} MiB; "
        f"{args.saves} saves x {args.rounds} rounds; load average {os.getloadavg()[0]:.1f}; "
        f"in {args.dir or tempfile.gettempdir()}"
    )
    results: dict[str, list[tuple]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for r in range(args.rounds):
            # The order rotates: a way's files are deleted after it, and the file system's
            # cost of creating files depends on how many were deleted just before.
            names = list(ways)
            for i, name in enumerate(names[r % len(names) :] + names[: r % len(names)]):
                make = ways[name]
                directory = epath.Path(tmp) / f"{r}-{i}"
                results[name] += measure(make(), directory, state, config, args.saves)
                directory.rmtree(missing_ok=True)
    first = statistics.median(c for c, _, _ in next(iter(results.values())))
    print("| per save | CPU ms (median) | user ms | system ms | CPU / first row's |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        cpu, user, system = (statistics.median(col) * 1e3 for col in zip(*rows, strict=True))
        print(f"| {name} | {cpu:.1f} | {user:.1f} | {system:.1f} | {cpu / (first * 1e3):.2f} |")


if __name__ == "__main__":
    main()
