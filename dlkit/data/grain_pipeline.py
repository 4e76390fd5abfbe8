"""The Grain input pipeline (`data.pipeline=grain`): batches for data beyond memory, read by
worker processes, each process reading only the examples it trains on, resumable exactly.

    from dlkit.data import arrayrecord, grain_pipeline

    train = arrayrecord.load_split("/data/fmnist_ar", "train")      # or any random-access source
    it = grain_pipeline.GrainLoader(train, batch_size=128, seed=0, workers=2)
    batch = next(it)          # {'inputs': (128, 28, 28, 1), 'labels': (128,), 'mask': (128,)}
    saved = it.state_at(it.position)      # {"start": 0, "iterator": <Grain iterator state>}
    it.close()                            # stops the worker processes
    again = grain_pipeline.GrainLoader(train, 128, seed=0, workers=2, position=1,
                                       data_state=saved)        # continues with batch 1

    # In a run: dlkit train ... --set data.pipeline=grain --set data.grain_workers=2

The batches are the in-memory `Loader`'s contract: global batch `b` holds `batch_size`
examples, epoch `e` visits the examples in a shuffled order drawn from `seed + e` (Grain's
`index_shuffle`, the order of `MapDataset.shuffle` with `repeat`), each epoch's incomplete
last batch is skipped ("drop"), and process `p` of `P` gets rows `p*B/P .. (p+1)*B/P - 1` of
every global batch. So P processes together feed the same global batches as one process,
and each process reads only its rows (never the whole dataset). The order is Grain's index
shuffle, computed per example without materialising a permutation, so it differs from
`Loader`'s numpy order.

Worker processes (`workers` > 0) are Grain's `mp_prefetch`: each worker reads and stacks whole
batches; the batches come out in the same order for any number of workers.

Read-ahead is bounded: each process (the main one, or each worker) reads with `read_threads`
threads and keeps at most `read_buffer` batches ahead (Grain's `ReadOptions`). Grain's own
defaults (16 threads, 500 elements) are made for elements that are single examples; an element
here is a whole batch, so they would hold up to 500 batches per process.

Exact resume: after every batch the loader keeps Grain's iterator state (`get_state`) by the
position it belongs to, so a checkpoint of position p stores the state of exactly the batches
trained on, even though dlkit's prefetch thread runs ahead. `dlkit.checkpoint` writes it as a
"grain" item with Grain's own Orbax handler, one file per process.
"""

import collections
import functools
import sys
import threading

import grain
import numpy as np
from absl import flags

from dlkit import errors
from dlkit.data import loader as loader_lib
from dlkit.data import sources

# Grain 0.2.18 reads an absl flag when an mp_prefetch iterator starts, which raises unless absl
# flags were parsed (google/grain#1355). dlkit defines no absl flags and never parses any, so
# marking them parsed changes no value; it lets scripts and notebooks use workers.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

# Iterator states kept by position: more than the batches the prefetch thread can run ahead.
STATES_KEPT = 64
MAX_SEED = 2**32  # Grain's shuffle takes seeds in [0, 2**32)
# Grain's ReadOptions per process: threads reading batches, and batches read ahead (both the
# defaults of data.grain_read_threads and data.grain_read_buffer).
READ_THREADS = 2
READ_BUFFER = 4


def import_grain():
    """The `grain` module, with the absl flag fix above applied."""
    return grain


