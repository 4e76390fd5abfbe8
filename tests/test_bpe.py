"""Tests for dlkit.data.tokenize_corpus and dlkit.data.bpe: the manifest's counts, exact round
trips through the trained tokenizer, windows over the token files, a source that travels to
Grain's workers as its file names, the errors a user can cause, and a shrunk kjv_bpe_lm run
through data.pipeline=grain."""

import json
import math
import os
import pickle
import sys

import numpy as np
import pytest

import dlkit
from dlkit.data import bpe, datasets, grain_pipeline, tokenize_corpus

# Two documents, some characters outside ASCII; ~45 KB, so the token files outweigh a pickle.
DOC_A = "".join(f"Gen{i}:1 In the beginning — héllo wörld ✓ {i * 7 % 13}\n" for i in range(900))
DOC_B = "".join(f"% fortune {i}: a penny saved is a penny earned.\n" for i in range(300))
VOCAB = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    files = []
    for name, content in (("a.txt", DOC_A), ("b.txt", DOC_B)):
        (root / name).write_text(content, encoding="utf-8")
        files.append(str(root / name))
    manifest = tokenize_corpus.tokenize(files, root / "corpus", vocab_size=VOCAB)
    return root / "corpus", files, manifest


def _copy(corpus_dir, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for name in os.listdir(corpus_dir):
        (out / name).write_bytes((corpus_dir / name).read_bytes())
    return out


def test_manifest_counts_the_tokens_written_per_split_and_source(corpus):
    directory, files, manifest = corpus
    assert json.loads((directory / bpe.MANIFEST).read_text()) == manifest
    assert manifest["vocab_size"] == VOCAB
    assert manifest["dtype"] == "uint16" and manifest["end_of_text"]["id"] == 0
    for split in bpe.SPLITS:
        tokens = np.load(directory / bpe.token_file(split))
        assert tokens.dtype == np.uint16
        assert len(tokens) == manifest["splits"][split]["tokens"]
        assert len(tokens) == sum(s[f"{split}_tokens"] for s in manifest["sources"])
        assert tokens.max() < VOCAB
        # Each document ends with END_OF_TEXT, and no other token is id 0.
        ends = np.cumsum([s[f"{split}_tokens"] for s in manifest["sources"]]) - 1
        np.testing.assert_array_equal(np.flatnonzero(tokens == 0), ends)
    assert [s["path"] for s in manifest["sources"]] == files
    assert [s["bytes"] for s in manifest["sources"]] == [os.path.getsize(f) for f in files]
    assert manifest["sources"][0]["sha256"] == bpe.sha256(files[0])


def test_the_tokenizer_round_trips_text_and_the_splits_are_each_files_tail(corpus):
    directory, _, manifest = corpus
    vocab = bpe.load_split(directory, "train", seq_len=8).vocab
    for sample in ("In the beginning — héllo wörld ✓\n", "unseen ✗ 漢字 \t tabs  and  spaces"):
        ids = vocab.encode(sample)
        assert ids.dtype == np.int32 and ids.max() < VOCAB
        assert vocab.decode(ids) == sample
    # The stored streams decode to the documents: train part + test part, in order.
    train, test = (np.load(directory / bpe.token_file(s)) for s in bpe.SPLITS)
    (a_train, b_train), (a_test, b_test) = (
        [s[f"{split}_tokens"] for s in manifest["sources"]] for split in bpe.SPLITS
    )
    assert vocab.decode(train[: a_train - 1]) + vocab.decode(test[: a_test - 1]) == DOC_A
    assert vocab.decode(train[a_train:-1]) + vocab.decode(test[a_test:-1]) == DOC_B
    # The held-out tail is about 5% of each document, starting at a line.
    tail = vocab.decode(test[: a_test - 1])
    assert DOC_A.endswith(tail) and tail.startswith("Gen")
    assert 0.04 < len(tail) / len(DOC_A) < 0.06
    assert b_test < a_test and b_train < a_train  # per document, not one tail of the stream


def test_windows_are_the_token_stream_shifted_by_one(corpus):
    directory, _, manifest = corpus
    t = 16
    train = datasets.load_dataset("bpe_corpus", "train", path=str(directory), seq_len=t)
    test = datasets.load_dataset("bpe_corpus", "test", path=str(directory), seq_len=t)
    stream = np.load(directory / "train.npy").astype(np.int64)
    held = np.load(directory / "test.npy").astype(np.int64)
    assert train.vocab_size == VOCAB
    assert len(train) == len(stream) - t and len(test) == (len(held) - t - 1) // t + 1
    indices = np.array([0, 5, len(train) - 1])
    batch = train.get_batch(indices)
    assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (3, t)
    for row, i in enumerate(indices):
        np.testing.assert_array_equal(batch["inputs"][row], stream[i : i + t])
        np.testing.assert_array_equal(batch["labels"][row], stream[i + 1 : i + t + 1])
    last = test[len(test) - 1]  # the test split tiles: window k starts at k * t
    np.testing.assert_array_equal(last["inputs"], held[(len(test) - 1) * t : len(test) * t])


def test_a_source_travels_to_grain_workers_as_its_file_names(corpus):
    directory, _, _ = corpus
    train = bpe.load_split(directory, "train", seq_len=16)
    blob = pickle.dumps(train)
    assert len(blob) < 2_000 < 2 * train.count  # the memmap is not copied
    back = pickle.loads(blob)
    assert isinstance(back.tokens, np.memmap) and back.vocab.path == train.vocab.path
    indices = np.arange(0, len(train), 997)
    np.testing.assert_array_equal(
        back.get_batch(indices)["labels"], train.get_batch(indices)["labels"]
    )
    with grain_pipeline.GrainLoader(train, 8, seed=3, workers=1) as loader:
        from_worker = [next(loader) for _ in range(3)]
    reference = grain_pipeline.GrainLoader(train, 8, seed=3)
    for b, batch in enumerate(from_worker):
        for key in ("inputs", "labels"):
            np.testing.assert_array_equal(batch[key], reference.batch_at(b)[key])


def test_missing_and_truncated_files_are_named(corpus, tmp_path):
    directory, _, manifest = corpus
    with pytest.raises(FileNotFoundError, match=r"data.path: expected a directory .* not a dir"):
        bpe.load_split(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="data.path: expected the directory written by"):
        datasets.load_dataset("bpe_corpus", "train")
    copy = _copy(directory, tmp_path)
    (copy / "train.npy").write_bytes((directory / "train.npy").read_bytes()[:-10])
    count = manifest["splits"]["train"]["tokens"]
    with pytest.raises(
        bpe.DataError, match=rf"train.npy: truncated token file, expected \d+ bytes \({count} "
    ):
        bpe.load_split(copy, "train")
    bpe.load_split(copy, "test")  # the other split is intact
    os.remove(copy / "test.npy")
    with pytest.raises(FileNotFoundError, match=r"expected the token file .*test.npy"):
        bpe.load_split(copy, "test")
    os.remove(copy / bpe.MANIFEST)
    with pytest.raises(FileNotFoundError, match=r"expected manifest.json in .*tokenize_corpus"):
        bpe.load_split(copy, "train")


def test_a_tokenizer_of_another_vocabulary_is_refused(corpus, tmp_path):
    directory, files, _ = corpus
    copy = _copy(directory, tmp_path)
    other = tokenize_corpus.tokenize(files[1:], tmp_path / "other", vocab_size=280)
    assert other["vocab_size"] == 280
    (copy / bpe.TOKENIZER).write_bytes((tmp_path / "other" / bpe.TOKENIZER).read_bytes())
    with pytest.raises(bpe.DataError, match="expected a vocabulary of 300 tokens .* got 280"):
        bpe.load_split(copy, "train")


def test_without_tokenizers_the_errors_name_the_extra(corpus, monkeypatch):
    directory, files, _ = corpus
    train = bpe.load_split(directory, "train", seq_len=8)  # reading needs no tokenizers
    assert train.get_batch(np.array([0]))["inputs"].shape == (1, 8)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` raises
    with pytest.raises(ImportError, match=r"pip install 'dlkit\[text\]'"):
        train.vocab.decode([1, 2])
    with pytest.raises(ImportError, match=r"pip install 'dlkit\[text\]'"):
        tokenize_corpus.tokenize(files, directory.parent / "x", vocab_size=VOCAB)


def test_missing_corpus_sources_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize_corpus, "FORTUNES_DIR", str(tmp_path / "no_fortunes"))
    with pytest.raises(FileNotFoundError, match=r"fortunes: .*apt-get install fortunes"):
        tokenize_corpus.source_files(["fortunes", "licenses"])
    with pytest.raises(ValueError, match=r"--sources: expected names from .* got \['bible'\]"):
        tokenize_corpus.source_files(["bible"])
    with pytest.raises(ValueError, match=r"--vocab-size: expected an int in \[258, 2\*\*31\)"):
        tokenize_corpus.tokenize([str(tmp_path)], tmp_path / "out", vocab_size=100)


def _shrunk_config(directory, overrides=()):
    shrink = [
        f"data.path={directory}",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.d_model=32",
        "model.max_len=16",
        "model.dropout_rate=0.0",
        "data.seq_len=16",
        "data.grain_workers=0",
        "train.batch_size=16",
        "train.eval_batch_size=16",
        "train.steps=30",
        "train.log_every=10",
        "train.eval_every=0",
        "train.progress=false",
        "train.plots=false",
        "checkpoint.every_steps=30",
        "optim.warmup_steps=5",
        "optim.learning_rate=3e-3",
        "parallel.num_devices=1",
    ]
    return dlkit.load_config("kjv_bpe_lm", [*shrink, *overrides])


def test_a_model_smaller_than_the_manifests_vocabulary_fails_before_compiling(corpus):
    directory, _, _ = corpus
    cfg = _shrunk_config(directory, ["model.vocab_size=64"])
    with pytest.raises(dlkit.ConfigError, match=r"model.vocab_size: expected 0 .* >= 300 .*manif"):
        dlkit.build(cfg)


def test_shrunk_kjv_bpe_lm_trains_through_grain_and_samples(corpus, tmp_path):
    directory, _, _ = corpus
    cfg = _shrunk_config(directory)
    assert cfg.data.pipeline == "grain" and cfg.data.name == "bpe_corpus"
    result = dlkit.fit(cfg, tmp_path / "run")
    assert result.model.vocab_size == VOCAB  # from the manifest
    first, last = result.history[0]["train/loss"], result.history.last("eval/loss")
    assert math.isfinite(last)
    assert first < math.log(VOCAB) + 0.5  # starts near uniform ...
    assert last < first - 1.0  # ... and learns the repetitive corpus in 30 steps
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any("eval/loss" in json.loads(line) for line in lines)
    sample = dlkit.sample(tmp_path / "run", "In the", 10)
    assert isinstance(sample, str) and sample
