"""Symbolic music in and out: score files (MusicXML, MIDI, ABC, Humdrum, or a music21 corpus name) to voices on a
16th-note grid, and a roll of voices back out to MIDI, MusicXML, a rendered WAV and a piano-roll picture.

A roll is an int array [voices, frames]: the MIDI pitch each voice sounds in each 16th-note frame, -1 where it is
silent. A held note and a repeated one look alike in a roll, so writing one out merges equal consecutive frames.
music21 is imported only where a score is parsed or written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import UserError

SILENT = -1
FRAMES_PER_QUARTER = 4
SCORE_EXTENSIONS = (".mid", ".midi", ".xml", ".musicxml", ".mxl", ".abc", ".krn")
MUSIC21_PREFIX = "music21:"
VOICE_NAMES = ("Soprano", "Alto", "Tenor", "Bass")
# General-MIDI programs a chorale is rendered with: choir aahs would blur the voices, strings keep them apart
VOICE_PROGRAMS = (40, 41, 42, 32)  # violin, viola, cello, acoustic bass


class ScoreError(UserError):
    """A score that cannot be turned into voices on the grid (unparsable, chords in a voice, overlaps, no notes)."""


@dataclass
class Voices:
    """The parts of one score as pitch arrays on the 16th-note grid (all the same length)."""

    parts: list[np.ndarray]
    names: list[str]
    title: str = ""
    key: str | None = None
    time_signature: str | None = None
    notes: list[int] = field(default_factory=list)  # notes per part

    @property
    def n_frames(self) -> int:
        return len(self.parts[0]) if self.parts else 0


# ----------------------------------------------------------------------------------------------------- reading
def resolve_music21(name: str) -> str:
    """The file behind a music21 corpus name (`music21:bach/bwv66.6` or `music21:bwv66.6`)."""
    from music21 import corpus

    work = name[len(MUSIC21_PREFIX) :] if name.startswith(MUSIC21_PREFIX) else name
    found = corpus.getWork(work)
    if isinstance(found, list):
        found = found[0] if len(found) == 1 else None
    if not found:
        raise ScoreError(f"music21's corpus has no single work named {work!r}")
    return str(found)


def parse_scores(path: str) -> list:
    """music21 Score objects of a file or music21 corpus name (an ABC or MIDI opus gives several)."""
    from music21 import converter, stream

    source = resolve_music21(path) if path.startswith(MUSIC21_PREFIX) else path
    if not source.startswith(MUSIC21_PREFIX) and not os.path.isfile(source):
        raise ScoreError(f"score file not found: {path}")
    try:
        parsed = converter.parse(source)
    except Exception as e:  # music21 raises many kinds on bad input; any of them means "not a score"
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScoreError(f"{path} cannot be read as a score ({type(e).__name__}: {text[:200]})") from None
    scores = list(parsed.scores) if isinstance(parsed, stream.Opus) else [parsed]
    return [at_sounding_pitch(s) for s in scores]


def at_sounding_pitch(score):
    """The score as it sounds: a part written for a transposing instrument (a clarinet in B-flat, a horn in F)
    is notated at another pitch than it sounds, and reading its written notes would put it in another key.
    music21 transposes only the parts it knows to be written, and applies any transposing ottava marks."""
    score.toSoundingPitch(inPlace=True)
    return score


def _frame(ql: float) -> int:
    return int(round(float(ql) * FRAMES_PER_QUARTER))


def score_voices(score, where: str = "score") -> Voices:
    """Each part of a music21 score as one voice on the grid. A part that sounds two notes at once (a chord, or
    overlapping notes) is an error, as is a score without notes. Grace notes (no duration) are ornaments and are
    left out; onsets and ends are rounded to the nearest 16th, and a note that rounds to nothing is an error."""
    from music21 import chord, harmony, meter, stream
    from music21 import key as m21key

    parts = list(score.parts) if isinstance(score, stream.Score) and score.hasPartLikeStreams() else [score]
    voices, names, counts = [], [], []
    for pi, part in enumerate(parts):
        name = (getattr(part, "partName", None) or f"part {pi + 1}").strip()
        notes = []
        for el in part.stripTies().flatten().notes:
            if isinstance(el, harmony.Harmony):
                continue
            dur = float(el.duration.quarterLength)
            if dur <= 0:
                continue
            start, end = _frame(el.offset), _frame(float(el.offset) + dur)
            beat = float(el.offset) + 1
            if isinstance(el, chord.Chord) and len(el.pitches) > 1:
                raise ScoreError(
                    f"{where}: {name} sounds {len(el.pitches)} notes at once at quarter {beat:g}; "
                    f"each part must be one voice"
                )
            if end <= start:
                raise ScoreError(f"{where}: {name} has a note shorter than a 16th at quarter {beat:g}")
            notes.append((start, end, int(el.pitches[0].midi), beat))
        notes.sort()
        for (_, e0, _, _), (s1, _, _, b1) in zip(notes, notes[1:]):
            if s1 < e0:
                raise ScoreError(
                    f"{where}: {name} has overlapping notes at quarter {b1:g}; each part must be one voice"
                )
        if notes:
            voices.append(notes)
            names.append(name)
            counts.append(len(notes))
    if not voices:
        raise ScoreError(f"{where} has no notes")
    length = max(n[1] for v in voices for n in v)
    parts_out = []
    for v in voices:
        arr = np.full(length, SILENT, np.int16)
        for s, e, p, _ in v:
            arr[s:e] = p
        parts_out.append(arr)
    title = ""
    if getattr(score, "metadata", None) is not None and score.metadata.title:
        title = str(score.metadata.title)
    key_name = None
    keys = list(score.recurse().getElementsByClass(m21key.KeySignature))
    if keys:
        k = keys[0] if isinstance(keys[0], m21key.Key) else keys[0].asKey("major")
        key_name = f"{k.tonic.name.replace('-', 'b')} {k.mode}"
    ts = list(score.recurse().getElementsByClass(meter.TimeSignature))
    return Voices(parts_out, names, title, key_name, ts[0].ratioString if ts else None, counts)


def read_voices(path: str) -> Voices:
    """The voices of the single score in a file (the first of an opus)."""
    return score_voices(parse_scores(path)[0], where=str(path))


def voices_to_roll(voices: Voices, n_voices: int = 4, where: str = "score") -> np.ndarray:
    """[n_voices, frames], parts ordered from the highest (mean sounding pitch) to the lowest: soprano first,
    whatever order the file lists them in (MIDI tracks often come bass first)."""
    if len(voices.parts) != n_voices:
        raise ScoreError(
            f"{where} has {len(voices.parts)} voices with notes ({', '.join(voices.names)}); {n_voices} are needed"
        )
    means = [float(p[p >= 0].mean()) for p in voices.parts]
    order = np.argsort(means)[::-1]
    return np.stack([voices.parts[i] for i in order]).astype(np.int64)


# ----------------------------------------------------------------------------------------------------- writing
def roll_notes(roll: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(voice, start frame, end frame, pitch) of every note: equal consecutive frames of a voice are one note."""
    out = []
    roll = np.asarray(roll)
    for v, line in enumerate(roll):
        t = 0
        while t < len(line):
            if line[t] < 0:
                t += 1
                continue
            e = t + 1
            while e < len(line) and line[e] == line[t]:
                e += 1
            out.append((v, t, e, int(line[t])))
            t = e
    return out


