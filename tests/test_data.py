"""Tests for dlkit.data: sources, the deterministic loader, IDX parsing and prefetching."""

import gzip
import os
import threading
import time

import numpy as np
import pytest
import sklearn.datasets

import dlkit.data as data

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _source(n=103):
    # inputs encode the index so batches can be traced back to examples.
    idx = np.arange(n)
    return data.ArraySource(
        inputs=np.stack([idx, -idx], axis=1).astype(np.float32), labels=idx.astype(np.int32)
    )


class _DictListSource:
    """A plain random-access source without get_batch."""

    def __init__(self, inputs, labels):
        self._inputs, self._labels = inputs, labels

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        return {"inputs": self._inputs[i], "labels": self._labels[i]}


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert np.array_equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- sources


def test_array_source_basics():
    src = _source(5)
    assert len(src) == 5
    assert src[3]["labels"] == 3
    assert np.array_equal(src[3]["inputs"], [3.0, -3.0])
    batch = src.get_batch(np.array([4, 0, 4]))
    assert np.array_equal(batch["labels"], [4, 0, 4])
    assert batch["inputs"].shape == (3, 2)
    assert src.element_spec == {
        "inputs": ((2,), np.dtype(np.float32)),
        "labels": ((), np.dtype(np.int32)),
    }


def test_array_source_rejects_mismatched_lengths_and_no_arrays():
    with pytest.raises(ValueError, match=r"arrays.*'a': 3.*'b': 4"):
        data.ArraySource(a=np.zeros(3), b=np.zeros(4))
    with pytest.raises(ValueError, match="arrays"):
        data.ArraySource()


def test_array_source_memmap(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(20, dtype=np.int16).reshape(10, 2))
    src = data.ArraySource(x=np.load(path, mmap_mode="r"))
    batch = data.get_batch(src, np.array([9, 1]))
    assert np.array_equal(batch["x"], [[18, 19], [2, 3]])
    assert not isinstance(batch["x"], np.memmap)


def test_get_batch_fallback_matches_array_source():
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(23, 3, 2)).astype(np.float32)
    labels = rng.integers(0, 10, size=23).astype(np.int32)
    plain = _DictListSource(inputs, labels)
    array = data.ArraySource(inputs=inputs, labels=labels)
    indices = np.array([5, 0, 22, 5])
    _assert_batches_equal(data.get_batch(plain, indices), data.get_batch(array, indices))
    a = data.Loader(plain, 4, seed=3, last_batch="pad")
    b = data.Loader(array, 4, seed=3, last_batch="pad")
    for position in range(15):
        _assert_batches_equal(a.batch_at(position), b.batch_at(position))


# ----------------------------------------------------------------------------- loader


def test_shuffled_drop_epochs_are_permutations_without_repeats():
    loader = data.Loader(_source(103), 10, seed=0)
    assert loader.batches_per_epoch == 10
    orders = []
    for _ in range(3):
        labels = np.concatenate([next(loader)["labels"] for _ in range(10)])
        assert len(labels) == 100
        assert len(np.unique(labels)) == 100
        assert labels.min() >= 0 and labels.max() < 103
        orders.append(labels)
    assert loader.position == 30
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])


def test_pad_covers_every_example_once_with_static_shapes():
    loader = data.Loader(_source(103), 10, seed=1, last_batch="pad")
    assert loader.batches_per_epoch == 11
    batches = list(loader.iter_epoch(2))
    assert len(batches) == 11
    for batch in batches:
        assert set(batch) == {"inputs", "labels", "mask"}
        assert batch["mask"].dtype == np.float32
        for value in batch.values():
            assert value.shape[0] == 10
    assert batches[-1]["mask"].sum() == 3
    assert np.array_equal(batches[-1]["mask"], [1, 1, 1] + [0] * 7)
    # Padding repeats the batch's first example.
    assert np.all(batches[-1]["labels"][3:] == batches[-1]["labels"][0])
    real = np.concatenate([b["labels"][b["mask"] == 1] for b in batches])
    assert np.array_equal(np.sort(real), np.arange(103))
    assert loader.position == 0  # iter_epoch does not move the loader


def test_unshuffled_pad_eval_is_source_order():
    loader = data.Loader(_source(103), 25, shuffle=False, last_batch="pad")
    batches = list(loader.iter_epoch(0))
    real = np.concatenate([b["labels"][b["mask"] == 1] for b in batches])
    assert np.array_equal(real, np.arange(103))
    indices, mask = loader.indices_at(4)
    assert indices.dtype == np.int64
    assert np.array_equal(indices, [100, 101, 102] + [100] * 22)
    assert mask.sum() == 3


