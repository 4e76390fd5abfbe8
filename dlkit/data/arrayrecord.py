"""ArrayRecord files as a dataset: `data.name=arrayrecord` with `data.path` a directory of
`train-*.array_record` and `test-*.array_record` files (each split one or more files, read in
name order), one example per record.

    # Write any registered dataset (or your arrays) once, then train from the files:
    python -m dlkit.data.write_arrayrecord fashion_mnist /data/fmnist_ar --num-files 4
    dlkit train fashion_mnist_cnn --set data.name=arrayrecord --set data.path=/data/fmnist_ar \\
        --set data.pipeline=grain --set data.grain_workers=2

    from dlkit.data import arrayrecord
    arrayrecord.write_split("/data/ar", "train", {"inputs": x, "labels": y}, num_files=4)
    train = arrayrecord.load_split("/data/ar", "train")   # ArrayRecordSource, random access
    train[3]                                              # {'inputs': (28, 28, 1), 'labels': ()}

A record is one example, a dict of numpy arrays serialized with `flax.serialization`'s msgpack
(no TensorFlow needed to read or write). Records are read through Grain's
`ArrayRecordDataSource`, so each read touches only the requested records: a dataset larger than
memory trains without being loaded, and the files are checked when opened (a missing, empty or
truncated file is an error naming it), not mid-training.
"""

import glob
import os

import msgpack
import numpy as np
from flax import serialization

from dlkit.data import sources
from dlkit.data.validate import DataError

SUFFIX = ".array_record"
# One record per chunk: a random read decodes only its own record (ArrayRecord's default groups
# 65536 records per chunk, made for sequential reads).
WRITER_OPTIONS = "group_size:1"


def _grain():
    from dlkit.data import grain_pipeline

    return grain_pipeline.import_grain()