def write_midi(roll: np.ndarray, path: str | Path, qpm: float = 80.0, programs=VOICE_PROGRAMS) -> Path:
    """One instrument per voice, named after it; written to a temporary file and renamed."""
    import pretty_midi

    from core.files import atomic_path

    sec = 60.0 / qpm / FRAMES_PER_QUARTER
    pm = pretty_midi.PrettyMIDI(initial_tempo=qpm)
    insts = []
    for v in range(len(roll)):
        inst = pretty_midi.Instrument(
            program=int(programs[v % len(programs)]), name=VOICE_NAMES[v] if v < len(VOICE_NAMES) else f"Voice {v + 1}"
        )
        insts.append(inst)
        pm.instruments.append(inst)
    for v, s, e, p in roll_notes(roll):
        insts[v].notes.append(pretty_midi.Note(velocity=80, pitch=p, start=s * sec, end=e * sec))
    with atomic_path(path) as tmp:
        pm.write(str(tmp))
    return Path(path)


def write_musicxml(
    roll: np.ndarray, path: str | Path, title: str = "", time_signature: str = "4/4", key: str | None = None
) -> Path:
    """A four-staff score (treble, treble, tenor clef, bass) with ties and bar lines where music21 puts them."""
    from music21 import clef, metadata, meter, note, stream
    from music21 import key as m21key

    from core.files import atomic_path

    clefs = (clef.TrebleClef, clef.TrebleClef, clef.Treble8vbClef, clef.BassClef)
    score = stream.Score()
    score.metadata = metadata.Metadata(title=title or "Chorale")
    roll = np.asarray(roll)
    for v, line in enumerate(roll):
        part = stream.Part()
        part.partName = VOICE_NAMES[v] if v < len(VOICE_NAMES) else f"Voice {v + 1}"
        part.append(clefs[v % len(clefs)]())
        if key:
            tonic, _, mode = key.partition(" ")
            part.append(m21key.Key(tonic.replace("b", "-") if len(tonic) > 1 else tonic, mode or "major"))
        part.append(meter.TimeSignature(time_signature))
        t = 0
        while t < len(line):
            e = t + 1
            while e < len(line) and line[e] == line[t]:
                e += 1
            ql = (e - t) / FRAMES_PER_QUARTER
            el = note.Rest(quarterLength=ql) if line[t] < 0 else note.Note(int(line[t]), quarterLength=ql)
            part.append(el)
            t = e
        score.insert(0, part)
    with atomic_path(path) as tmp:
        score.write("musicxml", fp=str(tmp), makeNotation=True)
    return Path(path)