def test_epoch_order_formula():
    loader = data.Loader(_source(103), 10, seed=7)
    expected = np.random.default_rng([7, 2]).permutation(103)[30:40]
    assert np.array_equal(loader.indices_at(2 * 10 + 3)[0], expected)


def test_same_seed_same_sequence_different_seed_differs():
    a = data.Loader(_source(), 10, seed=5)
    b = data.Loader(_source(), 10, seed=5)
    c = data.Loader(_source(), 10, seed=6)
    seq_a = [next(a) for _ in range(25)]
    seq_b = [next(b) for _ in range(25)]
    seq_c = [next(c) for _ in range(25)]
    for x, y in zip(seq_a, seq_b, strict=True):
        _assert_batches_equal(x, y)
    assert not all(
        np.array_equal(x["labels"], z["labels"]) for x, z in zip(seq_a, seq_c, strict=True)
    )


def test_resume_from_position_is_bitwise_identical():
    a = data.Loader(_source(), 10, seed=11)
    seq_a = [next(a) for _ in range(37)]
    b = data.Loader(_source(), 10, seed=11, position=17)
    assert b.state_dict() == {"position": 17}
    # 17..36 crosses the epoch boundaries at 20 and 30.
    for position in range(17, 37):
        _assert_batches_equal(next(b), seq_a[position])
    assert b.position == 37

    c = data.Loader(_source(), 10, seed=11)
    c.load_state_dict(a.state_dict())
    d = data.Loader(_source(), 10, seed=11)
    d.set_position(37)
    e = data.Loader(_source(), 10, seed=11)
    e.position = 37
    ref = a.batch_at(37)
    for loader in (c, d, e):
        _assert_batches_equal(next(loader), ref)


@pytest.mark.parametrize("last_batch", ["drop", "pad"])
def test_process_slices_concatenate_to_global_batch(last_batch):
    src = _source()
    full = data.Loader(src, 12, seed=2, last_batch=last_batch)
    parts = [
        data.Loader(src, 12, seed=2, last_batch=last_batch, process_index=i, process_count=2)
        for i in range(2)
    ]
    assert parts[0].local_batch_size == 6
    for position in (0, 1, 7, 8, 9, 25):
        expected = full.batch_at(position)
        got = [p.batch_at(position) for p in parts]
        for key in expected:
            assert got[0][key].shape[0] == 6
            assert np.array_equal(np.concatenate([g[key] for g in got]), expected[key]), key


@pytest.mark.parametrize(
    "last_batch,process_index,process_count,source",
    [
        ("drop", 0, 1, "array"),
        ("pad", 0, 1, "array"),
        ("drop", 1, 2, "array"),
        ("pad", 1, 2, "dicts"),
    ],
)
def test_stacked_batches_equal_k_stacked_single_batches(
    last_batch, process_index, process_count, source
):
    """`next_stacked(k)` (steps_per_dispatch) reads k batches at once; across epoch ends,
    padded last batches and process slices it must give exactly the single batches."""
    src = _source(103)
    if source == "dicts":
        src = _DictListSource(
            np.stack([np.arange(103), -np.arange(103)], axis=1).astype(np.float32),
            np.arange(103).astype(np.int32),
        )
    kwargs = dict(last_batch=last_batch, process_index=process_index, process_count=process_count)
    single = data.Loader(src, 10, seed=3, **kwargs)
    stacked = data.Loader(src, 10, seed=3, **kwargs)
    for k in (3, 4, 1, 7, 5, 11, 2, 6):  # 39 batches: crosses 3 epoch ends (10 or 11 each)
        got = stacked.next_stacked(k)
        want = [next(single) for _ in range(k)]
        assert sorted(got) == sorted(want[0])
        for key in want[0]:
            np.testing.assert_array_equal(got[key], np.stack([w[key] for w in want]), err_msg=key)
            assert got[key].dtype == want[0][key].dtype
        assert stacked.position == single.position
    with pytest.raises(ValueError, match=r"k: expected a positive int, got 0"):
        stacked.next_stacked(0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -4}, "batch_size"),
        ({"batch_size": 7, "process_count": 2}, r"batch_size.*process_count=2.*got 7"),
        ({"batch_size": 4.0}, "batch_size"),
        ({"batch_size": 4, "last_batch": "keep"}, r"last_batch.*'drop'.*'pad'.*'keep'"),
        ({"batch_size": 200}, r"batch_size.*103.*200"),
        ({"batch_size": 4, "process_index": 2, "process_count": 2}, "process_index"),
        ({"batch_size": 4, "position": -1}, "position"),
        ({"batch_size": 4, "seed": -1}, "seed"),
    ],
)
def test_loader_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.Loader(_source(), **kwargs)


