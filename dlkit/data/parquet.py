"""Parquet files as training data: read once with Grain's Parquet reader, written to ArrayRecord,
then trained from through the Grain pipeline.

    python -m dlkit.data.parquet /data/fmnist_ar \\
        --train '/data/parquet/train-*.parquet' --test /data/parquet/test.parquet \\
        --column inputs=pixels:uint8:28,28,1 --column labels=label:int32
    dlkit train fashion_mnist_cnn --set data.name=arrayrecord --set data.path=/data/fmnist_ar \\
        --set data.pipeline=grain

    from dlkit.data import parquet
    columns = parquet.parse_columns(["inputs=pixels:uint8:28,28,1", "labels=label:int32"])
    parquet.to_arrayrecord(["train.parquet"], "/data/ar", "train", columns)

Why a conversion and not a Parquet source: Grain (0.2.18) reads Parquet only as a sequential
`grain.experimental.ParquetIterDataset`, with no random access. The Grain pipeline needs random
access: it shuffles each epoch by index and gives each process its own rows of every global
batch (`dlkit.data.grain_pipeline`). So each Parquet file is read in order with Grain's reader
(which uses pyarrow) and its rows become one ArrayRecord file, `{split}-0000i-of-0000N`, in the
files' name order.

A column spec `NAME=COLUMN[:DTYPE[:SHAPE]]` maps Parquet column COLUMN to the example key NAME
("inputs", "labels", ...), cast to DTYPE (a numpy dtype name) and reshaped to SHAPE
(comma-separated ints), e.g. a flat list of 784 bytes to 28,28,1. Cells must be numbers or lists
of numbers; bytes (such as encoded images) are refused with the column named: decode them
first.
"""

import argparse
import dataclasses
import glob
import os

import numpy as np

from dlkit.data import arrayrecord
from dlkit.data.validate import DataError

_INSTALL_HINT = "pip install 'dlkit[parquet]' (or pip install pyarrow)"


@dataclasses.dataclass(frozen=True)
class Column:
    """Parquet column `column` as example key `name`, cast to `dtype`, reshaped to `shape`."""

    name: str
    column: str
    dtype: np.dtype | None = None
    shape: tuple[int, ...] | None = None

    def convert(self, value, where: str) -> np.ndarray:
        if isinstance(value, bytes | str):
            raise DataError(
                f"{where}, column {self.column!r}: expected numbers or lists of numbers, got "
                f"{type(value).__name__} (decode encoded images or text before converting)"
            )
        try:
            array = np.asarray(value, dtype=self.dtype)
        except (TypeError, ValueError) as e:
            raise DataError(
                f"{where}, column {self.column!r}: expected values castable to {self.dtype}, "
                f"got {value!r:.80}: {e}"
            ) from None
        if self.shape is not None:
            if array.size != int(np.prod(self.shape)):
                raise DataError(
                    f"{where}, column {self.column!r}: expected {int(np.prod(self.shape))} "
                    f"values to reshape to {self.shape}, got shape {array.shape}"
                )
            array = array.reshape(self.shape)
        return array


def parse_columns(specs) -> list[Column]:
    """Column specs `NAME=COLUMN[:DTYPE[:SHAPE]]` as `Column`s; ValueError naming a bad one."""
    out = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        parts = rest.split(":")
        if not sep or not name or not parts[0] or len(parts) > 3:
            raise ValueError(
                f"--column: expected NAME=COLUMN[:DTYPE[:SHAPE]] (e.g. "
                f"inputs=pixels:uint8:28,28,1), got {spec!r}"
            )
        dtype = shape = None
        if len(parts) > 1 and parts[1]:
            try:
                dtype = np.dtype(parts[1])
            except TypeError:
                raise ValueError(
                    f"--column {spec!r}: expected a numpy dtype name, got {parts[1]!r}"
                ) from None
        if len(parts) > 2 and parts[2]:
            try:
                shape = tuple(int(d) for d in parts[2].split(","))
            except ValueError:
                shape = ()
            if not shape or min(shape) < 1:
                raise ValueError(
                    f"--column {spec!r}: expected a shape of positive ints such as 28,28,1, "
                    f"got {parts[2]!r}"
                )
        out.append(Column(name, parts[0], dtype, shape))
    names = [c.name for c in out]
    if not out or len(set(names)) != len(names):
        raise ValueError(f"--column: expected one or more distinct example keys, got {names}")
    return out


