"""Integrated loudness (ITU-R BS.1770-4, LUFS) of a mono clip: pyloudnorm's meter, vectorised.

pyloudnorm filters with two `lfilter` passes and sums each 400 ms gating block in a Python loop; per 10 s clip
that was ~12% of the feature pipeline's time. Here the same K-weighting coefficients (taken from pyloudnorm's
own Meter, so the filter is the library's) run as one second-order-sections pass, and block energies come from one
cumulative sum. The value equals `pyloudnorm.Meter(sr).integrated_loudness(x)` to ~1e-10 LU (tested).
"""

from __future__ import annotations

import numpy as np

BLOCK_SECONDS = 0.4  # gating block (BS.1770-4)
STEP = 0.25  # 75% overlap
ABSOLUTE_GATE_LUFS = -70.0


class LoudnessMeter:
    def __init__(self, sample_rate: int):
        import pyloudnorm
        from scipy.signal import sosfilt

        meter = pyloudnorm.Meter(sample_rate)  # K-weighting: high shelf then high pass
        stages = list(meter._filters.values())
        self.sample_rate = sample_rate
        self._sosfilt = sosfilt
        self._sos = np.vstack([np.r_[s.b, s.a] for s in stages])
        self._gain = float(np.prod([s.passband_gain for s in stages]))

    def integrated(self, wave: np.ndarray) -> float:
        """LUFS of a mono wave; -inf when no block passes the gates; ValueError when shorter than one block."""
        sr = self.sample_rate
        x = np.asarray(wave, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError("integrated loudness takes a mono wave")
        if len(x) < BLOCK_SECONDS * sr:
            raise ValueError(f"a wave shorter than one {BLOCK_SECONDS:.1f} s gating block has no loudness")
        y = self._sosfilt(self._sos, x)
        if self._gain != 1.0:
            y *= self._gain
        energy = np.concatenate([[0.0], np.cumsum(y * y)])
        n_blocks = int(np.round((len(x) / sr - BLOCK_SECONDS) / (BLOCK_SECONDS * STEP))) + 1
        j = np.arange(n_blocks)
        # block bounds exactly as pyloudnorm computes them (float products truncated to samples)
        lower = (BLOCK_SECONDS * (j * STEP) * sr).astype(np.int64)
        upper = np.minimum((BLOCK_SECONDS * (j * STEP + 1) * sr).astype(np.int64), len(x))
        z = (energy[upper] - energy[lower]) / (BLOCK_SECONDS * sr)
        with np.errstate(divide="ignore"):
            block_lufs = -0.691 + 10.0 * np.log10(z)
            above_abs = block_lufs >= ABSOLUTE_GATE_LUFS
            if not above_abs.any():
                return float("-inf")
            relative_gate = -0.691 + 10.0 * np.log10(z[above_abs].mean()) - 10.0
            gated = (block_lufs > relative_gate) & (block_lufs > ABSOLUTE_GATE_LUFS)
            if not gated.any():
                return float("-inf")
            return float(-0.691 + 10.0 * np.log10(z[gated].mean()))
