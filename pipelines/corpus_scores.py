"""Symbolic side of the ground-truth corpus: which scores exist, and what a score says (notes, metre, key, chords).

Everything here is in quarter lengths (ql) from the start of the score; `pipelines.corpus` turns ql into seconds
once a tempo is chosen. music21 is only touched in `load_score` (worker side); the rest is plain numpy.

Sources (what music21 really ships, checked offline):
- `bach_chorales`: the 371 four-part chorales of `music21.corpus.chorales` (the Coconet data). Chords come from a
  harmonic analysis of the voices (see `analyse_chords`).
- `nottingham`: music21 ships only 2 tunes of the Nottingham database (`nottingham-dataset/reelsa-c.abc`); their
  ABC chord symbols are used directly (`pipelines.chords.to_harte`).
- `essen`: ~10k monophonic folk songs of the Essen collection (ABC). They carry no chords, so the corpus
  harmonises each bar with a diatonic triad (`harmonise_melody`); the rendered pad/bass/piano play exactly those
  chords, so the labels are what sounds.
- `user`: any folder of MIDI / MusicXML / ABC (`corpus.scores_dir`). Chord symbols are used where present, else
  analysis (polyphonic) or harmonisation (monophonic).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass, field

import numpy as np

from core.score_io import at_sounding_pitch
from pipelines.chords import PITCH_CLASSES, ChordLabelError, pitch_class, to_harte

SCORE_EXTENSIONS = (".mid", ".midi", ".xml", ".musicxml", ".mxl", ".abc", ".krn")
EPS = 1e-6
FOLK_METRES = ("2/4", "3/4", "4/4", "6/8")


@dataclass(frozen=True)
class PieceRef:
    """One score to render: a file (and a tune number inside an ABC opus)."""

    corpus: str
    path: str
    number: int | None = None

    @property
    def piece_id(self) -> str:
        base = os.path.splitext(os.path.basename(self.path))[0]
        if self.corpus == "user":
            # a short hash of the full path keeps ids unique across sub-folders
            base = f"{base}-{hashlib.sha256(self.path.encode()).hexdigest()[:6]}"
        pid = f"{self.corpus}-{base}" + (f"-{self.number}" if self.number is not None else "")
        return re.sub(r"[^A-Za-z0-9._-]+", "_", pid)


@dataclass
class ScoreNote:
    start: float  # ql
    end: float
    pitch: int  # MIDI
    velocity: int = 80


@dataclass
class Score:
    """What the renderer and the labels need from a score, in quarter lengths."""

    piece_id: str
    corpus: str
    title: str
    voices: list[list[ScoreNote]]
    beats: np.ndarray  # ql of every beat
    downbeats: np.ndarray  # ql of every bar start (pickup bars have none)
    beat_ql: float  # beat unit (1.0 = quarter, 1.5 = dotted quarter)
    time_signature: str
    beats_per_bar: int
    end: float  # ql where the music ends
    chord_symbols: list[tuple[float, str]] = field(default_factory=list)  # (ql, figure) from the score
    declared_key: tuple[int, str] | None = None  # (tonic pc, mode) declared by the source, if trustworthy
    final_pitch: int | None = None  # last melody note of the whole piece (folk tunes end on the tonic)
    signature_key: tuple[int, str] | None = None  # the source's key field (ABC `K:`) when it is not trusted as is

    @property
    def polyphonic(self) -> bool:
        """Two or more voices, or one voice (a MIDI track) that mostly plays chords."""
        voices = [v for v in self.voices if v]
        if len(voices) >= 2:
            return True
        starts = [round(n.start, 4) for v in voices for n in v]
        return bool(starts) and (len(starts) - len(set(starts))) >= 0.2 * len(starts)


# ----------------------------------------------------------------------------------------------------------
# Listing (driver side, cheap: no score is parsed)


def _music21_corpus_dir() -> str:
    import music21

    return os.path.join(os.path.dirname(music21.__file__), "corpus")


def _abc_tunes(path: str) -> list[tuple[int, str]]:
    """(X: number, M: metre) of every tune in an ABC file, read as text (fast: nothing is parsed)."""
    with open(path, encoding="latin-1") as f:
        text = f.read()
    out = []
    for block in re.split(r"^(?=X:)", text, flags=re.M):
        m = re.match(r"X:\s*(\d+)", block)
        if not m:
            continue
        metre = re.search(r"^M:\s*(\S+)", block, flags=re.M)
        out.append((int(m.group(1)), metre.group(1) if metre else ""))
    return out


def _abc_numbers(path: str) -> list[int]:
    return [n for n, _ in _abc_tunes(path)]


def list_corpus(name: str, scores_dir: str | None = None) -> list[PieceRef]:
    """All pieces of one named source, in a stable order."""
    root = _music21_corpus_dir()
    if name == "bach_chorales":
        from music21 import corpus

        names = sorted(set(corpus.chorales.Iterator(returnType="filename")))
        refs = []
        for n in names:
            base = os.path.join(root, n)
            for ext in (".mxl", ".xml", ".krn"):
                if os.path.exists(base + ext):
                    refs.append(PieceRef("bach_chorales", base + ext))
                    break
        return refs
    if name == "nottingham":
        folder = os.path.join(root, "nottingham-dataset")
        return [
            PieceRef("nottingham", os.path.join(folder, f), n)
            for f in sorted(os.listdir(folder))
            if f.endswith(".abc")
            for n in _abc_numbers(os.path.join(folder, f))
        ]
    if name == "essen":
        folder = os.path.join(root, "essenFolksong")
        # Only the common metres: a 4/2 or 3/2 bar (8 beats) is not a metre a downbeat tracker is asked for.
        return [
            PieceRef("essen", os.path.join(folder, f), n)
            for f in sorted(os.listdir(folder))
            if f.endswith(".abc") and not f.startswith("test")
            for n, metre in _abc_tunes(os.path.join(folder, f))
            if metre in FOLK_METRES
        ]
    if name == "user":
        if not scores_dir:
            return []
        refs = []
        for dirpath, _, files in sorted(os.walk(scores_dir)):
            for f in sorted(files):
                p = os.path.join(dirpath, f)
                if f.lower().endswith(".abc"):
                    numbers = _abc_numbers(p)
                    refs += [PieceRef("user", p, n) for n in numbers] if len(numbers) > 1 else [PieceRef("user", p)]
                elif f.lower().endswith(SCORE_EXTENSIONS):
                    refs.append(PieceRef("user", p))
        return refs
    from pipelines.errors import PipelineUserError

    raise PipelineUserError(f"unknown corpus {name!r} (known: bach_chorales, nottingham, essen, user)")


# ----------------------------------------------------------------------------------------------------------
# Parsing (worker side)


def beat_unit(numerator: int, denominator: int) -> float:
    """The counted beat, in ql: dotted quarter in compound x/8, else the quarter (x/2 and x/4) or the eighth."""
    if denominator == 8 and numerator % 3 == 0 and numerator > 3:
        return 1.5
    if denominator == 8:
        return 0.5
    return 1.0


def metric_grid(measures: list[tuple[float, float, float, int, int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Beats and downbeats (ql) from measures (offset, content length, padding_left, ts num, ts den, bar length).

    A short first measure, or one marked with left padding, is a pickup (anacrusis): its beats are the *last*
    beats of a bar and it has no downbeat. A short measure that completes the previous short one (the end of a
    repeated section followed by the next section's pickup) is a pickup too. Any other short measure is a bar cut
    short at its end (final bars): it keeps its downbeat.
    """
    beats: list[float] = []
    downbeats: list[float] = []
    prev_short_left = None  # content length of the previous measure when it was a left-aligned short bar
    for i, (offset, length, pad_left, num, den, bar) in enumerate(measures):
        step = beat_unit(num, den)
        n_beats = max(1, int(round(bar / step)))
        full = length >= bar - EPS
        pickup = not full and (
            pad_left > EPS or i == 0 or (prev_short_left is not None and abs(prev_short_left + length - bar) < EPS)
        )
        if pickup:
            phase = bar - length
            beats += [offset + k * step - phase for k in range(n_beats) if k * step >= phase - EPS]
            prev_short_left = None
        else:
            downbeats.append(offset)
            count = n_beats if full else int(np.ceil(length / step - EPS))
            extra = int(np.ceil((length - bar) / step - EPS)) if length > bar + EPS else 0  # overfull measures
            beats += [offset + k * step for k in range(count + extra)]
            prev_short_left = None if full else length
    return np.asarray(beats, float), np.asarray(downbeats, float)


