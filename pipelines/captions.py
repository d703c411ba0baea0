"""MusicBench-style captions: a base description plus 0-4 control sentences about tempo, key, chords, beats.

Every sentence is also returned on its own (the clips table keeps one column per kind) so that captions can be
recomposed at training time. Choices come from an RNG seeded by (seed, clip_id): a re-run, or the same clip in
another order or on another worker, gets the same caption.
"""

from __future__ import annotations

import hashlib
import json
import random

import fsspec

from pipelines.chords import to_symbol

# MusicBench's Italian tempo terms, upper bin edges in bpm.
TEMPO_TERMS = [
    (40, "Grave"),
    (60, "Largo"),
    (70, "Adagio"),
    (90, "Andante"),
    (110, "Moderato"),
    (140, "Allegro"),
    (160, "Vivace"),
    (210, "Presto"),
    (float("inf"), "Prestissimo"),
]

NEUTRAL_BASE = "A music clip."

_TEMPO_NUMERIC = [
    "The bpm is {bpm}.",
    "The tempo of this song is {bpm} beats per minute.",
    "This song goes at {bpm} beats per minute.",
]
_TEMPO_TERM = ["This song is in {term}.", "The tempo of this song is {term}.", "This piece moves at a {term} pace."]
_KEY = [
    "This song is in the key of {key} {mode}.",
    "The key of this song is {key} {mode}.",
    "The song is played in the key of {key} {mode}.",
]
_CHORDS = [
    "The chord progression in this song is {chords}.",
    "The chord sequence is {chords}.",
    "This song follows the chords {chords}.",
]
_BEATS = ["The time signature is {ts}.", "The beat counts to {count}.", "This song is in {ts} time."]


def tempo_term(bpm: float) -> str:
    return next(term for edge, term in TEMPO_TERMS if bpm < edge)


def clip_rng(seed: int, clip_id: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def chord_progression(chords: list[dict], max_chords: int = 8) -> list[str]:
    """Lead-sheet symbols of the chord segments, repeats collapsed, N dropped."""
    out: list[str] = []
    for seg in chords:
        sym = to_symbol(seg["label"])
        if sym in ("N", "X"):
            continue
        if not out or out[-1] != sym:
            out.append(sym)
    return out[:max_chords]


def control_sentences(features, rng: random.Random) -> dict[str, str | None]:
    """One candidate sentence per control (None where the feature is unknown, e.g. silence)."""
    s: dict[str, str | None] = {
        "caption_tempo": None,
        "caption_key": None,
        "caption_chords": None,
        "caption_beats": None,
    }
    if features.tempo_bpm:
        bpm = int(round(features.tempo_bpm))
        if rng.random() < 0.5:
            s["caption_tempo"] = rng.choice(_TEMPO_NUMERIC).format(bpm=bpm)
        else:
            s["caption_tempo"] = rng.choice(_TEMPO_TERM).format(term=tempo_term(features.tempo_bpm))
    if features.key:
        s["caption_key"] = rng.choice(_KEY).format(key=features.key, mode=features.mode)
    progression = chord_progression(features.chords)
    if progression:
        s["caption_chords"] = rng.choice(_CHORDS).format(chords=", ".join(progression))
    if features.time_signature:
        s["caption_beats"] = rng.choice(_BEATS).format(
            ts=features.time_signature, count=features.time_signature.split("/")[0]
        )
    return s


def compose_caption(
    base: str, sentences: dict[str, str | None], rng: random.Random, count_probs=(0.15, 0.25, 0.30, 0.20, 0.10)
) -> str:
    """Base description + k control sentences in random order, k drawn as in MusicBench."""
    available = [v for v in sentences.values() if v]
    k = rng.choices(range(len(count_probs)), weights=count_probs)[0]
    chosen = rng.sample(available, min(k, len(available)))
    return " ".join([base.strip()] + chosen).strip()


def read_sidecar(audio_path: str) -> dict:
    """`<audio>.json` (keys: description/caption, traits, split_group, ...) or `<audio>.txt` next to a file."""
    stem = audio_path.rsplit(".", 1)[0]
    for ext in (".json", ".txt"):
        for candidate in (audio_path + ext, stem + ext):
            try:
                with fsspec.open(candidate, "r", encoding="utf-8") as f:
                    text = f.read()
            except (FileNotFoundError, IsADirectoryError):
                continue
            if ext == ".txt":
                return {"description": text.strip()}
            try:
                meta = json.loads(text)
            except json.JSONDecodeError:
                return {}
            return meta if isinstance(meta, dict) else {}
    return {}


def base_description(sidecar: dict) -> str:
    for key in ("description", "caption", "text"):
        value = sidecar.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return NEUTRAL_BASE