def split_files(directory: str, split: str) -> list[str]:
    """The sorted `{split}-*.array_record` files (or `{split}.array_record`) in `directory`.

    Raises:
      FileNotFoundError: naming the directory and the pattern when none is found.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"data.path: expected a directory of {split}-*{SUFFIX} files, got {directory!r}, "
            "which is not a directory"
        )
    files = sorted(glob.glob(os.path.join(directory, f"{split}-*{SUFFIX}")))
    files += [p for p in [os.path.join(directory, f"{split}{SUFFIX}")] if os.path.isfile(p)]
    if not files:
        found = sorted(os.listdir(directory))[:8]
        raise FileNotFoundError(
            f"data.path: expected {split}-*{SUFFIX} files in {directory}, got none (found: "
            f"{found}); write them with `python -m dlkit.data.write_arrayrecord`"
        )
    return files


def _record_count(path: str) -> int:
    """The number of records in one file; DataError naming it if it cannot be read."""
    from array_record.python import array_record_module

    if not os.path.isfile(path):
        raise FileNotFoundError(f"ArrayRecord file: expected an existing file, got {path!r}")
    size = os.path.getsize(path)
    try:
        reader = array_record_module.ArrayRecordReader(path)
        try:
            count = reader.num_records()
        finally:
            reader.close()
    except Exception as e:  # the reader raises RuntimeError, often with an empty message
        raise DataError(
            f"ArrayRecord file {path}: expected a complete ArrayRecord file, got {size} bytes "
            f"that do not open as one (truncated or another format): {type(e).__name__}: {e}"
        ) from None
    if count == 0:
        raise DataError(f"ArrayRecord file {path}: expected at least one record, got 0")
    return count


class ArrayRecordSource:
    """Random-access source over ArrayRecord files, one example (a dict of arrays) per record.

    Args:
      paths: the files, in order; example indices run through them one after another.

    Attributes:
      paths: list[str], the files.
      counts: list[int], records per file.
    """

    def __init__(self, paths):
        paths = [os.fspath(p) for p in ([paths] if isinstance(paths, str | os.PathLike) else paths)]
        if not paths:
            raise ValueError("paths: expected at least one ArrayRecord file, got none")
        self.paths = paths
        self.counts = [_record_count(p) for p in paths]
        self._starts = np.cumsum([0] + self.counts)
        self._reader = _grain().sources.ArrayRecordDataSource(paths)
        self._batch_readers = None
        self._layouts: dict[int, _Layout | None] = {}  # by record length
        # Checked for every file now, so a bad file is found before training and not by the
        # first batch that happens to touch it.
        for start in self._starts[:-1]:
            self._decode(self._reader[int(start)], int(start))

    def __len__(self):
        return int(self._starts[-1])

    def _where(self, index: int) -> str:
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f"record {index - int(self._starts[f])} of {self.paths[f]}"

    def _decode(self, record: bytes, index: int) -> dict:
        try:
            example = serialization.msgpack_restore(record)
        except Exception as e:  # any msgpack failure is a bad record
            raise DataError(
                f"ArrayRecord {self._where(index)}: expected a msgpack dict of arrays (written "
                f"by dlkit.data.arrayrecord), got {len(record)} bytes that do not decode: {e}"
            ) from None
        if not isinstance(example, dict):
            raise DataError(
                f"ArrayRecord {self._where(index)}: expected a dict of arrays, got "
                f"{type(example).__name__}"
            )
        return {k: np.asarray(v) for k, v in example.items()}

    def __getitem__(self, i):
        """One example: dict[str, np.ndarray] without a batch axis."""
        i = sources._checked_index(i, len(self))
        i = i % len(self)
        return self._decode(self._reader[i], i)

    def get_batch(self, indices):
        """dict[str, np.ndarray] of shape (B, ...) for integer `indices` (B,)."""
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        if indices and (min(indices) < 0 or max(indices) >= len(self)):
            raise IndexError(f"indices: expected in [0, {len(self)}), got {indices}")
        records = self._read_many(indices)
        batch = self._decode_same_layout(records, indices[0]) if records else None
        if batch is not None:
            return batch
        examples = [self._decode(r, i) for r, i in zip(records, indices, strict=True)]
        return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}

    def _decode_same_layout(self, records: list[bytes], first_index: int) -> dict | None:
        """The batch decoded at once when every record has the layout of the first one (same
        length, and the same bytes everywhere but in the arrays' data: the same keys, shapes
        and dtypes), as the examples of one dataset usually have; None otherwise (the caller
        then decodes record by record, which also names any record that does not decode).

        Decoding each record with msgpack and stacking the examples costs more host CPU per
        batch than reading the records; slicing the arrays' bytes out of all the records at
        once costs a small fraction of it and yields the same arrays."""
        size = len(records[0])
        if size not in self._layouts:
            self._layouts[size] = _Layout.of(records[0], self._decode(records[0], first_index))
        layout = self._layouts[size]
        if layout is None or any(len(r) != size for r in records):
            return None
        rows = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), size)
        if not (rows[:, layout.fixed] == layout.header).all():
            return None
        return layout.arrays(rows)

    def _read_many(self, indices: list[int]) -> list[bytes]:
        """The records at `indices`, one batched read per file: ArrayRecord's reader reads a
        list of positions at a fraction of the CPU time of reading them one by one, and the
        data source's own `__getitems__` starts a thread pool on every call."""
        if self._batch_readers is None:  # opened lazily: after pickling, in each worker
            from array_record.python import array_record_module

            self._batch_readers = [
                array_record_module.ArrayRecordReader(p, "readahead_buffer_size:0")
                for p in self.paths
            ]
        files = np.searchsorted(self._starts, indices, side="right") - 1
        out: list[bytes | None] = [None] * len(indices)
        for f in np.unique(files):
            where = np.flatnonzero(files == f)
            positions = [indices[i] - int(self._starts[f]) for i in where]
            for i, record in zip(where, self._batch_readers[f].read(positions), strict=True):
                out[i] = record
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_batch_readers"] = None  # open file handles do not travel to worker processes
        return state

    @property
    def element_spec(self):
        """dict[str, (shape_without_batch, np.dtype)] of the first example."""
        return {k: (v.shape, v.dtype) for k, v in self[0].items()}

    def __repr__(self):
        return f"ArrayRecordSource(n={len(self)}, files={len(self.paths)})"


