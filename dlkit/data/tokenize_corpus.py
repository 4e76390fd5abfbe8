"""`python -m dlkit.data.tokenize_corpus OUT_DIR`: a text corpus tokenised once with a
byte-level BPE tokenizer trained here, written as memory-mapped token files to train from with
`data.name=bpe_corpus data.path=OUT_DIR`.

    python -m dlkit.data.tokenize_corpus /data/kjv_bpe                  # kjv, fortunes, licenses
    python -m dlkit.data.tokenize_corpus /data/mine --sources "" --files a.txt b.txt \\
        --vocab-size 1024

    from dlkit.data import tokenize_corpus
    manifest = tokenize_corpus.tokenize(["a.txt"], "/data/mine", vocab_size=512)

The corpus is local files only (`SOURCES`, each a Debian package, or `--files`). Each document
(file) is cut like `dlkit.data.text` cuts its file: its last `HELD_OUT_FRACTION` of characters
(from the next line start) is held out as the test split. The tokenizer (HF `tokenizers`,
byte-level BPE as GPT-2's, so every byte string round-trips) is trained on the train parts only,
then every document is encoded once and its ids appended to `train.npy` / `test.npy`, each
document followed by END_OF_TEXT (id 0). One file's text is in memory at a time and
the token files are streamed to disk. OUT_DIR gets:

    tokenizer.json   the trained tokenizer (`tokenizers.Tokenizer.from_file`)
    train.npy        (N_train,) uint16 token ids (int32 when the vocabulary exceeds 65,536)
    test.npy         (N_test,) the same for the held-out tails
    manifest.json    format, vocab_size, dtype, token counts per split, and every source's
                     path, bytes, SHA-256 and token counts; written last, so a directory with
                     a manifest is complete
"""

import argparse
import json
import os
import shutil

import numpy as np

from dlkit.data import bpe, text

FORTUNES_DIR = "/usr/share/games/fortunes"
LICENSES_DIR = "/usr/share/common-licenses"
# name -> (what it is, the Debian packages that install it).
SOURCES = {
    "kjv": ("the King James Bible (dlkit.data.text.kjv_path)", "bible-kjv bible-kjv-text"),
    "fortunes": (f"the fortune cookie files in {FORTUNES_DIR}", "fortunes"),
    "licenses": (f"the licence texts in {LICENSES_DIR}", "base-files"),
}
DEFAULT_SOURCES = ("kjv", "fortunes", "licenses")
LINES_PER_CHUNK = 256  # lines encoded per item of `encode_batch` (parallel across cores)


def _plain_files(directory: str, skip_suffixes=()) -> list[str]:
    """The regular (not symlinked) files of `directory`, sorted, but for names ending in
    `skip_suffixes`: the licences, not their aliases (GPL -> GPL-3)."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if not n.endswith(tuple(skip_suffixes)))
    paths = [os.path.join(directory, n) for n in names]
    return [p for p in paths if os.path.isfile(p) and not os.path.islink(p)]


def source_files(names, data_dir=None) -> list[str]:
    """The files of the named `SOURCES`, in order.

    Raises:
      ValueError: an unknown name.
      FileNotFoundError: naming every missing source and the `apt-get install` that adds it.
    """
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"--sources: expected names from {sorted(SOURCES)}, got {unknown}")
    files, missing = [], []
    for name in names:
        if name == "kjv":
            try:
                found = [os.fspath(text.kjv_path(data_dir))]
            except FileNotFoundError:
                found = []
        else:
            # fortune's data files, not its .dat indexes (binary) or .u8 links
            found = (
                _plain_files(FORTUNES_DIR, (".dat", ".u8"))
                if name == "fortunes"
                else _plain_files(LICENSES_DIR)
            )
        if not found:
            missing.append(name)
        files += found
    if missing:
        what = "; ".join(f"{n}: {SOURCES[n][0]}" for n in missing)
        packages = " ".join(SOURCES[n][1] for n in missing)
        raise FileNotFoundError(
            f"--sources: not found on this machine: {what}. Install them with `apt-get install "
            f"{packages}` (Debian/Ubuntu), or leave them out (--sources "
            f"{','.join(n for n in names if n not in missing)!r}) and name files with --files"
        )
    return files


def _split_document(path) -> tuple[str, str]:
    """(train text, test text) of one file: the test text is the last HELD_OUT_FRACTION of
    the characters, from the first line start at or after the cut when there is one."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"--files: expected an existing file, got {path!r}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--files: expected UTF-8 text, {path} is not ({e})") from None
    if not content:
        raise ValueError(f"--files: expected a non-empty text file, got empty {path}")
    cut = len(content) - int(len(content) * text.HELD_OUT_FRACTION)
    newline = content.find("\n", cut, len(content) - 1)
    cut = newline + 1 if newline >= 0 else cut
    return content[:cut], content[cut:]


def _chunks(content: str):
    lines = content.splitlines(keepends=True)
    for i in range(0, len(lines), LINES_PER_CHUNK):
        yield "".join(lines[i : i + LINES_PER_CHUNK])


