"""`python -m benchmarks.grain_input`: its parts at tiny sizes give well-formed, plausible
figures (the full run's figures are in BENCHMARKS.md)."""

import math

import numpy as np
from conftest import tiny_digits_config

from benchmarks import grain_input
from dlkit.data import arrayrecord

MIB = 2**20


def test_memory_part_writes_the_dataset_and_measures_the_process_tree(tmp_path):
    data = tmp_path / "ar"
    written = grain_input.write_dataset(str(data), 3 * MIB, shape=(16, 16, 3), eval_examples=64)
    train = arrayrecord.load_split(str(data), "train")
    assert len(train) == written["examples"] == math.ceil(3 * MIB / (16 * 16 * 3))
    assert written["bytes"] >= 3 * MIB and written["MiB_per_s"] > 0
    example = train[5]
    assert example["inputs"].shape == (16, 16, 3) and example["inputs"].dtype == np.uint8
    # The same bytes as the generator gives: written, not made up on read.
    chunk = grain_input.SyntheticImages(written["examples"], (16, 16, 3)).get_batch(np.arange(8))
    np.testing.assert_array_equal(example["inputs"], chunk["inputs"][5])
    assert len(arrayrecord.load_split(str(data), "test")) == 64

    row = grain_input.measure_memory(
        str(data),
        1,
        warmup=10,
        steps=10,
        log_dir=str(tmp_path),
        options={"features": (4,), "dense_size": 8, "dropout_rate": 0.0},
        batch=32,
    )
    assert row["workers"] == 1
    for key in ("examples_per_s", "steps_per_s", "main_peak_rss", "tree_peak_rss"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert row["examples_per_s"] == row["steps_per_s"] * 32
    # The training process and its Grain worker were both seen: the tree holds more than one
    # process and more memory than a Python process with JAX imported (> 100 MiB) alone.
    assert row["max_processes"] >= 2
    assert 100 * MIB < row["tree_peak_rss"] < 4096 * MIB
    assert 0 < row["tree_peak_pss"] <= row["tree_peak_rss"]
    table = grain_input.memory_table([row]).splitlines()
    assert len(table) == 3 and table[2].startswith("| 1 | ")


def test_speed_part_times_fit_between_rows_and_tabulates_ratios():
    seconds = {}
    for name, overrides in (("memory", {}), ("grain", {"data.pipeline": "grain"})):
        cfg = tiny_digits_config(**overrides)
        seconds[name], result = grain_input.timed_fit(cfg, warmup=10, steps=20)
        assert result.history.last("step") == 40  # warm-up + measured + one row to close
        assert math.isfinite(seconds[name]) and seconds[name] > 0
    res = {"results": {"memory": [10.0, 20.0, 30.0], "grain_ar_w0": [9.0, 19.0, 33.0]}}
    table = grain_input.speed_table(res).splitlines()
    assert (
        table[2] == "| in-memory loader (data.pipeline=memory) | 20.0 | 10.0-30.0 | 1.00x | 1.00x |"
    )
    # Ratio of medians 19/20; paired: the median of 0.9, 0.95, 1.1.
    assert table[3] == (
        "| Grain over ArrayRecord files, 0 workers | 19.0 | 9.0-33.0 | 0.95x | 0.95x |"
    )