def _parse(ref: PieceRef):
    from music21 import converter, corpus

    if ref.number is not None:
        return (
            corpus.parse(ref.path, number=ref.number)
            if ref.corpus != "user"
            else converter.parse(ref.path, number=ref.number)
        )
    return converter.parse(ref.path)


def load_score(ref: PieceRef) -> Score:
    """Parse a score into notes per voice, the metric grid, chord symbols and the declared key."""
    from music21 import harmony, meter, stream
    from music21 import key as m21key

    s = _parse(ref)
    if isinstance(s, stream.Opus):
        s = s.scores[0]
    s = at_sounding_pitch(s)
    parts = list(s.parts) if s.hasPartLikeStreams() else [s]
    title = (s.metadata.title if s.metadata and s.metadata.title else "") or ref.piece_id

    # metric grid from the first part that has measures
    ts_first = None
    measures = []
    for part in parts:
        ms = list(part.getElementsByClass(stream.Measure))
        if not ms:
            continue
        current = None
        for m in ms:
            ts = m.timeSignature or current
            if ts is None:
                found = m.getContextByClass(meter.TimeSignature)
                ts = found or meter.TimeSignature("4/4")
            current = ts
            ts_first = ts_first or ts
            measures.append(
                (
                    float(m.offset),
                    float(m.duration.quarterLength),
                    float(m.paddingLeft or 0.0),
                    int(ts.numerator),
                    int(ts.denominator),
                    float(ts.barDuration.quarterLength),
                )
            )
        break
    if not measures:
        raise ValueError("score has no measures / time signature")
    beats, downbeats = metric_grid(measures)

    voices, symbols = [], []
    last = (-1.0, None)
    for part in parts:
        flat = part.stripTies().flatten()
        notes = []
        for el in flat.notes:
            if isinstance(el, harmony.Harmony):
                continue
            start, dur = float(el.offset), float(el.duration.quarterLength)
            if dur <= EPS:
                continue  # grace notes
            for p in el.pitches:
                notes.append(ScoreNote(start, start + dur, int(p.midi), int(el.volume.velocity or 80)))
            if start >= last[0]:
                last = (start, int(min(p.midi for p in el.pitches)) if len(parts) > 1 else int(el.pitches[-1].midi))
        if notes:
            voices.append(sorted(notes, key=lambda n: (n.start, n.pitch)))
        for cs in flat.getElementsByClass(harmony.ChordSymbol):
            symbols.append((float(cs.offset), str(cs.figure)))
    if not voices:
        raise ValueError("score has no notes")
    end = max(n.end for v in voices for n in v)
    beats = beats[beats < end - EPS]
    downbeats = downbeats[downbeats < end - EPS]
    if len(beats) < 4:
        raise ValueError("score too short (fewer than 4 beats)")

    declared = signature = None
    keys = list(parts[0].recurse().getElementsByClass(m21key.Key))
    if keys:
        k = keys[0]
        k_key = (k.tonic.pitchClass, "minor" if k.mode in ("minor", "dorian", "phrygian", "aeolian") else "major")
        if ref.corpus in ("nottingham",):
            declared = k_key
        else:
            signature = k_key
    num, den = int(ts_first.numerator), int(ts_first.denominator)
    step = beat_unit(num, den)
    return Score(
        piece_id=ref.piece_id,
        corpus=ref.corpus,
        title=str(title),
        voices=voices,
        beats=beats,
        downbeats=downbeats,
        beat_ql=step,
        time_signature=f"{num}/{den}",
        beats_per_bar=max(1, int(round(float(ts_first.barDuration.quarterLength) / step))),
        end=end,
        chord_symbols=sorted(symbols),
        declared_key=declared,
        final_pitch=last[1],
        signature_key=signature,
    )


