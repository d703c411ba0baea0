"""A small learned beat / downbeat activation: log-mel frames -> temporal convolutional network -> two sigmoids.

The network is trained by `benchmarks/fit_beats.py` (PyTorch) on rendered music outside the default corpora and the
out-of-domain set (`benchmarks/beat_fit_set.py`) plus the default corpus' arrangements, and shipped as plain arrays
(`pipelines/beat_model.npz`), so the feature pipeline runs it in numpy: no PyTorch threads in Beam workers, and a
10 s clip costs a few milliseconds. The architecture follows the non-causal dilated TCN of Davies & Böck (EUSIPCO
2019), smaller: one convolution from the spectral frames to `channels`, then residual dilated convolutions (kernel
`kernel`, dilations 1, 2, 4, ...), then a 1x1 convolution to (beat, downbeat).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

BUILTIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "beat_model.npz")

FPS = 100.0
N_FFT = 2048
N_MELS = 80
FMIN, FMAX = 30.0, 11000.0


@lru_cache(maxsize=4)
def _mel_basis(sr: int) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX).astype(np.float32)


# Pitch frames (the `pitch` feature set): semitone bands of a longer FFT, where harmony and bass notes, the cues of
# a downbeat in music without drums, are resolved.
PITCH_FFT = 4096
PITCH_FMIN, PITCH_BANDS = 41.2, 84  # E1, seven octaves


@lru_cache(maxsize=4)
def _semitone_basis(sr: int) -> np.ndarray:
    """(PITCH_BANDS, bins) triangles centred on equal-tempered semitones, at least a bin and a half wide (below
    ~250 Hz a semitone is narrower than an FFT bin), each summing to one."""
    freqs = np.fft.rfftfreq(PITCH_FFT, 1.0 / sr)
    centres = PITCH_FMIN * 2.0 ** (np.arange(PITCH_BANDS) / 12.0)
    half = np.maximum(centres * (2 ** (1 / 12) - 1), 1.5 * sr / PITCH_FFT)
    basis = np.maximum(0.0, 1.0 - np.abs(freqs[None, :] - centres[:, None]) / half[:, None])
    return (basis / basis.sum(axis=1, keepdims=True)).astype(np.float32)


def _magnitudes(wave: np.ndarray, n_fft: int, hop: int, n_frames: int, n_bins: int) -> np.ndarray:
    """|rFFT| of Hann-windowed frames, the first `n_bins` bins only (`_band_basis`)."""
    import scipy.fft
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(wave, (n_fft // 2, n_fft // 2 + n_fft))
    frames = sliding_window_view(padded, n_fft)[::hop][:n_frames] * _hann(n_fft)
    return np.abs(scipy.fft.rfft(frames, axis=1)[:, :n_bins])  # float32 in, complex64 out: 4x faster than numpy's


@lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    return np.hanning(n).astype(np.float32)


@lru_cache(maxsize=8)
def _band_basis(kind: str, sr: int) -> np.ndarray:
    """The mel or semitone basis cut after the last FFT bin any of its bands reads: the magnitudes of the bins above
    (mel bands end at 11 kHz, semitone bands near 5.3 kHz) are never computed."""
    full = _mel_basis(sr) if kind == "mel" else _semitone_basis(sr)
    used = int(np.flatnonzero(full.any(axis=0))[-1]) + 1
    return np.ascontiguousarray(full[:, :used])


def spectral_frames(wave: np.ndarray, sr: int, features: str = "mel") -> np.ndarray:
    """(frames, channels) at FPS, frame t centred on t / FPS seconds: log-compressed mel magnitudes and their
    half-wave rectified first difference (onsets); `features` "pitch" appends log semitone-band magnitudes of a
    4096-sample FFT. `sr` must be a multiple of FPS (44.1 and 48 kHz are, 22.05 kHz is not)."""
    hop = int(round(sr / FPS))
    if abs(hop * FPS - sr) > 1e-6:
        raise ValueError(f"sample rate {sr} is not a multiple of {FPS:g} frames/s")
    if features not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {features!r} (known: {', '.join(FEATURE_SETS)})")
    wave = np.asarray(wave, dtype=np.float32)
    n_frames = len(wave) // hop + 1
    mel_basis = _band_basis("mel", sr)
    mel = np.log1p(_magnitudes(wave, N_FFT, hop, n_frames, mel_basis.shape[1]) @ mel_basis.T)
    diff = np.maximum(np.diff(mel, axis=0, prepend=mel[:1]), 0.0)
    parts = [mel, diff]
    if features == "pitch":
        pitch_basis = _band_basis("pitch", sr)
        parts.append(np.log1p(_magnitudes(wave, PITCH_FFT, hop, n_frames, pitch_basis.shape[1]) @ pitch_basis.T))
    return np.concatenate(parts, axis=1)


FEATURE_SETS = {"mel": 2 * N_MELS, "pitch": 2 * N_MELS + PITCH_BANDS}  # name -> channels


@dataclass(frozen=True)
class BeatNetwork:
    """The network's weights as arrays (conv weights are (out, in, kernel), as PyTorch stores them)."""

    weights: dict
    dilations: tuple[int, ...]
    mean: np.ndarray  # input normalisation, per feature
    std: np.ndarray
    features: str = "mel"  # the `spectral_frames` feature set it reads

    @classmethod
    def load(cls, path: str = "builtin") -> BeatNetwork:
        return _load(BUILTIN if path == "builtin" else path)

    def activations(self, feats: np.ndarray) -> np.ndarray:
        """(frames, 2): P(beat), P(downbeat) per frame of `spectral_frames(..., self.features)`."""
        x = ((feats - self.mean) / self.std).T.astype(np.float32)  # (channels, frames)
        w = self.weights
        x = _elu(_conv(x, w["inp.weight"], w["inp.bias"], 1))
        for i, d in enumerate(self.dilations):
            x = x + _elu(_conv(x, w[f"blocks.{i}.weight"], w[f"blocks.{i}.bias"], d))
        logits = _conv(x, w["out.weight"], w["out.bias"], 1)
        return (1.0 / (1.0 + np.exp(-logits))).T


@lru_cache(maxsize=4)
def _load(path: str) -> BeatNetwork:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    dilations = tuple(int(d) for d in arrays.pop("dilations"))
    mean, std = arrays.pop("mean"), arrays.pop("std")
    features = str(arrays.pop("features")) if "features" in arrays else "mel"
    return BeatNetwork({k: v.astype(np.float32) for k, v in arrays.items()}, dilations, mean, std, features)


def _conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, dilation: int) -> np.ndarray:
    """'same' 1-D convolution (cross-correlation, as PyTorch's Conv1d) of (in, T) by (out, in, k)."""
    out_ch, in_ch, k = weight.shape
    half = (k - 1) // 2 * dilation
    padded = np.pad(x, ((0, 0), (half, half)))
    t = x.shape[1]
    taps = np.concatenate([padded[:, j * dilation : j * dilation + t] for j in range(k)], axis=0)  # (k * in, T)
    return weight.transpose(0, 2, 1).reshape(out_ch, k * in_ch) @ taps + bias[:, None]


def _elu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))
