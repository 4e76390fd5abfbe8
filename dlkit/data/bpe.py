"""A BPE-tokenised corpus as a dataset: `data.name=bpe_corpus` with `data.path` the directory
`python -m dlkit.data.tokenize_corpus` wrote (tokenizer.json, train.npy, test.npy,
manifest.json).

    python -m dlkit.data.tokenize_corpus /data/kjv_bpe --vocab-size 4096   # once
    dlkit train kjv_bpe_lm --set data.path=/data/kjv_bpe

    from dlkit.data import bpe
    train = bpe.load_split("/data/kjv_bpe", "train", seq_len=128)   # TokenFileSource
    batch = train.get_batch(np.array([0, 17]))
    batch["inputs"].shape, batch["labels"].shape     # (2, 128) (2, 128) int32
    train.vocab_size                                 # from manifest.json
    train.vocab.decode(batch["inputs"][0])           # back to a str (needs `tokenizers`)

The token stream of a split is one memory-mapped .npy file (uint16, or int32 for vocabularies
above 65,536), never loaded whole. A window is `seq_len + 1` consecutive tokens: `inputs` are
the first `seq_len`, `labels` the next token at each position, as in `dlkit.data.text`. The
train split has a window at every start; the test split tiles its stream with non-overlapping
windows, so its loss is the mean nats per token. A source pickles as its file names (Grain's
worker processes map the file again rather than receive a copy).

Everything a run needs is checked when a split is opened, before anything compiles: the
manifest, the token file's size against the manifest's count, and the tokenizer's vocabulary
against the manifest's. Training reads only numpy files; the HF `tokenizers` package is needed
only to turn ids back into text (`vocab.decode`) or text into ids (`vocab.encode`).
"""

import hashlib
import json
import os

import numpy as np

from dlkit.data import text
from dlkit.data.validate import DataError

FORMAT = "dlkit.bpe_corpus/1"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"  # id 0: between documents, in both splits
SPLITS = ("train", "test")
COMMAND = "python -m dlkit.data.tokenize_corpus"


def token_file(split: str) -> str:
    """The token file's name for `split` ("train.npy")."""
    return f"{split}.npy"


def import_tokenizers():
    """The HF `tokenizers` module, or an ImportError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "tokenizers: the HF `tokenizers` package is needed to train, encode with or decode "
            "a BPE tokenizer, and it is not installed; install it with "
            "`pip install 'dlkit[text]'` (or `pip install tokenizers`)"
        ) from None
    return tokenizers


def sha256(path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_vocab_size(path) -> int:
    """Ids in a tokenizer.json (its BPE vocabulary and added tokens), read as JSON: 1 + the
    largest id. Needs no `tokenizers` package."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        ids = list(spec["model"]["vocab"].values())
        ids += [t["id"] for t in spec.get("added_tokens") or []]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"{path}: expected a HF tokenizers tokenizer.json with a model vocabulary, got a "
            f"file that does not read as one ({type(e).__name__}: {e})"
        ) from None
    return max(ids) + 1


