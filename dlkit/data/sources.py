"""Random-access data sources.

A *source* is any object with ``__len__`` and ``__getitem__(i) -> dict[str, np.ndarray]``.
:class:`ArraySource` is the standard one: a dict of equal-length arrays (in memory or
``np.memmap``) with a vectorised :meth:`ArraySource.get_batch`.

Usage::

    import numpy as np
    from dlkit.data import datasets, sources

    train = datasets.load_dataset("digits", "train")     # ArraySource, 1437 examples
    train.element_spec        # {'inputs': ((8, 8, 1), float32), 'labels': ((), int32)}
    batch = sources.get_batch(train, np.array([0, 5, 7]))
    batch["inputs"].shape     # (3, 8, 8, 1)

    src = sources.ArraySource(inputs=np.zeros((4, 3), np.float32), labels=np.arange(4))
    src[2]                    # {'inputs': array([0., 0., 0.]), 'labels': 2}

The registered datasets (``load_dataset``) are :mod:`dlkit.data.datasets`'s.
"""

import mmap

import numpy as np


def _memmap_file(arr):
    """(filename, offset, dtype, shape, order) of a read-only np.memmap that spans its mapping
    from `offset` (what `np.load(mmap_mode="r")` returns), else None (slices, in-memory
    arrays and writable maps travel by value)."""
    if not isinstance(arr, np.memmap) or not isinstance(arr.base, mmap.mmap):
        return None
    if arr.mode != "r" or not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        return None
    order = "C" if arr.flags.c_contiguous else "F"
    return (arr.filename, arr.offset, arr.dtype.str, arr.shape, order)


def _checked_index(i, length):
    """`i` as an int in [-length, length), else an IndexError naming the range."""
    i = int(i)
    if not -length <= i < length:
        raise IndexError(f"index: expected in [0, {length}), got {i}")
    return i


class ArraySource:
    """Random-access source over a dict of equal-length arrays.

    Args:
        **arrays: name -> array of shape (N, ...). Numpy arrays or ``np.memmap``; anything
            else is converted with ``np.asarray``. All must share the leading length N.

    Attributes:
        arrays: dict[str, np.ndarray], the arrays as given.
    """

    def __init__(self, **arrays):
        if not arrays:
            raise ValueError("arrays: expected at least one named array, got none")
        converted = {}
        for key, value in arrays.items():
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
            if arr.ndim == 0:
                raise ValueError(
                    f"arrays[{key!r}]: expected an array with a leading example axis, "
                    f"got a scalar of dtype {arr.dtype}"
                )
            converted[key] = arr
        lengths = {key: len(arr) for key, arr in converted.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays: expected equal leading lengths, got {lengths}")
        self.arrays = converted
        self._length = next(iter(lengths.values()))

    def __len__(self):
        return self._length

    def __getstate__(self):
        # Pickled for Grain's worker processes: a memory-mapped array travels as its file and
        # is mapped again there, instead of being copied whole into every worker.
        arrays = {}
        for key, arr in self.arrays.items():
            mapped = _memmap_file(arr)
            arrays[key] = ("memmap", mapped) if mapped else ("array", arr)
        return {"arrays": arrays, "length": self._length}

    def __setstate__(self, state):
        self.arrays = {}
        for key, (kind, value) in state["arrays"].items():
            if kind == "memmap":
                filename, offset, dtype, shape, order = value
                value = np.memmap(
                    filename,
                    dtype=np.dtype(dtype),
                    mode="r",
                    offset=offset,
                    shape=shape,
                    order=order,
                )
            self.arrays[key] = value
        self._length = state["length"]

    def __getitem__(self, i):
        """Returns one example: dict[str, np.ndarray] with the leading axis removed."""
        i = _checked_index(i, self._length)
        return {key: arr[i] for key, arr in self.arrays.items()}

    def get_batch(self, indices):
        """Gathers a batch with fancy indexing.

        Args:
            indices: integer array of shape (B,).

        Returns:
            dict[str, np.ndarray], each of shape (B, ...) with the source dtype. Always a
            fresh in-memory array, also for ``np.memmap`` sources.
        """
        indices = np.asarray(indices)
        return {key: np.asarray(arr[indices]) for key, arr in self.arrays.items()}

    @property
    def element_spec(self):
        """dict[str, (shape_without_batch, np.dtype)] describing one example."""
        return {key: (tuple(arr.shape[1:]), arr.dtype) for key, arr in self.arrays.items()}

    def __repr__(self):
        spec = ", ".join(f"{k}={s}:{d}" for k, (s, d) in self.element_spec.items())
        return f"ArraySource(n={self._length}, {spec})"


def get_batch(source, indices):
    """Gathers examples ``indices`` from any random-access source.

    Uses ``source.get_batch`` when it exists; otherwise stacks ``source[i]`` for each index,
    so any object with ``__len__`` and ``__getitem__`` returning a dict of arrays works.

    Args:
        source: the source.
        indices: integer array of shape (B,), B >= 1.

    Returns:
        dict[str, np.ndarray] of shape (B, ...) per key.
    """
    if hasattr(source, "get_batch"):
        return source.get_batch(indices)
    indices = np.asarray(indices)
    if indices.size == 0:
        raise ValueError("indices: expected at least one index for the stacking fallback, got 0")
    examples = [source[int(i)] for i in indices]
    return {key: np.stack([np.asarray(ex[key]) for ex in examples]) for key in examples[0]}


class Subset:
    """Examples ``start .. start + n - 1`` of a random-access source (e.g. the first
    `data.train_examples`, or the last `data.validation_examples` held out for validation).

    Args:
        source: any source with ``__len__`` and ``__getitem__`` (and optionally ``get_batch``).
        n: how many examples to keep, 1 <= n <= len(source) - start.
        start: the first example kept.
        what: the setting named in errors.
    """

    def __init__(self, source, n, start=0, what="data.train_examples"):
        if not 0 <= start < len(source) or not 1 <= n <= len(source) - start:
            raise ValueError(
                f"{what}: expected 1..{len(source) - start} (examples available), got {n}"
            )
        self.source = source
        self._length = int(n)
        self._start = int(start)

    def __len__(self):
        return self._length

    def __getitem__(self, i):
        i = _checked_index(i, self._length)
        return self.source[self._start + i % self._length]

    def get_batch(self, indices):
        indices = np.asarray(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self._length):
            raise IndexError(f"indices: expected in [0, {self._length}), got {indices}")
        return get_batch(self.source, indices + self._start)

    def __getattr__(self, name):
        # vocab_size, element_spec, ...: what the full source says about its examples;
        # `arrays` (read by the input checks) is cut to the subset.
        if name == "source":
            raise AttributeError(name)
        if name == "arrays":
            end = self._start + self._length
            return {k: v[self._start : end] for k, v in self.source.arrays.items()}
        return getattr(self.source, name)

    def __repr__(self):
        return f"Subset({self._length} from {self._start} of {self.source!r})"
