"""Per-clip music features: tempo, beats, downbeats + meter, key, chords, loudness.

`ClipAnalyzer` holds essentia's algorithms (not picklable, not thread-safe): build one per worker process, in
`DoFn.setup`. Every result is plain Python, ready for a clips-table row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipelines.beat_hmm import BeatHMM
from pipelines.beat_network import FPS, BeatNetwork, spectral_frames
from pipelines.chords import beat_sync, merge_segments, to_harte, viterbi_chords
from pipelines.loudness import LoudnessMeter

if TYPE_CHECKING:
    from pipelines.dataset import BuildDatasetParams

_HPCP_FRAME = 4096
_HPCP_HOP = 2048
# back-to-back clips whose beats `ClipAnalyzer.analyze_clips` tracks in one network pass (plus one clip of context
# on either side: (_CONTEXT_RUN + 2) / _CONTEXT_RUN of the network's cost of clips tracked alone)
_CONTEXT_RUN = 8
# audio borrowed from either neighbour for the network frames at a clip's edges, in frames: the longest FFT window
# (beat_network.PITCH_FFT, 4096 samples) reaches 2048 samples = 4.6 frames either side of its centre
_EDGE_FRAMES = 5


@dataclass(frozen=True)
class FeatureParams:
    """The analyzer's settings. Their defaults live in one place, the `build_dataset` section
    (`pipelines.dataset.BuildDatasetParams`, set in params.yaml): build these with `from_params(section)`, or
    `defaults(**overrides)` for the product's defaults with some fields changed. The two fields at the end are
    analysis constants that section does not expose."""

    analysis_sample_rate: int
    key_profile: str
    # Several profiles: one HPCP pass (exactly KeyExtractor's), each profile's key is a vote, the most voted key
    # wins (ties: the earlier profile). Empty: `key_profile` alone (what essentia's KeyExtractor names).
    key_profiles: tuple[str, ...]
    # Weight of the whole file's key profile (mean of its clips' HPCPs, each scaled to max 1) added to a clip's
    # own before the vote (`key_in_context`): a 10 s clip of a chorale that cadences on the dominant sounds in
    # that key, the file around it says otherwise. 0 keeps clips independent. Needs `key_profiles`.
    key_file_context: float
    # The whole file's key (`file_key`: a piece's key, where `key` is the clip's local one), on the file's HPCP
    # (its clips' summed): "consensus" = the four symbolic profiles the corpus labels are made with
    # (`pipelines.corpus_scores.key_correlations`), or an essentia Key profile ("bgate": KeyExtractor's default).
    file_key_profile: str
    rhythm_method: str
    beat_tracker: str  # "essentia" or "network": pipelines/beat_network.py activation + pipelines/beat_hmm.py
    beat_model: str
    # the network's beats: each clip tracked with this much of the clips around it (`analyze_clips`; 0: alone)
    beat_context_seconds: float
    downbeat_network_weight: float  # learned evidence + this x the network's downbeat log-odds
    chord_method: str
    chord_self_transition: float
    silence_dbfs: float
    # Downbeat evidence per beat: "weighted" sums the z-scored cues of `downbeat_weights`, "learned" reads the
    # boosted trees of `downbeat_model`; "chroma_bass" / "onsets_chords" are the earlier fixed sums (chroma change
    # + bass level [+ onsets, labels]).
    downbeat_evidence: str
    # Weights of the per-beat cues of "weighted": bass = low-band level at the beat, chord_change = chord label
    # changes there, novelty = chroma of the two beats after vs the two before, low_onset / high_onset = spectral
    # flux below 200 Hz / above 2 kHz (hats and snares sit on the backbeats, hence negative).
    downbeat_weights: tuple[tuple[str, float], ...]
    # Refinement of essentia's beats (see `refine_beats`); False keeps the tracker's beats (+ octave halving). The
    # network's beats are only halved.
    beat_refine: bool
    beat_phase_margin: float  # off-beat evidence above on-beat evidence by this much: shift half a beat
    beat_compound_margin: float  # dotted-beat (3 tatums) evidence above 2-tatum evidence: compound metre
    # Tempo octave: a beat level faster than this is taken as the subdivision and every other beat is kept
    # (the phase with the stronger bass / harmonic-change evidence); 0 disables.
    tempo_halve_above_bpm: float
    tempo_halve_min_contrast: float  # the two phases' evidence must differ by this much (z units) to halve
    # The network's beats: a level still faster than this (after halving) is a subdivision, grouped in twos or
    # threes by the downbeat evidence (`_group_fast_beats`); 0 disables.
    beat_group_above_bpm: float
    # Added to a meter's bar-phase score (contrast of z-scored evidence): meter 2 still scores F=0.67 on a 4/4 bar
    # with either half-bar phase, where a wrong 4/4 phase scores 0, hence a bias against it.
    meter_bias: tuple[tuple[int, float], ...]
    # downbeat_evidence "learned": per-beat boosted trees over the cues of the beat and its two neighbours, one
    # model for percussive clips and one for the rest (`DOWNBEAT_MODEL`, fitted by benchmarks/fit_downbeats.py);
    # "builtin" or a path to such a JSON file.
    downbeat_model: str
    # Decide meter and bar phase over the whole file (clips' beat grids stitched) instead of clip by clip.
    downbeat_file_context: bool
    # ... where a clip may leave the file's bar phase if its own evidence beats it by this much (None: never;
    # `file_bar_phase`)
    downbeat_rephase_penalty: float | None
    meters: tuple[int, ...] = (2, 3, 4)  # the beats per bar the bar phase chooses among
    beat_steady_tolerance: float = 0.04  # interval within this fraction of the median = settled tracking

    @classmethod
    def from_params(cls, section: BuildDatasetParams) -> FeatureParams:
        """The analysis settings of a `build_dataset` section (its other fields are not the analyzer's)."""
        names = set(cls.__dataclass_fields__)
        kwargs = {k: getattr(section, k) for k in type(section).model_fields if k in names}
        kwargs["key_profiles"] = tuple(section.key_profiles)
        kwargs["meter_bias"] = tuple((int(k), float(v)) for k, v in section.meter_bias.items())
        kwargs["downbeat_weights"] = tuple((str(k), float(v)) for k, v in section.downbeat_weights.items())
        return cls(**kwargs)

    @classmethod
    def defaults(cls, **overrides) -> FeatureParams:
        """The product's defaults (`BuildDatasetParams()`), with `overrides` in that section's types (lists and
        dicts, validated there)."""
        from pipelines.dataset import BuildDatasetParams

        return cls.from_params(BuildDatasetParams(**overrides))


@dataclass
class ClipFeatures:
    is_silent: bool
    tempo_bpm: float | None = None
    tempo_confidence: float | None = None
    beats_s: list[float] = field(default_factory=list)
    downbeats_s: list[float] = field(default_factory=list)
    time_signature: str | None = None
    key: str | None = None
    mode: str | None = None
    key_strength: float | None = None
    # the whole file's key, set by the build once every clip of the file is analysed (`ClipAnalyzer.file_key`)
    file_key: str | None = None
    file_mode: str | None = None
    chords: list[dict] = field(default_factory=list)
    loudness_lufs: float | None = None
    # the clip's key profile (12-bin HPCP summed over its frames, A-based as essentia's Key expects); kept for
    # the file-level key context, not written to the table
    key_pcp: np.ndarray | None = None
    beat_evidence: np.ndarray | None = None  # per-beat downbeat evidence, for the file-level bar phase


def file_profile(pcps: list[np.ndarray | None]) -> np.ndarray | None:
    """A whole file's key profile (A-based, as essentia's Key expects) from its clips' `key_pcp`s: their sum, scaled
    to max 1, bins under 0.2 cleared (KeyExtractor's averaging over a file); None when no clip is tonal."""
    tonal = [p for p in pcps if p is not None]
    total = np.sum(tonal, axis=0) if tonal else None
    if total is None or total.max() <= 0:
        return None
    pcp = total / total.max()
    return np.where(pcp < 0.2, 0.0, pcp)


def tempo_from_beats(beats: np.ndarray) -> float | None:
    """bpm from the median inter-beat interval (robust to a missed or doubled beat)."""
    if len(beats) < 2:
        return None
    return float(60.0 / np.median(np.diff(beats)))


def halve_fast_beats(
    beats: np.ndarray,
    chroma: np.ndarray,
    times: np.ndarray,
    low: np.ndarray,
    duration: float,
    max_bpm: float,
    min_contrast: float = 0.3,
) -> np.ndarray:
    """Tempo octave decision: beat trackers on dense textures (chorales with eighth-note passing tones) often lock
    to the subdivision. Above `max_bpm` (a prior: the beat level of most music lies well below it) keep every
    other beat, in the phase whose beats carry more bass / kick energy and harmonic change, provided the two
    phases differ by at least `min_contrast` (z units of that evidence summed)."""
    if max_bpm <= 0 or len(beats) < 6:
        return beats
    bpm = tempo_from_beats(beats)
    if bpm is None or bpm <= max_bpm:
        return beats
    from pipelines.chords import beat_sync

    cpb = beat_sync(chroma, times, np.concatenate([beats, [duration]]))
    unit = cpb / np.maximum(np.linalg.norm(cpb, axis=1, keepdims=True), 1e-9)
    change = np.zeros(len(beats))
    change[1:] = 1.0 - np.sum(unit[1:] * unit[:-1], axis=1)
    change[0] = np.median(change[1:])
    f = np.searchsorted(times, beats).clip(0, max(len(low) - 1, 0))
    bass = np.log1p(low[f]) if len(low) else np.zeros(len(beats))
    ev = _z(change) + _z(bass)
    # Contrast of one phase over the other, taken on the weaker half of its beats: a bar-level accent (every 4th
    # beat louder) lifts only one half and is no sign of a subdivision; a true subdivision makes every other beat
    # weak.
    contrast = []
    for q in (0, 1):
        on, off = ev[q::2], ev[1 - q :: 2]
        contrast.append(min(on[0::2].mean(), on[1::2].mean()) - off.mean() if len(on) >= 2 else 0.0)
    q = int(np.argmax(contrast))
    if contrast[q] < min_contrast:
        return beats  # alternate beats alike (a click track, an even pulse, bar accents only)
    return beats[q::2]


ONSET_FPS = 100.0  # frames per second of `onset_envelopes`


def onset_envelopes(wave: np.ndarray, sr: int) -> dict[str, np.ndarray]:
    """Spectral flux (rise of log magnitude, half-wave rectified, averaged over the band's bins) per band, at
    `ONSET_FPS` frames per second, frame k centred at k / ONSET_FPS s: `low` (30-200 Hz: kick, bass notes),
    `high` (2-11 kHz: hats, snare, consonant attacks), `all` (30 Hz-11 kHz)."""
    hop = int(round(sr / ONSET_FPS))
    n_fft = int(2 ** round(np.log2(0.023 * sr)))  # 1024 at 44.1 kHz
    x = np.asarray(wave, dtype=np.float32)
    pad = np.zeros(n_fft // 2, np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(np.concatenate([pad, x, pad]), n_fft)[::hop]
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    top = int(np.searchsorted(freqs, 11000.0))
    import scipy.fft

    mag = np.abs(scipy.fft.rfft(frames * np.hanning(n_fft).astype(np.float32), axis=1)[:, :top])
    logmag = np.log1p(100.0 * mag)
    rise = np.maximum(np.diff(logmag, axis=0), 0.0)
    out = {}
    for name, (lo, hi) in (("low", (30.0, 200.0)), ("high", (2000.0, 11000.0)), ("all", (30.0, 11000.0))):
        a, b = int(np.searchsorted(freqs, lo)), min(int(np.searchsorted(freqs, hi)), top)
        out[name] = np.concatenate([[0.0], rise[:, a:b].mean(axis=1)]) if len(rise) else np.zeros(len(logmag))
    return out


def _at(env: np.ndarray, times: np.ndarray, width: int = 3) -> np.ndarray:
    """Largest envelope value within +-`width` frames (30 ms) of each time."""
    from scipy.ndimage import maximum_filter1d

    if not len(env):
        return np.zeros(len(times))
    idx = np.round(np.asarray(times, float) * ONSET_FPS).astype(int)
    peak = maximum_filter1d(np.asarray(env, float), size=2 * width + 1, mode="constant", cval=-np.inf)
    out = peak[idx.clip(0, len(env) - 1)]
    out[(idx < -width) | (idx > len(env) - 1 + width)] = 0.0  # no frame within reach
    return out


def chroma_novelty(chroma: np.ndarray, times: np.ndarray, at: np.ndarray, span: float) -> np.ndarray:
    """Cosine distance between the mean chroma of [t - span, t) and of [t, t + span), for each t in `at`."""
    at = np.asarray(at, float)
    csum = np.vstack([np.zeros((1, chroma.shape[1])), np.cumsum(chroma, axis=0)])
    lo, mid, hi = (np.searchsorted(times, at - span), np.searchsorted(times, at), np.searchsorted(times, at + span))
    before, after = csum[mid] - csum[lo], csum[hi] - csum[mid]  # sums; the cosine ignores the counts
    dot = np.sum(before * after, axis=1)
    norm = np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1)
    ok = (mid > lo) & (hi > mid)
    return np.where(ok, 1.0 - dot / (norm + 1e-12), 0.0)


def steady_beats(beats: np.ndarray, duration: float, tolerance: float = 0.04, run: int = 3) -> np.ndarray:
    """Replace the unsettled start and end of a tracked beat sequence by the steady grid.

    Beat trackers take a few beats to lock on (essentia's degara starts late and off tempo) and stop early, so
    the first and last beats of a 10 s clip are often missing or misplaced. The settled part runs from the first
    to the last run of `run` intervals within `tolerance` of the median interval; beyond it the grid is
    extrapolated with the local interval of its first (last) `run` intervals, to the clip's edges."""
    b = np.asarray(beats, float)
    if len(b) < run + 2:
        return b
    ibi = np.diff(b)
    ok = np.abs(ibi / np.median(ibi) - 1.0) <= tolerance
    first = next((i for i in range(len(ibi) - run + 1) if ok[i : i + run].all()), None)
    if first is None:
        return b  # no settled stretch: leave the tracker's beats alone
    last = next(i for i in range(len(ibi) - 1, run - 2, -1) if ok[i - run + 1 : i + 1].all())
    core = b[first : last + 2]
    p0, p1 = np.median(np.diff(core[: run + 1])), np.median(np.diff(core[-(run + 1) :]))
    head = core[0] - p0 * np.arange(int(core[0] // p0), 0, -1)
    tail = core[-1] + p1 * np.arange(1, int((duration - core[-1]) // p1) + 1)
    return np.concatenate([head, core, tail])


def _tatum_evidence(
    beats: np.ndarray, chroma: np.ndarray, times: np.ndarray, env: dict
) -> tuple[np.ndarray, np.ndarray]:
    """The beat grid with its midpoints (tatums) and, per tatum, z(low-band onset) + z(chroma change)."""
    grid = np.sort(np.concatenate([beats, (beats[:-1] + beats[1:]) / 2]))
    half_beat = float(np.median(np.diff(grid)))
    return grid, _z(_at(env["low"], grid)) + _z(chroma_novelty(chroma, times, grid, half_beat))


def shift_offbeat(
    beats: np.ndarray, chroma: np.ndarray, times: np.ndarray, env: dict, duration: float, margin: float
) -> np.ndarray:
    """Phase: a tracker locked to the off-beats (a melody in even eighths gives it both) has its midpoints carry
    the bass onsets and harmonic changes. Shift by half a beat when the midpoints' evidence exceeds the beats' by
    `margin`."""
    if len(beats) < 4:
        return beats
    grid, e = _tatum_evidence(beats, chroma, times, env)
    if e[1::2].mean() - e[0::2].mean() <= margin:
        return beats
    shifted = grid[1::2]
    nxt = grid[-1] + float(np.median(np.diff(beats))) / 2
    return np.append(shifted, nxt) if nxt < duration else shifted


def compound_beats(
    beats: np.ndarray, chroma: np.ndarray, times: np.ndarray, env: dict, margin: float, min_bpm: float = 40.0
) -> np.ndarray:
    """Compound metre (6/8, 9/8, 12/8): the tracker often picks two eighths (a quarter) as the beat where the
    beat is three (a dotted quarter). On the eighth grid (beats + midpoints), compare the positions only the
    dotted grid has with those only the quarter grid has; take the dotted grid (best of its 3 phases) when its
    own positions carry clearly more onset / harmonic-change evidence. Simple metres put their weak beats on
    the quarter grid and off-beat eighths on the dotted one, which keeps them as they are."""
    if len(beats) < 6:
        return beats
    grid, e = _tatum_evidence(beats, chroma, times, env)
    k = np.arange(len(grid))
    best, phase = -np.inf, 0
    for p in range(3):
        own, other = e[(k % 3 == p) & (k % 2 == 1)], e[(k % 3 != p) & (k % 2 == 0)]
        if len(own) and len(other) and own.mean() - other.mean() > best:
            best, phase = own.mean() - other.mean(), p
    if best <= margin or 60.0 / (1.5 * float(np.median(np.diff(beats)))) < min_bpm:
        return beats
    return grid[phase::3]


def trim_to_sound(beats: np.ndarray, env_all: np.ndarray, slack: float = 0.2, rel: float = 0.4) -> np.ndarray:
    """Drop beats before the first / after the last onset (more than `slack` beats away): a clip that starts or
    ends in silence (the end of a piece, a pickup) has no beat there."""
    if len(beats) < 2 or not len(env_all):
        return beats
    onsets = np.nonzero(env_all > rel * np.percentile(env_all, 95))[0] / ONSET_FPS
    if not len(onsets):
        return beats
    pad = slack * float(np.median(np.diff(beats)))
    return beats[(beats >= onsets[0] - pad) & (beats <= onsets[-1] + pad)]


def refine_beats(
    beats: np.ndarray,
    duration: float,
    chroma: np.ndarray,
    times: np.ndarray,
    low: np.ndarray,
    env: dict,
    params: FeatureParams,
) -> np.ndarray:
    """Tracker beats -> tempo octave (halving), settled grid, beat phase, compound metre, settled grid, trimmed
    to where there is sound. Each step keeps the beats unless its evidence is clear (see the functions)."""
    beats = halve_fast_beats(
        beats, chroma, times, low, duration, params.tempo_halve_above_bpm, params.tempo_halve_min_contrast
    )
    tol = params.beat_steady_tolerance
    beats = steady_beats(beats, duration, tol)
    beats = shift_offbeat(beats, chroma, times, env, duration, params.beat_phase_margin)
    beats = compound_beats(beats, chroma, times, env, params.beat_compound_margin)
    beats = steady_beats(beats, duration, tol)
    return trim_to_sound(beats, env["all"])


def downbeat_cues(
    beats: np.ndarray,
    duration: float,
    chroma: np.ndarray,
    times: np.ndarray,
    low: np.ndarray,
    env: dict,
    self_transition: float,
    sr: int = 44100,
) -> dict[str, np.ndarray]:
    """Per-beat cues for the bar phase (see `FeatureParams.downbeat_weights`), each a float array like beats."""
    n = len(beats)
    period = float(np.median(np.diff(beats)))
    bounds = np.append(beats, min(duration, beats[-1] + period))
    log_low = np.log1p(low)
    bass = np.empty(n)
    for i, b in enumerate(beats):  # low-band level just at/after the beat (robust to a few ms of beat error)
        sel = (times >= b - 0.03) & (times < b + 0.1)
        bass[i] = log_low[sel].max() if sel.any() else log_low[np.argmin(np.abs(times - b))]
    # chroma of each beat from the analysis frames inside it (a quarter frame away from both edges)
    edge = 0.25 * _HPCP_FRAME / sr
    per_beat = np.zeros((n, chroma.shape[1]))
    for i, (a, c) in enumerate(zip(bounds[:-1], bounds[1:])):
        sel = (times >= a + edge) & (times < c - edge)
        if not sel.any():
            sel = (times >= a) & (times < c)
        per_beat[i] = chroma[sel].mean(axis=0) if sel.any() else chroma[np.argmin(np.abs(times - (a + c) / 2))]
    labels = viterbi_chords(per_beat, self_transition=self_transition)
    changes = np.array([float(x != y) for x, y in zip(labels[1:], labels[:-1])])
    all_onset = _at(env["all"], beats)
    return {
        "bass": bass,
        "chord_change": np.r_[changes.mean() if len(changes) else 0.0, changes],
        "novelty": chroma_novelty(chroma, times, beats, 2 * period),
        "low_onset": _at(env["low"], beats),
        "high_onset": _at(env["high"], beats),
        # further cues of the learned evidence: attack at the beat, no attack on the next beat (a note held over
        # it starts a strong beat), attack half a beat before it, and harmonic novelty over one and four beats
        "all_onset": all_onset,
        "sustain": -np.r_[all_onset[1:], all_onset[-1:]],
        "mid_before": np.r_[0.0, _at(env["all"], beats[:-1] + np.diff(beats) / 2)],
        "novelty_1": chroma_novelty(chroma, times, beats, period),
        "novelty_4": chroma_novelty(chroma, times, beats, 4 * period),
    }


DOWNBEAT_CUES = (
    "bass",
    "chord_change",
    "novelty",
    "low_onset",
    "high_onset",
    "all_onset",
    "sustain",
    "mid_before",
    "novelty_1",
    "novelty_4",
)


def percussiveness(env: dict) -> float:
    """Mean high-band (2-11 kHz) over mean full-band spectral flux: a drum kit's hats and snares put most of
    their attacks high (AUC 0.95-0.98 for drums vs no drums on the rendered dev and held-out sets)."""
    return float(np.mean(env["high"]) / (np.mean(env["all"]) + 1e-9))


DOWNBEAT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "downbeat_model.json")


_MAX_SHIFT = 4  # a downbeat model's widest reach, in beats: a 10 s clip at the slowest tempo (55 bpm) holds 9


def load_downbeat_model(spec: str) -> dict:
    """{"cues": [...], "shifts": [...], "percussive_threshold": x, "models": {"percussive": M, "tonal": M}}: per
    gate, boosted trees over the (cue, shift) features, cue-major: M = {"baseline": b, "trees": [{"feature",
    "threshold", "left", "right", "leaf", "value"}, ...]}, the raw score being b + the leaf values reached
    (`x[feature] <= threshold` goes left), as sklearn's HistGradientBoostingClassifier computes it."""
    path = DOWNBEAT_MODEL if spec == "builtin" else spec
    with open(path) as f:
        model = json.load(f)
    n = len(model["cues"]) * len(model["shifts"])
    unknown = sorted(set(model["cues"]) - set(DOWNBEAT_CUES))
    if unknown:
        raise ValueError(f"downbeat model {path}: unknown cues {unknown} (known: {', '.join(DOWNBEAT_CUES)})")
    if any(abs(int(s)) > _MAX_SHIFT for s in model["shifts"]):
        raise ValueError(f"downbeat model {path}: shifts beyond +-{_MAX_SHIFT} beats do not fit a short clip")
    for kind in ("percussive", "tonal"):
        for tree in model["models"][kind]["trees"]:
            size = len(tree["leaf"])
            if any(len(tree[k]) != size for k in ("feature", "threshold", "left", "right", "value")):
                raise ValueError(f"downbeat model {path}: a {kind} tree has arrays of different lengths")
            inner = [i for i, leaf in enumerate(tree["leaf"]) if not leaf]
            feats = [tree["feature"][i] for i in inner]
            if any(not 0 <= f < n for f in feats):
                raise ValueError(f"downbeat model {path}: a {kind} tree splits on feature {max(feats)} of {n}")
            if any(not (i < tree["left"][i] < size and i < tree["right"][i] < size) for i in inner):
                raise ValueError(f"downbeat model {path}: a {kind} tree has a child index out of order or range")
        model["models"][kind]["_arrays"] = stack_trees(model["models"][kind]["trees"])
    return model


def stack_trees(trees: list[dict]) -> dict:
    """The trees as [n_trees, max_nodes] arrays (padded with leaves) so that all are walked at once."""
    width = max(len(t["leaf"]) for t in trees)

    def pad(key, fill, dtype):
        out = np.full((len(trees), width), fill, dtype=dtype)
        for i, t in enumerate(trees):
            out[i, : len(t[key])] = t[key]
        return out

    return {
        "feature": pad("feature", 0, np.int64),
        "threshold": pad("threshold", 0.0, np.float64),
        "left": pad("left", 0, np.int64),
        "right": pad("right", 0, np.int64),
        "leaf": pad("leaf", 1, bool),
        "value": pad("value", 0.0, np.float64),
    }


def export_boosted_trees(clf) -> dict:
    """A fitted binary sklearn HistGradientBoostingClassifier (numerical features) as plain arrays for
    `boosted_trees_score` (reads its fitted predictors: checked against decision_function where it is fitted)."""
    trees = []
    for (predictor,) in clf._predictors:
        nodes = predictor.nodes
        if nodes["is_categorical"].any():
            raise ValueError("categorical splits are not exported")
        trees.append(
            {
                "feature": nodes["feature_idx"].tolist(),
                "threshold": nodes["num_threshold"].tolist(),
                "left": nodes["left"].tolist(),
                "right": nodes["right"].tolist(),
                "leaf": nodes["is_leaf"].astype(int).tolist(),
                "value": nodes["value"].tolist(),
            }
        )
    return {"baseline": float(clf._baseline_prediction.ravel()[0]), "trees": trees}


def boosted_trees_score(x: np.ndarray, model: dict) -> np.ndarray:
    """Raw (log-odds) score of each row of x under one gate's boosted trees (all trees walked together)."""
    t = model["_arrays"]
    n_trees = t["leaf"].shape[0]
    tree = np.arange(n_trees)[:, None]
    node = np.zeros((n_trees, len(x)), dtype=np.int64)
    rows = np.arange(len(x))[None, :]
    while True:  # ends: children come after their parent (checked at load), so every walk reaches a leaf
        inner = ~t["leaf"][tree, node]
        if not inner.any():
            break
        go_left = x[rows, t["feature"][tree, node]] <= t["threshold"][tree, node]
        node = np.where(inner, np.where(go_left, t["left"][tree, node], t["right"][tree, node]), node)
    return float(model["baseline"]) + t["value"][tree, node].sum(axis=0)


def cue_matrix(cues: dict[str, np.ndarray], names: list[str], shifts: list[int]) -> np.ndarray:
    """(beats, cues x shifts): each cue z-scored within the clip and clipped to +-2.5; column (cue, s) holds the
    value at beat i + s (0 past the clip's edges, the z-scored mean)."""
    cols = []
    for name in names:
        z = np.clip(_z(cues[name]), -2.5, 2.5)
        for s in shifts:
            shifted = np.zeros_like(z)
            if s >= 0:
                shifted[: len(z) - s] = z[s:]
            else:
                shifted[-s:] = z[: len(z) + s]
            cols.append(shifted)
    return np.stack(cols, axis=1)


def learned_evidence(cues: dict[str, np.ndarray], env: dict, model: dict) -> np.ndarray:
    kind = "percussive" if percussiveness(env) > model["percussive_threshold"] else "tonal"
    return boosted_trees_score(cue_matrix(cues, model["cues"], model["shifts"]), model["models"][kind])


def file_bar_phase(
    clips: list[tuple[float, np.ndarray, np.ndarray]],
    meters=(2, 3, 4),
    meter_bias: dict | None = None,
    rephase_penalty: float | None = None,
) -> tuple[list[np.ndarray], int]:
    """Meter and bar phase of a whole file from its clips' (start_s, beats, per-beat evidence): the clips'
    beat grids are stitched into one beat count (`beat_numbers`), and the (meter, phase) whose beats carry the most
    evidence over the file wins, as `bar_phase` does within a clip. Returns each clip's downbeats and the meter.

    `rephase_penalty` None: the stitched count fixes every clip's phase. A number: a clip may take another phase
    of the file's meter where its own evidence contrast beats the file phase's by more than this. Each clip is
    tracked without the audio around it, so its first beats can be off and the count slips a beat at a clip
    boundary (22 of the OOD set's 102 boundaries); one slipped clip then blurs the whole file's evidence for the
    right meter. The file's (meter, phase) then maximises the mean over clips of each clip's best contrast, less
    the penalty where the clip re-phases."""
    index = beat_numbers([(start, beats) for start, beats, _ in clips])
    used = [(i, e) for i, (_, _, e) in zip(index, clips) if i is not None]
    if not used:
        return [b[:1] for _, b, _ in clips], 4
    if rephase_penalty is None:
        m, p = _best_meter_phase(
            np.concatenate([i for i, _ in used]), np.concatenate([e for _, e in used]), meters, meter_bias
        )
        phases = [p] * len(used)
    else:
        m, phases = _best_meter_phases_per_clip(used, meters, meter_bias, rephase_penalty)
    phase_of = iter(phases)
    return [b[(i - next(phase_of)) % m == 0] if i is not None else b[:1] for i, (_, b, _) in zip(index, clips)], m


def _phase_contrast(beat_index: np.ndarray, evidence: np.ndarray, m: int, p: int) -> float:
    """Mean evidence on the beats numbered p mod m less the mean on the others (-inf where either set is empty)."""
    on = (beat_index - p) % m == 0
    if on.all() or not on.any():
        return -np.inf
    return float(evidence[on].mean() - evidence[~on].mean())


def _best_meter_phases_per_clip(
    used: list[tuple[np.ndarray, np.ndarray]], meters, meter_bias: dict | None, rephase_penalty: float
) -> tuple[int, list[int]]:
    """(m, each clip's phase) for `file_bar_phase` with a re-phase penalty; (4, zeros) when the file has too few
    beats for any meter."""
    n_beats = sum(len(i) for i, _ in used)
    best: tuple = (-np.inf, 4, [0] * len(used))
    for m in meters:
        if n_beats < 2 * m:
            continue
        contrasts = [[_phase_contrast(i, e, m, q) for q in range(m)] for i, e in used]
        for p in range(m):
            gains = [[c - (0.0 if q == p else rephase_penalty) for q, c in enumerate(clip)] for clip in contrasts]
            score = float(np.mean([max(g) for g in gains])) + float((meter_bias or {}).get(m, 0.0))
            if score > best[0]:
                best = (score, m, [int(np.argmax(g)) for g in gains])
    return best[1], best[2]


def beat_numbers(clips: list[tuple[float, np.ndarray]]) -> list[np.ndarray | None]:
    """Each clip's beats numbered on one count over the file, from (start_s, beats) in file order; None for a clip
    with fewer than 2 beats. A clip's first beat is numbered from the previous clip's beat nearest to it (plus the
    gap in beat periods), so back-to-back clips continue the count and overlapping clips (hop < clip length) give a
    beat both hold the same number; counting from the previous clip rather than from the file's start keeps a
    slight tempo error from drifting the count over a long file."""
    index, prev = [], None
    for start, beats in clips:
        if len(beats) < 2:
            index.append(None)
            continue
        period = float(np.median(np.diff(beats)))
        absolute = start + np.asarray(beats, float)
        if prev is None:
            first = 0
        else:
            j = int(np.argmin(np.abs(prev[0] - absolute[0])))
            first = int(prev[1][j]) + int(round((absolute[0] - prev[0][j]) / period))
        idx = first + np.arange(len(beats))
        index.append(idx)
        prev = (absolute, idx)
    return index


def _best_meter_phase(beat_index: np.ndarray, evidence: np.ndarray, meters, meter_bias: dict | None) -> tuple:
    """(m, p): the meter and phase whose beats (index = p mod m) carry the most evidence relative to the other
    beats, plus the meter's bias; (4, 0) when there are too few beats for any meter."""
    best = (-np.inf, 4, 0)
    for m in meters:
        if len(beat_index) < 2 * m:
            continue
        for p in range(m):
            score = _phase_contrast(beat_index, evidence, m, p) + float((meter_bias or {}).get(m, 0.0))
            if score > best[0]:
                best = (score, m, p)
    return best[1], best[2]


def bar_phase(
    beats: np.ndarray, evidence: np.ndarray, meters=(2, 3, 4), meter_bias: dict | None = None
) -> tuple[np.ndarray, int]:
    """The meter m and phase p whose beats i = p (mod m) carry the most evidence relative to the other beats
    (plus the meter's bias): (downbeats, m)."""
    m, p = _best_meter_phase(np.arange(len(beats)), evidence, meters, meter_bias)
    return beats[p::m], m


def estimate_downbeats(
    beats: np.ndarray,
    chroma_per_beat: np.ndarray,
    bass_per_beat: np.ndarray,
    meters=(2, 3, 4),
    extra: list[np.ndarray] | None = None,
    meter_bias: dict | None = None,
) -> tuple[np.ndarray, int]:
    """Pick the meter and bar phase whose downbeats coincide best with chord changes and bass onsets.

    essentia has no downbeat tracker and the neural ones do not install offline, so this is a small
    interpretable estimate: harmony tends to change, and the bass (or kick) tends to sound, at the start
    of a bar. For each meter m and phase p the score is the z-scored mean of that evidence on beats
    i = p (mod m); the best (m, p) wins. Meter 2 and 4 are confusable; 4 is preferred on near ties.
    """
    n = len(beats)
    if n < 4:
        return np.asarray(beats[:1], dtype=float), 4
    unit = chroma_per_beat / np.maximum(np.linalg.norm(chroma_per_beat, axis=1, keepdims=True), 1e-9)
    change = np.zeros(n)
    change[1:] = 1.0 - np.sum(unit[1:] * unit[:-1], axis=1)
    change[0] = np.median(change[1:]) if n > 1 else 0.0

    def z(x):
        return (x - x.mean()) / (x.std() + 1e-9)

    evidence = z(change) + z(bass_per_beat)
    for e in extra or []:  # further per-beat evidence (bass onsets, chord-label changes), z-scored alike
        evidence = evidence + z(np.asarray(e, float))
    best = (-np.inf, 4, 0)
    for m in meters:
        if n < 2 * m:
            continue
        for p in range(m):
            on = evidence[p::m]
            off = np.delete(evidence, np.arange(p, n, m))
            score = on.mean() - off.mean()
            if meter_bias is None:
                score += 0.05 if m == 4 else 0.0  # tie-break toward the commonest meter
            else:
                score += float(meter_bias.get(m, 0.0))
            if score > best[0]:
                best = (score, m, p)
    _, m, p = best
    return beats[p::m], m


def _spectra(wave: np.ndarray, window: np.ndarray, hop: int, centred: bool) -> np.ndarray:
    """Magnitude spectra of the frames essentia's FrameGenerator(frameSize=len(window), hopSize=hop,
    startFromZero=not centred) cuts, windowed by `window`, in one FFT batch (identical to Windowing + Spectrum
    per frame, without a Python call per frame)."""
    import scipy.fft

    size = len(window)
    x = np.asarray(wave, dtype=np.float32)
    if centred:  # frames centred at k * hop, the first one half before the start
        n = max(1, int(np.ceil((len(x) + size / 2) / hop)))
        x = np.concatenate([np.zeros(size // 2, np.float32), x])
    else:
        n = max(1, int(np.ceil(len(x) / hop)) - 1)
    x = np.concatenate([x, np.zeros(size + hop, np.float32)])
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[::hop][:n]
    return np.abs(scipy.fft.rfft(frames * window, axis=1)).astype(np.float32)


def _per_frame(algorithm):
    """The C++ compute of an essentia.standard algorithm, for calls made once per frame.

    essentia.standard's Python `compute` checks and converts every argument on every call (~5 us, about 5% of
    a clip's analysis over ~650 per-frame calls). The per-frame inputs here are rows of one float32 C-contiguous
    spectra array and the float32 arrays essentia itself returned, i.e. already what the C++ side takes, so
    the checks are skipped; the outputs are identical (tested)."""
    return algorithm.__compute__


def _essentia_window(es, kind: str, size: int) -> np.ndarray:
    """essentia's (normalised) window as an array; its zero-phase rotation is undone (magnitudes ignore it)."""
    return np.roll(np.asarray(es.Windowing(type=kind, size=size)(np.ones(size, np.float32))), size // 2)


class ClipAnalyzer:
    """All clip features in one pass. Build once per process (essentia algorithms are heavy and stateful)."""

    def __init__(self, params: FeatureParams):
        import essentia

        essentia.log.infoActive = False  # its INFO lines ("no classifier models configured") are noise in our logs
        import essentia.standard as es

        essentia.log.warningActive = False
        self.params = params
        sr = params.analysis_sample_rate
        self._rhythm = es.RhythmExtractor2013(method=params.rhythm_method)
        # KeyExtractor's own chain (hann 4096/4096, peaks 25-3500 Hz, whitening, 12-bin HPCP, mean, bins under 0.2
        # of the max cleared): the clip's key profile, voted on by one Key per profile and summed into the file's
        # (`file_key`).
        self._hann_window = _essentia_window(es, "hann", 4096)
        self._kpeaks = es.SpectralPeaks(
            orderBy="magnitude",
            magnitudeThreshold=1e-4,
            minFrequency=25,
            maxFrequency=3500,
            maxPeaks=60,
            sampleRate=sr,
        )
        self._kwhite = es.SpectralWhitening(maxFrequency=3500, sampleRate=sr)
        self._khpcp = es.HPCP(
            bandPreset=False,
            harmonics=4,
            maxFrequency=3500,
            minFrequency=25,
            nonLinear=False,
            normalized="none",
            referenceFrequency=440,
            sampleRate=sr,
            size=12,
            weightType="cosine",
            windowSize=1.0,
            maxShifted=False,
        )

        def key_algo(profile: str):  # essentia's Key as KeyExtractor sets it up
            return es.Key(
                usePolyphony=False, useThreeChords=False, numHarmonics=4, slope=0.6, profileType=profile, pcpSize=12
            )

        # no `key_profiles`: `key_profile` alone, which is KeyExtractor's result (same chain, same Key)
        self._keys = [key_algo(prof) for prof in params.key_profiles or (params.key_profile,)]
        self._file_key_algo = None if params.file_key_profile == "consensus" else key_algo(params.file_key_profile)
        self._bh_window = _essentia_window(es, "blackmanharris62", _HPCP_FRAME)
        self._peaks = es.SpectralPeaks(
            orderBy="magnitude",
            magnitudeThreshold=1e-5,
            minFrequency=40,
            maxFrequency=5000,
            maxPeaks=100,
            sampleRate=sr,
        )
        # referenceFrequency 440 puts A at bin 0; we roll to C below.
        self._hpcp = es.HPCP(
            size=12, referenceFrequency=440, sampleRate=sr, harmonics=4, nonLinear=False, normalized="unitMax"
        )
        self._chords_essentia = es.ChordsDetectionBeats(hopSize=_HPCP_HOP, sampleRate=sr)
        self._meter = LoudnessMeter(sr)
        self._downbeat_model = (
            load_downbeat_model(params.downbeat_model) if params.downbeat_evidence == "learned" else None
        )
        self._es = es
        self._beat_network = BeatNetwork.load(params.beat_model) if params.beat_tracker == "network" else None
        self._beat_hmm = BeatHMM(fps=FPS)
        self._sr = sr
        self._hop = int(round(sr / FPS))  # samples per network frame

    # -- pieces -------------------------------------------------------------------------------------------
    def _key_pcp(self, wave: np.ndarray) -> np.ndarray | None:
        """KeyExtractor's HPCP summed over the clip's frames (None when it has no tonal peaks)."""
        total = None
        peaks, white, hpcp = _per_frame(self._kpeaks), _per_frame(self._kwhite), _per_frame(self._khpcp)
        for spec in _spectra(wave, self._hann_window, 4096, centred=True):
            freqs, mags = peaks(spec)
            h = hpcp(freqs, white(spec, freqs, mags))
            total = h if total is None else total + h
        if total is None or total.max() <= 0:
            return None
        return np.asarray(total, dtype=np.float64)

    def _vote(self, pcp: np.ndarray) -> tuple[str, str, float]:
        """(key, scale, strength): the key most profiles name on the profile `pcp` (scaled to max 1, bins under
        0.2 cleared, as KeyExtractor does); strength is the mean strength of the profiles that named it."""
        pcp = pcp / pcp.max()
        pcp = np.where(pcp < 0.2, 0.0, pcp).astype(np.float32)
        votes: dict[tuple[str, str], list[float]] = {}
        for key_algo in self._keys:
            key, scale, strength, _ = key_algo(pcp)
            votes.setdefault((key, scale), []).append(float(strength))
        (key, scale), strengths = max(votes.items(), key=lambda kv: len(kv[1]))  # first of the tied: earliest
        return key, scale, float(np.mean(strengths))

    def key_in_context(self, clip_pcp: np.ndarray, file_pcps: list[np.ndarray]) -> tuple[str, str, float]:
        """The clip's key voted on its own profile plus `key_file_context` x the mean profile of the file's
        clips (each scaled to max 1, so long and short clips weigh alike)."""
        file_pcp = np.mean([p / p.max() for p in file_pcps], axis=0)
        return self._vote(clip_pcp / clip_pcp.max() + self.params.key_file_context * file_pcp / file_pcp.max())

    def file_key(self, pcps: list[np.ndarray | None]) -> tuple[str | None, str | None]:
        """(key, mode) of a whole file from its clips' key profiles: their sum is the file's HPCP (what
        KeyExtractor would average over the file), scaled to max 1 with bins under 0.2 cleared as it does, matched
        by `file_key_profile`. (None, None) when no clip is tonal."""
        pcp = file_profile(pcps)
        if pcp is None:
            return None, None
        if self._file_key_algo is not None:
            key, scale, _, _ = self._file_key_algo(pcp.astype(np.float32))
            return key, scale
        from pipelines.corpus_scores import key_correlations, key_name

        best = int(np.argmax(key_correlations(np.roll(pcp, -3))))  # A-based bins -> C-based
        return key_name(best % 12), "major" if best < 12 else "minor"

    def _hpcp_frames(self, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frames x 12 chroma, C-based), frame centre times, low-band energy per frame (bass/kick)."""
        sr = self.params.analysis_sample_rate
        spectra = _spectra(wave, self._bh_window, _HPCP_HOP, centred=False)
        freqs = np.fft.rfftfreq(_HPCP_FRAME, 1 / sr)
        low = np.sum(spectra[:, freqs < 150.0].astype(np.float64) ** 2, axis=1)
        peaks, hpcp = _per_frame(self._peaks), _per_frame(self._hpcp)
        chroma = np.asarray([hpcp(*peaks(spec)) for spec in spectra], dtype=float).reshape(-1, 12)
        chroma = np.roll(chroma, -3, axis=1)  # bin 0 = A -> bin 0 = C: new[c] = old[(c + 3) % 12]
        times = (np.arange(len(chroma)) * _HPCP_HOP + _HPCP_FRAME / 2) / sr
        return chroma, times, low

    def _loudness(self, wave: np.ndarray) -> float | None:
        sr = self.params.analysis_sample_rate
        if len(wave) < int(0.4 * sr):  # BS.1770 needs at least one 400 ms block
            return None
        value = self._meter.integrated(wave)
        return float(value) if np.isfinite(value) else None

    # -- all ----------------------------------------------------------------------------------------------
    # A clip is analysed in three steps: `_signals` reads everything analysis needs from its audio, `_track_alone`
    # finds its beats (or `analyze_clips` does, with the clips around it), `_finish` derives the rest from those.
    def _signals(
        self, wave: np.ndarray, lead: np.ndarray | None = None, tail: np.ndarray | None = None
    ) -> _ClipSignals:
        """`lead` / `tail`: the audio just before / after the clip where it continues (`_with_edges`), so the network
        frames at its edges are those of the piece, not of audio cut off."""
        p, sr = self.params, self.params.analysis_sample_rate
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        duration = len(wave) / sr
        rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) if len(wave) else 0.0
        net = self._beat_network
        if rms <= 10 ** (p.silence_dbfs / 20):
            # No tempo/key/chord claims about silence; its network frames are silence's (all zero) for the clips
            # around it.
            frames = None if net is None else np.zeros((len(wave) // self._hop + 1, net.mean.shape[0]), np.float32)
            return _ClipSignals(duration, self._loudness(wave), silent=True, frames=frames)
        sig = _ClipSignals(duration, self._loudness(wave), silent=False, key_pcp=self._key_pcp(wave))
        sig.chroma, sig.times, sig.low = self._hpcp_frames(wave)
        if p.beat_refine or p.downbeat_evidence in ("weighted", "learned"):
            sig.env = onset_envelopes(wave, sr)
        if net is not None:
            sig.frames = self._network_frames(wave, lead, tail)
        else:
            _, beats, confidence, _, _ = self._rhythm(wave)
            sig.essentia_beats, sig.essentia_confidence = np.asarray(beats, dtype=float), float(confidence)
        return sig

    def _network_frames(self, wave: np.ndarray, lead: np.ndarray | None, tail: np.ndarray | None) -> np.ndarray:
        net, hop = self._beat_network, self._hop
        if lead is None and tail is None:
            return spectral_frames(wave, self._sr, net.features)
        lead = np.zeros(0, np.float32) if lead is None else lead
        tail = np.zeros(0, np.float32) if tail is None else tail
        frames = spectral_frames(np.concatenate([lead, wave, tail]), self._sr, net.features)
        first = len(lead) // hop  # lead is a whole number of frames long
        return frames[first : first + len(wave) // hop + 1]

    def _track_alone(self, sig: _ClipSignals) -> tuple[np.ndarray, float | None, np.ndarray | None]:
        """(beats, tracker confidence, the network's (beat, downbeat) activation or None) from the clip alone."""
        if self._beat_network is None:
            return sig.essentia_beats, sig.essentia_confidence, None
        activation = self._beat_network.activations(sig.frames)
        return self._beat_hmm.decode(activation[:, 0]), None, activation

    def _settle_beats(self, sig: _ClipSignals, beats: np.ndarray, activation: np.ndarray | None = None) -> np.ndarray:
        """The tracker's beats inside the clip, refined (essentia's) or halved / grouped when too fast (the
        network's)."""
        p = self.params
        beats = np.asarray(beats, dtype=float)
        beats = beats[(beats >= 0) & (beats < sig.duration)]
        if p.beat_refine and self._beat_network is None:
            return refine_beats(beats, sig.duration, sig.chroma, sig.times, sig.low, sig.env, p)
        beats = halve_fast_beats(
            beats, sig.chroma, sig.times, sig.low, sig.duration, p.tempo_halve_above_bpm, p.tempo_halve_min_contrast
        )
        return self._group_fast_beats(sig, beats, activation)

    def _group_fast_beats(self, sig: _ClipSignals, beats: np.ndarray, activation: np.ndarray | None) -> np.ndarray:
        """A beat level above `beat_group_above_bpm` is taken as a subdivision (the network follows the eighths of
        a slow 6/8 or of a slow 4/4 where they are the densest pulse): keep every second or every third beat, in
        the grouping and phase whose beats carry the most downbeat evidence relative to the others."""
        limit = self.params.beat_group_above_bpm
        bpm = tempo_from_beats(beats)
        if not limit or bpm is None or bpm <= limit or len(beats) < 6:
            return beats
        evidence = self._downbeat_evidence(sig, beats, activation)
        if evidence is None:
            return beats
        m, q = _best_meter_phase(np.arange(len(beats)), evidence, (2, 3), None)
        return beats[q::m]

    def _cues(self, sig: _ClipSignals, beats: np.ndarray) -> dict[str, np.ndarray]:
        p = self.params
        return downbeat_cues(
            beats,
            sig.duration,
            sig.chroma,
            sig.times,
            sig.low,
            sig.env,
            p.chord_self_transition,
            p.analysis_sample_rate,
        )

    def _downbeat_evidence(
        self, sig: _ClipSignals, beats: np.ndarray, activation: np.ndarray | None
    ) -> np.ndarray | None:
        """Per-beat downbeat evidence of `downbeat_evidence` "learned" (plus the network's weighted log-odds) or
        "weighted"; None for the other kinds or fewer than 4 beats."""
        p = self.params
        if len(beats) < 4 or p.downbeat_evidence not in ("weighted", "learned"):
            return None
        cues = self._cues(sig, beats)
        if p.downbeat_evidence == "weighted":
            return sum(w * np.clip(_z(cues[name]), -2.5, 2.5) for name, w in p.downbeat_weights)
        evidence = learned_evidence(cues, sig.env, self._downbeat_model)
        if activation is not None and p.downbeat_network_weight:
            evidence = evidence + p.downbeat_network_weight * network_evidence(activation[:, 1], beats)
        return evidence

    def downbeat_inputs(self, wave: np.ndarray) -> tuple[np.ndarray, dict, dict] | None:
        """(beats, per-beat cues, onset envelopes) as `analyze` computes them, for fitting the downbeat model;
        None for a silent clip or one with fewer than 4 beats."""
        sig = self._signals(np.ascontiguousarray(wave, dtype=np.float32))
        if sig.silent or sig.env is None:
            return None
        tracked, _, activation = self._track_alone(sig)
        beats = self._settle_beats(sig, tracked, activation)
        if len(beats) < 4:
            return None
        return beats, self._cues(sig, beats), sig.env

    def analyze(self, wave: np.ndarray) -> ClipFeatures:
        """All features of one clip, heard on its own."""
        return self._analyze_signals(self._signals(wave))

    def _analyze_signals(self, sig: _ClipSignals) -> ClipFeatures:
        if sig.silent:
            return ClipFeatures(is_silent=True, loudness_lufs=sig.loudness)
        return self._finish(sig, *self._track_alone(sig))

    def analyze_clips(
        self, clips: Iterable[tuple[int, float, np.ndarray]]
    ) -> Iterator[tuple[int, float, ClipFeatures]]:
        """(index, start_s, features) of a file's clips, from (index, start_s, wave) in file order.

        With the beat network and `beat_context_seconds` > 0, each clip's beats are tracked with the audio around
        it: the network runs over runs of back-to-back clips (each run with one clip more on either side, so every
        frame sees the ~10 s of context either way the network reads), and the HMM decodes the clip plus
        `beat_context_seconds` of its neighbours' activation. A clip cut out of a piece then starts on the beat
        the piece is on, instead of finding its footing in its first bars, and neighbouring clips agree on the
        beats at their boundary. Clips that do not follow each other (hop != clip length) are tracked alone.
        Holds at most `_CONTEXT_RUN` + 2 clips' frames (never the file's audio)."""
        if self._beat_network is None or self.params.beat_context_seconds <= 0:
            for index, start_s, wave in clips:
                yield index, start_s, self.analyze(wave)
            return
        run: list[tuple[int, float, _ClipSignals]] = []
        before: _ClipSignals | None = None  # the clip just before the run, for context
        for index, start_s, wave, lead, tail in _with_edges(clips, self._sr, _EDGE_FRAMES * self._hop):
            sig = self._signals(wave, lead, tail)
            if run and lead is None:  # a gap (or an overlap) before this clip: the run ends there
                yield from self._finish_run(run, before, None)
                run, before = [], None
            elif len(run) == _CONTEXT_RUN:
                yield from self._finish_run(run, before, sig)
                run, before = [], run[-1][2]
            run.append((index, start_s, sig))
        if run:
            yield from self._finish_run(run, before, None)

    def _finish_run(
        self, run: list[tuple[int, float, _ClipSignals]], before: _ClipSignals | None, after: _ClipSignals | None
    ) -> Iterator[tuple[int, float, ClipFeatures]]:
        if len(run) == 1 and before is None and after is None:  # no neighbour: tracked exactly as `analyze` does
            index, start_s, sig = run[0]
            yield index, start_s, self._analyze_signals(sig)
            return

        def span(sig: _ClipSignals) -> tuple[np.ndarray, int]:
            return sig.frames, round(sig.duration * FPS)

        tracked = track_in_context(
            self._beat_network,
            self._beat_hmm,
            [span(sig) for _, _, sig in run],
            None if before is None else span(before),
            None if after is None else span(after),
            self.params.beat_context_seconds,
        )
        for (index, start_s, sig), (beats, activation) in zip(run, tracked):
            if sig.silent:
                yield index, start_s, ClipFeatures(is_silent=True, loudness_lufs=sig.loudness)
            else:
                yield index, start_s, self._finish(sig, beats, None, activation)

    def _finish(
        self, sig: _ClipSignals, tracked_beats: np.ndarray, confidence: float | None, activation: np.ndarray | None
    ) -> ClipFeatures:
        """A non-silent clip's features from its signals and the tracker's beats (seconds from the clip's start)."""
        p, duration = self.params, sig.duration
        key_pcp, chroma, times, low = sig.key_pcp, sig.chroma, sig.times, sig.low
        # no tonal peaks (25-3500 Hz) in a clip that is not silent: no key claim (KeyExtractor would name one anyway)
        key, scale, strength = self._vote(key_pcp) if key_pcp is not None else (None, None, None)
        beats = self._settle_beats(sig, tracked_beats, activation)
        boundaries = np.unique(np.concatenate([[0.0], beats, [duration]]))
        seg_chroma = beat_sync(chroma, times, boundaries)
        if p.chord_method == "essentia" and len(beats) >= 2:
            hpcp_a = np.roll(chroma, 3, axis=1).astype(np.float32)  # back to essentia's A-based bins
            labels_es, _ = self._chords_essentia(self._es.array(hpcp_a), self._es.array(beats.astype(np.float32)))
            bounds = np.asarray(beats)
            labels = [to_harte(lab) for lab in labels_es][: len(bounds) - 1]
            chords = merge_segments(bounds[: len(labels) + 1], labels)
        else:
            labels = viterbi_chords(seg_chroma, self_transition=p.chord_self_transition)
            chords = merge_segments(boundaries, labels)

        evidence = None
        if len(beats) >= 4 and p.downbeat_evidence == "network":
            evidence = network_evidence(activation[:, 1], beats)
            downbeats, meter = bar_phase(beats, evidence, p.meters, dict(p.meter_bias))
            time_signature = f"{meter}/4"
        elif len(beats) >= 4 and p.downbeat_evidence in ("weighted", "learned"):
            evidence = self._downbeat_evidence(sig, beats, activation)
            downbeats, meter = bar_phase(beats, evidence, p.meters, dict(p.meter_bias))
            time_signature = f"{meter}/4"
        elif len(beats) >= 4:
            # Downbeat evidence per beat: chroma of the beat interval starting there, low-band energy at it.
            beat_bounds = np.concatenate([beats, [duration]])
            chroma_per_beat = beat_sync(chroma, times, beat_bounds)
            low_frame = np.searchsorted(times, beats).clip(0, max(len(low) - 1, 0))
            bass_per_beat = np.log1p(low[low_frame]) if len(low) else np.zeros(len(beats))
            extra = []
            if p.downbeat_evidence == "onsets_chords" and len(low):
                # low-band onset: rise of log energy into the beat's frame (a kick or a new bass note)
                log_low = np.log1p(low)
                prev = (low_frame - 1).clip(0, None)
                extra.append(np.maximum(log_low[low_frame] - log_low[prev], 0.0))
                # chord-label change at the beat (harmonic rhythm follows the bar)
                beat_labels = viterbi_chords(chroma_per_beat, self_transition=p.chord_self_transition)
                changes = np.array([float(a != b) for a, b in zip(beat_labels[1:], beat_labels[:-1])])
                extra.append(np.r_[changes.mean() if len(changes) else 0.0, changes])  # beat 0: no evidence
            downbeats, meter = estimate_downbeats(
                beats, chroma_per_beat, bass_per_beat, p.meters, extra, dict(p.meter_bias)
            )
            time_signature = f"{meter}/4"
        else:
            downbeats, time_signature = beats[:1], None

        tempo = tempo_from_beats(beats)
        if confidence is None or self.params.rhythm_method != "multifeature":
            # degara reports no confidence; use beat regularity (1 - CV of intervals) scaled to essentia's 0-5.3
            ibi = np.diff(beats)
            confidence = float(5.32 * max(0.0, 1.0 - ibi.std() / ibi.mean())) if len(ibi) > 1 else 0.0
        return ClipFeatures(
            is_silent=False,
            tempo_bpm=tempo,
            tempo_confidence=float(confidence),
            beats_s=[float(b) for b in beats],
            downbeats_s=[float(b) for b in downbeats],
            time_signature=time_signature,
            key=key,
            mode=scale,
            key_strength=None if strength is None else float(strength),
            chords=chords,
            loudness_lufs=sig.loudness,
            key_pcp=key_pcp,
            beat_evidence=evidence,
        )


def _with_edges(
    clips: Iterable[tuple[int, float, np.ndarray]], sr: int, edge: int
) -> Iterator[tuple[int, float, np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """(index, start_s, wave, lead, tail): each clip with the last `edge` samples of the clip before it and the
    first `edge` of the clip after it, where they are back to back (None where a gap or an overlap separates them,
    where either is shorter than `edge`, or at the file's ends). Holds one clip back to see the next."""
    held, lead = None, None
    for index, start_s, wave in clips:
        if held is not None:
            back_to_back = abs(held[1] + len(held[2]) / sr - start_s) < 1.5 / sr
            follows = back_to_back and min(len(held[2]), len(wave)) >= edge
            yield (*held, lead, wave[:edge].copy() if follows else None)
            lead = held[2][-edge:].copy() if follows else None
        held = (index, start_s, wave)
    if held is not None:
        yield (*held, lead, None)


def track_in_context(
    net: BeatNetwork,
    hmm: BeatHMM,
    clips: list[tuple[np.ndarray, int]],
    before: tuple[np.ndarray, int] | None,
    after: tuple[np.ndarray, int] | None,
    context_s: float,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(beats in seconds from the clip's start, the network's (beat, downbeat) activation over the clip) of
    back-to-back clips, from each clip's (spectral frames, frames it spans): the frames of `before`, `clips` and
    `after` are joined into one stretch for the network, and each clip's beats are decoded from its activation plus
    `context_s` of the activation on either side, then cut to the clip."""
    segments = ([before] if before is not None else []) + list(clips) + ([after] if after is not None else [])
    # a clip's frames run one past its end (the frame centred there is the next clip's first): cut to its span
    activation = net.activations(np.concatenate([frames[:n] for frames, n in segments]))
    offsets = np.cumsum([0] + [n for _, n in segments])
    first = 1 if before is not None else 0
    reach = int(round(context_s * FPS))
    tracked = []
    for k, (_, n) in enumerate(clips):
        start = int(offsets[first + k])
        lo, hi = max(0, start - reach), min(len(activation), start + n + reach)
        beats = hmm.decode(activation[lo:hi, 0]) + (lo - start) / FPS
        tracked.append((beats[(beats >= 0) & (beats < n / FPS)], activation[start : start + n]))
    return tracked


@dataclass
class _ClipSignals:
    """What analysis reads from a clip's audio (`ClipAnalyzer._signals`): the rest works from these alone."""

    duration: float
    loudness: float | None
    silent: bool
    key_pcp: np.ndarray | None = None
    chroma: np.ndarray | None = None  # HPCP frames (C-based), their centre times, low-band energy per frame
    times: np.ndarray | None = None
    low: np.ndarray | None = None
    env: dict | None = None  # onset envelopes (`onset_envelopes`)
    frames: np.ndarray | None = None  # the beat network's input frames
    essentia_beats: np.ndarray | None = None  # beat_tracker essentia: its beats and confidence
    essentia_confidence: float | None = None


def network_evidence(downbeat_activation: np.ndarray, beats: np.ndarray, reach: int = 3) -> np.ndarray:
    """Per beat: log-odds of the network's downbeat activation at its peak within `reach` frames of the beat (the
    HMM's beat frame and the downbeat peak can differ by a frame or two)."""
    frames = np.round(np.asarray(beats) * FPS).astype(int)
    n = len(downbeat_activation)
    peak = np.array([downbeat_activation[max(0, f - reach) : min(n, f + reach + 1)].max(initial=0.0) for f in frames])
    peak = np.clip(peak, 1e-4, 1 - 1e-4)
    return np.log(peak / (1 - peak))


def _z(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, float)
    return (x - x.mean()) / (x.std() + 1e-9)
