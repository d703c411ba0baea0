"""The tempo-state HMM beat decoder: exact Viterbi, and beats that follow a steady tempo through missed and spurious
activation peaks."""

import time

import mir_eval
import numpy as np
import pytest

from pipelines.beat_hmm import BeatHMM, _state_space, _viterbi

FPS = 100.0


def _activation(beats: np.ndarray, seconds: float, height: float | np.ndarray = 0.9, floor: float = 0.02):
    """Gaussian peaks (sigma 1 frame, ~2.4 frames at half height) at `beats` (seconds) over a constant floor."""
    frames = np.arange(int(seconds * FPS))
    heights = np.broadcast_to(height, np.shape(beats))
    peaks = np.zeros(frames.size)
    for beat, h in zip(beats, heights):
        peaks = np.maximum(peaks, (h - floor) * np.exp(-0.5 * (frames - beat * FPS) ** 2))
    return floor + peaks


def _f(reference: np.ndarray, estimated: np.ndarray) -> float:
    return mir_eval.beat.f_measure(reference, estimated)


def test_steady_tempo_is_exact():
    beats = np.arange(0.25, 10.0, 0.5)  # 120 bpm
    activation = _activation(beats, 10.0)
    hmm = BeatHMM()
    decoded = hmm.decode(activation)
    assert _f(beats, decoded) >= 0.99
    np.testing.assert_allclose(decoded, beats, atol=1.5 / FPS)

    hmm.decode(activation)  # warm the state-space cache
    times = []
    for _ in range(10):
        start = time.perf_counter()
        hmm.decode(activation)
        times.append(time.perf_counter() - start)
    low, mid = min(times) * 1e3, np.median(times) * 1e3
    print(f"\nBeatHMM.decode, {activation.size} frames: min {low:.1f} ms, median {mid:.1f} ms")


def test_fills_missed_beats_and_ignores_spurious_peaks():
    rng = np.random.default_rng(3)
    beats = np.arange(0.25, 10.0, 0.5)
    # 20% of the beats lose their peak (not the first or last: nothing before or after them pins the phase there)
    kept = np.delete(beats, rng.choice(np.arange(1, beats.size - 1), size=beats.size // 5, replace=False))
    # smaller peaks off the beat, at least 100 ms from any beat
    spurious = rng.uniform(0.0, 10.0, 200)
    spurious = spurious[np.abs(spurious[:, None] - beats[None, :]).min(axis=1) > 0.1][:5]
    assert spurious.size == 5
    activation = _activation(np.r_[kept, spurious], 10.0, height=np.r_[np.full(kept.size, 0.9), np.full(5, 0.4)])
    decoded = BeatHMM().decode(activation)
    assert _f(beats, decoded) >= 0.95
    # a peak picker would score far lower on the same activation: the HMM is doing the work
    assert _f(beats, np.sort(np.r_[kept, spurious])) < 0.85


def test_follows_a_tempo_change():
    slow = np.arange(0.3, 6.0, 0.6)  # 100 bpm for 6 s
    fast = slow[-1] + np.arange(1, 20) * 60.0 / 130.0  # then 130 bpm
    beats = np.r_[slow, fast[fast < 10.0]]
    decoded = BeatHMM().decode(_activation(beats, 10.0))
    assert _f(beats, decoded) >= 0.9


def test_tempo_outside_range_decodes_within_it():
    beats = np.arange(0.5, 10.0, 1.0)  # 60 bpm, below min_bpm
    hmm = BeatHMM(min_bpm=100.0)
    decoded = hmm.decode(_activation(beats, 10.0))
    assert decoded.size >= 2
    median_interval = np.median(np.diff(decoded))
    assert 60.0 / hmm.max_bpm - 1 / FPS <= median_interval <= 60.0 / hmm.min_bpm + 1 / FPS
    # it locks to a multiple of the tempo: every real beat is still a decoded one
    assert (np.abs(beats[:, None] - decoded[None, :]).min(axis=1) < 0.07).all()


@pytest.mark.parametrize("activation", [np.zeros(0), np.array([0.9]), np.zeros(500)])
def test_too_short_or_silent_gives_no_beats(activation):
    decoded = BeatHMM().decode(activation)
    assert isinstance(decoded, np.ndarray) and decoded.size == 0


def test_threshold_decodes_only_the_active_stretch():
    beats = np.arange(2.25, 8.0, 0.5)
    activation = _activation(beats, 10.0)
    activation[: int(2.0 * FPS)] = activation[int(8.0 * FPS) :] = 0.0  # silence at both ends
    decoded = BeatHMM(threshold=0.3).decode(activation)
    assert _f(beats, decoded) >= 0.99
    assert decoded.min() >= 2.0 and decoded.max() < 8.0


def _dense_viterbi(space, activation):
    """Textbook Viterbi over the full (states x states) transition matrix built from the state space."""
    n = space.tempo.size
    log_trans = np.full((n, n), -np.inf)
    inner = np.setdiff1d(np.arange(n), space.last)
    log_trans[inner, inner + 1] = 0.0
    log_trans[np.ix_(space.last, space.first)] = space.log_change_t.T
    log_obs = np.where(
        space.is_beat[None, :],
        np.log(activation)[:, None],
        np.log((1 - activation) / (space.observation_lambda - 1))[:, None],
    )
    delta = -np.log(n) + log_obs[0]
    back = np.zeros((activation.size, n), dtype=np.int64)
    for t in range(1, activation.size):
        scores = delta[:, None] + log_trans
        back[t] = scores.argmax(axis=0)
        delta = scores.max(axis=0) + log_obs[t]
    path = [int(delta.argmax())]
    for t in range(activation.size - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    return np.array(path[::-1]), float(delta.max())


@pytest.mark.parametrize("num_tempi", [None, 6])
def test_viterbi_matches_the_dense_textbook_version(num_tempi):
    # a small model (10 fps: beat intervals of 3..10 frames) keeps the dense matrix small
    space = _state_space(10.0, 60.0, 200.0, num_tempi, 5.0, 4)
    rng = np.random.default_rng(0)
    activation = rng.uniform(0.01, 0.99, 80)
    path, score = _viterbi(space, activation)
    expected_path, expected_score = _dense_viterbi(space, activation)
    assert score == pytest.approx(expected_score, abs=1e-9)
    np.testing.assert_array_equal(path, expected_path)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        BeatHMM().decode(np.zeros((2, 100)))
    with pytest.raises(ValueError):
        BeatHMM().decode(np.r_[0.5, np.nan, 0.5])
    with pytest.raises(ValueError):
        BeatHMM(min_bpm=200.0, max_bpm=100.0)
