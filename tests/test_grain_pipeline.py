"""The Grain pipeline (`data.pipeline=grain`): batches, per-process rows, workers, exact resume
and the errors a user can cause."""

import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import assert_bitwise_equal, tiny_digits_config

import dlkit
from dlkit.checkpoint import store
from dlkit.data import arrayrecord, datasets, grain_pipeline, sources, write_arrayrecord

REPO = pathlib.Path(__file__).resolve().parents[1]


def _numbered(n=20):
    """A source whose example i holds i, so batches show which examples they hold."""
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return sources.ArraySource(inputs=x, labels=np.arange(n, dtype=np.int32))


def _ids(batch):
    return batch["labels"].tolist()


def test_processes_read_their_rows_of_the_one_process_batches():
    src = _numbered(22)  # 22 % 8 = 6 examples left over each epoch
    one = grain_pipeline.GrainLoader(src, 8, seed=3)
    halves = [
        grain_pipeline.GrainLoader(src, 8, seed=3, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert one.batches_per_epoch == 2 and halves[0].local_batch_size == 4
    batches = [_ids(one.batch_at(b)) for b in range(6)]  # 3 epochs
    for b in range(6):
        # Process p holds rows p*4 .. p*4+3 of global batch b, as dlkit's Loader splits them.
        assert _ids(halves[0].batch_at(b)) + _ids(halves[1].batch_at(b)) == batches[b]
        np.testing.assert_array_equal(halves[1].batch_at(b)["mask"], np.ones(4, np.float32))
    epochs = [sum(batches[2 * e : 2 * e + 2], []) for e in range(3)]
    assert all(len(set(e)) == 16 for e in epochs)  # no example twice in an epoch
    assert epochs[0] != epochs[1] != epochs[2]  # each epoch shuffled anew from the seed
    again = grain_pipeline.GrainLoader(src, 8, seed=3)
    assert [_ids(next(again)) for _ in range(6)] == batches  # the iterator yields batch_at
    other_seed = grain_pipeline.GrainLoader(src, 8, seed=4)
    assert _ids(other_seed.batch_at(0)) != batches[0]


def test_workers_yield_the_in_process_batches_and_keep_each_position_state():
    src = _numbered(40)
    with grain_pipeline.GrainLoader(src, 8, seed=0, workers=2) as it:
        seen = [_ids(next(it)) for _ in range(5)]
        states = [it.state_at(p) for p in range(6)]
    reference = grain_pipeline.GrainLoader(src, 8, seed=0)
    assert seen == [_ids(reference.batch_at(b)) for b in range(5)]
    # A state per position, kept after the iterator moved on (the prefetch thread runs ahead
    # of the step, and a checkpoint needs the state of the batches trained on).
    assert all(s is not None and s["start"] == 0 for s in states)
    assert len({json.dumps(s["iterator"], sort_keys=True) for s in states}) == 6


class _CountingSource:
    """`_numbered`'s examples, counting the reads (from any thread)."""

    def __init__(self, n):
        self.source, self.reads = _numbered(n), []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.reads.append(i)  # list.append is atomic under the GIL
        return self.source[i]


def test_read_ahead_is_bounded_by_read_buffer_and_the_batches_do_not_depend_on_it():
    src = _CountingSource(40)
    it = grain_pipeline.GrainLoader(src, 8, seed=0, read_threads=2, read_buffer=2)
    first = _ids(next(it))
    time.sleep(0.5)  # let the read threads fill the buffer
    # The batch returned and at most `read_buffer` batches ahead: Grain's default ReadOptions
    # (500 elements) would read 500 batches ahead here.
    assert 8 <= len(src.reads) - 1 <= 3 * 8  # -1: the sample check_args reads
    data = dlkit.Config().data  # the config's defaults are the loader's
    assert (data.grain_read_threads, data.grain_read_buffer) == (
        grain_pipeline.READ_THREADS,
        grain_pipeline.READ_BUFFER,
    )
    batches = [first] + [_ids(next(it)) for _ in range(6)]
    for threads, buffer in ((0, 0), (4, 1)):
        other = grain_pipeline.GrainLoader(
            _numbered(40), 8, seed=0, read_threads=threads, read_buffer=buffer
        )
        assert [_ids(next(other)) for _ in range(7)] == batches


def test_a_memory_mapped_source_travels_to_workers_as_its_file(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(4000 * 64, dtype=np.float32).reshape(4000, 64))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    src = sources.ArraySource(inputs=x, labels=np.zeros(4000, np.int32))
    blob = pickle.dumps(src)
    # The labels (16 KB) travel by value, the 1 MB memmap by its file name.
    assert len(blob) < 20_000
    back = pickle.loads(blob)
    assert isinstance(back.arrays["inputs"], np.memmap)
    np.testing.assert_array_equal(back.get_batch([0, 3999])["inputs"], x[[0, 3999]])


def test_arrayrecord_files_hold_the_examples_and_bad_files_are_named(tmp_path):
    # Written by the command line (`python -m dlkit.data.write_arrayrecord`).
    write_arrayrecord.main(["digits", str(tmp_path), "--num-files", "3", "--splits", "test"])
    digits = datasets.load_dataset("digits", "test")
    paths = arrayrecord.split_files(str(tmp_path), "test")
    src = arrayrecord.load_split(str(tmp_path), "test")
    assert len(src) == len(digits) == sum(src.counts) and len(src.counts) == 3
    idx = np.array([0, 119, 120, 359])  # across the file boundaries
    for key in ("inputs", "labels"):
        np.testing.assert_array_equal(src.get_batch(idx)[key], digits.get_batch(idx)[key])
    # A truncated file: an error naming it, when the source is opened.
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"test-00001-of-00003.array_record: expected a complete"):
        arrayrecord.load_split(str(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match=r"expected an existing file, got .*nope"):
        arrayrecord.ArrayRecordSource([paths[0], str(tmp_path / "nope.array_record")])
    with pytest.raises(FileNotFoundError, match=r"expected train-\*.array_record files"):
        arrayrecord.load_split(str(tmp_path), "train")
    # A record that is not an example: an error naming the record and its file.
    from array_record.python import array_record_module

    bad = str(tmp_path / "bad.array_record")
    writer = array_record_module.ArrayRecordWriter(bad, arrayrecord.WRITER_OPTIONS)
    writer.write(b"\xc1 not msgpack")
    writer.close()
    with pytest.raises(ValueError, match=r"record 0 of .*bad.array_record: expected a msgpack"):
        arrayrecord.ArrayRecordSource([bad])


def test_a_batch_read_at_once_equals_its_records_decoded_one_by_one(tmp_path, monkeypatch):
    import ml_dtypes

    rng = np.random.default_rng(0)
    n = 12
    examples = {
        "inputs": rng.integers(0, 255, (n, 5, 4, 3), dtype=np.uint8),
        "labels": np.arange(n, dtype=np.int64),
        "weights": rng.standard_normal((n, 7)).astype(np.float32),
        "half": rng.standard_normal((n, 2)).astype(ml_dtypes.bfloat16),
        "flags": rng.random(n) < 0.5,
    }
    examples["weights"][3, 1] = np.nan
    arrayrecord.write_split(str(tmp_path / "same"), "train", examples)
    # Records whose layouts differ: record 4's label is 4 uint8s, the others' one int32 (records
    # of the same length that differ outside the arrays' data), and inputs of two lengths.
    mixed = [
        {"inputs": np.full((2 + i % 2,), i, np.uint8), "labels": np.asarray([i], np.int32)}
        for i in range(6)
    ]
    mixed[4]["labels"] = np.full((4,), 4, np.uint8)
    arrayrecord.write_file(str(tmp_path / "mixed.array_record"), mixed)

    def one_by_one(src, idx):
        return [src[int(i)] for i in idx]

    src = arrayrecord.load_split(str(tmp_path / "same"), "train")
    idx = np.array([7, 0, 11, 3, 3, 5])
    batch = src.get_batch(idx)
    for key, value in batch.items():
        assert value.dtype == examples[key].dtype and value.shape == (6,) + examples[key].shape[1:]
        np.testing.assert_array_equal(value, np.stack([ex[key] for ex in one_by_one(src, idx)]))
        np.testing.assert_array_equal(value, examples[key][idx])
    assert len(src._layouts) == 1 and None not in src._layouts.values()  # read at once
    # The record-by-record path is taken whenever a record differs from the first one's layout.
    decoded = []
    real_decode = arrayrecord.ArrayRecordSource._decode
    monkeypatch.setattr(
        arrayrecord.ArrayRecordSource,
        "_decode",
        lambda self, r, i: decoded.append(i) or real_decode(self, r, i),
    )
    odd = arrayrecord.ArrayRecordSource([str(tmp_path / "mixed.array_record")])
    same_length = odd.get_batch(np.array([0, 2]))  # both int32 labels, 2 inputs
    np.testing.assert_array_equal(same_length["labels"], [[0], [2]])
    assert same_length["labels"].dtype == np.int32
    decoded.clear()
    with pytest.raises(ValueError, match="same shape"):  # record 4: one by one, as before
        odd.get_batch(np.array([2, 4]))
    assert decoded == [2, 4]
    with pytest.raises(ValueError, match="same shape"):  # inputs of 2 and 3 bytes
        odd.get_batch(np.array([0, 1]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=9, process_count=2), r"train.batch_size: expected .* divisible by .* 2"),
        (dict(batch_size=64), r"train.batch_size: expected at most the 20 .* got 64"),
        (dict(seed=2**32), r"train.seed: expected an int in \[0, 2\*\*32\)"),
        (dict(workers=-1), r"data.grain_workers: expected an int >= 0, got -1"),
        (dict(read_threads=-1), r"data.grain_read_threads: expected an int >= 0, got -1"),
        (dict(read_buffer=1.5), r"data.grain_read_buffer: expected an int >= 0, got 1.5"),
        (dict(worker_buffer=0), r"data.grain_worker_buffer: expected a positive int, got 0"),
    ],
)
def test_loader_arguments_that_cannot_work_are_named(kwargs, message):
    kwargs = {"batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        grain_pipeline.GrainLoader(_numbered(20), **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.pipeline": "tfdata"}, r"data.pipeline: expected one of .*memory.*grain"),
        ({"data.grain_workers": 2}, r"data.grain_workers: read only with data.pipeline=grain"),
        (
            {"data.pipeline": "grain", "data.grain_workers": -1},
            r"data.grain_workers: expected an int >= 0 .* got -1",
        ),
        ({"data.grain_read_buffer": 8}, r"data.grain_read_buffer: read only with data.pipel"),
        (
            {"data.pipeline": "grain", "data.grain_read_threads": -2},
            r"data.grain_read_threads: expected an int >= 0 .* got -2",
        ),
        (
            {"data.pipeline": "grain", "data.last_batch": "pad"},
            r"data.last_batch: expected 'drop' with data.pipeline=grain .* got 'pad'",
        ),
        ({"data.name": "arrayrecord"}, r"data.path: expected a directory of train-"),
    ],
)
def test_config_values_that_cannot_work_fail_before_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        dlkit.fit(tiny_digits_config(**overrides))


