"""Coconet from the registry: harmonize a melody, rewrite bars of a score, compose from nothing. Thin: read the
input (core.score_io), mark which cells are given (models.coconet.given_cells), resolve the model by alias
(`champion` unless told otherwise), fill (models.coconet.fill), write MIDI + MusicXML + WAV + piano-roll PNG.

    from generation.coconet import CoconetSession
    session = CoconetSession()                      # models:/smitin-coconet@champion
    result = session.harmonize("tune.mid", out="chorale.mid")
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.score_io import (
    FRAMES_PER_QUARTER,
    SILENT,
    ScoreError,
    read_voices,
    voices_to_roll,
    write_midi,
    write_musicxml,
    write_piano_roll,
    write_wav,
)

VOICE_LETTERS = "SATB"
MAX_FRAMES = 16 * 64  # 64 bars of 4/4: a chorale is 10-40; longer requests are refused, not ground through
MAX_SEED = 2**63 - 1


class CoconetRequestError(UserError):
    """A harmonize / infill / compose request that cannot be served."""


@dataclass
class CoconetResult:
    roll: np.ndarray
    given: np.ndarray
    files: dict[str, Path] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def parse_voices(text: str) -> list[int]:
    """'ATB' -> [1, 2, 3]."""
    letters = text.strip().upper()
    if not letters or any(c not in VOICE_LETTERS for c in letters) or len(set(letters)) != len(letters):
        raise CoconetRequestError(f"--voices {text!r}: give distinct letters of S, A, T, B (e.g. ATB)")
    return sorted(VOICE_LETTERS.index(c) for c in letters)


def parse_bars(text: str) -> tuple[int, int]:
    """'3-5' -> (3, 5), '4' -> (4, 4); bars count from 1."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text or "")
    if not m:
        raise CoconetRequestError(f"--bars {text!r}: expected a bar or a range of bars, e.g. 3-5")
    first, last = int(m[1]), int(m[2] or m[1])
    if first < 1 or last < first:
        raise CoconetRequestError(f"--bars {text!r}: bars count from 1 and a range must not run backwards")
    return first, last


def frames_per_bar(time_signature: str | None) -> int:
    if not time_signature:
        return 4 * FRAMES_PER_QUARTER
    m = re.fullmatch(r"(\d+)/(\d+)", time_signature)
    if not m or int(m[2]) not in (1, 2, 4, 8, 16) or int(m[1]) < 1:
        raise CoconetRequestError(f"time signature {time_signature!r} is not like 4/4 or 6/8")
    return int(m[1]) * FRAMES_PER_QUARTER * 4 // int(m[2])


def check_seed(seed) -> int:
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise CoconetRequestError(f"seed {seed!r} is not a whole number") from None
    if not 0 <= seed <= MAX_SEED:
        raise CoconetRequestError(f"seed {seed} is outside 0..2^63-1")
    return seed


# median pitch of each voice (S, A, T, B) in the JSB Chorales training split
VOICE_CENTERS = (71, 65, 59, 50)


def fit_melody(melody: np.ndarray, lo: int, hi: int, center: int = VOICE_CENTERS[0]) -> tuple[np.ndarray, int]:
    """The melody as written when it lies within [lo, hi]; otherwise moved by the whole octaves that bring its
    median nearest `center` (the median of the voice it goes to) while fitting. An error when it spans more than
    the range."""
    sounding = melody[melody >= 0]
    if not sounding.size:
        raise CoconetRequestError("the melody has no notes")
    if sounding.min() >= lo and sounding.max() <= hi:
        return melody, 0
    if sounding.max() - sounding.min() > hi - lo:
        raise CoconetRequestError(
            f"the melody spans {int(sounding.min())}..{int(sounding.max())}, wider than the model's range {lo}..{hi}"
        )
    fits = [12 * k for k in range(-10, 11) if sounding.min() + 12 * k >= lo and sounding.max() + 12 * k <= hi]
    if not fits:
        raise CoconetRequestError(
            f"the melody {int(sounding.min())}..{int(sounding.max())} cannot be moved by "
            f"octaves into the model's range {lo}..{hi}; transpose it first"
        )
    median = float(np.median(sounding))
    shift = min(fits, key=lambda s: (abs(median + s - center), abs(s)))
    return np.where(melody >= 0, melody + shift, melody), shift