# ----------------------------------------------------------------------------------------------------------
# Key: four published key profiles over duration-weighted pitch classes


@functools.lru_cache(maxsize=1)
def _key_profiles() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(major, minor) weights of Krumhansl-Kessler, Aarden-Essen, Bellman-Budge and Temperley-Kostka-Payne, as
    music21 ships them. Krumhansl-Kessler alone leans to the dominant: on 100 rendered chorale openings it
    disagreed with the majority of the four in 16 and named the majority key's dominant in 14 of those, e.g. G
    minor for a C-minor opening with no F# and B naturals (BWV 136.6). Scale membership and leading tones side
    with the majority there, so the reference is the four profiles' consensus."""
    from music21.analysis import discrete

    out = []
    for cls in (discrete.KrumhanslKessler, discrete.AardenEssen, discrete.BellmanBudge, discrete.TemperleyKostkaPayne):
        solver = cls()
        out.append((np.asarray(solver.getWeights("major"), float), np.asarray(solver.getWeights("minor"), float)))
    return tuple(out)


def pc_histogram(score: Score, start: float = 0.0, end: float | None = None) -> np.ndarray:
    end = score.end if end is None else end
    h = np.zeros(12)
    for v in score.voices:
        for n in v:
            overlap = min(n.end, end) - max(n.start, start)
            if overlap > 0:
                h[n.pitch % 12] += overlap
    return h