class _Layout:
    """Where each array's data sits in a record of one layout (see
    `ArrayRecordSource._decode_same_layout`).

    Attributes:
      fields: [(key, offset, nbytes, dtype, shape)], each array's data bytes in the record.
      fixed: bool (record_length,), True for the bytes outside the arrays' data.
      header: uint8, the record's bytes where `fixed` is True: every record of this layout
        has exactly these.
    """

    def __init__(self, fields, fixed, header):
        self.fields, self.fixed, self.header = fields, fixed, header

    @classmethod
    def of(cls, record: bytes, example: dict) -> "_Layout | None":
        """The layout of `record`, which decodes to `example`; None if it is not a flat map
        of array data that can be sliced out (the batch is then decoded record by record)."""
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(record)
        fields = []
        try:
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                unpacker.skip()  # the array: a msgpack ext whose data ends with the array's bytes
                value = example.get(key) if isinstance(key, str) else None
                if not isinstance(value, np.ndarray) or value.dtype.hasobject:
                    return None
                end = unpacker.tell()
                fields.append((key, end - value.nbytes, value.nbytes, value.dtype, value.shape))
        except Exception:  # not a map of ext values: the record-by-record path handles it
            return None
        if unpacker.tell() != len(record) or len(fields) != len(example):
            return None
        fixed = np.ones(len(record), bool)
        for _, offset, nbytes, _, _ in fields:
            fixed[offset : offset + nbytes] = False
        row = np.frombuffer(record, np.uint8)
        layout = cls(fields, fixed, row[fixed].copy())
        # The slices must give back exactly what msgpack decoded.
        sliced = layout.arrays(row[None])
        for key, value in example.items():
            got = sliced[key][0]
            nan = value.dtype.kind in "fc"
            if got.dtype != value.dtype or not np.array_equal(got, value, equal_nan=nan):
                return None
        return layout

    def arrays(self, rows: np.ndarray) -> dict:
        """{key: (B, ...) array} from `rows`, uint8 (B, record_length) of this layout."""
        return {
            key: np.ascontiguousarray(rows[:, offset : offset + nbytes])
            .view(dtype)
            .reshape((len(rows),) + shape)
            for key, offset, nbytes, dtype, shape in self.fields
        }


def load_split(directory: str, split: str) -> ArrayRecordSource:
    """The `split` ("train" or "test") of `directory` (see `split_files`)."""
    return ArrayRecordSource(split_files(directory, split))


def write_split(directory, split: str, source, *, num_files: int = 1, chunk: int = 4096):
    """Writes every example of `source` to `num_files` ArrayRecord files in `directory`,
    `{split}-00000-of-0000N.array_record`, contiguous runs of examples in file order.

    Args:
      directory: created if missing.
      split: the file name prefix, e.g. "train".
      source: a random-access source, or a dict of equal-length arrays {"inputs": (N, ...), ...}.
      num_files: a positive int at most N.
      chunk: examples read from `source` at a time (bounds memory for memory-mapped sources).
    Returns:
      list[str], the files written.
    """
    if isinstance(source, dict):
        source = sources.ArraySource(**source)
    n = len(source)
    if isinstance(num_files, bool) or not isinstance(num_files, int) or not 1 <= num_files <= n:
        raise ValueError(f"num_files: expected an int in [1, {n}] (the examples), got {num_files}")
    os.makedirs(directory, exist_ok=True)
    bounds = np.linspace(0, n, num_files + 1).astype(int)
    paths = []
    for f in range(num_files):
        path = file_name(directory, split, f, num_files)

        def examples(lo=bounds[f], end=bounds[f + 1]):
            for start in range(lo, end, chunk):
                batch = sources.get_batch(source, np.arange(start, min(start + chunk, end)))
                for i in range(len(next(iter(batch.values())))):
                    yield {k: v[i] for k, v in batch.items()}

        write_file(path, examples())
        paths.append(path)
    return paths


def file_name(directory, split: str, index: int, count: int) -> str:
    """The path of file `index` of `count` of a split: `{split}-00000-of-0000N.array_record`."""
    return os.path.join(directory, f"{split}-{index:05d}-of-{count:05d}{SUFFIX}")


def write_file(path: str, examples) -> int:
    """Writes each example (a dict of arrays) of the iterable `examples` as one record of a new
    ArrayRecord file at `path`; returns the number written."""
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(os.fspath(path), WRITER_OPTIONS)
    count = 0
    try:
        for example in examples:
            example = {k: np.asarray(v) for k, v in example.items()}
            writer.write(serialization.msgpack_serialize(example))
            count += 1
    finally:
        writer.close()
    return count