@pytest.fixture(scope="module")
def digits_ar(tmp_path_factory):
    """digits written to ArrayRecord: 2 train files, 1 test file."""
    directory = tmp_path_factory.mktemp("digits_ar")
    arrayrecord.write_split(
        directory, "train", datasets.load_dataset("digits", "train"), num_files=2
    )
    arrayrecord.write_split(directory, "test", datasets.load_dataset("digits", "test"))
    return str(directory)


def _grain_config(path, **overrides):
    grain = {"data.name": "arrayrecord", "data.path": path, "data.pipeline": "grain"}
    return tiny_digits_config(**{**grain, "data.grain_workers": 1, **overrides})


def test_a_killed_grain_run_resumes_bitwise_equal_to_an_uninterrupted_one(digits_ar, tmp_path):
    full = dlkit.fit(_grain_config(digits_ar), tmp_path / "full")  # checkpoints at 6 and 12
    step6 = tmp_path / "full" / "checkpoints" / "6"
    saved = json.loads((step6 / "grain" / "process_0-of-1.json").read_text())
    assert store.read_json_item(step6, "data") == {"position": 6, "grain_start": 0}
    # Kill after step 6's checkpoint: the run resumes from it, restoring the Grain state.
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "12")
    restored = []
    original = grain_pipeline.GrainLoader.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        restored.append(self.restored_state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grain_pipeline.GrainLoader, "__init__", spy)
        resumed = dlkit.fit(_grain_config(digits_ar), part)
    # The resumed pipeline continued from the saved iterator state (not from the position), so
    # equal params also mean the state saved was that of exactly the 6 batches trained on.
    assert restored == [saved]
    assert_bitwise_equal(full.state.params, resumed.state.params)
    assert_bitwise_equal(full.state.opt_state, resumed.state.opt_state)


