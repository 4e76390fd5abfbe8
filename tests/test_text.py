"""Tests for dlkit.data.text and the kjv_char_lm experiment: vocabulary, windows, the fixed
held-out tail, the `bible` dump, and a shrunk run of the experiment that trains and samples."""

import importlib.util
import math
import pathlib
import shutil

import numpy as np
import pytest

import dlkit
from dlkit import data
from dlkit.data import text

SAMPLE = "In the beginning — héllo wörld ✓\n" * 40  # 1,320 characters, some outside ASCII
needs_bible = pytest.mark.skipif(
    shutil.which("bible") is None,
    reason="needs Debian's `bible` program: apt-get install bible-kjv bible-kjv-text",
)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE, encoding="utf-8")
    return path


def test_vocab_is_the_files_sorted_characters_and_round_trips(text_file):
    train = text.load_text(text_file, "train", seq_len=16)
    assert train.vocab.chars == "".join(sorted(set(SAMPLE)))
    assert train.vocab_size == len(set(SAMPLE)) == 19
    ids = train.vocab.encode("wörld ✓")
    assert ids.dtype == np.int32 and train.vocab.decode(ids) == "wörld ✓"
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        train.vocab.encode("z")


def test_windows_are_shifted_by_one_and_the_test_split_is_the_fixed_tail(text_file):
    n, seq_len = len(SAMPLE), 16
    boundary = n - int(n * text.HELD_OUT_FRACTION)  # 1320 - 66
    train = text.load_text(text_file, "train", seq_len=seq_len)
    test = data.load_dataset("text", "test", path=str(text_file), seq_len=seq_len)
    assert len(train) == boundary - seq_len  # a window at every start
    assert len(test) == (n - boundary - 1) // seq_len  # non-overlapping tiles: 65 // 16
    batch = train.get_batch(np.array([0, 7]))
    assert batch["inputs"].shape == batch["labels"].shape == (2, seq_len)
    assert batch["inputs"].dtype == np.int32
    assert train.vocab.decode(batch["inputs"][1]) == SAMPLE[7 : 7 + seq_len]
    assert train.vocab.decode(batch["labels"][1]) == SAMPLE[8 : 8 + seq_len + 0]
    last = train.get_batch(np.array([len(train) - 1]))
    assert train.vocab.decode(last["labels"][0])[-1] == SAMPLE[boundary - 1]  # never the tail
    tiles = test.get_batch(np.arange(len(test)))
    assert test.vocab.decode(tiles["inputs"]) == SAMPLE[boundary : boundary + 4 * seq_len]
    assert test.vocab is train.vocab
    with pytest.raises(IndexError):
        test.get_batch(np.array([len(test)]))


def test_text_dataset_errors_name_the_setting(tmp_path, text_file):
    with pytest.raises(ValueError, match="data.path"):
        data.load_dataset("text", "train")
    with pytest.raises(FileNotFoundError, match="data.path"):
        data.load_dataset("text", "train", path=str(tmp_path / "missing.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(ValueError, match="UTF-8"):
        data.load_dataset("text", "train", path=str(bad))
    with pytest.raises(ValueError, match="data.seq_len"):
        data.load_dataset("text", "test", path=str(text_file), seq_len=100)


def test_engine_takes_the_vocabulary_size_from_the_file(text_file):
    cfg = _shrunk_config(["data.name=text", f"data.path={text_file}"])
    assert dlkit.build(cfg).module.vocab_size == 19
    dlkit.apply_overrides(cfg, ["model.vocab_size=5"])
    with pytest.raises(dlkit.ConfigError, match="model.vocab_size"):
        dlkit.build(cfg)


@needs_bible
def test_kjv_is_dumped_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DLKIT_DATA_DIR", str(tmp_path))
    path = text.kjv_path()
    assert path == tmp_path / "kjv.txt"
    content = path.read_text(encoding="utf-8")
    lines = content.splitlines()
    assert len(lines) == 31_102  # every verse of the Authorized Version
    assert lines[0] == "Ge1:1 In the beginning God created the heaven and the earth."
    assert lines[-1] == "Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen."
    assert len(content) == 4_404_412
    mtime = path.stat().st_mtime_ns
    assert text.kjv_path() == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    test = data.load_dataset("kjv", "test", seq_len=256)
    assert test.vocab_size == 73 and len(test) == 860


def test_kjv_without_bible_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DLKIT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv bible-kjv-text"):
        text.kjv_path()


def _experiment():
    path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "kjv_char_lm.py"
    spec = importlib.util.spec_from_file_location("kjv_char_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shrunk_config(overrides=()):
    shrink = [
        "model.num_layers=1",
        "model.num_heads=2",
        "model.d_model=32",
        "model.max_len=32",
        "model.dropout_rate=0.0",
        "data.seq_len=32",
        "train.batch_size=16",
        "train.eval_batch_size=16",
        "train.steps=40",
        "train.log_every=20",
        "train.eval_every=0",
        "train.progress=false",
        "optim.warmup_steps=5",
        "optim.learning_rate=3e-3",
        "parallel.num_devices=1",
    ]
    return dlkit.load_config("kjv_char_lm", [*shrink, *overrides])


@pytest.mark.parametrize("source", ["text", pytest.param("kjv", marks=needs_bible)])
def test_shrunk_experiment_learns_and_samples(source, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DLKIT_DATA_DIR", str(tmp_path))
    overrides = ["data.name=text", f"data.path={text_file}"] if source == "text" else []
    cfg = _shrunk_config(overrides)
    result = dlkit.fit(cfg, tmp_path / "run")
    first, last = result.history[0]["train/loss"], result.history.last("eval/loss")
    vocab = 19 if source == "text" else 73
    assert first < math.log(vocab) + 0.5  # starts near uniform ...
    assert last < first - 0.5  # ... and learns in 40 steps
    # 40 characters after a 6-character prompt exceed max_len=32: the asked length is kept.
    sample = _experiment().generate(tmp_path / "run", "In the", 40)
    assert sample.startswith("In the") and len(sample) == 46