def key_correlations(hist: np.ndarray) -> np.ndarray:
    """(24,) Pearson correlation with the 12 major then 12 minor rotations of each profile, averaged over the
    four profiles (its argmax is the profiles' majority key on every chorale opening checked)."""
    out = np.zeros(24)
    if hist.sum() <= 0:
        return out
    profiles = _key_profiles()
    for major, minor in profiles:
        for t in range(12):
            out[t] += np.corrcoef(hist, np.roll(major, t))[0, 1]
            out[12 + t] += np.corrcoef(hist, np.roll(minor, t))[0, 1]
    return out / len(profiles)


def score_key(score: Score, end: float | None = None) -> tuple[int, str]:
    """(tonic pc, mode) of the score up to `end`.

    Declared keys (ABC `K:` with a mode, as in the Nottingham tunes) win. Otherwise the profiles' consensus over
    the rendered span decides between relatives only when the key is clear; folk melodies (monophonic) take their
    tonic from the final note (folk tunes mostly end on it, modal ones too; the third above it decides the mode),
    except where the final is the third or fifth of the key the source's `K:` field names: such a tune is in that
    key and ends on a tone of its tonic triad (a third of the Essen tunes end on degree 3 or 5; calling "K: D ...
    ending on A" A major labelled, and harmonised, the tune in its dominant).
    """
    if score.declared_key is not None:
        return score.declared_key
    corr = key_correlations(pc_histogram(score, 0.0, end))
    best = int(np.argmax(corr))
    tonic, mode = best % 12, ("major" if best < 12 else "minor")
    if not score.polyphonic and score.final_pitch is not None:
        hist = pc_histogram(score, 0.0, end)
        final = score.final_pitch % 12
        if score.signature_key is not None:
            sig_tonic, sig_mode = score.signature_key
            third = 4 if sig_mode == "major" else 3
            if (final - sig_tonic) % 12 in (third, 7):
                final = sig_tonic
        return final, ("major" if hist[(final + 4) % 12] >= hist[(final + 3) % 12] else "minor")
    return tonic, mode


def key_segments(score: Score, end: float, window_bars: int = 4) -> list[tuple[float, float, int, str]]:
    """Local keys: the profiles' consensus over a sliding window of bars; a change is kept only where it lasts two
    windows or more. The global key (`score_key`) is the reference for evaluation; these segments note modulations."""
    bars = [d for d in score.downbeats if d < end]
    glob = score_key(score, end)
    if not score.polyphonic:
        # A monophonic tune is rendered over a harmonisation built diatonically in the global key (and its
        # key comes from the final note): what sounds is that key throughout. Profiles on a few bars of a bare
        # melody mostly finds the dominant or the relative, which would be label noise, not a modulation.
        return [(0.0, end, *glob)]
    if len(bars) < window_bars + 2:
        return [(0.0, end, *glob)]
    bar_len = float(np.median(np.diff(bars)))
    local = []
    for b in bars:
        h = pc_histogram(score, b - bar_len * (window_bars / 2), b + bar_len * (window_bars / 2))
        c = key_correlations(h)
        i = int(np.argmax(c))
        # the global key keeps a bar unless another key is clearly better
        g = glob[0] + (0 if glob[1] == "major" else 12)
        local.append(g if c[g] >= c[i] - 0.1 else i)
    segs: list[list] = []
    for b, k in zip(bars, local):
        if segs and segs[-1][2] == k:
            continue
        segs.append([b, None, k])
    # drop one-window blips (merge into the previous segment)
    out: list[list] = []
    for i, s in enumerate(segs):
        nxt = segs[i + 1][0] if i + 1 < len(segs) else end
        if out and nxt - s[0] < 2 * bar_len:
            continue
        if out and out[-1][2] == s[2]:
            continue
        out.append(s)
    out[0][0] = 0.0
    result = []
    for i, s in enumerate(out):
        stop = out[i + 1][0] if i + 1 < len(out) else end
        result.append((float(s[0]), float(stop), s[2] % 12, "major" if s[2] < 12 else "minor"))
    return result


