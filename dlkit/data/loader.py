"""Deterministic, resumable batching over a random-access source.

The whole loader state is one integer, ``position``: the number of global batches already
produced since the start of training. Batch ``position`` is a pure function of
``(seed, position)`` and the source, so resuming is ``Loader(..., position=p)`` and
multi-process training gives every process its own contiguous slice of the same global batch.

Usage::

    import numpy as np
    from dlkit.data import datasets, loader

    train = datasets.load_dataset("digits", "train")
    it = loader.Loader(train, batch_size=32, seed=0)          # infinite, shuffled, drop
    batch = next(it)      # {'inputs': (32, 8, 8, 1) f32, 'labels': (32,) i32, 'mask': (32,) f32}
    state = it.state_dict()                                    # {'position': 1}

    # Evaluation: every example exactly once, fixed shapes; weight per-example results by mask.
    test = datasets.load_dataset("digits", "test")
    for batch in loader.Loader(test, 100, shuffle=False, last_batch="pad").iter_epoch(0):
        ...

    # Process 1 of 2 gets rows 16..31 of each global batch of 32.
    shard = loader.Loader(train, 32, process_index=1, process_count=2)
"""

import math
import numbers

import numpy as np

from dlkit.data import sources

_LAST_BATCH_MODES = ("drop", "pad")


def _is_int(value):
    # bool is an int subclass but a batch size of True is always a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def stack_batches(batches: list[dict]) -> dict:
    """Batches with the same keys -> one dict, each leaf stacked: (B, ...) -> (K, B, ...)."""
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


