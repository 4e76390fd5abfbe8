"""Parquet files converted to ArrayRecord (dlkit.data.parquet) and trained from through Grain."""

import os

import numpy as np
import pyarrow as pa  # the test extra installs it
import pyarrow.parquet as pq
import pytest

from dlkit.data import arrayrecord, parquet
from dlkit.data.validate import DataError

COLUMNS = ["inputs=pixels:uint8:4,3,1", "labels=label:int32"]


def _write(path, images, labels, **extra):
    table = pa.table(
        {"pixels": [im.reshape(-1).tolist() for im in images], "label": labels, **extra}
    )
    pq.write_table(table, path, row_group_size=7)  # several row groups per file
    return path


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 4, 3, 1), dtype=np.uint8), rng.integers(0, 10, n)


def test_rows_come_back_as_the_examples_in_file_order(tmp_path):
    (a_img, a_lab), (b_img, b_lab) = _data(20, 0), _data(13, 1)
    # Name order, not argument order, for a glob: b-* sorts after a-*.
    _write(tmp_path / "b-train.parquet", b_img, b_lab)
    _write(tmp_path / "a-train.parquet", a_img, a_lab)
    columns = parquet.parse_columns(COLUMNS)
    files = parquet.expand([str(tmp_path / "*-train.parquet")])
    written = parquet.to_arrayrecord(files, tmp_path / "ar", "train", columns)
    assert [os.path.basename(p) for p in written] == [
        "train-00000-of-00002.array_record",
        "train-00001-of-00002.array_record",
    ]
    source = arrayrecord.load_split(str(tmp_path / "ar"), "train")
    assert source.counts == [20, 13]
    batch = source.get_batch(np.arange(33))
    np.testing.assert_array_equal(batch["inputs"], np.concatenate([a_img, b_img]))
    np.testing.assert_array_equal(batch["labels"], np.concatenate([a_lab, b_lab]))
    assert batch["inputs"].dtype == np.uint8 and batch["labels"].dtype == np.int32


def test_the_command_converts_both_splits_and_a_run_trains_from_them(tmp_path, capsys):
    import dlkit

    img, lab = _data(96, 2)
    _write(tmp_path / "train.parquet", img[:64], lab[:64])
    _write(tmp_path / "test.parquet", img[64:], lab[64:])
    out = tmp_path / "ar"
    parquet.main(
        [str(out), "--train", str(tmp_path / "train.parquet"), "--test"]
        + [str(tmp_path / "test.parquet"), "--column", COLUMNS[0], "--column", COLUMNS[1]]
    )
    assert "train: 1 Parquet file(s) -> 1" in capsys.readouterr().out
    assert len(arrayrecord.load_split(str(out), "test")) == 32
    cfg = dlkit.load_config("digits_mlp")
    dlkit.apply_overrides(
        cfg,
        [
            "data.name=arrayrecord",
            f"data.path={out}",
            "data.pipeline=grain",
            "model.hidden_sizes=[8]",
            "train.steps=4",
            "train.batch_size=16",
            "train.eval_every=4",
            "train.log_every=2",
            "train.progress=false",
            "train.plots=false",
            "optim.warmup_steps=0",
            "parallel.num_devices=1",
        ],
    )
    result = dlkit.fit(cfg, tmp_path / "run")
    final = result.history[-1]
    assert final["step"] == 4 and np.isfinite(final["train/loss"])
    assert 0.0 <= final["eval/accuracy"] <= 1.0


def test_bad_input_names_the_file_row_and_column_and_leaves_no_partial_split(tmp_path):
    img, lab = _data(10, 3)
    good = _write(tmp_path / "a.parquet", img, lab)
    columns = parquet.parse_columns(COLUMNS)

    with pytest.raises(DataError, match=r"a\.parquet: expected columns \['nope'\]"):
        parquet.to_arrayrecord([good], tmp_path / "o1", "train", parquet.parse_columns(["x=nope"]))

    wrong = _write(tmp_path / "b.parquet", np.zeros((3, 2, 2, 1), np.uint8), [1, 2, 3])
    with pytest.raises(DataError, match=r"b\.parquet row 0, column 'pixels': expected 12 values"):
        parquet.to_arrayrecord([good, wrong], tmp_path / "o2", "train", columns)
    assert not list((tmp_path / "o2").iterdir())  # the good file's output was removed too

    truncated = tmp_path / "c.parquet"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"c\.parquet: expected a complete Parquet file"):
        parquet.to_arrayrecord([truncated], tmp_path / "o3", "train", columns)

    encoded = _write(tmp_path / "d.parquet", img, lab, raw=[b"\x89PNG"] * 10)
    with pytest.raises(DataError, match=r"column 'raw': expected numbers .* got bytes"):
        parquet.to_arrayrecord(
            [encoded], tmp_path / "o4", "train", parquet.parse_columns(["x=raw"])
        )

    parquet.to_arrayrecord([good], tmp_path / "o5", "train", columns)
    with pytest.raises(FileExistsError, match="expected no train ArrayRecord files"):
        parquet.to_arrayrecord([good], tmp_path / "o5", "train", columns)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("inputs", "expected NAME=COLUMN"),
        ("inputs=px:float99", "expected a numpy dtype name"),
        ("inputs=px:uint8:28,x", "expected a shape of positive ints"),
        ("inputs=px:uint8:0,3", "expected a shape of positive ints"),
    ],
)
def test_column_specs_are_checked(spec, message):
    with pytest.raises(ValueError, match=message):
        parquet.parse_columns([spec])
    with pytest.raises(ValueError, match="distinct example keys"):
        parquet.parse_columns(["a=x", "a=y"])


def test_a_pattern_that_matches_nothing_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"matching '.*none-\*\.parquet'"):
        parquet.expand([str(tmp_path / "none-*.parquet")])
