"""The dataset registry: named datasets read from local files, as sources.

Usage::

    from dlkit.data import datasets

    train = datasets.load_dataset("digits", "train")     # ArraySource, 1437 examples
    datasets.dataset_info("digits")   # {'num_classes': 10, 'splits': (...), 'input_shape': ...}
    datasets.available_datasets()     # ('digits', 'fashion_mnist', 'kjv', ...)

Datasets are read from local files only; nothing is downloaded. ``fashion_mnist`` is
searched in ``data_dir``, then ``$DLKIT_DATA_DIR/fashion-mnist`` and ``$DLKIT_DATA_DIR``,
then ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
Text and speech datasets are built by :mod:`dlkit.data.text` and :mod:`dlkit.data.speech`;
this module sits above them and :mod:`dlkit.data.sources`, so none of those imports it.
"""

import functools
import gzip
import os

import numpy as np

from dlkit.data import arrays, sources, speech, text

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/ format).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# name -> static metadata; the loaders are dispatched in load_dataset.
DATASETS = {
    "digits": {"num_classes": 10, "splits": ("train", "test"), "input_shape": (8, 8, 1)},
    "fashion_mnist": {"num_classes": 10, "splits": ("train", "test"), "input_shape": (28, 28, 1)},
    # Character-level text (dlkit.data.text): the vocabulary comes from the file and the
    # example shape from data.seq_len, so both are None here.
    "text": {"num_classes": None, "splits": ("train", "test"), "input_shape": None},
    "kjv": {"num_classes": None, "splits": ("train", "test"), "input_shape": None},
    # A BPE-tokenised corpus (dlkit.data.bpe), written by `python -m
    # dlkit.data.tokenize_corpus DIR`: memory-mapped token files; the vocabulary from its manifest.
    "bpe_corpus": {"num_classes": None, "splits": ("train", "test"), "input_shape": None},
    # Your own arrays (dlkit.data.arrays): shapes and classes come from the files.
    "arrays": {"num_classes": None, "splits": ("train", "test"), "input_shape": None},
    # ArrayRecord files (dlkit.data.arrayrecord), e.g. written by `python -m
    # dlkit.data.arrayrecord`; read record by record, never loaded whole.
    "arrayrecord": {"num_classes": None, "splits": ("train", "test"), "input_shape": None},
    # espeak-ng digits (dlkit.data.speech), 1 s at 22.05 kHz, int16; splits hold out voices
    # and accents.
    "spoken_digits": {
        "num_classes": 10,
        "splits": ("train", "test_voices", "test_accents"),
        "input_shape": (22050,),
    },
}


def available_datasets():
    """Returns the names accepted by :func:`load_dataset`, as a sorted tuple of str."""
    return tuple(sorted(DATASETS))


def _check_name(name):
    if name not in DATASETS:
        raise ValueError(f"name: expected one of {available_datasets()}, got {name!r}")


def dataset_info(name):
    """Static metadata of a registered dataset.

    Args:
        name: a name from :func:`available_datasets`.

    Returns:
        dict with ``num_classes`` (int), ``splits`` (tuple of str) and ``input_shape``
        (tuple, one example without batch axis).
    """
    _check_name(name)
    info = DATASETS[name]
    return {
        "num_classes": info["num_classes"],
        "splits": tuple(info["splits"]),
        "input_shape": None if info["input_shape"] is None else tuple(info["input_shape"]),
    }