def test_validate_and_audit_read_a_bounded_sample_and_say_so(monkeypatch):
    monkeypatch.setattr(grain_pipeline, "CHECK_SAMPLE", 100)
    monkeypatch.setattr(grain_pipeline.Sample.__init__, "__defaults__", (100, 0))
    c = dlkit.build(tiny_digits_config(**{"data.pipeline": "grain"}))
    lines = []
    train, eval_ = dlkit.components.checked_sources(c, lines.append)
    assert (len(train), len(eval_)) == (100, 100)
    assert lines == [
        "data checks (data.pipeline=grain): train: 100 of 1437 examples (a seeded random "
        "sample); eval: 100 of 360 examples (a seeded random sample)"
    ]
    np.testing.assert_array_equal(
        train.get_batch([0, 99])["inputs"],
        c.train_source.get_batch(train.indices[[0, 99]])["inputs"],
    )
    report = dlkit.data.audit.audit_datasets(train, eval_)
    assert report.stats["train"]["num_examples"] == 100


# Run in a subprocess, so that a hang fails the test after DEATH_TIMEOUT_S instead of blocking
# the suite. The source fails only inside Grain's worker processes (spawned: they import this
# script as __mp_main__), on the first batch that holds example 7.
_DYING_WORKER_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import numpy as np
from conftest import tiny_digits_config
import dlkit
from dlkit.data import datasets


