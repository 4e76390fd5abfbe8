"""Audio classification: a log-mel spectrogram front end computed in JAX, then a small CNN.

    module = AudioClassifier(sample_rate=16000, num_mels=64, num_classes=10)
    logits = module.apply(variables, waveforms, train=False)   # (B, L) float -> (B, 10)
    spec = log_mel_spectrogram(waveforms, sample_rate=16000)    # (B, frames, 64)

The spectrogram is part of the compiled model: frames are gathered with a strided index,
windowed (Hann), transformed with `jnp.fft.rfft`, and projected on a triangular mel filterbank
(HTK mel scale) built once in numpy. Nothing in the front end is learned.

`dtype` is the compute dtype of the CNN (train.precision): the spectrogram and its
normalisation stay float32 whatever it is, the normalised features are cast to `dtype` for the
convolutions and the head, params stay float32, and the logits are returned as float32.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dlkit.models.cnn import max_pool_2x2


def hz_to_mel(hz):
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    num_mels: int, n_fft: int, sample_rate: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular filters evenly spaced on the mel scale, each peaking at 1.

    Args:
      num_mels: number of filters M.
      n_fft: FFT size; the filters cover its n_fft // 2 + 1 frequency bins.
      sample_rate: in Hz.
      fmin, fmax: frequency range in Hz; fmax defaults to sample_rate / 2.
    Returns:
      (n_fft // 2 + 1, M) float32; filter m rises from edge m to its centre m + 1 and falls to
      edge m + 2 of `mel_to_hz(linspace(mel(fmin), mel(fmax), M + 2))`.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), num_mels + 2))  # (M + 2,)
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # (F,)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (M,) each
    rising = (freqs[:, None] - lower) / (centre - lower)  # (F, M)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def mel_centres(num_mels: int, sample_rate: int, fmin: float = 0.0, fmax=None) -> np.ndarray:
    """(M,) the centre frequency in Hz of each filter of `mel_filterbank`."""
    fmax = sample_rate / 2 if fmax is None else fmax
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), num_mels + 2))[1:-1]


def log_mel_spectrogram(
    waveforms: jax.Array,
    *,
    sample_rate: int,
    n_fft: int = 512,
    hop_length: int = 160,
    num_mels: int = 64,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> jax.Array:
    """Log mel power spectrogram, in JAX.

    Args:
      waveforms: (B, L) float, L >= n_fft.
      sample_rate: in Hz.
      n_fft: samples per frame (and FFT size).
      hop_length: samples between frame starts.
      num_mels: mel bands M.
      fmin, fmax: the filterbank's range in Hz.
    Returns:
      (B, 1 + (L - n_fft) // hop_length, M) float32: log(mel power + 1e-6).
    """
    b, length = waveforms.shape  # (B, L)
    if length < n_fft:
        raise ValueError(f"waveforms: expected at least n_fft={n_fft} samples, got {length}")
    num_frames = 1 + (length - n_fft) // hop_length
    index = np.arange(num_frames)[:, None] * hop_length + np.arange(n_fft)  # (frames, n_fft)
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)  # periodic Hann
    frames = waveforms.astype(jnp.float32)[:, index] * window  # (B, frames, n_fft)
    power = jnp.abs(jnp.fft.rfft(frames, axis=-1)) ** 2  # (B, frames, n_fft // 2 + 1)
    filters = mel_filterbank(num_mels, n_fft, sample_rate, fmin, fmax)  # (F, M)
    return jnp.log(power @ filters + 1e-6)  # (B, frames, M)


class AudioClassifier(nn.Module):
    """Waveform -> log-mel -> per-example normalisation -> CNN -> mean over time -> head.

    Input: waveforms (B, L) float in [-1, 1] or int16 PCM (e.g. 16 kHz mono), or (B, L, 1).
    Output: logits (B, num_classes), float32.
    """

    sample_rate: int = 16000  # Hz of the input
    n_fft: int = 512  # samples per STFT frame (32 ms at 16 kHz)
    hop_length: int = 160  # samples between frames (10 ms at 16 kHz)
    num_mels: int = 64  # mel bands
    features: tuple[int, ...] = (16, 32, 64)  # channels of each conv block (3x3 conv, 2x2 pool)
    num_classes: int = 10  # size of the output layer
    dropout_rate: float = 0.1  # before the head, in [0, 1)
    dtype: Any = jnp.float32  # compute dtype of the CNN (float32 | bfloat16 | float16); the
    #                           log-mel front end and params stay float32. Set by train.precision.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if x.ndim == 3 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim != 2:
            raise ValueError(f"AudioClassifier input: expected (B, L) waveforms, got {x.shape}")
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(jnp.float32) / 32768.0  # 16-bit PCM to [-1, 1)
        spec = log_mel_spectrogram(
            x,
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            num_mels=self.num_mels,
        )  # (B, T, M)
        # Loudness differs between recordings: normalise each example's spectrogram.
        mean = jnp.mean(spec, axis=(1, 2), keepdims=True)
        std = jnp.std(spec, axis=(1, 2), keepdims=True)
        h = ((spec - mean) / (std + 1e-5))[..., None].astype(self.dtype)  # (B, T, M, 1)
        for channels in self.features:
            h = nn.relu(nn.Conv(channels, (3, 3), padding="SAME", dtype=self.dtype)(h))
            h = max_pool_2x2(h)  # (B, T/2, M/2, ch)
        # Pool over time only: where the energy sits in frequency is what tells phonemes apart.
        h = jnp.mean(h, axis=1)  # (B, M', ch)
        h = h.reshape(h.shape[0], -1)  # (B, M' * ch)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(h)  # (B, num_classes)
        return logits.astype(jnp.float32)
