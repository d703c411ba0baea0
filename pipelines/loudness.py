"""Integrated loudness (ITU-R BS.1770-4, LUFS) of a mono clip: pyloudnorm's meter, vectorised.

pyloudnorm filters with two `lfilter` passes and sums each 400 ms gating block in a Python loop; per 10 s clip
that was ~12% of the feature pipeline's time. Here the same K-weighting stages (built with pyloudnorm's public
`IIRfilter`, with the parameters its Meter uses, so the coefficients are the library's) run as one
second-order-sections pass, and block energies come from one cumulative sum. The value equals
`pyloudnorm.Meter(sr).integrated_loudness(x)` to ~1e-10 LU (tested).
"""

from __future__ import annotations

import numpy as np

BLOCK_SECONDS = 0.4  # gating block (BS.1770-4)
STEP = 0.25  # 75% overlap
ABSOLUTE_GATE_LUFS = -70.0


def k_weighting_stages(sample_rate: int) -> list:
    """BS.1770 K-weighting as pyloudnorm's Meter builds it: a +4 dB high shelf at 1.5 kHz, then a 38 Hz high pass.

    Both stages have unit passband gain, so their biquads alone are the whole filter.
    """
    from pyloudnorm import IIRfilter

    return [
        IIRfilter(4.0, 1 / np.sqrt(2), 1500.0, sample_rate, "high_shelf"),
        IIRfilter(0.0, 0.5, 38.0, sample_rate, "high_pass"),
    ]


class LoudnessMeter:
    def __init__(self, sample_rate: int):
        from scipy.signal import sosfilt

        self.sample_rate = sample_rate
        self._sosfilt = sosfilt
        self._sos = np.vstack([np.r_[s.b, s.a] for s in k_weighting_stages(sample_rate)])

    def integrated(self, wave: np.ndarray) -> float:
        """LUFS of a mono wave; -inf when no block passes the gates; ValueError when shorter than one block."""
        sr = self.sample_rate
        x = np.asarray(wave, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError("integrated loudness takes a mono wave")
        if len(x) < BLOCK_SECONDS * sr:
            raise ValueError(f"a wave shorter than one {BLOCK_SECONDS:.1f} s gating block has no loudness")
        y = self._sosfilt(self._sos, x)
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
