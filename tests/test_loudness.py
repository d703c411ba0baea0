"""The vectorised BS.1770 meter gives pyloudnorm's integrated loudness."""

import numpy as np
import pyloudnorm
import pytest

from pipelines.loudness import LoudnessMeter
from tests.synth import click_track

SR = 44100


def _signals():
    rng = np.random.default_rng(7)
    noise = 0.1 * rng.standard_normal(SR * 10)
    gated = noise * np.r_[np.zeros(SR * 3), np.ones(SR * 7)]  # silence first: the gates drop it
    ramp = noise * np.geomspace(1e-5, 1.0, len(noise))  # blocks either side of both gates
    odd = 0.3 * np.sin(2 * np.pi * 50 * np.arange(int(SR * 4.37)) / SR)  # length not a block multiple; 50 Hz
    return {"noise": noise, "gated": gated, "ramp": ramp, "odd": odd, "clicks": click_track(120.0, 6.0)}


@pytest.mark.parametrize("name", list(_signals()))
@pytest.mark.parametrize("sr", [44100, 32000])
def test_matches_pyloudnorm(name, sr):
    x = _signals()[name].astype(np.float32)
    expected = pyloudnorm.Meter(sr).integrated_loudness(x.astype(np.float64))
    assert LoudnessMeter(sr).integrated(x) == pytest.approx(expected, abs=1e-9)


def test_silence_is_minus_infinity():
    assert LoudnessMeter(SR).integrated(np.zeros(SR, np.float32)) == float("-inf")


def test_shorter_than_a_block_is_refused():
    with pytest.raises(ValueError, match="gating block"):
        LoudnessMeter(SR).integrated(np.zeros(int(0.3 * SR), np.float32))