def test_loader_rejects_empty_source():
    empty = data.ArraySource(x=np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"source.*empty dataset.*len=0"):
        data.Loader(empty, 4, last_batch="pad")


def test_pad_allows_batch_larger_than_dataset():
    loader = data.Loader(_source(5), 8, last_batch="pad", shuffle=False)
    batch = next(loader)
    assert batch["labels"].shape == (8,)
    assert batch["mask"].sum() == 5


# ----------------------------------------------------------------------------- datasets


def test_registry_and_errors():
    assert set(data.available_datasets()) == {
        "digits",
        "fashion_mnist",
        "text",
        "kjv",
        "bpe_corpus",
        "spoken_digits",
        "arrays",
        "arrayrecord",
    }
    assert data.dataset_info("digits") == {
        "num_classes": 10,
        "splits": ("train", "test"),
        "input_shape": (8, 8, 1),
    }
    with pytest.raises(ValueError, match=r"name.*digits.*fashion_mnist.*'mnist'"):
        data.load_dataset("mnist", "train")
    with pytest.raises(ValueError, match=r"split.*'train'.*'test'.*'valid'"):
        data.load_dataset("digits", "valid")


def test_digits_splits():
    train = data.load_dataset("digits", "train")
    test = data.load_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    for src in (train, test):
        assert src.arrays["inputs"].shape == (len(src), 8, 8, 1)
        assert src.arrays["inputs"].dtype == np.float32
        assert src.arrays["labels"].dtype == np.int32
        assert 0.0 <= src.arrays["inputs"].min() and src.arrays["inputs"].max() <= 1.0
    assert set(np.unique(train.arrays["labels"])) == set(range(10))
    assert set(np.unique(test.arrays["labels"])) == set(range(10))
    assert train.arrays["inputs"].max() == 1.0

    # Train and test partition the 1797 original rows: their union is the original data.
    original = sklearn.datasets.load_digits()
    rows = np.concatenate([train.arrays["inputs"], test.arrays["inputs"]]).reshape(1797, 64)
    labels = np.concatenate([train.arrays["labels"], test.arrays["labels"]])
    got = np.concatenate([rows * 16, labels[:, None]], axis=1)
    want = np.concatenate([original.data, original.target[:, None]], axis=1)
    # Sort rows lexicographically: equal multisets of rows means an exact partition.
    assert np.array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])

    again = data.load_dataset("digits", "train")
    assert np.array_equal(again.arrays["inputs"], train.arrays["inputs"])
    assert np.array_equal(again.arrays["labels"], train.arrays["labels"])


def _write_idx(path, array, code, compress):
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        payload = gzip.compress(payload)
    path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("dtype", "code"),
    [
        (np.uint8, 0x08),
        (np.int8, 0x09),
        (np.int16, 0x0B),
        (np.int32, 0x0C),
        (np.float32, 0x0D),
        (np.float64, 0x0E),
    ],
)
def test_read_idx_round_trip(tmp_path, dtype, code, compress):
    rng = np.random.default_rng(code)
    array = (rng.normal(size=(4, 3, 5)) * 50).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    _write_idx(path, array, code, compress)
    got = data.read_idx(path)
    assert got.shape == (4, 3, 5)
    assert got.dtype == np.dtype(dtype)
    assert np.array_equal(got, array)


