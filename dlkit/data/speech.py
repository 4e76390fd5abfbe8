"""Spoken digits synthesised with Debian's `espeak-ng`, generated once into the data cache.

    from dlkit.data import speech

    train = speech.load_spoken_digits("train")          # ArraySource: inputs, labels
    train.arrays["inputs"].shape                         # (N, 22050) int16, 1 s at 22.05 kHz
    unseen = speech.load_spoken_digits("test_voices")    # voices never heard in training
    accents = speech.load_spoken_digits("test_accents")  # accents never heard in training

The words "zero" .. "nine" are spoken by every combination of a grid (`Grid`): English accents
(espeak-ng language voices) x voice variants (`+m1`, `+f3`, ...) x speeds x pitches. Each clip
is trimmed of silence and padded (or cut) to one second. Identical waveforms (some variants
ignore a pitch setting) are kept once: clips are hashed in a fixed order and a repeat is
dropped, so no waveform is in two splits. The splits hold out whole voices and whole accents:

- "train": the training voices in the training accents;
- "test_voices": the held-out voices in the training accents;
- "test_accents": the training voices in the held-out accents
  (held-out voices in held-out accents are in no split).

The arrays go to `<cache>/spoken_digits-<grid hash>.npz` (cache: `data_dir`, $DLKIT_DATA_DIR or
~/.cache/dlkit) and are reused; a different grid is a different file.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import wave

import numpy as np

from dlkit.data import sources, text

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 22050  # espeak-ng's output rate
CLIP_SAMPLES = SAMPLE_RATE  # one second
SPLITS = ("train", "test_voices", "test_accents")


@dataclasses.dataclass(frozen=True)
class Grid:
    """What is synthesised: every accent x voice x speed x pitch says every digit."""

    accents: tuple[str, ...] = (
        "en-us",
        "en-gb",
        "en-gb-x-rp",
        "en-gb-x-gbclan",
        "en-gb-x-gbcwmd",
        "en-us-nyc",
        "en-gb-scotland",
        "en-029",
    )
    voices: tuple[str, ...] = (
        "m1", "m2", "m4", "m5", "m6", "m7", "f1", "f3", "f4", "f5", "klatt", "klatt3", "Andy",
        "m3", "f2", "klatt2",
    )  # fmt: skip
    speeds: tuple[int, ...] = (130, 175)  # words per minute
    pitches: tuple[int, ...] = (35, 65)  # 0-99
    held_out_voices: tuple[str, ...] = ("m3", "f2", "klatt2")
    held_out_accents: tuple[str, ...] = ("en-gb-scotland", "en-029")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self)).encode()).hexdigest()[:12]


def synthesise(word: str, accent: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One clip from espeak-ng: (CLIP_SAMPLES,) int16, silence trimmed, zero-padded or cut."""
    command = ["espeak-ng", "-v", f"{accent}+{voice}", "-s", str(speed), "-p", str(pitch)]
    out = subprocess.run([*command, "--stdout", word], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(out)) as w:
        if w.getframerate() != SAMPLE_RATE or w.getsampwidth() != 2:
            raise RuntimeError(f"espeak-ng: expected 16-bit {SAMPLE_RATE} Hz, got {w.getparams()}")
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 300)
    pcm = pcm[loud[0] : loud[-1] + 1] if loud.size else pcm[:0]
    clip = np.zeros(CLIP_SAMPLES, np.int16)
    clip[: min(len(pcm), CLIP_SAMPLES)] = pcm[:CLIP_SAMPLES]
    return clip


def _split_of(grid: Grid, accent: str, voice: str) -> str | None:
    voice_out, accent_out = voice in grid.held_out_voices, accent in grid.held_out_accents
    if voice_out and accent_out:
        return None
    return "test_voices" if voice_out else "test_accents" if accent_out else "train"


def generate(grid: Grid, path: pathlib.Path) -> None:
    """Synthesises `grid` (in parallel, one espeak-ng process per clip) into the .npz `path`."""
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError(
            f"spoken_digits: {path} does not exist and `espeak-ng` to make it is not installed; "
            "install it with `apt-get install espeak-ng` (Debian/Ubuntu)."
        )
    jobs = []
    for split in SPLITS:  # train first: a waveform repeated across splits stays in train
        for accent in grid.accents:
            for voice in grid.voices:
                if _split_of(grid, accent, voice) != split:
                    continue
                for speed in grid.speeds:
                    for pitch in grid.pitches:
                        for label, word in enumerate(WORDS):
                            jobs.append((split, accent, voice, speed, pitch, label, word))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        clips = list(pool.map(lambda j: synthesise(j[6], j[1], j[2], j[3], j[4]), jobs))
    seen, keep = set(), []
    for i, clip in enumerate(clips):
        digest = hashlib.sha256(clip.tobytes()).digest()
        if digest not in seen and clip.any():
            seen.add(digest)
            keep.append(i)
    columns = list(zip(*[jobs[i] for i in keep], strict=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(
        tmp,
        inputs=np.stack([clips[i] for i in keep]),
        split=np.array(columns[0]),
        accent=np.array(columns[1]),
        voice=np.array(columns[2]),
        speed=np.array(columns[3], np.int32),
        pitch=np.array(columns[4], np.int32),
        labels=np.array(columns[5], np.int32),
        generated=np.int32(len(jobs)),
    )
    tmp.replace(path)  # atomic: concurrent processes never see half a file


def dataset_path(grid: Grid = Grid(), data_dir=None) -> pathlib.Path:
    """The cached .npz of `grid`, generated first if missing."""
    path = text.cache_dir(data_dir) / f"spoken_digits-{grid.digest()}.npz"
    if not path.is_file():
        generate(grid, path)
    return path


@functools.cache
def _arrays(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def load_spoken_digits(split: str, *, data_dir=None, grid: Grid = Grid()) -> sources.ArraySource:
    """A split of the spoken digits.

    Args:
      split: "train", "test_voices" or "test_accents" (see the module docstring).
      data_dir: the cache directory; default $DLKIT_DATA_DIR or ~/.cache/dlkit.
      grid: what to synthesise; the default is 8 accents x 16 voices x 2 speeds x 2 pitches.
    Returns:
      ArraySource with "inputs" (N, 22050) int16 waveforms at 22.05 kHz and "labels" (N,)
      int32 digits; `.meta` holds the split's "accent", "voice", "speed" and "pitch" (N,).
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS} for spoken_digits, got {split!r}")
    path = dataset_path(grid, data_dir)
    arrays = _arrays(str(path), path.stat().st_mtime_ns)
    rows = arrays["split"] == split
    source = sources.ArraySource(inputs=arrays["inputs"][rows], labels=arrays["labels"][rows])
    source.meta = {k: arrays[k][rows] for k in ("accent", "voice", "speed", "pitch")}
    return source