class DyingSource:
    def __init__(self, source, how):
        self.source, self.how = source, how

    def __len__(self):
        return len(self.source)

    def _fail_in_a_worker(self, indices):
        if os.getpid() != int(os.environ["TRAINER_PID"]) and 7 in np.asarray(indices):
            if self.how == "exit":
                os._exit(3)
            raise ValueError("example 7 of DyingSource does not decode")

    def __getitem__(self, i):
        self._fail_in_a_worker([i])
        return self.source[i]

    def get_batch(self, indices):
        self._fail_in_a_worker(indices)
        return self.source.get_batch(indices)


if __name__ == "__main__":
    os.environ["TRAINER_PID"] = str(os.getpid())
    how, workers = sys.argv[1], sys.argv[2]
    overrides = {{"data.pipeline": "grain", "data.grain_workers": workers, "train.steps": 400}}
    train = DyingSource(datasets.load_dataset("digits", "train"), how)
    dlkit.fit(tiny_digits_config(**overrides), train_source=train,
              eval_source=datasets.load_dataset("digits", "test"))
    print("TRAINED WITHOUT AN ERROR")
"""
DEATH_TIMEOUT_S = 120


@pytest.mark.parametrize(
    "how, workers, error",
    [
        ("raise", 1, "ValueError: example 7 of DyingSource does not decode"),
        ("exit", 2, "RuntimeError: Worker process was terminated unexpectedly with exit code 3"),
    ],
)
def test_a_worker_that_fails_or_dies_stops_the_run_with_an_error_naming_it(
    tmp_path, how, workers, error
):
    script = tmp_path / "dying_worker.py"
    script.write_text(_DYING_WORKER_SCRIPT.format(tests=str(pathlib.Path(__file__).parent)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        run = subprocess.run(
            [sys.executable, str(script), how, str(workers)],
            env=env,
            capture_output=True,
            text=True,
            timeout=DEATH_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"a dead Grain worker ({how}) hung the run for {DEATH_TIMEOUT_S} s")
    assert run.returncode == 1 and "TRAINED WITHOUT AN ERROR" not in run.stdout
    # The error as raised in the worker (or Grain's, naming the worker's exit code), with
    # dlkit's note naming the batch and the worker setting; fit raises it, never a hang.
    assert error in run.stderr, run.stderr[-3000:]
    note = re.search(
        r"dlkit: raised while reading batch (\d+) of the Grain pipeline in Grain worker "
        rf"processes \(data.grain_workers={workers}\)",
        run.stderr,
    )
    assert note, run.stderr[-3000:]
    # At once: by the batch that holds example 7 in the first epoch (44 batches), never
    # training on past it.
    assert int(note.group(1)) < 1437 // 32 and "step 400" not in run.stdout