def expand(patterns) -> list[str]:
    """The files the paths and glob patterns name, sorted per pattern; FileNotFoundError
    naming a pattern that matches nothing."""
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(os.fspath(pattern)))
        if not found:
            raise FileNotFoundError(f"Parquet files: expected files matching {pattern!r}, got none")
        files += found
    return files


def _rows(path: str):
    """The rows of one Parquet file, in order, through Grain's reader."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading Parquet needs pyarrow: {_INSTALL_HINT}") from None
    from dlkit.data import grain_pipeline

    grain = grain_pipeline.import_grain()
    try:
        schema = pq.ParquetFile(path).schema_arrow  # opens the footer: a bad file fails here
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
        size = os.path.getsize(path)
        raise DataError(
            f"Parquet file {path}: expected a complete Parquet file, got {size} bytes that do "
            f"not open as one: {type(e).__name__}: {e}"
        ) from None
    return schema.names, iter(grain.experimental.ParquetIterDataset(path))


def to_arrayrecord(files, directory, split: str, columns: list[Column]) -> list[str]:
    """Writes the rows of each Parquet file in `files` as one ArrayRecord file of `split` in
    `directory` (created if missing).

    Args:
      files: Parquet file paths, in the order their rows should be indexed.
      directory: the output directory (`data.path` of `data.name=arrayrecord`).
      split: "train" or "test".
      columns: from `parse_columns`.
    Returns:
      list[str], the ArrayRecord files written.
    Raises:
      DataError naming the file (and the row and column) that cannot be converted; the
      files this call wrote are removed, so no partial split is left behind.
      FileExistsError when `directory` already holds files of `split`.
    """
    files = [os.fspath(f) for f in files]
    if not files:
        raise ValueError(f"files: expected at least one Parquet file for {split!r}, got none")
    pattern = os.path.join(os.fspath(directory), f"{split}*{arrayrecord.SUFFIX}")
    existing = sorted(glob.glob(pattern))
    if existing:
        raise FileExistsError(
            f"directory: expected no {split} ArrayRecord files in {directory} (they would mix "
            f"with the new ones), got {existing[:4]}; remove them or choose another directory"
        )
    os.makedirs(directory, exist_ok=True)
    out = []
    try:
        for i, path in enumerate(files):
            names, rows = _rows(path)
            missing = [c.column for c in columns if c.column not in names]
            if missing:
                raise DataError(
                    f"Parquet file {path}: expected columns {missing} (from --column), got "
                    f"columns {names}"
                )
            target = arrayrecord.file_name(directory, split, i, len(files))

            def examples(rows=rows, path=path):
                for r, row in enumerate(rows):
                    yield {c.name: c.convert(row[c.column], f"{path} row {r}") for c in columns}

            out.append(target)
            if arrayrecord.write_file(target, examples()) == 0:
                raise DataError(f"Parquet file {path}: expected at least one row, got 0")
    except BaseException:
        for target in out:
            if os.path.exists(target):
                os.remove(target)
        raise
    return out


def main(argv=None) -> None:
    """`python -m dlkit.data.parquet OUT_DIR --train FILES --test FILES --column SPEC ...`."""
    parser = argparse.ArgumentParser(
        prog="python -m dlkit.data.parquet",
        description="Convert Parquet files to ArrayRecord for data.name=arrayrecord.",
    )
    parser.add_argument("out_dir")
    parser.add_argument("--train", nargs="+", required=True, help="train split files or globs")
    parser.add_argument("--test", nargs="+", default=[], help="test split files or globs")
    parser.add_argument(
        "--column",
        action="append",
        required=True,
        help="NAME=COLUMN[:DTYPE[:SHAPE]], e.g. inputs=pixels:uint8:28,28,1 (repeat per key)",
    )
    args = parser.parse_args(argv)
    try:
        columns = parse_columns(args.column)
        splits = {"train": expand(args.train), "test": expand(args.test) if args.test else []}
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    for split, files in splits.items():
        if files:
            written = to_arrayrecord(files, args.out_dir, split, columns)
            print(f"{split}: {len(files)} Parquet file(s) -> {len(written)} in {args.out_dir}")


if __name__ == "__main__":
    main()