def read_idx(path):
    """Parses an IDX file (the MNIST format), plain or gzip-compressed.

    Format: two zero bytes, a dtype code byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), an ndim byte, ndim big-endian int32 dims, then the data.

    Args:
        path: file path; gzip is detected from the content, not the name.

    Returns:
        np.ndarray of the stored shape, with the native-endian version of the stored dtype.

    Raises:
        ValueError: the file is truncated, has trailing bytes or a bad header (names path).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: expected an IDX header of at least 4 bytes, got {len(raw)}")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: expected IDX magic 0x0000, got 0x{raw[0]:02x}{raw[1]:02x} (not an IDX file)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: expected an IDX dtype code in ({known}), got 0x{code:02X}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated header, expected {header} bytes for {ndim} dims, got {len(raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "trailing bytes in"
        raise ValueError(
            f"{path}: {kind} IDX file, expected {expected} bytes for shape {shape} "
            f"{dtype.name}, got {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _check_split(name, split):
    splits = DATASETS[name]["splits"]
    if split not in splits:
        raise ValueError(f"split: expected one of {splits} for {name!r}, got {split!r}")


def _readonly(arr):
    # Cached arrays are shared by every load_dataset call; writes would leak between them.
    arr.setflags(write=False)
    return arr


@functools.cache
def _digits_arrays(split):
    # Imported lazily: scikit-learn is only needed for this dataset.
    import sklearn.datasets
    import sklearn.model_selection

    digits = sklearn.datasets.load_digits()
    x, y = digits.images, digits.target
    x_train, x_test, y_train, y_test = sklearn.model_selection.train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    inputs = (x.astype(np.float32) / np.float32(16.0))[..., None]
    return _readonly(inputs), _readonly(y.astype(np.int32))


def _fashion_mnist_dirs(data_dir):
    """Directories searched for Fashion-MNIST, in order."""
    if data_dir is not None:
        return [os.fspath(data_dir)]
    env = os.environ.get("DLKIT_DATA_DIR")
    if env:
        return [os.path.join(env, "fashion-mnist"), env]
    return [FASHION_MNIST_SYSTEM_DIR]


def _find_idx(directory, stem):
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _resolve_fashion_mnist(split, data_dir):
    """Returns (images_path, labels_path) from the first directory holding both files."""
    stems = _FASHION_MNIST_FILES[split]
    searched = _fashion_mnist_dirs(data_dir)
    for directory in searched:
        paths = [_find_idx(directory, stem) for stem in stems]
        if all(paths):
            return paths[0], paths[1]
    raise FileNotFoundError(
        f"fashion_mnist split {split!r}: files {stems[0]}[.gz] and {stems[1]}[.gz] not found; "
        f"searched {searched}. To get them: `apt-get install dataset-fashion-mnist` "
        f"(Debian/Ubuntu, installs to {FASHION_MNIST_SYSTEM_DIR}), or put the four IDX files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte, plain or .gz) from the Fashion-MNIST GitHub repository "
        "(zalandoresearch/fashion-mnist, data/fashion) in a directory DIR and set "
        "DLKIT_DATA_DIR=DIR or pass `--set data.data_dir=DIR`."
    )


@functools.cache
def _fashion_mnist_arrays(split, images_path, labels_path):
    # Cached per process: decoding the gzip files takes about a second.
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{labels_path}: expected labels of shape ({images.shape[0]},), got {labels.shape}"
        )
    inputs = (images.astype(np.float32) / np.float32(255.0))[..., None]
    return _readonly(inputs), _readonly(labels.astype(np.int32))


def load_dataset(name, split, *, data_dir=None, path=None, seq_len=256, scale="uint8"):
    """Loads a registered dataset split from local files.

    Args:
        name: ``"digits"`` (scikit-learn's bundled 8x8 digits; fixed stratified 80/20 split,
            1437 train / 360 test), ``"fashion_mnist"`` (IDX files; 60000 train / 10000 test),
            ``"text"`` (the UTF-8 file ``path``, characters), ``"kjv"`` (the King James
            Bible, dumped once into the data cache by Debian's ``bible``; see
            :mod:`dlkit.data.text`), ``"bpe_corpus"`` (the token files in the directory
            ``path``; see :mod:`dlkit.data.bpe`) or ``"spoken_digits"`` (espeak-ng, generated
            once into the cache; see :mod:`dlkit.data.speech`).
        split: ``"train"`` or ``"test"``; spoken_digits: ``"train"``, ``"test_voices"`` or
            ``"test_accents"``.
        data_dir: directory holding the data files (fashion_mnist), or the cache directory
            (kjv). Default: search ``$DLKIT_DATA_DIR/fashion-mnist``, ``$DLKIT_DATA_DIR``, else
            ``/usr/share/datasets/fashion-mnist``; the cache is ``$DLKIT_DATA_DIR`` or
            ``~/.cache/dlkit``.
        path: the text file (``"text"``), the corpus directory (``"bpe_corpus"``), or the
            ``.npz`` file or ``.npy`` directory (``"arrays"``, see :mod:`dlkit.data.arrays`).
        scale: ``"arrays"`` only: ``"uint8"`` divides uint8 inputs by 255, ``"none"`` keeps them.
        seq_len: characters per example (``"text"`` and ``"kjv"``), tokens per example
            (``"bpe_corpus"``).

    Returns:
        ArraySource with ``inputs`` float32 (N, H, W, 1) in [0, 1] (spoken_digits: int16 (N, L)
        waveforms) and ``labels`` int32 (N,).
        The arrays are cached per process, shared between calls and read-only. For text, a
        :class:`dlkit.data.text.TextSource` of (seq_len,) int32 ``inputs`` and ``labels``
        (bpe_corpus: its subclass :class:`dlkit.data.bpe.TokenFileSource`).

    Raises:
        ValueError: unknown name or split.
        FileNotFoundError: the files are missing; the message says how to get them.
    """
    _check_name(name)
    _check_split(name, split)
    if name in ("text", "kjv"):
        if name == "kjv":
            path = text.kjv_path(data_dir)
        elif not path:
            raise ValueError("data.path: expected a UTF-8 text file for data.name=text, got none")
        return text.load_text(path, split, seq_len=seq_len)
    if name == "bpe_corpus":
        from dlkit.data import bpe

        if not path:
            raise ValueError(
                "data.path: expected the directory written by `python -m "
                "dlkit.data.tokenize_corpus DIR` for data.name=bpe_corpus, got none"
            )
        return bpe.load_split(path, split, seq_len=seq_len)
    if name == "arrays":
        return arrays.load_arrays(path, split, scale=scale)
    if name == "arrayrecord":
        from dlkit.data import arrayrecord  # imports Grain: only when asked for

        if not path:
            raise ValueError(
                "data.path: expected a directory of train-*.array_record and "
                "test-*.array_record files for data.name=arrayrecord, got none"
            )
        return arrayrecord.load_split(path, split)
    if name == "spoken_digits":
        return speech.load_spoken_digits(split, data_dir=data_dir)
    if name == "digits":
        inputs, labels = _digits_arrays(split)
    else:
        images_path, labels_path = _resolve_fashion_mnist(split, data_dir)
        inputs, labels = _fashion_mnist_arrays(
            split, os.path.abspath(images_path), os.path.abspath(labels_path)
        )
    return sources.ArraySource(inputs=inputs, labels=labels)