def test_read_idx_rejects_truncated_and_bad_files(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    _write_idx(path, np.arange(10, dtype=np.uint8), 0x08, compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte.*truncated.*expected 18.*got 15"):
        data.read_idx(path)
    gz = tmp_path / "images.gz"
    gz.write_bytes(
        gzip.compress(bytes([0, 0, 8, 1]) + np.array([10], ">i4").tobytes() + bytes(10))[:-6]
    )
    with pytest.raises(ValueError, match="images.gz"):
        data.read_idx(gz)
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match=r"bad.*magic"):
        data.read_idx(bad)


def test_fashion_mnist_from_idx_files_in_data_dir(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28)).astype(np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 2], np.uint8)
    sub = tmp_path / "fashion-mnist"
    sub.mkdir()
    _write_idx(sub / "t10k-images-idx3-ubyte", images, 0x08, compress=False)
    _write_idx(sub / "t10k-labels-idx1-ubyte.gz", labels, 0x08, compress=True)
    monkeypatch.setenv("DLKIT_DATA_DIR", str(tmp_path))
    src = data.load_dataset("fashion_mnist", "test")
    assert src.arrays["inputs"].shape == (6, 28, 28, 1)
    assert np.allclose(src.arrays["inputs"][..., 0], images / 255.0)
    assert np.array_equal(src.arrays["labels"], labels)
    assert src.arrays["labels"].dtype == np.int32
    direct = data.load_dataset("fashion_mnist", "test", data_dir=sub)
    assert np.array_equal(direct.arrays["inputs"], src.arrays["inputs"])


def test_fashion_mnist_missing_files_explains_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("fashion_mnist", "train", data_dir=tmp_path)
    message = str(info.value)
    assert "dataset-fashion-mnist" in message
    assert "DLKIT_DATA_DIR" in message
    assert str(tmp_path) in message


@pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR),
    reason=f"{FASHION_DIR} missing: apt-get install dataset-fashion-mnist",
)
def test_fashion_mnist_system_copy(monkeypatch):
    monkeypatch.delenv("DLKIT_DATA_DIR", raising=False)
    train = data.load_dataset("fashion_mnist", "train")
    test = data.load_dataset("fashion_mnist", "test")
    assert train.arrays["inputs"].shape == (60000, 28, 28, 1)
    assert test.arrays["inputs"].shape == (10000, 28, 28, 1)
    assert np.array_equal(np.bincount(train.arrays["labels"]), np.full(10, 6000))
    assert np.array_equal(np.bincount(test.arrays["labels"]), np.full(10, 1000))
    for src in (train, test):
        assert src.arrays["inputs"].dtype == np.float32
        assert src.arrays["inputs"].min() == 0.0 and src.arrays["inputs"].max() == 1.0
    # Cached per process: a second load returns the same arrays without re-decoding.
    assert data.load_dataset("fashion_mnist", "train").arrays["inputs"] is train.arrays["inputs"]


# ----------------------------------------------------------------------------- prefetch


def test_prefetch_yields_put_in_order():
    with data.prefetch(iter(range(50)), put=lambda x: x * 10, size=3) as it:
        assert list(it) == [x * 10 for x in range(50)]
        with pytest.raises(StopIteration):
            next(it)


def test_prefetch_reraises_source_error_after_earlier_items():
    def source():
        for i in range(10):
            if i == 3:
                raise RuntimeError("boom at 3")
            yield i

    it = data.prefetch(source(), put=lambda x: x, size=2)
    received = []
    with pytest.raises(RuntimeError, match="boom at 3"):
        for x in it:
            received.append(x)
    assert received == [0, 1, 2]
    it.close()


def test_prefetch_close_stops_infinite_producer():
    def infinite():
        i = 0
        while True:
            yield i
            i += 1

    it = data.Prefetcher(infinite(), put=lambda x: x, size=2)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    time.sleep(0.05)  # let the producer block on the full queue
    start = time.monotonic()
    it.close()
    assert time.monotonic() - start < 1.0
    assert not it.thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)


def test_prefetch_size_zero_is_synchronous():
    calls = []

    def put(x):
        calls.append(threading.current_thread())
        return -x

    it = data.prefetch(iter(range(4)), put=put, size=0)
    assert it.thread is None
    assert calls == []  # nothing computed ahead
    assert next(it) == 0 and len(calls) == 1
    assert list(it) == [-1, -2, -3]
    assert all(t is threading.current_thread() for t in calls)


def test_prefetch_over_loader_matches_direct_iteration():
    direct = data.Loader(_source(), 10, seed=4)
    expected = [next(direct) for _ in range(12)]
    loader = data.Loader(_source(), 10, seed=4)
    with data.prefetch(loader, put=lambda b: b, size=2) as it:
        got = [next(it) for _ in range(12)]
    for a, b in zip(expected, got, strict=True):
        _assert_batches_equal(a, b)


def test_prefetch_rejects_bad_size():
    with pytest.raises(ValueError, match=r"size.*non-negative.*-1"):
        data.prefetch(iter([]), put=lambda x: x, size=-1)
