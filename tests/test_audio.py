"""Tests for dlkit.models.audio and dlkit.data.speech: the JAX log-mel front end (a sine peaks
in its mel band), the classifier's shapes and pinned parameter count, the espeak-ng digits
(de-duplicated, whole voices and accents held out) and a shrunk spoken_digits run."""

import hashlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlkit
from dlkit import models, state
from dlkit.data import speech
from dlkit.models import audio


def test_filterbank_triangles_peak_at_their_centres():
    fb = audio.mel_filterbank(40, 512, 16000)
    assert fb.shape == (257, 40) and fb.dtype == np.float32
    assert fb.min() >= 0.0 and fb.max() <= 1.0
    assert np.all(fb.sum(axis=0) > 0)  # no empty band at this resolution
    freqs = np.linspace(0, 8000, 257)
    peaks = freqs[np.argmax(fb, axis=0)]  # the FFT bin nearest each centre
    np.testing.assert_allclose(peaks, audio.mel_centres(40, 16000), atol=8000 / 256)


@pytest.mark.parametrize("expected", [12, 30, 50])
def test_log_mel_of_a_sine_peaks_in_the_right_band(expected):
    sr, num_mels = 16000, 64
    hz = audio.mel_centres(num_mels, sr)[expected]  # 459 Hz, 1628 Hz, 4356 Hz
    t = np.arange(sr // 2) / sr  # half a second
    wave = np.sin(2 * np.pi * hz * t).astype(np.float32)[None]  # (1, L)
    spec = audio.log_mel_spectrogram(jnp.asarray(wave), sample_rate=sr, num_mels=num_mels)
    assert spec.shape == (1, 1 + (sr // 2 - 512) // 160, num_mels)
    band = int(jnp.argmax(jnp.mean(spec[0], axis=0)))
    assert band == expected
    # A louder sine shifts every band by the same log factor (log(4) for twice the amplitude).
    louder = audio.log_mel_spectrogram(jnp.asarray(2 * wave), sample_rate=sr, num_mels=num_mels)
    peak = louder[0, :, band] - spec[0, :, band]
    np.testing.assert_allclose(peak, np.log(4.0), atol=1e-3)


def test_classifier_shapes_and_pinned_count():
    module = models.build("audio_cnn", features=(4, 8), num_mels=32, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 8000)) * 0.1  # half a second at 16 kHz
    variables = jax.jit(lambda x: module.init(jax.random.key(0), x, train=False))(x)
    logits = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    # The head sees 32 / 2 / 2 = 8 mel positions x 8 channels (time is averaged out).
    expected = (9 * 1 * 4 + 4) + (9 * 4 * 8 + 8) + (8 * 8 * 10 + 10)
    assert state.param_count(variables["params"]) == expected == 986
    with pytest.raises(ValueError, match="n_fft=512"):
        audio.log_mel_spectrogram(jnp.zeros((1, 100)), sample_rate=16000)


needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="needs Debian's espeak-ng: apt-get install espeak-ng",
)
TINY_GRID = speech.Grid(
    accents=("en-us", "en-gb", "en-029"),
    voices=("m1", "f1", "m3"),
    speeds=(150,),
    pitches=(40, 60),
    held_out_voices=("m3",),
    held_out_accents=("en-029",),
)


@pytest.fixture(scope="module")
def tiny_speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs Debian's espeak-ng: apt-get install espeak-ng")
    cache = tmp_path_factory.mktemp("speech")
    return {s: speech.load_spoken_digits(s, data_dir=cache, grid=TINY_GRID) for s in speech.SPLITS}


@needs_espeak
def test_spoken_digits_are_deduplicated_and_hold_out_whole_voices_and_accents(tiny_speech):
    train, voices, accents = (tiny_speech[s] for s in speech.SPLITS)
    assert set(train.meta["voice"]) == {"m1", "f1"} and set(train.meta["accent"]) == {
        "en-us",
        "en-gb",
    }
    assert set(voices.meta["voice"]) == {"m3"} and "en-029" not in set(voices.meta["accent"])
    assert set(accents.meta["accent"]) == {"en-029"} and "m3" not in set(accents.meta["voice"])
    everything = np.concatenate([s.arrays["inputs"] for s in tiny_speech.values()])
    assert everything.shape[1:] == (22050,) and everything.dtype == np.int16
    hashes = {hashlib.sha256(row.tobytes()).digest() for row in everything}
    assert len(hashes) == len(everything)  # no waveform twice, within or across splits
    assert len(everything) < 160  # some variants ignore the pitch setting: repeats were dropped
    for s in tiny_speech.values():
        assert set(s.arrays["labels"]) == set(range(10))


@needs_espeak
def test_shrunk_spoken_digits_experiment_learns(tiny_speech):
    cfg = dlkit.load_config("spoken_digits")
    dlkit.apply_overrides(
        cfg,
        [
            "model.features=8,16",
            "model.dropout_rate=0.0",
            "train.steps=60",
            "train.batch_size=16",
            "train.eval_batch_size=16",
            "train.log_every=30",
            "train.eval_every=0",
            "train.progress=false",
            "optim.warmup_steps=5",
            "parallel.num_devices=1",
        ],
    )
    result = dlkit.fit(
        cfg, train_source=tiny_speech["train"], eval_source=tiny_speech["test_voices"]
    )
    assert result.history.last("eval/accuracy") > 0.5  # chance is 0.1