def key_name(tonic: int) -> str:
    return PITCH_CLASSES[tonic % 12]


# ----------------------------------------------------------------------------------------------------------
# Chords (Harte labels over ql segments)

_QUALITIES = {"maj": (0, 4, 7), "min": (0, 3, 7), "dim": (0, 3, 6), "aug": (0, 4, 8)}


def symbol_chords(score: Score, end: float) -> list[tuple[float, float, str]]:
    """Chord symbols of the score as segments: each lasts until the next symbol (or the end)."""
    out = []
    syms = [(t, f) for t, f in score.chord_symbols if t < end]
    for i, (t, fig) in enumerate(syms):
        stop = syms[i + 1][0] if i + 1 < len(syms) else end
        try:
            label = to_harte(fig)
        except ChordLabelError:
            label = "X"
        if stop > t + EPS:
            out.append((t, stop, label))
    if out and out[0][0] > EPS:
        out.insert(0, (0.0, out[0][0], "N"))
    return out


def _best_chord(weights: np.ndarray, bass_pc: int | None) -> str:
    """Best (root, quality) template for pitch-class weights: chord-tone weight minus half the rest, a small
    bonus when the lowest note is the root; a minor seventh above a major triad makes it a dominant 7th."""
    total = weights.sum()
    if total <= EPS:
        return "N"
    best, label = -np.inf, "N"
    for root in range(12):
        for quality, ivs in _QUALITIES.items():
            tones = [(root + i) % 12 for i in ivs]
            inside = weights[tones].sum()
            score = inside - 0.5 * (total - inside)
            score += 0.15 * total if bass_pc == root else 0.0
            score -= 0.05 * total if quality in ("dim", "aug") else 0.0  # rarer: need clearer evidence
            score -= 0.5 * total * (weights[root] <= EPS)  # a chord needs its root
            if score > best + EPS:
                best, label = score, f"{PITCH_CLASSES[root]}:{quality}"
    root = pitch_class(label.split(":")[0])
    if label.endswith(":maj") and weights[(root + 10) % 12] >= 0.12 * total:
        label = label[:-3] + "7"
    return label


def analyse_chords(score: Score, end: float) -> list[tuple[float, float, str]]:
    """Harmonic analysis of a polyphonic score, beat by beat (music21 `chordify` in spirit, done on our note
    list): the pitch classes sounding in each beat, weighted by how long they sound, bass note (lowest pitch at
    the beat's start) emphasised, matched to maj/min/dim/aug triad templates (+ dominant 7th); equal neighbours
    merged. Passing tones shorter than the beat weigh little; a beat with no notes is `N`."""
    bounds = [b for b in score.beats if b < end] + [end]
    labels = []
    notes = [n for v in score.voices for n in v]
    for a, b in zip(bounds[:-1], bounds[1:]):
        w = np.zeros(12)
        bass = None
        for n in notes:
            overlap = min(n.end, b) - max(n.start, a)
            if overlap > EPS:
                w[n.pitch % 12] += overlap
                if n.start <= a + EPS and (bass is None or n.pitch < bass):
                    bass = n.pitch
        if bass is None:  # nothing starts at the beat: lowest sounding note
            sounding = [n.pitch for n in notes if min(n.end, b) - max(n.start, a) > EPS]
            bass = min(sounding) if sounding else None
        labels.append(_best_chord(w, None if bass is None else bass % 12))
    return merge_ql(bounds, labels)


