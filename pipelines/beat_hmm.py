"""Beat times from a frame-wise beat activation, decoded with the bar-pointer tempo-state HMM.

A beat activation (the probability of a beat at each frame, e.g. a small network's output at 100 frames/s) is
peaky and noisy: some beats have no peak, some peaks are no beat. Picking peaks keeps both errors; a hidden Markov
model that only allows beats at a steady (slowly changing) tempo fills the gaps and ignores the strays. The model is
the one of Krebs, Böck & Widmer, "An Efficient State-Space Model for Joint Tempo and Meter Tracking" (ISMIR 2015),
as used by madmom's DBNBeatTrackingProcessor, written here from the paper's description with numpy only:

- one chain of states per beat interval L (frames): positions 0..L-1, position 0 being the beat;
- within a chain the position advances one per frame; only at the end of a beat may the tempo change, from
  interval Li to Lj with probability proportional to exp(-transition_lambda * |Lj / Li - 1|);
- the first L / observation_lambda positions of a beat are "beat" states and emit the activation, the others
  emit (1 - activation) / (observation_lambda - 1).

The Viterbi pass costs O(states + tempi²) per frame: every state but a chain's position 0 has exactly one
predecessor, so only the tempo changes into position 0 need a max.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_ACTIVATION_EPS = 1e-6  # keeps log(activation) and log(1 - activation) finite
# tempo changes less likely than this become impossible (log -inf), as in madmom (where it keeps the matrix sparse)
_MIN_TRANSITION = 1e-12


class _StateSpace(NamedTuple):
    intervals: np.ndarray  # (K,) beat interval of each tempo chain, frames
    first: np.ndarray  # (K,) state index of each chain's position 0 (the beat)
    last: np.ndarray  # (K,) state index of each chain's last position
    tempo: np.ndarray  # (S,) chain of each state
    position: np.ndarray  # (S,) position of each state within its chain
    is_beat: np.ndarray  # (S,) bool: the state emits the activation
    beat_states: np.ndarray  # (B,) indices where is_beat
    log_change_t: np.ndarray  # (K, K) log P(chain j | end of chain i), stored [j, i] so the max runs along rows
    observation_lambda: float


def _intervals(fps: float, min_bpm: float, max_bpm: float, num_tempi: int | None) -> np.ndarray:
    """Beat intervals (frames) spaced geometrically: a tempo change is judged relative to the tempo (the ratio)."""
    lo, hi = fps * 60.0 / max_bpm, fps * 60.0 / min_bpm
    every = np.arange(max(round(lo), 1), max(round(hi), 1) + 1)
    if num_tempi is None or num_tempi >= every.size:
        return every
    return np.unique(np.maximum(np.round(np.geomspace(lo, hi, num_tempi)), 1)).astype(np.int64)


@functools.lru_cache(maxsize=16)
def _state_space(
    fps: float, min_bpm: float, max_bpm: float, num_tempi: int | None, transition_lambda: float, observation_lambda: int
) -> _StateSpace:
    intervals = _intervals(fps, min_bpm, max_bpm, num_tempi)
    first = np.r_[0, np.cumsum(intervals)[:-1]]
    last = first + intervals - 1
    tempo = np.repeat(np.arange(intervals.size), intervals)
    position = np.arange(tempo.size) - first[tempo]
    # position 0 always counts, so even a chain shorter than observation_lambda has a beat state
    beat_span = np.maximum(np.ceil(intervals / observation_lambda).astype(np.int64), 1)
    is_beat = position < beat_span[tempo]
    ratio = intervals[None, :] / intervals[:, None]  # [from, to]
    prob = np.exp(-transition_lambda * np.abs(ratio - 1.0))
    prob[prob < _MIN_TRANSITION] = 0.0  # the diagonal is 1, so every row keeps a way on
    prob /= prob.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        log_change_t = np.ascontiguousarray(np.log(prob).T)
    space = _StateSpace(
        intervals,
        first,
        last,
        tempo,
        position,
        is_beat,
        np.flatnonzero(is_beat),
        log_change_t,
        float(observation_lambda),
    )
    for array in space[:-1]:
        array.setflags(write=False)  # shared by every caller through the cache
    return space


def _viterbi(space: _StateSpace, activation: np.ndarray) -> tuple[np.ndarray, float]:
    """Most likely state sequence for a clipped activation, and its log probability (uniform initial states)."""
    log_beat = np.log(activation)
    log_other = np.log((1.0 - activation) / (space.observation_lambda - 1.0))
    # Non-beat states all emit log_other: add it as a running scalar and only the difference to the beat states,
    # which are a few percent of the states.
    gain = log_beat - log_other
    n_frames, n_tempi, n_states = activation.size, space.intervals.size, space.tempo.size
    first, last, beat_states, log_change_t = space.first, space.last, space.beat_states, space.log_change_t
    row_base = np.arange(n_tempi) * n_tempi

    delta = np.full(n_states, -np.log(n_states))
    delta[beat_states] += gain[0]
    spare = np.empty_like(delta)
    cand = np.empty((n_tempi, n_tempi))
    # backpointers only for position 0 (the source chain of the tempo change); other predecessors are implicit
    source = np.empty((n_frames, n_tempi), dtype=np.int16 if n_tempi < 2**15 else np.int64)
    for t in range(1, n_frames):
        np.add(delta[last], log_change_t, out=cand)
        best = cand.argmax(axis=1)
        source[t] = best
        spare[1:] = delta[:-1]  # position p follows p - 1; the chain starts are overwritten next
        spare[first] = cand.ravel()[row_base + best]
        spare[beat_states] += gain[t]
        delta, spare = spare, delta

    state = int(delta.argmax())
    score = float(delta[state] + log_other.sum())
    path = np.empty(n_frames, dtype=np.int64)
    # walk back one beat at a time: a chain's positions within a beat are implicit
    t, k, p = n_frames - 1, int(space.tempo[state]), int(space.position[state])
    while True:
        start = t - p
        lo = max(start, 0)
        path[lo : t + 1] = first[k] + np.arange(lo - start, p + 1)
        if start <= 0:
            break
        k = int(source[start, k])
        t, p = start - 1, int(space.intervals[k]) - 1
    return path, score


@dataclass(frozen=True)
class BeatHMM:
    """Beat tracker: Viterbi decoding of Krebs, Böck & Widmer's (ISMIR 2015) tempo-state HMM over an activation.

    The defaults are madmom's DBNBeatTrackingProcessor's. `threshold` > 0 decodes only the stretch between the first
    and last frame whose activation reaches it, so silence at either end yields no beats.
    """

    fps: float = 100.0
    min_bpm: float = 55.0
    max_bpm: float = 215.0
    num_tempi: int | None = 60
    transition_lambda: float = 100.0
    observation_lambda: int = 16
    threshold: float = 0.0

    def __post_init__(self):
        if not self.fps > 0 or not 0 < self.min_bpm < self.max_bpm:
            raise ValueError(f"need fps > 0 and 0 < min_bpm < max_bpm, got {self.fps}, {self.min_bpm}, {self.max_bpm}")
        if self.num_tempi is not None and self.num_tempi < 1:
            raise ValueError(f"num_tempi must be None or >= 1, got {self.num_tempi}")
        if self.observation_lambda < 2:
            raise ValueError(f"observation_lambda must be >= 2, got {self.observation_lambda}")
        if self.transition_lambda < 0 or not 0 <= self.threshold < 1:
            raise ValueError("need transition_lambda >= 0 and 0 <= threshold < 1")

    @property
    def _space(self) -> _StateSpace:
        return _state_space(
            self.fps, self.min_bpm, self.max_bpm, self.num_tempi, self.transition_lambda, self.observation_lambda
        )

    def decode(self, activation: np.ndarray) -> np.ndarray:
        """Beat times in seconds (sorted) for a 1-D activation sampled at `fps`.

        Empty for fewer than 2 frames (no tempo to follow) and for an all-zero activation (no evidence at all).
        """
        activation = np.asarray(activation, dtype=np.float64)
        if activation.ndim != 1:
            raise ValueError(f"activation must be 1-D, got shape {activation.shape}")
        if not np.isfinite(activation).all():
            raise ValueError("activation has NaN or infinite values")
        offset = 0
        if self.threshold > 0:
            above = np.flatnonzero(activation >= self.threshold)
            if above.size == 0:
                return np.empty(0)
            offset = int(above[0])
            activation = activation[offset : above[-1] + 1]
        # with no evidence the prior alone would place beats at an arbitrary tempo (madmom returns none too)
        if activation.size < 2 or not (activation > 0).any():
            return np.empty(0)
        space = self._space
        path, _ = _viterbi(space, np.clip(activation, _ACTIVATION_EPS, 1.0 - _ACTIVATION_EPS))
        frames = _corrected_beats(space, path, activation)
        return (frames + offset) / self.fps


def _corrected_beats(space: _StateSpace, path: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """Frames of the decoded beats (position 0), each moved to the activation's peak within its beat states.

    The path may enter position 0 a frame or two before the peak, since any frame among a beat's beat states
    explains it equally well (madmom's `correct=True`).
    """
    position = space.position[path]
    onsets = np.flatnonzero(position == 0)
    # a beat's beat states run from its position 0 until the first non-beat state (or the next beat, for chains
    # short enough to be all beat states)
    stops = np.flatnonzero(~space.is_beat[path] | (position == 0))
    after = np.searchsorted(stops, onsets, side="right")
    ends = np.append(stops, path.size)[after]
    return np.array([start + int(np.argmax(activation[start:end])) for start, end in zip(onsets, ends)], dtype=np.int64)
