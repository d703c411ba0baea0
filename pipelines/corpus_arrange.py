"""Seeded arrangement of a score: instruments per voice, tempo, transposition, and the accompaniment stems
(drum kit locked to the score's beats, bass, piano; a pad under monophonic tunes).

Everything is MIDI-like events in quarter lengths (ql); `pipelines.corpus` renders them. A variant is a pure
function of (score, params, rng), so the same seed gives the same arrangement on any worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from core.synth import DRUM_CHANNEL
from pipelines.corpus_scores import EPS, Score, chord_pcs, transpose_label

if TYPE_CHECKING:
    from pipelines.corpus import CorpusParams

KICK, SNARE, SIDESTICK, CLOSED_HAT, PEDAL_HAT, OPEN_HAT, RIDE, CRASH = 36, 38, 37, 42, 44, 46, 51, 49
TOMS = (50, 47, 45, 43)

# A plain word per General-MIDI program, for the base description ("for strings and organ").
PROGRAM_WORDS = {
    16: "organ",
    17: "organ",
    19: "organ",
    20: "organ",
    21: "accordion",
    22: "harmonica",
    23: "accordion",
    24: "guitar",
    25: "guitar",
    40: "violin",
    41: "viola",
    42: "cello",
    43: "double bass",
    46: "harp",
    48: "strings",
    49: "strings",
    50: "strings",
    52: "choir",
    53: "choir",
    56: "trumpet",
    57: "trombone",
    58: "tuba",
    60: "horn",
    61: "brass",
    64: "saxophone",
    65: "saxophone",
    66: "saxophone",
    68: "oboe",
    69: "english horn",
    70: "bassoon",
    71: "clarinet",
    72: "piccolo",
    73: "flute",
    74: "recorder",
    75: "pan flute",
    79: "ocarina",
    88: "synth pad",
    89: "synth pad",
    105: "banjo",
    109: "bagpipe",
    110: "fiddle",
}
FORMS = {"bach_chorales": "chorale", "nottingham": "folk tune", "essen": "folk song", "user": "piece"}


@dataclass(frozen=True)
class Event:
    start: float  # ql
    end: float
    channel: int
    pitch: int
    velocity: int


@dataclass
class Stem:
    name: str  # score | drums | bass | piano
    programs: dict[int, int]  # channel -> GM program (drums: channel 9 -> kit 0)
    events: list[Event] = field(default_factory=list)


@dataclass
class Arrangement:
    variant: int
    bpm: float
    transpose: int
    stems: dict[str, Stem]
    gains_db: dict[str, float]
    base_traits: frozenset[str]  # the mixture the trait pairs are built around
    styles: dict[str, str]

    def instruments(self, stem: str) -> list[str]:
        return [program_word(p) for p in self.stems[stem].programs.values()]


def program_word(program: int) -> str:
    if program in PROGRAM_WORDS:
        return PROGRAM_WORDS[program]
    import pretty_midi

    return pretty_midi.program_to_instrument_name(program).lower()


def join_words(words: list[str]) -> str:
    words = list(dict.fromkeys(words))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def describe(corpus: str, score_words: list[str], traits: list[str]) -> str:
    """'A chorale for strings and organ with drums and bass.'"""
    text = f"A {FORMS.get(corpus, 'piece')} for {join_words(score_words)}"
    if traits:
        text += f" with {join_words(traits)}"
    return text + "."


# ----------------------------------------------------------------------------------------------------------


def _place(pc: int, low: int) -> int:
    """The pitch of class `pc` at or above `low` (within an octave)."""
    return low + (pc - low) % 12


def _voicing(pcs: list[int], low: int) -> list[int]:
    """Close position above `low`, root first."""
    out, floor = [], low
    for pc in pcs:
        p = _place(pc, floor)
        out.append(p)
        floor = p + 1
    return out


def _chord_at(chords: list[tuple[float, float, str]], t: float) -> tuple[float, float, str] | None:
    for seg in chords:
        if seg[0] <= t + EPS < seg[1]:
            return seg
    return None


def score_events(score: Score, cut: float, transpose: int, programs: list[int]) -> tuple[list[Event], dict]:
    events, chans = [], {}
    channels = [c for c in range(16) if c != DRUM_CHANNEL]
    for i, voice in enumerate(score.voices[: len(channels) - 3]):  # 3 channels stay free for pad/bass/piano
        ch = channels[i]
        chans[ch] = programs[i % len(programs)]
        for n in voice:
            if n.start >= cut - EPS:
                continue
            pitch = n.pitch + transpose
            if 0 <= pitch < 128:
                events.append(Event(n.start, min(n.end, cut), ch, pitch, int(np.clip(n.velocity, 50, 110))))
    return events, chans


def pad_events(chords, channel: int, rng) -> list[Event]:
    low = int(rng.integers(52, 57))
    out = []
    for a, b, label in chords:
        info = chord_pcs(label)
        if info is None:
            continue
        for p in _voicing(info[1][:3], low):
            out.append(Event(a, b, channel, p, 62))
    return out


def bass_events(chords, beats, downbeats, channel: int, style: str, rng) -> list[Event]:
    """Root (and fifth) in the bass register at chord changes and downbeats, by `style`."""
    low = int(rng.integers(33, 38))
    downs = set(np.round(downbeats, 4))
    beats = list(beats)
    out = []
    for i, t in enumerate(beats):
        seg = _chord_at(chords, t)
        if seg is None or chord_pcs(seg[2]) is None:
            continue
        root = chord_pcs(seg[2])[0]
        change = abs(seg[0] - t) < EPS
        nxt = beats[i + 1] if i + 1 < len(beats) else seg[1]
        on_down = round(t, 4) in downs
        if style == "whole" and not (on_down or change):
            continue
        pitch = _place(root, low)
        if style == "root_fifth" and not (on_down or change):
            pitch = _place((root + 7) % 12, low) if (i % 2) else pitch
        end = min(seg[1], nxt) if style != "whole" else seg[1]
        if style == "whole":
            # hold until the next downbeat or chord change
            later = [b for b in beats[i + 1 :] if round(b, 4) in downs or _chord_at(chords, b) is not seg]
            end = min(later[0], seg[1]) if later else seg[1]
        vel = int(rng.integers(88, 108)) if on_down else int(rng.integers(72, 92))
        out.append(Event(t, max(t + 0.1, end - 0.05), channel, pitch, vel))
    return out


def piano_events(chords, beats, downbeats, beat_ql: float, channel: int, style: str, rng) -> list[Event]:
    low = int(rng.integers(55, 61))
    downs = set(np.round(downbeats, 4))
    beats = list(beats)
    out = []
    for i, t in enumerate(beats):
        seg = _chord_at(chords, t)
        if seg is None or chord_pcs(seg[2]) is None:
            continue
        pcs = chord_pcs(seg[2])[1]
        notes = _voicing(pcs, low)
        nxt = min(beats[i + 1] if i + 1 < len(beats) else seg[1], seg[1])
        on_down = round(t, 4) in downs
        change = abs(seg[0] - t) < EPS
        vel = int(rng.integers(62, 80)) + (8 if on_down else 0)
        if style == "block_beats":
            out += [Event(t, nxt - 0.05, channel, p, vel) for p in notes]
        elif style == "block_bars":
            if on_down or change:
                later = [b for b in beats[i + 1 :] if round(b, 4) in downs or _chord_at(chords, b) is not seg]
                end = min(later[0], seg[1]) if later else seg[1]
                out += [Event(t, end - 0.05, channel, p, vel) for p in notes]
                out.append(Event(t, end - 0.05, channel, notes[0] - 12, vel))
        elif style == "offbeat":
            half = t + beat_ql / 2
            if half < nxt - EPS:
                out += [Event(half, nxt - 0.02, channel, p, vel - 6) for p in notes]
            if on_down:
                out.append(Event(t, nxt, channel, notes[0] - 12, vel))
        else:  # arpeggio: the chord tones in eighths (thirds of the beat in compound metre)
            sub = 3 if abs(beat_ql - 1.5) < EPS else 2
            step = (nxt - t) / sub
            for k in range(sub):
                p = notes[(i * sub + k) % len(notes)]
                out.append(Event(t + k * step, t + (k + 1) * step, channel, p, vel - 4 * k))
    return out


def drum_events(score: Score, cut: float, rng) -> tuple[list[Event], str]:
    """A kit part on the score's own beat grid: kick on the downbeat, backbeat snare, hats or ride on the
    subdivisions; a per-variant pattern style plus per-bar mutations (ghost notes, extra kicks, fills, crashes)
    so that no single pattern identifies the trait."""
    beats = score.beats[score.beats < cut - EPS]
    downbeats = score.downbeats[score.downbeats < cut - EPS]
    n = score.beats_per_bar
    compound = abs(score.beat_ql - 1.5) < EPS
    sub = 3 if compound else int(rng.choice([2, 2, 4]))
    hat = int(rng.choice([CLOSED_HAT, CLOSED_HAT, PEDAL_HAT, RIDE]))
    hat_every = int(rng.choice([1, 1, sub])) if sub > 1 else 1  # hats on every subdivision or only on beats
    style = str(rng.choice(["rock", "halftime", "four_floor", "sparse", "syncopated"]))
    if n == 3 or n == 1:
        style = str(rng.choice(["waltz", "sparse"]))
    events: list[Event] = []

    def hit(t, pitch, vel, length=0.1):
        if t < cut - EPS:
            events.append(Event(t, min(t + length, cut), DRUM_CHANNEL, pitch, int(np.clip(vel, 20, 127))))

    bar_starts = list(downbeats)
    db_set = set(np.round(downbeats, 4))
    beat_list = list(beats)
    bar_index = -1
    for i, t in enumerate(beat_list):
        if round(t, 4) in db_set:
            bar_index += 1
            pos = 0
        elif bar_index < 0:  # pickup: hats only
            hit(t, hat, rng.integers(50, 70))
            continue
        else:
            pos += 1
        nxt = beat_list[i + 1] if i + 1 < len(beat_list) else t + score.beat_ql
        step = (nxt - t) / sub
        # hats / ride
        for k in range(0, sub, hat_every):
            hit(t + k * step, hat, (rng.integers(68, 84) if k == 0 else rng.integers(44, 64)))
        # kick and snare
        if pos == 0:
            if rng.random() < 0.97:
                hit(t, KICK, rng.integers(96, 118))
            if bar_index % 8 == 0 and rng.random() < 0.7:
                hit(t, CRASH, rng.integers(80, 105), 0.5)
        backbeat = {
            "rock": pos % 2 == 1,
            "syncopated": pos % 2 == 1,
            "four_floor": pos % 2 == 1,
            "halftime": n >= 4 and pos == n // 2,
            "sparse": n >= 2 and pos == n - 1 and n % 2 == 0,
            "waltz": pos > 0,
        }[style]
        if n == 2 and style in ("rock", "syncopated", "four_floor", "halftime"):
            backbeat = pos == 1
        if backbeat:
            hit(t, SNARE if rng.random() < 0.9 else SIDESTICK, rng.integers(86, 112))
        if style == "four_floor" and pos > 0:
            hit(t, KICK, rng.integers(84, 100))
        if style == "rock" and n >= 4 and pos == n // 2 and rng.random() < 0.8:
            hit(t, KICK, rng.integers(84, 104))
        if style == "syncopated" and sub >= 2 and pos in (1, n - 2) and rng.random() < 0.6:
            hit(t + step * (sub // 2), KICK, rng.integers(80, 100))
        # per-bar mutations
        if rng.random() < 0.12:
            hit(t + step * int(rng.integers(1, sub)) if sub > 1 else t, SNARE, rng.integers(30, 45))  # ghost
        if rng.random() < 0.06 and sub > 1:
            hit(t + step * int(rng.integers(1, sub)), KICK, rng.integers(70, 90))
        last_beat_of_phrase = pos == n - 1 and bar_index % 4 == 3
        if last_beat_of_phrase and rng.random() < 0.5:
            fill_sub = max(sub, 2)
            for k in range(fill_sub):
                hit(t + k * (nxt - t) / fill_sub, int(rng.choice((SNARE,) + TOMS)), rng.integers(80, 110))
    del bar_starts
    return events, f"{style}/{sub}/{hat}"


def choose_tempo(score: Score, params: CorpusParams, rng) -> float:
    """Beat tempo of a variant (the first draw of the variant's rng: the duration cap depends on it)."""
    compound = abs(score.beat_ql - 1.5) < EPS
    lo, hi = params.compound_tempo_bpm if compound else params.tempo_bpm
    return round(float(rng.uniform(lo, hi)), 1)


def arrange(score: Score, chords_ql, cut: float, variant: int, params: CorpusParams, rng) -> Arrangement:
    """One seeded variant: tempo, transposition, programs, styles, stem gains and the base trait set."""
    bpm = choose_tempo(score, params, rng)
    t_lo, t_hi = params.transpose
    transpose = int(rng.integers(t_lo, t_hi + 1))
    palette = params.voice_programs if score.polyphonic else params.melody_programs
    n_voices = len(score.voices)
    programs = [int(rng.choice(palette)) for _ in range(n_voices)]

    # the accompaniment plays the chords in the variant's key
    chords_ql = [(a, b, transpose_label(lab, transpose)) for a, b, lab in chords_ql]
    stems: dict[str, Stem] = {}
    evs, chans = score_events(score, cut, transpose, programs)
    score_stem = Stem("score", chans, evs)
    used = set(chans)
    free = [c for c in range(16) if c != DRUM_CHANNEL and c not in used]
    if not score.polyphonic:
        pad_ch = free.pop(0)
        pad_prog = int(rng.choice(params.pad_programs))
        score_stem.programs[pad_ch] = pad_prog
        score_stem.events += pad_events(chords_ql, pad_ch, rng)
    stems["score"] = score_stem
    styles = {}
    beats = score.beats[score.beats < cut - EPS]
    downbeats = score.downbeats[score.downbeats < cut - EPS]
    traits = params.traits
    if "drums" in traits:
        evs, styles["drums"] = drum_events(score, cut, rng)
        stems["drums"] = Stem("drums", {DRUM_CHANNEL: 0}, evs)
    if "bass" in traits:
        ch = free.pop(0)
        styles["bass"] = str(rng.choice(["root_beats", "root_fifth", "whole"]))
        stems["bass"] = Stem(
            "bass",
            {ch: int(rng.choice(params.bass_programs))},
            bass_events(chords_ql, beats, downbeats, ch, styles["bass"], rng),
        )
    if "piano" in traits:
        ch = free.pop(0)
        styles["piano"] = str(rng.choice(["block_beats", "block_bars", "offbeat", "arpeggio"]))
        stems["piano"] = Stem(
            "piano",
            {ch: int(rng.choice(params.piano_programs))},
            piano_events(chords_ql, beats, downbeats, score.beat_ql, ch, styles["piano"], rng),
        )
    gains = {"score": 0.0}
    for name in stems:
        if name != "score":
            g_lo, g_hi = params.stem_gain_db[name]
            gains[name] = round(float(rng.uniform(g_lo, g_hi)), 2)
    base = frozenset(t for t in traits if t in stems and rng.random() < 0.5)
    return Arrangement(variant, bpm, transpose, stems, gains, base, styles)


def mixes_of(arr: Arrangement) -> list[frozenset[str]]:
    """The base trait set and its one-stem neighbours: for every trait T the pair (base | T, base - T) exists,
    and the two differ by exactly the T stem. 1 + len(traits) mixtures per variant."""
    traits = [s for s in arr.stems if s != "score"]
    out = [arr.base_traits]
    for t in traits:
        out.append(arr.base_traits ^ {t})
    return out
