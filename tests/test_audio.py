"""Tests for dlkit.models.audio: the JAX log-mel front end (a sine peaks in its mel band) and
the classifier's shapes and pinned parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlkit import models, state
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
    expected = (9 * 1 * 4 + 4) + (9 * 4 * 8 + 8) + (8 * 10 + 10)
    assert state.param_count(variables["params"]) == expected == 426
    with pytest.raises(ValueError, match="n_fft=512"):
        audio.log_mel_spectrogram(jnp.zeros((1, 100)), sample_rate=16000)
