"""The project's one SoundFont renderer (TinySoundFont, a PyPI wheel): notes in quarter lengths -> mono audio.
The rendered corpus and Coconet's chorales both sound through it."""

from __future__ import annotations

import os

import numpy as np

DRUM_CHANNEL = 9


def default_soundfont() -> str:
    import pretty_midi

    return os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")


def synthesize(sf2_bytes: bytes, stem, seconds_per_ql: float, n_samples: int, sr: int) -> np.ndarray:
    """One stem, mono float32. A fresh synth per stem: nothing rings over from a previous render."""
    import tinysoundfont

    synth = tinysoundfont.Synth(samplerate=sr)
    sfid = synth.sfload(sf2_bytes)
    for ch, program in stem.programs.items():
        if ch == DRUM_CHANNEL:
            synth.program_select(ch, sfid, 128, program, True)
        else:
            synth.program_select(ch, sfid, 0, program)
    timeline = []
    for e in stem.events:
        on = int(round(e.start * seconds_per_ql * sr))
        off = max(on + 1, int(round(e.end * seconds_per_ql * sr)))
        timeline.append((off, 0, e.channel, e.pitch, 0))  # note-offs first at the same sample (repeated notes)
        timeline.append((on, 1, e.channel, e.pitch, e.velocity))
    timeline.sort()
    out = np.zeros((n_samples, 2), np.float32)
    pos = 0
    for sample, kind, ch, pitch, vel in timeline:
        sample = min(sample, n_samples)
        if sample > pos:
            out[pos:sample] = np.frombuffer(synth.generate(sample - pos), np.float32).reshape(-1, 2)
            pos = sample
        if kind:
            synth.noteon(ch, pitch, vel)
        else:
            synth.noteoff(ch, pitch)
    if pos < n_samples:
        out[pos:] = np.frombuffer(synth.generate(n_samples - pos), np.float32).reshape(-1, 2)
    return out.mean(axis=1)