class _IndexBatches(grain.MapDataset):
    """Element `b`: the example indices of this process's rows of global batch `b`, an int64
    array of `local` indices. Global batch `g` holds examples `g * B .. (g+1) * B - 1` of the
    epochs laid end to end, each epoch cut to its whole batches (`Loader(last_batch="drop")`);
    epoch `e` visits the examples in Grain's index shuffle with seed `seed + e`, the order of
    `MapDataset.range(n).shuffle(seed).repeat()`.

    One node computes a whole batch of indices: built from Grain's range, shuffle, repeat and
    batch nodes instead, every index passed through four Python `__getitem__` layers, which
    cost more CPU per batch than reading its records."""

    def __init__(self, n, batch_size, *, seed, shuffle, process_index, process_count):
        super().__init__()
        self._n, self._seed, self._shuffle = n, seed, shuffle
        self._local = batch_size // process_count
        self._keep = (n // batch_size) * batch_size
        self._p, self._count = process_index, process_count

    def __len__(self):
        return sys.maxsize

    def __str__(self):
        return f"IndexBatches(n={self._n}, local={self._local}, shuffle={self._shuffle})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        # Chunk c of `local` rows is rows (c % P) * local .. of global batch c // P; a chunk
        # never straddles two epochs, since `keep` is a multiple of the global batch.
        first = (index * self._count + self._p) * self._local
        epoch, row = divmod(first, self._keep)
        rows = range(row, row + self._local)
        if self._shuffle:
            seed = (self._seed + epoch) % MAX_SEED
            shuffle = grain.experimental.index_shuffle
            rows = [shuffle(i, max_index=self._n - 1, seed=seed, rounds=4) for i in rows]
        return np.asarray(rows, np.int64)


def _with_mask(batch: dict) -> dict:
    """The batch with the loader's "mask" (every row real: whole batches only)."""
    rows = len(next(iter(batch.values())))
    return {**batch, "mask": np.ones((rows,), np.float32)}


def local_batches(source, batch_size, *, seed, shuffle, process_index, process_count):
    """This process's batches as a Grain `MapDataset`: element `b` is its rows of global batch
    `b`, a dict of (batch_size // process_count, ...) arrays plus "mask"; infinitely long."""
    # The pipeline computes each batch's example INDICES, and its examples are then read
    # with one `get_batch` call: a source reads a list of records (ArrayRecord) or rows
    # (arrays) at once far more cheaply than one element at a time through Grain.
    ds = _IndexBatches(
        len(source),
        batch_size,
        seed=seed,
        shuffle=shuffle,
        process_index=process_index,
        process_count=process_count,
    )
    return ds.map(functools.partial(_read_batch, source))


def _read_batch(source, indices) -> dict:
    """The examples at `indices` of `source`, stacked, plus the loader's "mask"."""
    return _with_mask(sources.get_batch(source, np.asarray(indices, np.int64)))


class GrainLoader:
    """The `Loader` of `data.pipeline=grain`: an infinite iterator over this process's slice of
    each global batch, built on Grain.

    Args:
      source: a random-access source (`__len__`, `__getitem__(i) -> dict[str, np.ndarray]`),
        e.g. `dlkit.data.arrayrecord.ArrayRecordSource` or an `ArraySource` of memory-mapped
        .npy files. With workers it is pickled to each of them (memory-mapped arrays travel as
        their file names; see `ArraySource`).
      batch_size: the GLOBAL batch size, a positive int divisible by `process_count` and at
        most `len(source)`.
      seed: int in [0, 2**32): the shuffle's seed (epoch e uses seed + e).
      shuffle: whether to shuffle each epoch.
      process_index, process_count: this process and how many share each global batch.
      workers: Grain worker processes (`mp_prefetch`); 0 reads in this process.
      worker_buffer: batches each worker keeps ready.
      read_threads: threads reading batches in each process (this one, or each worker); 0
        reads in the thread that asks for the batch.
      read_buffer: batches read ahead per process, at most; 0 reads none ahead.
      position: global batches already trained on (to resume).
      data_state: what `state_at(position)` returned when the checkpoint was written; None
        starts the pipeline at `position`.
    """

    def __init__(
        self,
        source,
        batch_size,
        *,
        seed=0,
        shuffle=True,
        process_index=0,
        process_count=1,
        workers=0,
        worker_buffer=1,
        read_threads=READ_THREADS,
        read_buffer=READ_BUFFER,
        position=0,
        data_state=None,
    ):
        check_args(source, batch_size, seed, process_index, process_count, workers, position)
        check_buffers(worker_buffer, read_threads, read_buffer)
        self.source = source
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.workers, self.worker_buffer = int(workers), int(worker_buffer)
        self.read_threads, self.read_buffer = int(read_threads), int(read_buffer)
        self._n = len(source)
        self.dataset = local_batches(
            source,
            self.batch_size,
            seed=self.seed,
            shuffle=self.shuffle,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        self._position = int(position)
        self.start = self._position if data_state is None else _saved_start(data_state)
        self.restored_state = None if data_state is None else data_state["iterator"]
        read_options = grain.ReadOptions(
            num_threads=self.read_threads, prefetch_buffer_size=self.read_buffer
        )
        ds = self.dataset[self.start :].to_iter_dataset(read_options)
        if self.workers:
            options = grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=self.worker_buffer
            )
            ds = ds.mp_prefetch(options)
        self._iterator = iter(ds)
        if self.restored_state is not None:
            self._iterator.set_state(self.restored_state)
        self._lock = threading.Lock()
        self._states = collections.OrderedDict()
        self._keep_state(self._position)

    @property
    def num_examples(self):
        """int, the examples in the source (all processes)."""
        return self._n

    @property
    def batches_per_epoch(self):
        """int, whole global batches per epoch: `n // batch_size`."""
        return self._n // self.batch_size

    @property
    def local_batch_size(self):
        """int, rows per batch on this process."""
        return self.batch_size // self.process_count

    @property
    def position(self):
        """int, the global batches produced so far (the next batch is this one)."""
        return self._position

    @property
    def epoch(self):
        """int, the epoch of the next batch."""
        return self._position // self.batches_per_epoch

    def batch_at(self, position):
        """This process's slice of global batch `position`, read directly (no iterator, no
        workers); the same arrays the iterator yields there."""
        return self.dataset[int(position)]

    def _keep_state(self, position):
        state = self._iterator.get_state()
        with self._lock:
            self._states[position] = state
            while len(self._states) > STATES_KEPT:
                self._states.popitem(last=False)

    def state_at(self, position):
        """What a checkpoint of `position` stores: {"start": int, "iterator": Grain's iterator
        state after the batches before `position`}, or None when that position is no longer
        (or not yet) kept; resuming then starts the pipeline at the position."""
        with self._lock:
            state = self._states.get(int(position))
        return None if state is None else {"start": self.start, "iterator": state}

    def __iter__(self):
        return self

    def __next__(self):
        """Batch `position`: dict of (local_batch_size, ...) arrays plus "mask"; never ends.

        Raises:
          whatever reading the batch raised (in a worker too: Grain re-raises it here), or
          RuntimeError naming the exit code of a worker process that died; each with a note
          naming the batch and the workers.
        """
        try:
            batch = next(self._iterator)
        except Exception as e:
            where = "Grain worker processes" if self.workers else "this process"
            e.add_note(
                f"dlkit: raised while reading batch {self._position} of the Grain pipeline in "
                f"{where} (data.grain_workers={self.workers})"
            )
            raise
        self._position += 1
        self._keep_state(self._position)
        return batch

    def next_stacked(self, k):
        """The next `k` batches stacked: each leaf (k, local_batch_size, ...)."""
        return loader_lib.stack_batches([next(self) for _ in range(k)])

    def close(self):
        """Stops the worker processes (if any); idempotent."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (
            f"GrainLoader(n={self._n}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle}, process={self.process_index}/{self.process_count}, "
            f"workers={self.workers}, position={self._position})"
        )


def _saved_start(data_state) -> int:
    if not isinstance(data_state, dict) or not {"start", "iterator"} <= set(data_state):
        got = sorted(data_state) if isinstance(data_state, dict) else type(data_state).__name__
        raise ValueError(
            f"data_state: expected a dict with keys 'start' and 'iterator' (from state_at), "
            f"got {got}"
        )
    return int(data_state["start"])


def check_buffers(worker_buffer, read_threads, read_buffer) -> None:
    """ValueErrors naming the config key, the expected and the received value."""
    is_int = loader_lib._is_int
    if not is_int(worker_buffer) or worker_buffer < 1:
        raise ValueError(
            f"data.grain_worker_buffer: expected a positive int, got {worker_buffer!r}"
        )
    for key, value in (("grain_read_threads", read_threads), ("grain_read_buffer", read_buffer)):
        if not is_int(value) or value < 0:
            raise ValueError(f"data.{key}: expected an int >= 0, got {value!r}")


def check_config(cfg, strategy, train_source) -> None:
    """The loader's arguments as a run's config and strategy give them, checked before
    compiling; a problem is a ConfigError."""
    try:
        check_args(
            train_source,
            cfg.train.batch_size,
            cfg.train.seed,
            strategy.process_index,
            strategy.process_count,
            cfg.data.grain_workers,
            0,
        )
    except ValueError as e:
        raise errors.ConfigError(str(e)) from None


def check_args(source, batch_size, seed, process_index, process_count, workers, position):
    """The `Loader`'s argument checks, plus Grain's limits; ValueErrors naming the argument
    (as the config key where there is one), the expected and the received value."""
    is_int = loader_lib._is_int
    if not is_int(process_count) or process_count <= 0:
        raise ValueError(f"process_count: expected a positive int, got {process_count!r}")
    if not is_int(batch_size) or batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            "train.batch_size: expected a positive int divisible by the process count "
            f"{process_count} (each process reads batch_size // {process_count} rows), "
            f"got {batch_size!r}"
        )
    if not is_int(process_index) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index: expected an int in [0, {process_count}), got {process_index!r}"
        )
    if not is_int(seed) or not 0 <= seed < MAX_SEED:
        raise ValueError(
            f"train.seed: expected an int in [0, 2**32) (Grain's shuffle seed), got {seed!r}"
        )
    if not is_int(workers) or workers < 0:
        raise ValueError(f"data.grain_workers: expected an int >= 0, got {workers!r}")
    if not is_int(position) or position < 0:
        raise ValueError(f"position: expected a non-negative int, got {position!r}")
    n = len(source)
    if batch_size > n:
        raise ValueError(
            f"train.batch_size: expected at most the {n} training examples (the Grain pipeline "
            f"trains on whole batches only), got {batch_size}"
        )
    sample = sources.get_batch(source, np.zeros(1, np.int64))
    if not isinstance(sample, dict) or "mask" in sample:
        got = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise ValueError(
            f"source: expected examples as dict[str, np.ndarray] without a 'mask' key (the "
            f"loader adds it), got {got}"
        )


# Examples per split that `data.validate` and `data.audit` read with data.pipeline=grain.
CHECK_SAMPLE = 4096


class Sample:
    """A seeded random sample of `n` examples of a source (in index order), random access:
    what the input checks read of a dataset that may not fit in memory.

    Args:
      source: a random-access source.
      n: examples kept; all of them when the source is smaller.
      seed: picks the sample.
    """

    def __init__(self, source, n=CHECK_SAMPLE, seed=0):
        self.source = source
        total = len(source)
        if total > n:
            self.indices = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
        else:
            self.indices = np.arange(total)
        self.num_source_examples = total

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]

    def get_batch(self, indices):
        return sources.get_batch(self.source, self.indices[np.asarray(indices)])

    def describe(self, split):
        """One line: what the checks covered."""
        return (
            f"{split}: {len(self)} of {self.num_source_examples} examples "
            f"({'all' if len(self) == self.num_source_examples else 'a seeded random sample'})"
        )