class CoconetSession:
    """A Coconet resolved from the registry (or a local folder) and loaded once."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        params: str | Path | None = "params.yaml",
        tracking_uri: str | None = None,
        alias: str = "champion",
        registry=None,
    ):
        from core.config import load_section
        from models.coconet import load_coconet
        from models.coconet_eval import SamplingParams
        from registry.loading import fetch

        self.sampling = (
            load_section(SamplingParams, params, "coconet_sampling")
            if params and Path(params).exists()
            else SamplingParams()
        )
        t0 = time.perf_counter()
        uri = str(model) if model else None
        reg = registry
        if uri is None or uri.startswith("models:/"):
            if reg is None:
                from registry.store import Registry, Settings

                reg = Registry(
                    Settings.load(params if params and Path(params).exists() else None, tracking_uri=tracking_uri)
                )
            uri = uri or f"models:/{reg.settings.coconet_name}@{alias}"
        self.ref = fetch(reg if uri.startswith("models:/") else None, uri)
        if self.ref.kind != "coconet":
            raise CoconetRequestError(f"{uri} is a {self.ref.kind.replace('_', ' ')}, not a Coconet model")
        self.model, self.meta = load_coconet(self.ref.path)
        self.cfg = self.model.cfg
        self.load_seconds = time.perf_counter() - t0

    def label(self) -> str:
        return self.ref.label()

    # ------------------------------------------------------------------ tasks
    def harmonize(
        self, melody: str | np.ndarray, *, voices: str = "ATB", out: str | Path | None = None, **kw
    ) -> CoconetResult:
        """Write `voices` around a one-voice melody (a score file or a pitch array on the 16th grid); the melody
        takes the one voice not listed."""
        write = parse_voices(voices)
        if len(write) != self.cfg.n_voices - 1:
            raise CoconetRequestError(
                f"--voices {voices!r}: name three of S, A, T, B to write; the melody takes the fourth"
            )
        melody_voice = next(v for v in range(self.cfg.n_voices) if v not in write)
        title, ts, key = "Harmonization", None, None
        if isinstance(melody, (str, Path)):
            parts = read_voices(str(melody))
            if len(parts.parts) != 1:
                raise CoconetRequestError(
                    f"{melody} has {len(parts.parts)} voices with notes "
                    f"({', '.join(parts.names)}); give a melody of one voice"
                )
            line = parts.parts[0].astype(np.int64)
            title, ts, key = (parts.title or Path(str(melody)).stem), parts.time_signature, parts.key
        else:
            line = np.asarray(melody, dtype=np.int64)
            if line.ndim != 1:
                raise CoconetRequestError("a melody array must be one voice: [frames]")
        line, shift = fit_melody(line, self.cfg.min_pitch, self.cfg.max_pitch, VOICE_CENTERS[melody_voice])
        roll = np.full((self.cfg.n_voices, len(line)), SILENT, np.int64)
        roll[melody_voice] = line
        from models.coconet import given_cells

        given = given_cells(self.cfg.n_voices, len(line), write)
        info = {"task": "harmonize", "melody_voice": VOICE_LETTERS[melody_voice], "transposed": shift}
        return self._run(roll, given, out, title, ts, key, info, **kw)

    def infill(
        self,
        score: str | np.ndarray,
        *,
        bars: str,
        voices: str = "SATB",
        out: str | Path | None = None,
        time_signature: str | None = None,
        **kw,
    ) -> CoconetResult:
        """Rewrite `voices` over `bars` of a four-voice score; every other cell is kept exactly."""
        write = parse_voices(voices)
        title, key = "Infill", None
        if isinstance(score, (str, Path)):
            parts = read_voices(str(score))
            try:
                roll = voices_to_roll(parts, self.cfg.n_voices, where=str(score))
            except ScoreError as e:
                raise CoconetRequestError(str(e)) from None
            time_signature = time_signature or parts.time_signature
            title, key = parts.title or Path(str(score)).stem, parts.key
        else:
            roll = np.asarray(score, dtype=np.int64)
        per_bar = frames_per_bar(time_signature)
        first, last = parse_bars(bars)
        n_bars = -(-roll.shape[1] // per_bar)
        if last > n_bars:
            raise CoconetRequestError(f"--bars {bars}: the score has {n_bars} bars of {time_signature or '4/4'}")
        self._check_range(roll)
        from models.coconet import given_cells

        given = given_cells(self.cfg.n_voices, roll.shape[1], write, (first - 1) * per_bar, last * per_bar)
        info = {"task": "infill", "bars": [first, last], "voices": "".join(VOICE_LETTERS[v] for v in write)}
        return self._run(roll, given, out, title, time_signature, key, info, **kw)

    def compose(
        self, *, bars: int = 8, out: str | Path | None = None, time_signature: str = "4/4", **kw
    ) -> CoconetResult:
        """Four voices from nothing."""
        if not isinstance(bars, int) or bars < 1:
            raise CoconetRequestError(f"--bars must be a positive whole number, got {bars!r}")
        frames = bars * frames_per_bar(time_signature)
        roll = np.full((self.cfg.n_voices, frames), SILENT, np.int64)
        from models.coconet import given_cells

        given = given_cells(self.cfg.n_voices, frames, range(self.cfg.n_voices))
        return self._run(roll, given, out, "Chorale", time_signature, None, {"task": "compose", "bars": bars}, **kw)

    # ------------------------------------------------------------------ shared
    def _check_range(self, roll: np.ndarray) -> None:
        sounding = roll[roll >= 0]
        if not sounding.size:
            raise CoconetRequestError("the score has no notes")
        if sounding.min() < self.cfg.min_pitch or sounding.max() > self.cfg.max_pitch:
            raise CoconetRequestError(
                f"the score reaches {int(sounding.min())}..{int(sounding.max())}, outside the "
                f"model's range {self.cfg.min_pitch}..{self.cfg.max_pitch}; transpose it first"
            )

    def _run(
        self,
        roll,
        given,
        out,
        title,
        time_signature,
        key,
        info,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        temperature: float | None = None,
        repair: bool | None = None,
        seed: int = 0,
        qpm: float = 80.0,
        progress: Callable[[int, int], None] | None = None,
        write_audio: bool = True,
    ) -> CoconetResult:
        from models.coconet import fill

        if roll.shape[1] > MAX_FRAMES:
            raise CoconetRequestError(
                f"{roll.shape[1] // 16} bars is longer than the {MAX_FRAMES // 16} bars one request may be"
            )
        if steps is not None and not 1 <= int(steps) <= 100_000:
            raise CoconetRequestError(f"--steps must be 1..100000, got {steps}")
        if temperature is not None and not (0 <= float(temperature) <= 10):
            raise CoconetRequestError(f"--temperature must be 0..10, got {temperature}")
        if not (10 <= float(qpm) <= 400):
            raise CoconetRequestError(f"--qpm must be 10..400, got {qpm}")
        seed = check_seed(seed)
        paths = output_paths(out) if out else {}
        n_free = int((~given).sum())
        try:
            s = self.sampling.make(sampler, n_free, steps=steps, temperature=temperature, repair=repair)
        except ValueError as e:
            raise CoconetRequestError(str(e)) from None
        t0 = time.perf_counter()
        written = fill(self.model, roll, given, s, seed=seed, progress=progress)
        seconds = time.perf_counter() - t0
        info = {
            **info,
            "model": self.label(),
            "sampler": s.name,
            "steps": getattr(s, "steps", n_free),
            "temperature": s.temperature,
            "seed": seed,
            "free_cells": n_free,
            "parallels_repaired": sum(r["parallels_before"] - r["parallels_after"] for r in getattr(s, "reports", [])),
            "frames": int(roll.shape[1]),
            "seconds": round(seconds, 3),
        }
        result = CoconetResult(written, given, info=info)
        if paths:
            result.files = write_outputs(
                written,
                given,
                paths,
                title=title,
                time_signature=time_signature or "4/4",
                key=key,
                qpm=qpm,
                audio=write_audio,
            )
        return result


def output_paths(out: str | Path) -> dict[str, Path]:
    """OUT.mid, OUT.musicxml, OUT.wav, OUT.png from any of those names (checked writable before any work)."""
    from core.files import check_output_path

    out = Path(out)
    if out.is_dir():  # a folder: the files go inside it, under the task's name
        out = out / "coconet"
    stem = out.with_suffix("") if out.suffix.lower() in (".mid", ".midi", ".musicxml", ".xml", ".wav", ".png") else out
    paths = {
        "midi": stem.with_suffix(".mid"),
        "musicxml": stem.with_suffix(".musicxml"),
        "wav": stem.with_suffix(".wav"),
        "png": stem.with_suffix(".png"),
    }
    for p in paths.values():
        check_output_path(p, "--out")
    return paths


def write_outputs(
    roll,
    given,
    paths: dict[str, Path],
    *,
    title: str,
    time_signature: str,
    key: str | None,
    qpm: float,
    audio: bool = True,
) -> dict[str, Path]:
    out = {
        "midi": write_midi(roll, paths["midi"], qpm=qpm),
        "musicxml": write_musicxml(roll, paths["musicxml"], title=title, time_signature=time_signature, key=key),
        "png": write_piano_roll(roll, paths["png"], given=given, title=title),
    }
    if audio:
        out["wav"] = write_wav(roll, paths["wav"], qpm=qpm)
    return out


def stderr_progress(label: str) -> Callable[[int, int], None]:
    from generation.progress import Progress

    return Progress(label)
