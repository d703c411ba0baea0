"""Chord labels and beat-synchronous chord recognition.

The one chord-label converter of the project: everything that leaves this module is Harte syntax
(`A:min`, `F#:maj`, `G:7/3`, `N`), which is what mir_eval scores.
"""

from __future__ import annotations

import re

import numpy as np

PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_PC_OF = {
    "C": 0,
    "B#": 0,
    "C#": 1,
    "Db": 1,
    "D": 2,
    "D#": 3,
    "Eb": 3,
    "E": 4,
    "Fb": 4,
    "E#": 5,
    "F": 5,
    "F#": 6,
    "Gb": 6,
    "G": 7,
    "G#": 8,
    "Ab": 8,
    "A": 9,
    "A#": 10,
    "Bb": 10,
    "B": 11,
    "Cb": 11,
}

# Common chord-symbol suffixes (essentia, lead sheets, music21 figures) -> Harte shorthand.
_SUFFIX_TO_HARTE = {
    "": "maj",
    "M": "maj",
    "maj": "maj",
    "major": "maj",
    "m": "min",
    "min": "min",
    "minor": "min",
    "-": "min",
    "7": "7",
    "dom7": "7",
    "maj7": "maj7",
    "M7": "maj7",
    "m7": "min7",
    "min7": "min7",
    "-7": "min7",
    "dim": "dim",
    "o": "dim",
    "dim7": "dim7",
    "o7": "dim7",
    "m7b5": "hdim7",
    "ø7": "hdim7",
    "hdim7": "hdim7",
    "aug": "aug",
    "+": "aug",
    "6": "maj6",
    "maj6": "maj6",
    "m6": "min6",
    "min6": "min6",
    "9": "9",
    "maj9": "maj9",
    "m9": "min9",
    "min9": "min9",
    "sus4": "sus4",
    "sus": "sus4",
    "sus2": "sus2",
    "7sus4": "sus4(b7)",
}
# The bass after "/" may carry lead-sheet decorations we ignore (Nottingham writes e.g. "D/f+").
_SYMBOL = re.compile(r"^([A-Ga-g])([#b♯♭]*)(.*?)(?:/([A-Ga-g][#b♯♭]*)[+\-]?)?$")


class ChordLabelError(ValueError):
    pass


def pitch_class(name: str) -> int:
    name = name.replace("♯", "#").replace("♭", "b")
    name = name[0].upper() + name[1:]
    if name in _PC_OF:
        return _PC_OF[name]
    # multiple accidentals (e.g. "Cbb"): count them
    base = _PC_OF[name[0]]
    return (base + name.count("#") - name.count("b")) % 12


def to_harte(symbol: str) -> str:
    """A chord symbol (`Am`, `F#`, `Bb7`, `C/E`, `N`, or already Harte) as a Harte label."""
    s = symbol.strip()
    if s in ("", "N", "N.C.", "NC", "X"):
        return "N" if s != "X" else "X"
    if ":" in s:  # already Harte; normalise the root spelling only
        root, rest = s.split(":", 1)
        return f"{PITCH_CLASSES[pitch_class(root)]}:{rest}"
    m = _SYMBOL.match(s)
    if not m:
        raise ChordLabelError(f"cannot read chord symbol {symbol!r}")
    root, acc, suffix, bass = m.groups()
    quality = _SUFFIX_TO_HARTE.get(suffix)
    if quality is None:
        raise ChordLabelError(f"unknown chord quality {suffix!r} in {symbol!r}")
    rpc = pitch_class(root + acc)
    label = f"{PITCH_CLASSES[rpc]}:{quality}"
    if bass:
        # a trailing "+" on the bass is the Nottingham database's sharp ("D/f+" = D/F#, a descending bass line)
        sharp = 1 if s.endswith("+") else 0
        interval = (pitch_class(bass) + sharp - rpc) % 12
        label += "/" + _INTERVAL_DEGREE[interval]
    return label