def harmonise_melody(score: Score, end: float, tonic: int, mode: str) -> list[tuple[float, float, str]]:
    """One diatonic triad per bar for a monophonic tune (half bars in 4-beat metres): melody notes that are chord
    tones count by duration (twice on beats), with a prior toward I/IV/V; the last bar is the tonic. The pickup
    has no chord (`N`)."""
    if mode == "major":
        degrees = [
            (0, "maj", 0.30),
            (5, "maj", 0.20),
            (7, "maj", 0.25),
            (9, "min", 0.10),
            (2, "min", 0.08),
            (4, "min", 0.04),
        ]
    else:
        degrees = [
            (0, "min", 0.30),
            (5, "min", 0.20),
            (7, "maj", 0.25),
            (8, "maj", 0.10),
            (3, "maj", 0.10),
            (10, "maj", 0.06),
        ]
    downs = [d for d in score.downbeats if d < end]
    if not downs:
        downs = [0.0]
    bounds = []
    for i, d in enumerate(downs):
        nxt = downs[i + 1] if i + 1 < len(downs) else end
        bounds.append(d)
        if score.beats_per_bar == 4 and nxt - d > 2 * score.beat_ql + EPS:
            bounds.append(d + 2 * score.beat_ql)
    bounds.append(end)
    beat_set = set(np.round(score.beats, 4))
    melody = [n for v in score.voices for n in v]
    labels = []
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        w = np.zeros(12)
        for n in melody:
            overlap = min(n.end, b) - max(n.start, a)
            if overlap > EPS:
                w[n.pitch % 12] += overlap * (2.0 if round(n.start, 4) in beat_set else 1.0)
        if j == len(bounds) - 2 or w.sum() <= EPS:
            choice = (0, "maj" if mode == "major" else "min")
        else:
            best, choice = -np.inf, None
            for deg, quality, prior in degrees:
                root = (tonic + deg) % 12
                tones = [(root + i) % 12 for i in _QUALITIES[quality]]
                s = (w[tones].sum() - 0.7 * (w.sum() - w[tones].sum())) / w.sum() + prior
                if s > best:
                    best, choice = s, (deg, quality)
        labels.append(f"{PITCH_CLASSES[(tonic + choice[0]) % 12]}:{choice[1]}")
    segs = merge_ql(bounds, labels)
    if downs[0] > EPS:
        segs.insert(0, (0.0, downs[0], "N"))
    return segs


def merge_ql(bounds: list[float], labels: list[str]) -> list[tuple[float, float, str]]:
    out: list[list] = []
    for a, b, lab in zip(bounds[:-1], bounds[1:], labels):
        if out and out[-1][2] == lab:
            out[-1][1] = b
        else:
            out.append([a, b, lab])
    return [(float(a), float(b), lab) for a, b, lab in out]


def transpose_label(label: str, semitones: int) -> str:
    if label in ("N", "X") or ":" not in label:
        return label
    root, rest = label.split(":", 1)
    return f"{PITCH_CLASSES[(pitch_class(root) + semitones) % 12]}:{rest}"


def chord_pcs(label: str) -> tuple[int, list[int]] | None:
    """(root pc, chord-tone pcs) of a Harte label, for the accompaniment; None for N/X."""
    if label in ("N", "X") or ":" not in label:
        return None
    root_name, rest = label.split(":", 1)
    quality = rest.split("/")[0].split("(")[0]
    root = pitch_class(root_name)
    ivs = {
        "maj": (0, 4, 7),
        "min": (0, 3, 7),
        "dim": (0, 3, 6),
        "aug": (0, 4, 8),
        "7": (0, 4, 7, 10),
        "maj7": (0, 4, 7, 11),
        "min7": (0, 3, 7, 10),
        "dim7": (0, 3, 6, 9),
        "hdim7": (0, 3, 6, 10),
        "maj6": (0, 4, 7, 9),
        "min6": (0, 3, 7, 9),
        "9": (0, 4, 7, 10),
        "sus4": (0, 5, 7),
        "sus2": (0, 2, 7),
        "sus4(b7)": (0, 5, 7, 10),
    }.get(quality, (0, 4, 7))
    return root, [(root + i) % 12 for i in ivs]