@dataclass
class _Stem:
    """What `core.synth.synthesize` reads: channel programs and note events in quarter lengths."""

    programs: dict[int, int]
    events: list


@dataclass(frozen=True)
class _Event:
    start: float
    end: float
    channel: int
    pitch: int
    velocity: int


def render_audio(
    roll: np.ndarray,
    qpm: float = 80.0,
    sr: int = 32000,
    soundfont: str | None = None,
    programs=VOICE_PROGRAMS,
    tail_s: float = 1.0,
) -> np.ndarray:
    """Mono float32 audio of a roll through the project's SoundFont renderer (peak-normalised to 0.89)."""
    from core.synth import default_soundfont, synthesize

    sf2 = Path(soundfont or default_soundfont()).read_bytes()
    stem = _Stem(
        {v: int(programs[v % len(programs)]) for v in range(len(roll))},
        [_Event(s / FRAMES_PER_QUARTER, e / FRAMES_PER_QUARTER, v, p, 80) for v, s, e, p in roll_notes(roll)],
    )
    spq = 60.0 / qpm
    n = int(round((np.asarray(roll).shape[1] / FRAMES_PER_QUARTER * spq + tail_s) * sr))
    wave = synthesize(sf2, stem, spq, n, sr)
    peak = float(np.abs(wave).max())
    return (wave * (0.89 / peak) if peak > 0 else wave).astype(np.float32)


def write_wav(
    roll: np.ndarray, path: str | Path, qpm: float = 80.0, sr: int = 32000, soundfont: str | None = None
) -> Path:
    from core.audio import write_wav as write_wave

    return write_wave(path, render_audio(roll, qpm=qpm, sr=sr, soundfont=soundfont), sr)


VOICE_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")


def write_piano_roll(roll: np.ndarray, path: str | Path, given: np.ndarray | None = None, title: str = "") -> Path:
    """A PNG piano roll: one colour per voice; cells the user gave drawn solid with a black edge, cells the model
    wrote drawn lighter, so what was kept and what was written can be told apart at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    from core.files import atomic_path

    roll = np.asarray(roll)
    V, T = roll.shape
    given = np.zeros_like(roll, bool) if given is None else np.asarray(given, bool)
    fig, ax = plt.subplots(figsize=(min(20, 2 + T / 16), 4.5))
    for v, s, e, p in roll_notes(roll):
        kept = bool(given[v, s:e].all())
        ax.add_patch(
            Rectangle(
                (s, p - 0.4),
                e - s,
                0.8,
                facecolor=VOICE_COLORS[v % 4],
                alpha=1.0 if kept else 0.55,
                edgecolor="black" if kept else "none",
                linewidth=0.8,
            )
        )
    sounding = roll[roll >= 0]
    lo, hi = (int(sounding.min()), int(sounding.max())) if sounding.size else (48, 72)
    ax.set_xlim(0, T)
    ax.set_ylim(lo - 2, hi + 2)
    for bar in range(0, T + 1, 16):
        ax.axvline(bar, color="0.85", lw=0.6, zorder=0)
    ax.set_xlabel("16th-note frame (bar lines every 16)")
    ax.set_ylabel("MIDI pitch")
    ax.set_title(title or "piano roll")
    handles = [Patch(color=VOICE_COLORS[v], label=VOICE_NAMES[v]) for v in range(min(V, 4))]
    handles.append(Patch(facecolor="white", edgecolor="black", label="given (kept)"))
    # below the roll, so that no note is hidden behind it
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, ncol=5, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), format="png", dpi=110)
    plt.close(fig)
    return Path(path)