_INTERVAL_DEGREE = {
    0: "1",
    1: "b2",
    2: "2",
    3: "b3",
    4: "3",
    5: "4",
    6: "b5",
    7: "5",
    8: "b6",
    9: "6",
    10: "b7",
    11: "7",
}


def to_symbol(harte: str) -> str:
    """Harte `A:min` -> lead-sheet `Am` (for captions)."""
    if harte in ("N", "X"):
        return harte
    root, _, rest = harte.partition(":")
    quality = rest.split("/")[0] or "maj"
    short = {"maj": "", "min": "m", "7": "7", "maj7": "maj7", "min7": "m7", "dim": "dim", "aug": "aug"}
    return root + short.get(quality, quality)


# ---------------------------------------------------------------------------------------------------------
# Recognition: 24 major/minor triads + N, beat-synchronous chroma, Viterbi smoothing.

TRIAD_LABELS = [f"{PITCH_CLASSES[r]}:maj" for r in range(12)] + [f"{PITCH_CLASSES[r]}:min" for r in range(12)]


def _templates() -> np.ndarray:
    t = np.zeros((24, 12))
    for r in range(12):
        t[r, [r, (r + 4) % 12, (r + 7) % 12]] = 1.0
        t[12 + r, [r, (r + 3) % 12, (r + 7) % 12]] = 1.0
    return t / np.linalg.norm(t, axis=1, keepdims=True)


_TEMPLATES = _templates()


def beat_sync(frames: np.ndarray, frame_times: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Median of chroma frames (n, 12) inside each [boundaries[i], boundaries[i+1]) segment."""
    out = np.zeros((len(boundaries) - 1, frames.shape[1]))
    for i, (a, b) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        sel = (frame_times >= a) & (frame_times < b)
        if sel.any():
            out[i] = np.median(frames[sel], axis=0)
        elif len(frame_times):
            out[i] = frames[np.argmin(np.abs(frame_times - (a + b) / 2))]
    return out


def viterbi_chords(
    chroma: np.ndarray, self_transition: float = 0.5, sharpness: float = 12.0, no_chord_energy: float = 0.05
) -> list[str]:
    """Most likely triad (or N) per segment of beat-synchronous chroma (n, 12), C-based.

    Emissions are a softmax over cosine similarity with the triad templates; the transition matrix stays on
    the same chord with `self_transition` and spreads the rest evenly, which removes one-beat flickers that
    a frame-wise argmax produces at passing notes.
    """
    n = len(chroma)
    if n == 0:
        return []
    energy = chroma.sum(axis=1)
    norm = chroma / np.maximum(np.linalg.norm(chroma, axis=1, keepdims=True), 1e-9)
    sim = norm @ _TEMPLATES.T  # (n, 24)
    # N state: similarity is a constant that wins only when nothing is sounding.
    quiet = energy < no_chord_energy * max(energy.max(), 1e-9)
    sim_n = np.where(quiet, 1.0, 0.0)[:, None]
    scores = np.concatenate([sim, sim_n], axis=1) * sharpness
    log_emit = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    s = 25
    log_trans = np.full((s, s), np.log((1 - self_transition) / (s - 1)))
    np.fill_diagonal(log_trans, np.log(self_transition))
    delta = log_emit[0] - np.log(s)
    back = np.zeros((n, s), dtype=np.int64)
    for t in range(1, n):
        cand = delta[:, None] + log_trans
        back[t] = cand.argmax(axis=0)
        delta = cand.max(axis=0) + log_emit[t]
    path = [int(delta.argmax())]
    for t in range(n - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    path.reverse()
    return [TRIAD_LABELS[p] if p < 24 else "N" for p in path]


def merge_segments(boundaries: np.ndarray, labels: list[str]) -> list[dict]:
    """Consecutive equal labels -> [{start_s, end_s, label}]."""
    segments: list[dict] = []
    for a, b, label in zip(boundaries[:-1], boundaries[1:], labels):
        if segments and segments[-1]["label"] == label:
            segments[-1]["end_s"] = float(b)
        else:
            segments.append({"start_s": float(a), "end_s": float(b), "label": label})
    return segments