class Loader:
    """Deterministic batches over any random-access source.

    Args:
        source: object with ``__len__`` and ``__getitem__(i) -> dict[str, np.ndarray]``
            (e.g. :class:`dlkit.data.sources.ArraySource`); ``get_batch(indices)`` is used
            when present.
        batch_size: GLOBAL batch size across all processes; a positive int divisible by
            ``process_count``. Each process yields ``batch_size // process_count`` rows.
        seed: non-negative int. Epoch ``e`` visits examples in the order
            ``np.random.default_rng([seed, e]).permutation(n)`` (``np.arange(n)`` when
            ``shuffle`` is False).
        shuffle: whether to permute the examples each epoch.
        last_batch: ``"drop"`` skips the incomplete last batch of each epoch (needs
            ``batch_size <= len(source)``); ``"pad"`` fills it up to ``batch_size`` with
            copies of its first example carrying ``mask == 0``, so all batches share one shape.
        process_index: index of this process in ``[0, process_count)``.
        process_count: number of processes sharing each global batch.
        position: number of global batches already produced (to resume).

    Every batch is a dict of the source's keys, each (local_batch_size, ...), plus ``"mask"``
    float32 (local_batch_size,): 1.0 for real examples, 0.0 for padding.
    """

    def __init__(
        self,
        source,
        batch_size,
        *,
        seed=0,
        shuffle=True,
        last_batch="drop",
        process_index=0,
        process_count=1,
        position=0,
    ):
        if not _is_int(process_count) or process_count <= 0:
            raise ValueError(f"process_count: expected a positive int, got {process_count!r}")
        if not _is_int(batch_size) or batch_size <= 0 or batch_size % process_count:
            raise ValueError(
                "batch_size: expected a positive int divisible by "
                f"process_count={process_count}, got {batch_size!r}"
            )
        if not _is_int(process_index) or not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index: expected an int in [0, {process_count}), got {process_index!r}"
            )
        if last_batch not in _LAST_BATCH_MODES:
            raise ValueError(f"last_batch: expected one of {_LAST_BATCH_MODES}, got {last_batch!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        n = len(source)
        if n <= 0:
            raise ValueError(
                f"source: expected a non-empty dataset, got an empty dataset (len={n})"
            )
        if last_batch == "drop" and batch_size > n:
            raise ValueError(
                f"batch_size: expected at most len(source)={n} with last_batch='drop' "
                f"(otherwise no batch is ever produced), got {batch_size}; "
                "use a smaller batch_size or last_batch='pad'"
            )
        # Fetch one example now so a malformed source fails here, not mid-training.
        sample = sources.get_batch(source, np.zeros(1, np.int64))
        if not isinstance(sample, dict):
            raise ValueError(
                f"source: expected examples as dict[str, np.ndarray], got {type(sample).__name__}"
            )
        if "mask" in sample:
            raise ValueError(
                "source: expected no key named 'mask' (the loader adds it), "
                f"got keys {list(sample)}"
            )
        self.source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.last_batch = last_batch
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self._n = n
        self._local_batch_size = self.batch_size // self.process_count
        if last_batch == "drop":
            self._batches_per_epoch = n // self.batch_size
        else:
            self._batches_per_epoch = math.ceil(n / self.batch_size)
        # One cached epoch order: consecutive batches almost always share an epoch.
        self._cached_epoch = None
        self._cached_order = None
        self._position = 0
        self.position = position

    @property
    def num_examples(self):
        """int, the number of examples in the source."""
        return self._n

    @property
    def batches_per_epoch(self):
        """int, ``n // batch_size`` for "drop", ``ceil(n / batch_size)`` for "pad"."""
        return self._batches_per_epoch

    @property
    def local_batch_size(self):
        """int, rows per batch on this process: ``batch_size // process_count``."""
        return self._local_batch_size

    @property
    def position(self):
        """int, the number of global batches produced so far; the next batch is this one."""
        return self._position

    @position.setter
    def position(self, value):
        if not _is_int(value) or value < 0:
            raise ValueError(f"position: expected a non-negative int, got {value!r}")
        self._position = int(value)

    def set_position(self, position):
        """Moves the loader so the next batch is global batch ``position``."""
        self.position = position

    @property
    def epoch(self):
        """int, the epoch of the next batch: ``position // batches_per_epoch``."""
        return self._position // self._batches_per_epoch

    def state_dict(self):
        """Returns the loader state for checkpoints: ``{"position": int}``."""
        return {"position": self._position}

    def load_state_dict(self, state):
        """Restores the state returned by :meth:`state_dict`.

        Args:
            state: mapping with key ``"position"`` (non-negative int).
        """
        if "position" not in state:
            raise ValueError(
                f"state: expected a mapping with key 'position', got keys {list(state)}"
            )
        self.position = state["position"]

    def _order(self, epoch):
        """int64 (n,), the example order of ``epoch``."""
        if epoch != self._cached_epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self._n)
            else:
                order = np.arange(self._n)
            self._cached_order = order.astype(np.int64, copy=False)
            self._cached_epoch = epoch
        return self._cached_order

    def indices_at(self, position):
        """Global example indices of global batch ``position`` (all processes).

        Args:
            position: non-negative int.

        Returns:
            (indices, mask): int64 (batch_size,) source indices and float32 (batch_size,)
            mask, 0.0 on padding rows (which repeat the batch's first index).
        """
        if not _is_int(position) or position < 0:
            raise ValueError(f"position: expected a non-negative int, got {position!r}")
        epoch, k = divmod(int(position), self._batches_per_epoch)
        order = self._order(epoch)
        start = k * self.batch_size
        indices = order[start : start + self.batch_size]
        mask = np.ones(self.batch_size, np.float32)
        num_real = len(indices)
        if num_real < self.batch_size:
            # Only reachable with "pad": repeat a valid example so the shape stays static.
            indices = np.concatenate(
                [indices, np.full(self.batch_size - num_real, indices[0], np.int64)]
            )
            mask[num_real:] = 0.0
        return indices, mask

    def batch_at(self, position):
        """This process's slice of global batch ``position``; does not move the loader.

        Args:
            position: non-negative int.

        Returns:
            dict of the source's keys, each np.ndarray (local_batch_size, ...), plus ``"mask"``
            float32 (local_batch_size,).
        """
        indices, mask = self.indices_at(position)
        lo = self.process_index * self._local_batch_size
        hi = lo + self._local_batch_size
        batch = dict(sources.get_batch(self.source, indices[lo:hi]))
        batch["mask"] = mask[lo:hi]
        return batch

    def stacked_at(self, position, k):
        """Global batches ``position .. position + k - 1`` of this process, stacked; does not
        move the loader. The same arrays as stacking ``k`` calls of :meth:`batch_at` (tested),
        for ``train.steps_per_dispatch``. When the k batches are whole and in one epoch they
        are one contiguous run of the epoch's order, read with one ``get_batch`` call: no
        per-batch calls and no stacking copy.

        Args:
            position: non-negative int.
            k: positive int, the number of batches.

        Returns:
            dict of the source's keys, each np.ndarray (k, local_batch_size, ...), plus
            ``"mask"`` float32 (k, local_batch_size).
        """
        if not _is_int(position) or position < 0:
            raise ValueError(f"position: expected a non-negative int, got {position!r}")
        if not _is_int(k) or k <= 0:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        bpe, size, local = self._batches_per_epoch, self.batch_size, self._local_batch_size
        epoch, first = divmod(int(position), bpe)
        # All k whole and in this epoch (a batch past the epoch's end would end past n).
        if (first + k) * size <= self._n:
            order = self._order(epoch)
            rows = order[first * size : (first + k) * size].reshape(k, size)
            lo = self.process_index * local
            batch = sources.get_batch(self.source, rows[:, lo : lo + local].reshape(-1))
            out = {key: np.reshape(v, (k, local) + np.shape(v)[1:]) for key, v in batch.items()}
            out["mask"] = np.ones((k, local), np.float32)
            return out
        return stack_batches([self.batch_at(position + i) for i in range(k)])

    def next_stacked(self, k):
        """Returns :meth:`stacked_at` of the current position and advances it by ``k``."""
        out = self.stacked_at(self._position, k)
        self._position += k
        return out

    def __iter__(self):
        return self

    def __next__(self):
        """Returns batch ``position`` and advances ``position`` by one; never ends."""
        batch = self.batch_at(self._position)
        self._position += 1
        return batch

    def iter_epoch(self, epoch):
        """Finite iterator over the batches of one epoch; does not move the loader.

        With ``shuffle=False, last_batch="pad"`` it covers every example exactly once
        (mask 1) in source order, which is what evaluation needs.

        Args:
            epoch: non-negative int.

        Yields:
            batches as in :meth:`batch_at`, ``batches_per_epoch`` of them.
        """
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative int, got {epoch!r}")
        first = int(epoch) * self._batches_per_epoch
        for position in range(first, first + self._batches_per_epoch):
            yield self.batch_at(position)

    def __repr__(self):
        return (
            f"Loader(n={self._n}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle}, last_batch={self.last_batch!r}, "
            f"process={self.process_index}/{self.process_count}, position={self._position})"
        )


def stacked(loader: Loader, k: int):
    """The loader's batches K at a time, stacked: each leaf (B, ...) -> (K, B, ...), the same
    arrays as K calls of `next` (`Loader.next_stacked`). Never ends, as the loader does not."""
    while True:
        yield loader.next_stacked(k)
