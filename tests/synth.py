"""Synthetic audio whose musical answer is known: click tracks, chord sequences, cadences."""

from __future__ import annotations

import numpy as np

NOTE = {"C": 0, "C#": 1, "D": 2, "Eb": 3, "E": 4, "F": 5, "F#": 6, "G": 7, "Ab": 8, "A": 9, "Bb": 10, "B": 11}


def _tone(freq: float, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    # a few harmonics with decaying amplitude, like a plucked/organ tone
    return sum((0.6**h) * np.sin(2 * np.pi * freq * (h + 1) * t) for h in range(4))


def click_track(bpm: float, seconds: float, sr: int = 44100, accent_every: int = 4, seed: int = 0) -> np.ndarray:
    """Noise-burst clicks at `bpm`, every `accent_every`-th one louder and with a low thump (a downbeat)."""
    rng = np.random.default_rng(seed)
    x = np.zeros(int(seconds * sr))
    period = 60.0 / bpm
    for i, t in enumerate(np.arange(0.0, seconds, period)):
        n = int(t * sr)
        length = min(2500, len(x) - n)
        env = np.exp(-np.arange(length) / 300)
        amp = 1.0 if i % accent_every == 0 else 0.45
        x[n : n + length] += amp * rng.standard_normal(length) * env
        if i % accent_every == 0:
            x[n : n + length] += 0.8 * np.sin(2 * np.pi * 60 * np.arange(length) / sr) * env
    return (0.7 * x / np.abs(x).max()).astype(np.float32)


def chord_sequence(
    chords: list[tuple[str, str]],
    bpm: float,
    beats_per_chord: int,
    seconds: float,
    sr: int = 44100,
    with_clicks: bool = True,
) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Triads (root, 'maj'|'min') with a bass note, one per `beats_per_chord` beats, looping; returns
    (wave, [(start, end, Harte label)])."""
    x = np.zeros(int(seconds * sr))
    span = beats_per_chord * 60.0 / bpm
    truth = []
    for j, start in enumerate(np.arange(0.0, seconds, span)):
        root, quality = chords[j % len(chords)]
        pcs = [0, 4, 7] if quality == "maj" else [0, 3, 7]
        a, b = int(start * sr), min(int((start + span) * sr), len(x))
        env = np.minimum(1.0, np.arange(b - a) / (0.01 * sr))
        for k in pcs:
            x[a:b] += 0.2 * env * _tone(261.63 * 2 ** ((NOTE[root] + k) / 12), b - a, sr)
        x[a:b] += 0.3 * env * _tone(65.41 * 2 ** (NOTE[root] / 12), b - a, sr)
        truth.append((float(start), float(min(start + span, seconds)), f"{root}:{quality}"))
    if with_clicks:
        x = x / np.abs(x).max() + 0.5 * click_track(bpm, seconds, sr)
    return (0.8 * x / np.abs(x).max()).astype(np.float32), truth


def cadence(key: str, mode: str, seconds: float = 12.0, sr: int = 44100) -> np.ndarray:
    """I-IV-V-I (major) or i-iv-V-i (minor) on `key`, looping: defines the key unambiguously."""
    names = list(NOTE)
    tonic = NOTE[key]
    deg = lambda semis: names[(tonic + semis) % 12]  # noqa: E731
    if mode == "major":
        prog = [(deg(0), "maj"), (deg(5), "maj"), (deg(7), "maj"), (deg(0), "maj")]
    else:
        prog = [(deg(0), "min"), (deg(5), "min"), (deg(7), "maj"), (deg(0), "min")]
    wave, _ = chord_sequence(prog, bpm=100, beats_per_chord=4, seconds=seconds, sr=sr, with_clicks=True)
    return wave