def train_tokenizer(texts, vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (an iterable of str), with
    END_OF_TEXT as id 0 and all 256 bytes in its alphabet."""
    tk = bpe.import_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[bpe.END_OF_TEXT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _encode(tokenizer, content: str, dtype) -> np.ndarray:
    """The ids of `content`, encoded in chunks of lines (byte-level ids concatenate exactly)."""
    encodings = tokenizer.encode_batch(list(_chunks(content)))
    ids = [np.asarray(e.ids, dtype) for e in encodings]
    return np.concatenate(ids) if ids else np.zeros((0,), dtype)


def _write_npy(raw_path: str, path: str, count: int, dtype) -> None:
    """`path` as a (count,) .npy of the raw token bytes in `raw_path` (then removed)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
    with open(path, "wb") as out, open(raw_path, "rb") as raw:
        np.lib.format.write_array_header_1_0(out, {**header, "shape": (count,)})
        shutil.copyfileobj(raw, out, 1 << 24)
    os.remove(raw_path)


def tokenize(files, out_dir, *, vocab_size: int = 4096, min_frequency: int = 2) -> dict:
    """Trains the tokenizer on `files`' train parts, writes OUT_DIR (see the module docstring).

    Args:
      files: UTF-8 text files, one document each.
      out_dir: created if missing; its manifest is replaced last.
      vocab_size: tokens in the vocabulary, END_OF_TEXT and the 256 bytes included: an int in
        [258, 2**31). The trainer may stop below it when the corpus has no more merges.
      min_frequency: a pair must occur this often to be merged.
    Returns:
      The manifest (a dict, as written to manifest.json).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"--vocab-size: expected an int, got {vocab_size!r}")
    if not 258 <= vocab_size < 2**31:
        raise ValueError(
            f"--vocab-size: expected an int in [258, 2**31) (END_OF_TEXT and 256 bytes, plus "
            f"at least one merge), got {vocab_size}"
        )
    if not files:
        raise ValueError("--files: expected at least one text file, got none")
    files = [os.path.abspath(os.fspath(f)) for f in files]
    for path in files:  # every file is checked before the tokenizer trains
        _split_document(path)
    # One file in memory at a time: read once to train the tokenizer, once to encode.
    tokenizer = train_tokenizer(
        (chunk for path in files for chunk in _chunks(_split_document(path)[0])),
        vocab_size,
        min_frequency,
    )
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    eot = tokenizer.token_to_id(bpe.END_OF_TEXT)
    dtype = np.dtype(np.uint16 if size <= 2**16 else np.int32)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, bpe.MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # an interrupted rewrite must not look complete
    tokenizer.save(os.path.join(out_dir, bpe.TOKENIZER))
    counts = dict.fromkeys(bpe.SPLITS, 0)
    raw = {s: open(os.path.join(out_dir, f"{s}.tokens.tmp"), "wb") for s in bpe.SPLITS}
    records = []
    try:
        for path in files:
            parts = _split_document(path)
            record = {"path": path, "bytes": os.path.getsize(path), "sha256": bpe.sha256(path)}
            for split, content in zip(bpe.SPLITS, parts, strict=True):
                ids = np.append(_encode(tokenizer, content, dtype), np.asarray(eot, dtype))
                raw[split].write(ids.tobytes())
                counts[split] += len(ids)
                record[f"{split}_tokens"] = len(ids)
            records.append(record)
    finally:
        for f in raw.values():
            f.close()
    for split in bpe.SPLITS:
        out = os.path.join(out_dir, bpe.token_file(split))
        _write_npy(raw[split].name, out, counts[split], dtype)
    manifest = {
        "format": bpe.FORMAT,
        "vocab_size": size,
        "requested_vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "dtype": dtype.name,
        "tokenizer": bpe.TOKENIZER,
        "end_of_text": {"token": bpe.END_OF_TEXT, "id": eot},
        "held_out_fraction": text.HELD_OUT_FRACTION,
        "splits": {s: {"file": bpe.token_file(s), "tokens": counts[s]} for s in bpe.SPLITS},
        "sources": records,
        "tokenizers_version": bpe.import_tokenizers().__version__,
    }
    tmp = manifest_path + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, manifest_path)
    return manifest


def main(argv=None) -> None:
    """`python -m dlkit.data.tokenize_corpus OUT_DIR [--vocab-size N] [--sources ...]
    [--files ...]`: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m dlkit.data.tokenize_corpus", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out_dir")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument(
        "--sources",
        default=",".join(DEFAULT_SOURCES),
        help=f"comma-separated, from {sorted(SOURCES)}; '' for --files only",
    )
    parser.add_argument("--files", nargs="*", default=[], help="more UTF-8 text files")
    parser.add_argument("--data-dir", default=None, help="the kjv cache directory")
    args = parser.parse_args(argv)
    names = [n for n in args.sources.split(",") if n]
    files = source_files(names, args.data_dir) + list(args.files)
    manifest = tokenize(
        files, args.out_dir, vocab_size=args.vocab_size, min_frequency=args.min_frequency
    )
    splits = ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in manifest["splits"].items())
    print(
        f"{len(files)} file(s) -> vocabulary {manifest['vocab_size']}, {splits} "
        f"({manifest['dtype']}) in {args.out_dir}"
    )


if __name__ == "__main__":
    main()
