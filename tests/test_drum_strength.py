"""The strength judge: descriptors of synthetic drums over a chord (known onset times), level invariance, silence,
the scale's anchors and which descriptors it uses, and the separation shared with the detector (librosa's HPSS,
value for value)."""

import librosa
import numpy as np
import pytest

from models.detectors import hpss, spectral_parts
from models.drum_strength import DESCRIPTORS, StrengthScale, percussive_descriptors

SR = 16000
T = np.arange(3 * SR) / SR


def _chord() -> np.ndarray:
    tones = sum(0.2 * np.sin(2 * np.pi * f * T) for f in (220.0, 277.2, 329.6))
    return (tones * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * T))).astype(np.float32)


def _hits(times, seed=0) -> np.ndarray:
    """Decaying noise bursts (50 ms, 10 ms time constant) at `times` seconds: a stand-in for drum hits."""
    rng = np.random.default_rng(seed)
    x = np.zeros_like(T)
    n = int(0.05 * SR)
    for s in times:
        i = int(s * SR)
        x[i : i + n] += (rng.standard_normal(n) * np.exp(-np.arange(n) / (0.01 * SR)))[: len(x) - i]
    return x.astype(np.float32)


def test_drums_raise_share_onsets_and_a_groove_raises_regularity():
    chord = percussive_descriptors(_chord(), SR)
    groove = percussive_descriptors(_chord() + _hits(np.arange(0.1, 3.0, 0.5)), SR)  # 6 hits, every 0.5 s
    scattered = percussive_descriptors(_chord() + _hits([0.13, 0.55, 1.41, 1.62, 2.37, 2.71]), SR)
    assert chord["share"] < 0.01 and groove["share"] > 0.15  # the hits carry the percussive energy
    assert chord["onset_rate"] <= 0.5  # a chord's ripples are not onsets
    assert groove["onset_rate"] == pytest.approx(2.0, abs=0.5)  # 6 hits in 3 s (the clip's start may add one)
    assert groove["regularity"] > 0.6 > 0.4 > scattered["regularity"]  # a 0.5 s period repeats; scattered do not
    assert scattered["share"] > 0.15  # as much percussive energy, only less regular


def test_descriptors_do_not_depend_on_the_level_and_silence_has_no_drums():
    wave = _chord() + _hits(np.arange(0.1, 3.0, 0.5))
    loud, quiet = percussive_descriptors(wave, SR), percussive_descriptors(0.01 * wave, SR)
    for k in DESCRIPTORS:
        assert quiet[k] == pytest.approx(loud[k], rel=1e-3, abs=1e-3)
    assert percussive_descriptors(np.zeros(3 * SR, np.float32), SR) == dict.fromkeys(DESCRIPTORS, 0.0)


def test_a_shared_separation_gives_the_same_descriptors():
    wave = _chord() + _hits([0.4, 1.9])
    assert percussive_descriptors(wave, SR, spectral_parts(wave)) == percussive_descriptors(wave, SR)


@pytest.mark.parametrize("frames", [186, 40, 9, 1])
def test_separation_equals_librosa_hpss(frames):
    """The fast separation gives librosa.decompose.hpss's values exactly, on music and at lengths shorter than the
    median filters (mirrored edges), with silent frames (librosa's zero split)."""
    wave = np.tile(_chord() + _hits([0.4, 1.1, 1.9]), 2)
    S = np.abs(librosa.stft(wave, n_fft=1024, hop_length=256))[:, 20 : 20 + frames]
    S[:, :1] = 0.0
    harmonic, percussive = hpss(S)
    ref_h, ref_p = librosa.decompose.hpss(S, margin=1.0)
    assert np.array_equal(harmonic, ref_h) and np.array_equal(percussive, ref_p)
    assert harmonic.dtype == ref_h.dtype == np.float32


def test_scale_puts_its_anchors_at_0_and_1_and_uses_only_descriptors_that_separate():
    rng = np.random.default_rng(0)
    without = np.column_stack([rng.normal(0.05, 0.01, 40), rng.normal(3.0, 0.3, 40), rng.normal(0.2, 0.05, 40)])
    with_ = np.column_stack([rng.normal(0.15, 0.01, 40), rng.normal(5.0, 0.3, 40), rng.normal(0.2, 0.05, 40)])
    scale = StrengthScale.from_takes(without, with_)
    assert scale.used.tolist() == [True, True, False]  # regularity is the same in both: it says nothing
    assert scale.describe()["used"] == {"share": 1.0, "onset_rate": 1.0, "regularity": 0.0}
    lo, hi = np.median(without, 0), np.median(with_, 0)
    assert scale.strength(np.stack([lo, hi])) == pytest.approx([0.0, 1.0])
    half = (lo + hi) / 2
    half[2] = 99.0  # an unused descriptor cannot move the verdict
    assert scale.strength(half) == pytest.approx([0.5])
    # one used descriptor far off the scale is clipped to [-1, 2] before the mean
    assert scale.strength(np.array([lo[0] + 100 * (hi[0] - lo[0]), lo[1], 0.0])) == pytest.approx([1.0])
    with pytest.raises(ValueError, match="with and without"):
        StrengthScale.from_takes(without[:0], with_)


def test_a_scale_whose_references_do_not_differ_judges_nothing():
    same = np.tile([0.1, 3.0, 0.3], (10, 1))
    scale = StrengthScale.from_takes(same, same)
    assert not scale.used.any() and np.isnan(scale.strength(same)).all()


def test_hpss_benchmark_times_both_separations_on_audio_files(tmp_path, capsys):
    """benchmarks/hpss.py cuts segments from audio files, runs librosa's separation and ours, and reports both."""
    import soundfile as sf

    from benchmarks.hpss import main

    sf.write(tmp_path / "groove.flac", np.tile(_chord() + _hits(np.arange(0.1, 3.0, 0.5)), 2), SR)
    main(["--audio", str(tmp_path / "*.flac"), "--segments", "3", "--seconds", "1.5"])
    out = capsys.readouterr().out
    assert "3 segments of 1.5 s" in out and "librosa.decompose.hpss (baseline)" in out
    assert "identical values: True" in out
