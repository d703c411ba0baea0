"""Part-writing statistics of a four-voice roll ([soprano, alto, tenor, bass] x 16th-note frames, MIDI pitch,
-1 silent), the measures a harmony teacher marks: parallel fifths and octaves, voice crossings, notes outside the
voices' ranges, and whether each beat sounds a triad or seventh chord. Plain numpy, no model.

Conventions (documented so that generated and Bach's chorales are measured alike):
- a beat is a quarter note (4 frames); JSB encodes no metre, and its chorales are in 4/4 or 3/4;
- motion is read between consecutive *distinct* sonorities (a frame identical to the one before is a held chord);
- a parallel is two voices that both move, in the same direction, from a perfect fifth to a perfect fifth or from
  an octave/unison to an octave/unison (intervals modulo the octave, so compound ones count);
- ranges are the usual SATB ones: soprano C4-G5, alto G3-D5, tenor C3-G4, bass E2-C4;
- a beat's sonority is a triad or seventh chord when its pitch classes are all tones of one such chord and include
  its root and third (an omitted fifth, as Bach often writes, still counts; a bare fifth or octave does not).
"""

from __future__ import annotations

import numpy as np

FRAMES_PER_BEAT = 4
RANGES = ((60, 79), (55, 74), (48, 67), (40, 60))  # S, A, T, B
CHORDS = {  # intervals above the root; index 1 is the third
    "major": (0, 4, 7),
    "minor": (0, 3, 7),
    "diminished": (0, 3, 6),
    "augmented": (0, 4, 8),
    "dominant7": (0, 4, 7, 10),
    "major7": (0, 4, 7, 11),
    "minor7": (0, 3, 7, 10),
    "half-diminished7": (0, 3, 6, 10),
    "diminished7": (0, 3, 6, 9),
}


def _chord_sets() -> list[tuple[frozenset[int], int, int]]:
    out = []
    for root in range(12):
        for iv in CHORDS.values():
            out.append((frozenset((root + i) % 12 for i in iv), root, (root + iv[1]) % 12))
    return out


_CHORD_SETS = _chord_sets()


def is_tertian(pitch_classes: set[int]) -> bool:
    """All of `pitch_classes` belong to one triad or seventh chord that has its root and third among them."""
    pcs = frozenset(pitch_classes)
    if len(pcs) < 2:
        return False
    return any(pcs <= tones and root in pcs and third in pcs for tones, root, third in _CHORD_SETS)


def parallel_motions(roll: np.ndarray) -> list[tuple[int, int, int, int, str]]:
    """Every parallel fifth and octave as (upper voice, lower voice, first frame of the sonority the two voices
    leave, first frame of the sonority they reach, "fifth" | "octave"), in frame order."""
    frames = np.asarray(roll).T
    if len(frames) < 2:
        return []
    keep = np.ones(len(frames), bool)
    keep[1:] = np.any(frames[1:] != frames[:-1], axis=1)
    starts = np.flatnonzero(keep)
    frames = frames[keep]
    found = []
    V = frames.shape[1]
    for a in range(V):
        for b in range(a + 1, V):
            x, y = frames[:, a], frames[:, b]
            prev_x, next_x, prev_y, next_y = x[:-1], x[1:], y[:-1], y[1:]
            sounding = (prev_x >= 0) & (next_x >= 0) & (prev_y >= 0) & (next_y >= 0)
            move_x, move_y = next_x - prev_x, next_y - prev_y
            same_way = (move_x != 0) & (move_y != 0) & (np.sign(move_x) == np.sign(move_y))
            iv_prev, iv_next = np.abs(prev_x - prev_y) % 12, np.abs(next_x - next_y) % 12
            both = sounding & same_way
            for kind, iv in (("fifth", 7), ("octave", 0)):
                for k in np.flatnonzero(both & (iv_prev == iv) & (iv_next == iv)):
                    found.append((a, b, int(starts[k]), int(starts[k + 1]), kind))
    return sorted(found, key=lambda m: (m[3], m[0], m[1]))


def parallels(roll: np.ndarray) -> dict[str, int]:
    """Counts of parallel fifths and octaves between every pair of voices."""
    kinds = [m[4] for m in parallel_motions(roll)]
    return {"fifths": kinds.count("fifth"), "octaves": kinds.count("octave")}


def voice_leading_stats(roll: np.ndarray) -> dict[str, float]:
    """Counts and rates of one four-voice roll; `beats` normalises the per-100-beat rates."""
    roll = np.asarray(roll)
    V, T = roll.shape
    beats = max(1, T // FRAMES_PER_BEAT)
    par = parallels(roll)
    frames = roll.T
    beat_frames = frames[::FRAMES_PER_BEAT]
    crossed = np.zeros(len(beat_frames), bool)
    for upper in range(V - 1):
        hi, lo = beat_frames[:, upper], beat_frames[:, upper + 1]
        crossed |= (hi >= 0) & (lo >= 0) & (lo > hi)
    onsets = np.zeros_like(roll, bool)
    onsets[:, 0] = roll[:, 0] >= 0
    onsets[:, 1:] = (roll[:, 1:] >= 0) & (roll[:, 1:] != roll[:, :-1])
    out_of_range = 0
    for v in range(min(V, len(RANGES))):
        lo, hi = RANGES[v]
        notes = roll[v][onsets[v]]
        out_of_range += int(np.sum((notes < lo) | (notes > hi)))
    tertian = [is_tertian({int(p) % 12 for p in f if p >= 0}) for f in beat_frames]
    return {
        "beats": beats,
        "notes": int(onsets.sum()),
        "parallel_fifths": par["fifths"],
        "parallel_octaves": par["octaves"],
        "crossing_beats": int(crossed.sum()),
        "out_of_range_notes": out_of_range,
        "tertian_beats": int(np.sum(tertian)),
    }


def summarize(stats: list[dict[str, float]]) -> dict[str, float]:
    """Pooled rates over many rolls: parallels and crossings per 100 beats, out-of-range share of notes, share of
    beats that sound a triad or seventh chord."""
    tot = {k: float(sum(s[k] for s in stats)) for k in stats[0]} if stats else {}
    if not tot:
        return {}
    beats = max(tot["beats"], 1.0)
    return {
        "parallels_per_100_beats": 100 * (tot["parallel_fifths"] + tot["parallel_octaves"]) / beats,
        "parallel_fifths_per_100_beats": 100 * tot["parallel_fifths"] / beats,
        "parallel_octaves_per_100_beats": 100 * tot["parallel_octaves"] / beats,
        "crossings_per_100_beats": 100 * tot["crossing_beats"] / beats,
        "out_of_range_share": tot["out_of_range_notes"] / max(tot["notes"], 1.0),
        "tertian_share": tot["tertian_beats"] / beats,
        "beats": int(beats),
    }


def voice_accuracy(generated: np.ndarray, reference: np.ndarray) -> list[float]:
    """Per voice, the share of frames whose pitch equals the reference's."""
    g, r = np.asarray(generated), np.asarray(reference)
    return [float(np.mean(g[v] == r[v])) for v in range(r.shape[0])]