class BPEVocab:
    """The corpus's tokenizer (its tokenizer.json): ids to text and back. The file is loaded
    on first use; pickles as its path.

    Args:
      path: the tokenizer.json.
      size: the manifest's vocabulary size.
    """

    def __init__(self, path, size: int):
        self.path = os.fspath(path)
        self.size = int(size)
        self._tokenizer = None

    def __len__(self) -> int:
        return self.size

    def __getstate__(self):
        return {"path": self.path, "size": self.size}

    def __setstate__(self, state):
        self.__init__(state["path"], state["size"])

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer`; ImportError naming the pip extra if not installed."""
        if self._tokenizer is None:
            self._tokenizer = import_tokenizers().Tokenizer.from_file(self.path)
            got = self._tokenizer.get_vocab_size(with_added_tokens=True)
            if got != self.size:
                raise DataError(
                    f"{self.path}: expected a tokenizer of {self.size} tokens ({MANIFEST}), "
                    f"got {got}"
                )
        return self._tokenizer

    def encode(self, text_: str) -> np.ndarray:
        """(N,) int32 ids of `text_`."""
        return np.asarray(self.tokenizer.encode(text_).ids, np.int32)

    def decode(self, ids) -> str:
        """The text of the ids (any int array shape, flattened); END_OF_TEXT is kept."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def read_manifest(directory) -> dict:
    """The corpus's manifest.json, checked for the keys a run reads.

    Raises:
      FileNotFoundError: `directory` or its manifest is missing (says how to write them).
      DataError: the manifest is not one `tokenize_corpus` wrote.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"data.path: expected a directory written by `{COMMAND} DIR`, got {directory!r}, "
            "which is not a directory"
        )
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.path: expected {MANIFEST} in {directory} (written last by `{COMMAND} "
            f"{directory}`), got none; found {sorted(os.listdir(directory))[:8]}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        fmt = manifest["format"]
        vocab_size = manifest["vocab_size"]
        counts = {s: manifest["splits"][s]["tokens"] for s in SPLITS}
        np.dtype(manifest["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{path}: expected a manifest written by `{COMMAND}` ({FORMAT}), got one that does "
            f"not read as it ({type(e).__name__}: {e})"
        ) from None
    if fmt != FORMAT:
        raise DataError(f"{path}: expected format {FORMAT!r}, got {fmt!r}")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise DataError(f"{path}: expected vocab_size an int >= 2, got {vocab_size!r}")
    for split, count in counts.items():
        if not isinstance(count, int) or count < 1:
            raise DataError(f"{path}: expected splits.{split}.tokens an int >= 1, got {count!r}")
    return manifest


def _open_tokens(path: str, count: int, dtype: np.dtype) -> np.memmap:
    """The (count,) token file memory-mapped read-only, after checking that its header and
    size are what the manifest says."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.path: expected the token file {path} ({MANIFEST} lists it), got none; "
            f"write the corpus again with `{COMMAND}`"
        )
    with open(path, "rb") as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read_header = {
                1: np.lib.format.read_array_header_1_0,
                2: np.lib.format.read_array_header_2_0,
            }.get(major)
            if read_header is None:
                raise ValueError(f"format version {major}, expected 1 or 2")
            shape, fortran, stored = read_header(f)
        except ValueError as e:
            raise DataError(f"{path}: expected a .npy file, got a bad header ({e})") from None
        offset = f.tell()
    if shape != (count,) or stored != dtype or fortran:
        raise DataError(
            f"{path}: expected a ({count},) {dtype} array ({MANIFEST}), got {shape} {stored}"
        )
    expected, size = offset + count * dtype.itemsize, os.path.getsize(path)
    if size != expected:
        kind = "truncated" if size < expected else "trailing bytes in"
        raise DataError(
            f"{path}: {kind} token file, expected {expected} bytes ({count} {dtype} tokens, "
            f"{MANIFEST}), got {size}"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


class TokenFileSource(text.TextSource):
    """Windows of `seq_len + 1` tokens over one split's memory-mapped token file.

    Args:
      path: the split's .npy token file.
      count, dtype: its tokens and their dtype, from the manifest (checked against the file).
      vocab: the corpus's `BPEVocab`.
      seq_len: tokens per example (the model's T).
      stride: distance between window starts: 1 (every start) or seq_len (tiling).
    Examples are {"inputs": (seq_len,) int32, "labels": (seq_len,) int32}.
    """

    def __init__(self, path, count: int, dtype, vocab: BPEVocab, seq_len: int, stride: int):
        self.path, self.count, self.dtype = os.fspath(path), int(count), np.dtype(dtype)
        tokens = _open_tokens(self.path, self.count, self.dtype)
        super().__init__(tokens, vocab, seq_len, stride)

    def __getstate__(self):
        # Grain's workers map the file again instead of receiving the whole stream.
        return {
            "path": self.path,
            "count": self.count,
            "dtype": self.dtype.str,
            "vocab": self.vocab,
            "seq_len": self.seq_len,
            "stride": self.stride,
        }

    def __setstate__(self, state):
        self.__init__(**state)

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        """{"inputs": (B, seq_len) int32, "labels": (B, seq_len) int32} for window `indices`."""
        return {k: v.astype(np.int32) for k, v in super().get_batch(indices).items()}

    def __repr__(self):
        return (
            f"TokenFileSource(windows={len(self)}, tokens={self.count}, vocab={len(self.vocab)}, "
            f"seq_len={self.seq_len}, path={self.path!r})"
        )


def load_split(directory, split: str, *, seq_len: int = 256) -> TokenFileSource:
    """A split of the corpus in `directory` as a `TokenFileSource`.

    Args:
      directory: what `python -m dlkit.data.tokenize_corpus DIR` wrote.
      split: "train" (a window at every start) or "test" (non-overlapping windows).
      seq_len: tokens per example.
    Returns:
      The source; `vocab_size` is the manifest's, the same for both splits.
    Raises:
      FileNotFoundError: the directory, manifest, tokenizer or token file is missing.
      DataError: the manifest is malformed, the token file does not match it, or the
        tokenizer's vocabulary size is not the manifest's.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS} for a BPE corpus, got {split!r}")
    directory = os.path.abspath(os.fspath(directory))
    manifest = read_manifest(directory)
    tokenizer = os.path.join(directory, manifest.get("tokenizer", TOKENIZER))
    if not os.path.isfile(tokenizer):
        raise FileNotFoundError(
            f"data.path: expected the tokenizer {tokenizer} ({MANIFEST} names it), got none"
        )
    size = tokenizer_vocab_size(tokenizer)
    if size != manifest["vocab_size"]:
        raise DataError(
            f"{tokenizer}: expected a vocabulary of {manifest['vocab_size']} tokens "
            f"({os.path.join(directory, MANIFEST)}), got {size}; the files are from different "
            f"runs of `{COMMAND}`"
        )
    vocab = BPEVocab(tokenizer, manifest["vocab_size"])
    entry = manifest["splits"][split]
    path = os.path.join(directory, entry.get("file", token_file(split)))
    stride = 1 if split == "train" else seq_len
    return TokenFileSource(path, entry["tokens"], manifest["dtype"], vocab, seq_len, stride)
