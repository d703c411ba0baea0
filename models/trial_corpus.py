"""A stop-gap trait-pair corpus for the generator while the rendered ground-truth corpus (issue 3) is not in.

Bach chorales (music21's corpus) played by one GM instrument per piece through pretty_midi's TimGM6mb SoundFont
(tinysoundfont), each rendered twice: with a GM drum kit groove and without it (same `mix_id`, trait `drums`).
Transpositions and tempo variants multiply the data so the generator generalises instead of memorising. Writes a
clips table with the project schema (only the columns the models read are filled), so the codec/tokenize/train
stages read it exactly as they will read `data/clips`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

SR = 32000
# GM programs (0-based) for the harmony; drums use channel 9.
PROGRAMS = {"organ": 19, "piano": 0, "strings": 48, "choir": 52, "brass": 61, "flute": 73, "guitar": 24}
KICK, SNARE, HAT, OPEN_HAT, RIDE, CRASH = 36, 38, 42, 46, 51, 49


def _sf2_path() -> str:
    import pretty_midi

    return str(Path(pretty_midi.__file__).parent / "TimGM6mb.sf2")


def _chorale_notes(name: str) -> list[tuple[float, float, int]]:
    """(onset_quarters, duration_quarters, midi pitch) of every note of a chorale, all parts."""
    from music21 import corpus

    score = corpus.parse(name)
    notes = []
    for part in score.parts:
        for n in part.flatten().notes:
            for p in n.pitches:
                notes.append((float(n.offset), float(n.quarterLength), int(p.midi)))
    return notes


def _groove(n_beats: int, style: int, rng) -> list[tuple[float, int, int]]:
    """(onset_quarters, drum key, velocity): kick/snare backbeat with hats or ride, a few styles."""
    hits = []
    for b in range(n_beats):
        bar_pos = b % 4
        if bar_pos in (0, 2) or (style == 1 and bar_pos == 2):
            hits.append((b, KICK, 110))
        if style == 2 and bar_pos == 2:
            hits.append((b + 0.5, KICK, 95))
        if bar_pos in (1, 3):
            hits.append((b, SNARE, 105))
        cymbal = RIDE if style == 3 else HAT
        for sub in ((0.0, 0.5) if style != 1 else (0.0, 0.25, 0.5, 0.75)):
            hits.append((b + sub, cymbal, 70 + int(rng.integers(0, 25))))
        if b % 16 == 0:
            hits.append((b, CRASH, 90))
    return hits


def render(notes, drums, program: int, bpm: float, transpose: int, seconds_cap: float) -> np.ndarray:
    import tinysoundfont

    synth = tinysoundfont.Synth(samplerate=SR, gain=-3)
    sfid = synth.sfload(_sf2_path())
    synth.program_select(0, sfid, 0, program)
    synth.program_select(9, sfid, 128, 0, True)
    q = 60.0 / bpm
    events = []  # (time_s, order, kind, chan, key, vel)
    for onset, dur, pitch in notes:
        key = pitch + transpose
        if 24 <= key <= 108:
            events.append((onset * q, 1, "on", 0, key, 80))
            events.append(((onset + dur) * q - 0.01, 0, "off", 0, key, 0))
    for onset, key, vel in drums:
        events.append((onset * q, 1, "on", 9, key, vel))
        events.append((onset * q + 0.1, 0, "off", 9, key, 0))
    events = sorted(e for e in events if e[0] < seconds_cap)
    end = min(max((e[0] for e in events), default=0.0) + 1.0, seconds_cap)
    out, t = [], 0
    for time_s, _, kind, chan, key, vel in events + [(end, 2, "end", 0, 0, 0)]:
        n = int(time_s * SR) - t
        if n > 0:
            out.append(np.frombuffer(synth.generate(n), dtype=np.float32).reshape(-1, 2).mean(1))
            t += n
        if kind == "on":
            synth.noteon(chan, key, vel)
        elif kind == "off":
            synth.noteoff(chan, key)
    wave = np.concatenate(out) if out else np.zeros(0, np.float32)
    return wave.astype(np.float32)


def build_trial_clips(out_dir: str | Path, n_pieces: int = 60, variants: int = 3, clip_seconds: float = 10.0,
                      seconds_cap: float = 40.0, seed: int = 0) -> Path:
    """Render `n_pieces` chorales x `variants` (instrument, transposition, tempo, groove) x {drums, no drums} and
    write them as a clips table (one shard) in `out_dir`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from music21 import corpus

    from pipelines.audio import encode_flac
    from pipelines.schema import CLIPS_SCHEMA, shard_name

    rng = np.random.default_rng(seed)
    names = sorted(str(p) for p in corpus.getComposer("bach") if str(p).endswith((".mxl", ".xml")))
    names = [names[i] for i in rng.permutation(len(names))[: n_pieces * 2]]
    rows, done = [], 0
    for name in names:
        if done >= n_pieces:
            break
        try:
            notes = _chorale_notes(name)
        except Exception:  # a few corpus files are not plain chorales
            continue
        if len(notes) < 40:
            continue
        done += 1
        piece = Path(name).stem
        split_hash = int(hashlib.sha256(piece.encode()).hexdigest(), 16) % 10
        split = "train" if split_hash < 8 else ("valid" if split_hash == 8 else "test")
        n_beats = int(max(o + d for o, d, _ in notes)) + 1
        for v in range(variants):
            inst = list(PROGRAMS)[int(rng.integers(len(PROGRAMS)))]
            bpm = float(rng.uniform(80, 150))
            transpose = int(rng.integers(-4, 5))
            style = int(rng.integers(0, 4))
            groove = _groove(n_beats, style, rng)
            mix_id = f"{piece}-v{v}"
            for with_drums in (True, False):
                wave = render(notes, groove if with_drums else [], PROGRAMS[inst], bpm, transpose, seconds_cap)
                peak = np.abs(wave).max() or 1.0
                wave = 0.8 * wave / peak
                n_clip = int(clip_seconds * SR)
                for ci, start in enumerate(range(0, len(wave) - n_clip + 1, n_clip)):
                    clip = wave[start:start + n_clip]
                    sha = hashlib.sha256(f"{mix_id}-{with_drums}".encode()).hexdigest()
                    caption = f"A Bach chorale played by {inst}" + (" with a drum kit." if with_drums else ".")
                    rows.append({
                        "clip_id": f"{sha[:16]}-{ci}", "source_path": f"trial/{mix_id}-{int(with_drums)}.flac",
                        "source_sha256": sha, "clip_index": ci, "start_s": start / SR, "duration_s": clip_seconds,
                        "sample_rate": SR, "split": split, "mix_id": mix_id,
                        "audio": {"bytes": encode_flac(clip, SR), "path": None}, "is_silent": False,
                        "tempo_bpm": bpm, "traits": [{"name": "drums", "present": with_drums}],
                        "caption": caption, "caption_base": caption,
                    })
    table = pa.Table.from_pylist(rows, schema=CLIPS_SCHEMA)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_dir / shard_name(0, 1))
    return out_dir


if __name__ == "__main__":
    import sys

    out = build_trial_clips(sys.argv[1], n_pieces=int(sys.argv[2]) if len(sys.argv) > 2 else 60,
                            variants=int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    print(out)
