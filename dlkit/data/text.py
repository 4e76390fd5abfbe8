"""Character-level text: any UTF-8 file as a random-access source of token windows.

    from dlkit.data import text

    train = text.load_text("notes.txt", "train", seq_len=128)   # the first 95% of the file
    test = text.load_text("notes.txt", "test", seq_len=128)     # the fixed last 5%
    batch = train.get_batch(np.array([0, 17]))
    batch["inputs"].shape, batch["labels"].shape                # (2, 128) (2, 128) int32
    train.vocab.decode(batch["inputs"][0])                      # back to a str

    path = text.kjv_path()        # the King James Bible, dumped once by Debian's `bible`

The vocabulary is the sorted set of characters of the whole file, so both splits share it. A
window is `seq_len + 1` consecutive characters: `inputs` are the first `seq_len`, `labels` the
next character at each position. The train split has a window at every start position (the
loader's shuffle makes them random crops); the test split tiles its tail with non-overlapping
windows, so an evaluation predicts each held-out character once (a few at the very end that do
not fill a window are left out) and its loss is the mean nats per character.
"""

import functools
import os
import pathlib
import shutil
import subprocess

import numpy as np

HELD_OUT_FRACTION = 0.05  # the "test" split: this fraction of the file's characters, at its end
SPLITS = ("train", "test")
# Every verse of the Authorized Version, one per line with its reference ("Ge1:1 In the ...").
BIBLE_COMMAND = ("bible", "-f", "Gen1:1-Rev22:21")
KJV_FILE = "kjv.txt"


class Vocab:
    """The characters of a text and their integer ids (ids follow sorted code points).

    Attributes:
      chars: str, every character once, sorted.
    """

    def __init__(self, chars: str):
        self.chars = chars
        self._ids = {ch: i for i, ch in enumerate(chars)}
        self._table = np.array([ord(ch) for ch in chars], np.int64)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """(len(text),) int32 ids. Raises ValueError naming a character not in the vocabulary."""
        try:
            return np.array([self._ids[ch] for ch in text], np.int32)
        except KeyError as e:
            raise ValueError(f"text: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        """The string of the ids (any int array shape, flattened)."""
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


class TextSource:
    """Windows of `seq_len + 1` characters over one split of a tokenised text.

    Args:
      tokens: (N,) int32 ids of the split's characters.
      vocab: the file's `Vocab`.
      seq_len: characters per example (the model's T).
      stride: distance between window starts: 1 (every start) or seq_len (tiling).
    Examples are {"inputs": (seq_len,) int32, "labels": (seq_len,) int32}.
    """

    def __init__(self, tokens: np.ndarray, vocab: Vocab, seq_len: int, stride: int):
        if seq_len < 1:
            raise ValueError(f"data.seq_len: expected an int >= 1, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"data.seq_len: expected at most {len(tokens) - 1} (the split has "
                f"{len(tokens)} characters), got {seq_len}"
            )
        self.tokens = tokens
        self.vocab = vocab
        self.seq_len = seq_len
        self.stride = stride
        self._length = (len(tokens) - seq_len - 1) // stride + 1

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return self._length

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        """{"inputs": (B, seq_len) int32, "labels": (B, seq_len) int32} for window `indices`."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._length):
            raise IndexError(f"indices: expected in [0, {self._length}), got {indices}")
        starts = indices * self.stride  # (B,)
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]  # (B, T + 1)
        return {"inputs": windows[:, :-1], "labels": windows[:, 1:]}

    def __getitem__(self, i):
        batch = self.get_batch(np.array([int(i)]))
        return {k: v[0] for k, v in batch.items()}

    def __repr__(self):
        return (
            f"TextSource(windows={self._length}, chars={len(self.tokens)}, "
            f"vocab={len(self.vocab)}, seq_len={self.seq_len})"
        )


@functools.cache
def _read(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, Vocab]:
    # Cached per process by (path, mtime, size): both splits and every call share one copy.
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if not content:
        raise ValueError(f"data.path: expected a non-empty UTF-8 text file, got empty {path}")
    vocab = Vocab("".join(sorted(set(content))))
    codes = np.frombuffer(content.encode("utf-32-le"), np.uint32)  # (N,) code points
    tokens = np.searchsorted(vocab._table, codes).astype(np.int32)
    tokens.setflags(write=False)
    return tokens, vocab


def load_text(path, split: str, *, seq_len: int = 256) -> TextSource:
    """A split of the UTF-8 text file `path` as a `TextSource`.

    Args:
      path: any UTF-8 text file.
      split: "train" (the first 95% of the characters, a window at every start) or "test"
        (the last 5%, non-overlapping windows).
      seq_len: characters per example.
    Returns:
      The `TextSource`; its `vocab` is the whole file's, the same for both splits.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS} for a text file, got {split!r}")
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path: expected a UTF-8 text file, got {path!r}")
    info = os.stat(path)
    try:
        tokens, vocab = _read(path, info.st_mtime_ns, info.st_size)
    except UnicodeDecodeError as e:
        raise ValueError(f"data.path: expected UTF-8 text, {path} is not ({e})") from None
    boundary = len(tokens) - int(len(tokens) * HELD_OUT_FRACTION)
    if split == "train":
        return TextSource(tokens[:boundary], vocab, seq_len, stride=1)
    return TextSource(tokens[boundary:], vocab, seq_len, stride=seq_len)


def cache_dir(data_dir=None) -> pathlib.Path:
    """Where generated data goes: `data_dir`, else $DLKIT_DATA_DIR, else ~/.cache/dlkit."""
    if data_dir:
        return pathlib.Path(data_dir)
    if os.environ.get("DLKIT_DATA_DIR"):
        return pathlib.Path(os.environ["DLKIT_DATA_DIR"])
    return pathlib.Path.home() / ".cache" / "dlkit"


def kjv_path(data_dir=None) -> pathlib.Path:
    """The King James Bible as one UTF-8 file, written once into the data cache.

    The text is Debian's `bible-kjv` (the `bible` program) with `bible-kjv-text` (its data):
    `bible -f Gen1:1-Rev22:21` prints all 31,102 verses, one per line after its reference
    (4,404,412 characters). Later calls reuse the file.

    Raises:
      FileNotFoundError: no cached file and no `bible` program; says how to install it.
    """
    path = cache_dir(data_dir) / KJV_FILE
    if path.is_file():
        return path
    if shutil.which(BIBLE_COMMAND[0]) is None:
        raise FileNotFoundError(
            f"kjv: {path} does not exist and the `bible` program to write it is not installed. "
            "Install it with `apt-get install bible-kjv bible-kjv-text` (Debian/Ubuntu), or put "
            f"any text at {path}, or train on another file with `--set data.name=text "
            "--set data.path=FILE`."
        )
    result = subprocess.run(
        BIBLE_COMMAND, capture_output=True, check=True, stdin=subprocess.DEVNULL
    )
    text = result.stdout.decode("utf-8")
    if text.count("\n") < 31_000:
        raise RuntimeError(
            f"kjv: `{' '.join(BIBLE_COMMAND)}` printed {text.count(chr(10))} lines, expected "
            f"31,102 verses; is `bible-kjv-text` installed? stderr: {result.stderr[-500:]!r}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # atomic: concurrent processes never see half a file
    return path
