"""Out-of-domain evaluation set for the feature extractors: music nothing in the project is tuned on.

    python benchmarks/ood_set.py [--out data/ood] [--limit N]
    python benchmarks/ood_set.py --fit --out data/ood_fit       # the downbeat evidence's fit set (FIT_PIECES)

Pieces: music21 corpus scores OUTSIDE the default corpora (Bach chorales, Nottingham, Essen): string quartets
(Haydn, Mozart, Beethoven, Robert Schumann), keyboard works (Mozart, Clara Schumann, Chopin, C. P. E. Bach),
Joplin's rag, Monteverdi madrigals, Palestrina, Lusitano and trecento pieces, and songs / arias / chamber pieces
(Handel, Verdi, Schubert, Schumann, Beach, Corelli, Weber, ...). Meters 2/2, 2/4, 3/4, 3/8, 4/2, 4/4, 6/8, 9/8.
Each is rendered from its start, as written (no added drums, bass or piano), through a General-MIDI SoundFont other
than the project's default TimGM6mb: Debian's FluidR3_GM (`fluid-soundfont-gm`) or Csound's sf_GMbank
(`csound-soundfont`), chosen per piece; `ensure_soundfonts` installs them with apt-get when missing (as root,
idempotent).

Tempo: a seeded beat tempo per piece (the corpus files' metronome marks are mostly notation-software defaults),
60-150 bpm for quarter / eighth beats, 45-100 for dotted-quarter beats; a third of the pieces keep it, a third
slow down (ritardando: linearly in score time to 0.6x over the last ~40 % of the excerpt), a third change tempo at
a bar line near the middle (x0.7 or x1.35). Excerpts end at the last bar line before 30 s (25 s of base tempo for
the pieces whose tempo changes, so they stay near 30 s).

Labels (`manifest.json` and `labels.parquet`, one row per file, the columns `pipelines/evaluate.py` reads):
- beats / downbeats: the score's metric grid (`pipelines.corpus_scores.metric_grid`, the default corpus' own
  convention: the beat is the quarter in x/4 and x/2, the eighth in 3/8, the dotted quarter in 6/8 and 9/8;
  pickups have no downbeat) mapped to seconds through the excerpt's tempo map.
- tempo: `tempo_bpm` = 60 / median inter-beat interval of the labelled beats (the global tempo);
  `tempo_map` = [seconds, beat bpm] at each beat; `tempo_start_bpm` the base tempo.
- key: the key signature names a relative pair (K major / its relative minor); the pair member that the
  project's four-profile consensus (`pipelines.corpus_scores.key_correlations`: Krumhansl-Kessler, Aarden-Essen,
  Bellman-Budge, Temperley-Kostka-Payne over duration-weighted pitch classes of the excerpt) prefers is the key,
  unless a key outside the pair correlates better by more than 0.1 (modal madrigals, an excerpt that opens away
  from the signature's key): then that key (`key_source` says which). Scores without a signature take the
  consensus. `key_segments`: the project's local-key segments (`pipelines.corpus_scores.key_segments`).
- time signature as written (the first bar's) and `beats_per_bar` in the beat unit above (2/2 -> 4, 6/8 -> 2).
- chords: the project's harmonic analysis of the score (`analyse_chords`), for completeness.

Split: by piece, sha256 of the piece id: even -> `dev` (for choices), odd -> `heldout` (for reported numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.synth import synthesize  # noqa: E402
from pipelines.corpus import mix_stems, piece_truth  # noqa: E402
from pipelines.corpus_arrange import Event, Stem, score_events  # noqa: E402
from pipelines.corpus_scores import (  # noqa: E402
    EPS,
    PieceRef,
    Score,
    key_correlations,
    key_name,
    load_score,
    pc_histogram,
)

SOUNDFONTS = {
    "FluidR3_GM": ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "fluid-soundfont-gm"),
    "sf_GMbank": ("/usr/share/sounds/sf2/sf_GMbank.sf2", "csound-soundfont"),
}

# (family, path under music21's corpus folder). Families decide the instruments.
PIECES: list[tuple[str, str]] = [
    # string quartets
    *[("quartet", f"haydn/opus1no1/movement{i}.mxl") for i in range(1, 6)],
    *[("quartet", f"haydn/opus74no1/movement{i}.mxl") for i in range(1, 5)],
    ("quartet", "mozart/k155/movement1.mxl"),
    ("quartet", "mozart/k156/movement1.mxl"),
    ("quartet", "mozart/k156/movement3.mxl"),
    ("quartet", "mozart/k458/movement1.mxl"),
    ("quartet", "mozart/k458/movement2.mxl"),
    ("quartet", "mozart/k80/movement1.mxl"),
    ("quartet", "mozart/k80/movement4.mxl"),
    ("quartet", "beethoven/opus18no1/movement1.mxl"),
    ("quartet", "beethoven/opus18no1/movement2.mxl"),
    ("quartet", "beethoven/opus18no1/movement4.mxl"),
    ("quartet", "beethoven/opus59no1/movement1.mxl"),
    ("quartet", "beethoven/opus59no1/movement2.mxl"),
    ("quartet", "beethoven/opus59no2/movement4.mxl"),
    ("quartet", "beethoven/opus59no3/movement1.mxl"),
    ("quartet", "schumann_robert/opus41no1/movement2.mxl"),
    ("quartet", "schumann_robert/opus41no1/movement3.mxl"),
    # keyboard
    ("keyboard", "mozart/k545/movement1_exposition.mxl"),
    *[("keyboard", f"schumann_clara/polonaise_op1n{i}.mxl") for i in range(1, 5)],
    ("keyboard", "chopin/mazurka06-2.krn"),
    ("keyboard", "cpebach/h186.mxl"),
    ("rag", "joplin/maple_leaf_rag.mxl"),
    # madrigals
    *[
        ("madrigal", f"monteverdi/madrigal.{n}.mxl")
        for n in ("3.1", "3.2", "3.5", "3.7", "3.13", "3.14", "3.15", "3.16", "4.1", "4.6", "5.2", "5.4")
    ],
    # songs, arias, chamber music
    ("song", "handel/rinaldo/Lascia_chio_pianga.mxl"),
    ("song", "verdi/laDonnaEMobile.mxl"),
    ("song", "schubert/Lindenbaum.xml"),
    ("song", "schumann_robert/dichterliebe_no2.xml"),
    ("song", "johnson_j_r/lift_every_voice.mxl"),
    ("song", "liliuokalani/aloha_oe.mxl"),
    ("chamber", "beach/prayer_of_a_tired_child.musicxml"),
    ("chamber", "schumann_clara/opus17/movement3.xml"),
    ("chamber", "corelli/opus3no1/1grave.xml"),
    # The rest of the corpus' movements of the quartets above, more pieces in other families, so each split holds
    # about 40 files: with 25, one file's key or meter moved a split's mean by 0.03-0.04.
    *[("quartet", f"mozart/{w}.mxl") for w in ("k155/movement2", "k155/movement3", "k156/movement2")],
    *[("quartet", f"mozart/{w}.mxl") for w in ("k156/movement4", "k458/movement3", "k458/movement4")],
    *[("quartet", f"mozart/k80/movement{i}.mxl") for i in (2, 3)],
    ("quartet", "beethoven/opus18no1/movement3.mxl"),
    *[("quartet", f"beethoven/opus59no1/movement{i}.mxl") for i in (3, 4)],
    *[("quartet", f"beethoven/opus59no2/movement{i}.mxl") for i in (1, 2, 3)],
    *[("quartet", f"beethoven/opus59no3/movement{i}.mxl") for i in (2, 3, 4)],
    *[("quartet", f"schumann_robert/opus41no1/movement{i}.mxl") for i in (1, 4, 5)],
    # Palestrina masses the beat fit set does not draw from (it takes Agnus Dei of masses 1-9)
    *[("madrigal", f"palestrina/Kyrie_{n}.krn") for n in (12, 25, 38, 51, 77)],
    ("madrigal", "lusitano/allor_che_ignuda.mxl"),
    ("madrigal", "ciconia/quod_jactatur.xml"),
    ("madrigal", "luca/gloria.xml"),
    ("chamber", "weber/concertino_clarinet.mxl"),
]

# The fit set (`--fit`): drum-free music written for the instruments it is played on, to train the learned downbeat
# evidence (benchmarks/fit_downbeats.py --tonal-set) away from the drum / bass arrangements of the default corpora.
# No work of PIECES (not even another movement of one) and none of the default corpora; rendered through the
# default SoundFont, which the OOD set never uses.
FIT_PIECES: list[tuple[str, str]] = [
    *[("quartet", f"beethoven/{op}.mxl") for op in ("opus18no3", "opus18no4", "opus18no5", "opus74", "opus132")],
    ("quartet", "beethoven/opus133.mxl"),
    ("song", "schumann_robert/opus48no2.mxl"),
    *[("madrigal", f"monteverdi/madrigal.3.{n}.mxl") for n in (3, 4, 6, 8, 9, 10, 11, 12, 17, 18, 19, 20)],
]

# General-MIDI programs per family: a list of per-voice palettes (voice i takes palette min(i, last)).
PROGRAMS: dict[str, list[list[int]]] = {
    "quartet": [[40], [40], [41], [42], [43]],  # violin, violin, viola, cello, (contrabass)
    "keyboard": [[0, 1, 6]],  # grand / bright piano, harpsichord (all voices alike)
    "rag": [[0, 1, 2]],
    "madrigal": [[52, 53, 74, 71, 68]],  # choir aahs / voice oohs / recorder / clarinet / oboe consort
    "song": [[52, 53, 65, 71, 40, 73], [0, 1]],  # voice or a melody instrument; the piano below
    "chamber": [[40, 71, 73, 68], [0, 42, 6]],
    # the beat fit set's (benchmarks/beat_fit_set.py): a fiddle tune on one melody instrument, a medieval consort
    "folk": [[40, 73, 21, 78, 0, 24, 105, 71, 22]],
    "consort": [[74, 52, 53, 19, 68, 71, 42, 6, 46]],
}
SAME_PROGRAM_FAMILIES = ("keyboard", "rag", "madrigal", "folk", "consort")  # one program drawn for every voice


def ensure_soundfonts(fonts: dict[str, tuple[str, str]] | None = None) -> dict[str, str]:
    """{name: path} of General-MIDI SoundFonts from Debian packages (`fonts`: name -> (path, package); the OOD set's
    by default), installed with apt-get where missing."""
    fonts = SOUNDFONTS if fonts is None else fonts
    missing = [pkg for path, pkg in fonts.values() if not os.path.exists(path)]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"missing SoundFonts; as root: apt-get update && apt-get install -y {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env)
    return {name: path for name, (path, _) in fonts.items()}


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()[:8], "big")


def split_of(piece_id: str) -> str:
    """dev (even hash) or heldout (odd): by piece, stable across runs and machines."""
    return "dev" if _hash("ood-split", piece_id) % 2 == 0 else "heldout"


def piece_id_of(path: str) -> str:
    return os.path.splitext(path)[0].replace("/", "-").replace(".", "_")


# ----------------------------------------------------------------------------------------------------------
# Tempo map


@dataclass
class TempoMap:
    """Beat tempo as a piecewise-linear function of score time (ql): anchors (ql, bpm); bpm counts `beat_ql`
    beats. `seconds(ql)` integrates 60 / (bpm * beat_ql) over score time."""

    anchors: list[tuple[float, float]]
    beat_ql: float
    step_ql: float = 1.0 / 96

    def __post_init__(self):
        end = max(a for a, _ in self.anchors) + 64.0
        self._grid = np.arange(0.0, end + self.step_ql, self.step_ql)
        qs, bpms = zip(*self.anchors)
        bpm = np.interp(self._grid, qs, bpms)
        spq = 60.0 / (bpm * self.beat_ql)
        self._time = np.concatenate([[0.0], np.cumsum((spq[1:] + spq[:-1]) / 2 * self.step_ql)])

    def bpm(self, ql) -> np.ndarray:
        qs, bpms = zip(*self.anchors)
        return np.interp(ql, qs, bpms)

    def seconds(self, ql) -> np.ndarray:
        return np.interp(ql, self._grid, self._time)

    def ql_at(self, seconds: float) -> float:
        return float(np.interp(seconds, self._time, self._grid))


def step_anchor(ql: float, before: float, after: float) -> list[tuple[float, float]]:
    """A sudden change at `ql` (a hair of score time to keep the anchors increasing)."""
    return [(ql - 1e-3, before), (ql, after)]


def nearest_downbeat(score: Score, ql: float, cut: float) -> float | None:
    downs = [d for d in score.downbeats if EPS < d < cut - EPS]
    return min(downs, key=lambda d: abs(d - ql)) if downs else None


def tempo_plan(score: Score, piece_id: str, max_seconds: float) -> tuple[str, float, TempoMap, float]:
    """(mode, base bpm, tempo map, cut ql): constant / ritardando / step, seeded by the piece."""
    h = _hash("ood-tempo", piece_id)
    compound = abs(score.beat_ql - 1.5) < EPS
    lo, hi = (45.0, 100.0) if compound else (60.0, 150.0)
    base = round(lo + (hi - lo) * ((h >> 8) % 1000) / 999.0, 1)
    mode = ("constant", "ritardando", "step")[h % 3]
    flat = TempoMap([(0.0, base)], score.beat_ql)
    cap = max_seconds if mode == "constant" else max_seconds - 5.0
    cut = piece_truth(score, flat.ql_at(cap)).cut
    if mode == "ritardando":
        start = nearest_downbeat(score, 0.6 * cut, cut)
        if start is None:
            return "constant", base, flat, cut
        return mode, base, TempoMap([(0.0, base), (start, base), (cut, 0.6 * base)], score.beat_ql), cut
    if mode == "step":
        at = nearest_downbeat(score, 0.5 * cut, cut)
        if at is None:
            return "constant", base, flat, cut
        factor = 0.7 if (h >> 4) % 2 or base * 1.35 > hi else 1.35  # a step up stays within the range
        return mode, base, TempoMap([(0.0, base), *step_anchor(at, base, round(base * factor, 1))], score.beat_ql), cut
    return mode, base, flat, cut


# ----------------------------------------------------------------------------------------------------------
# Key


def choose_key(score: Score, cut: float) -> tuple[int, str, str]:
    """(tonic pc, mode, source): the key signature's relative pair decided by the four-profile consensus, or
    the consensus itself where it is clearly elsewhere or there is no signature (see the module docstring)."""
    corr = key_correlations(pc_histogram(score, 0.0, cut))
    best = int(np.argmax(corr))
    consensus = (best % 12, "major" if best < 12 else "minor")
    if score.signature_key is None:
        return *consensus, "consensus (no signature)"
    tonic, mode = score.signature_key
    major = tonic if mode == "major" else (tonic + 3) % 12
    pair = [major, 12 + (major + 9) % 12]  # K major, its relative minor
    inside = max(pair, key=lambda i: corr[i])
    if corr[best] > corr[inside] + 0.1:
        return *consensus, "consensus (outside the signature's pair)"
    return inside % 12, ("major" if inside < 12 else "minor"), "signature pair + consensus"


# ----------------------------------------------------------------------------------------------------------
# One piece


def programs_for(family: str, n_voices: int, piece_id: str) -> list[int]:
    palettes = PROGRAMS[family]
    h = _hash("ood-programs", piece_id)
    if family in SAME_PROGRAM_FAMILIES:
        prog = palettes[0][h % len(palettes[0])]
        return [prog] * n_voices
    if family == "quartet":
        return [palettes[min(i, len(palettes) - 1)][0] for i in range(n_voices)]
    first = palettes[0][h % len(palettes[0])]
    rest = palettes[1][(h >> 8) % len(palettes[1])]
    out = [first] + [rest] * (n_voices - 1)  # the melody, then every accompaniment staff alike
    return out


def render_piece(
    family: str, rel: str, corpus_root: str, out: str, soundfonts: dict, sr: int, max_s: float, take: int = 0
) -> dict:
    """Render a score's opening and label it. `take` > 0: another rendering of the same piece (training sets): its
    own seeded tempo plan and instruments, the next SoundFont in name order; file `<piece>~<take>.flac`, same
    piece_id (so a split by piece keeps its takes together)."""
    import soundfile as sf

    path = os.path.join(corpus_root, rel)
    pid = piece_id_of(rel)
    seed = pid if take == 0 else f"{pid}~{take}"  # what the seeded draws (tempo, programs) hash
    score = load_score(PieceRef(family, path))
    mode, base, tmap, cut = tempo_plan(score, seed, max_s)
    truth = piece_truth(score, cut + EPS)  # cut already lies on a bar line: keeps it, gives chords / segments
    cut = truth.cut
    key_pc, key_mode, key_source = choose_key(score, cut)

    programs = programs_for(family, len(score.voices), seed)
    events, chans = score_events(score, cut, 0, programs)
    timed = [
        Event(float(tmap.seconds(e.start)), float(tmap.seconds(e.end)), e.channel, e.pitch, e.velocity) for e in events
    ]
    sf_name = sorted(soundfonts)[(_hash("ood-soundfont", pid) + take) % len(soundfonts)]
    with open(soundfonts[sf_name], "rb") as f:
        sf2 = f.read()
    end_s = float(tmap.seconds(cut))
    n = int(round((end_s + 0.8) * sr))
    wave = synthesize(sf2, Stem("score", chans, timed), 1.0, n, sr)  # events already in seconds
    stems, mixes = mix_stems({"score": wave}, {}, [frozenset()])
    audio = mixes[frozenset()]
    file = f"{seed}.flac"
    sf.write(os.path.join(out, "audio", file), audio, sr, subtype="PCM_16")

    beats_ql = score.beats[score.beats < cut - EPS]
    downs_ql = score.downbeats[score.downbeats < cut - EPS]
    beats = tmap.seconds(beats_ql)
    bpm_at_beats = tmap.bpm(beats_ql)
    ksegs = [
        {"start_s": float(tmap.seconds(a)), "end_s": float(tmap.seconds(b)), "key": key_name(k), "mode": m}
        for a, b, k, m in truth.key_segments
    ]
    chords = [
        {"start_s": float(tmap.seconds(a)), "end_s": float(tmap.seconds(b)), "label": lab}
        for a, b, lab in truth.chords_ql
    ]
    return {
        "file": file,
        "path": os.path.abspath(os.path.join(out, "audio", file)),
        "piece_id": pid,
        "corpus": family,
        "family": family,
        "split": split_of(pid),
        "score_path": rel,
        "title": score.title,
        "soundfont": sf_name,
        "programs": programs,
        "duration_s": n / sr,
        "sample_rate": sr,
        "tempo_mode": mode,
        "tempo_start_bpm": base,
        "tempo_bpm": float(60.0 / np.median(np.diff(beats))),
        "tempo_map": [[float(t), float(b)] for t, b in zip(beats, bpm_at_beats)],
        "beat_unit": {1.0: "quarter", 1.5: "dotted quarter", 0.5: "eighth"}[score.beat_ql],
        "time_signature": score.time_signature,
        "beats_per_bar": int(score.beats_per_bar),
        "beats_s": [float(b) for b in beats],
        "downbeats_s": [float(d) for d in tmap.seconds(downs_ql)],
        "key": key_name(key_pc),
        "mode": key_mode,
        "key_source": key_source,
        "key_consensus": f"{key_name(truth.key[0])} {truth.key[1]}",
        "key_segments": ksegs,
        "chords": chords,
        "chord_source": truth.chord_source,
        "traits": [],
    }


def write_set(out: str, rows: list[dict], errors: list[dict], started: float, **extra) -> dict:
    """Write a rendered set's manifest.json (its stats and every row) and labels.parquet; return the stats."""
    from collections import Counter

    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = {
        "files": len(rows),
        "failed": errors,
        "seconds": round(time.time() - started, 1),
        "audio_minutes": round(sum(r["duration_s"] for r in rows) / 60, 2),
        **extra,
        **{
            name: dict(sorted(Counter(r[col] for r in rows).items()))
            for name, col in (
                ("time_signatures", "time_signature"),
                ("tempo_modes", "tempo_mode"),
                ("families", "family"),
                ("soundfonts", "soundfont"),
            )
        },
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"stats": stats, "files": rows}, f, indent=1)
    table_rows = [{k: v for k, v in r.items() if k not in ("programs", "tempo_map")} for r in rows]
    pq.write_table(pa.Table.from_pylist(table_rows), os.path.join(out, "labels.parquet"))
    return stats


def build_set(
    out: str, limit: int | None = None, sr: int = 44100, max_seconds: float = 30.0, fit: bool = False
) -> dict:
    """Render the OOD set (or, `fit`, the fit set: FIT_PIECES through the default SoundFont, split `fit`)."""
    import music21

    from core.synth import default_soundfont

    soundfonts = {"TimGM6mb": default_soundfont()} if fit else ensure_soundfonts()
    pieces = FIT_PIECES if fit else PIECES
    corpus_root = os.path.join(os.path.dirname(music21.__file__), "corpus")
    shutil.rmtree(os.path.join(out, "audio"), ignore_errors=True)
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    rows, errors = [], []
    started = time.time()
    for family, rel in pieces[:limit]:
        t = time.time()
        try:
            row = render_piece(family, rel, corpus_root, out, soundfonts, sr, max_seconds)
            if fit:
                row["split"] = "fit"
        except Exception as e:  # a score music21 cannot read or one too short: listed, not rendered
            errors.append({"score_path": rel, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"  skip {rel}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        rows.append(row)
        print(
            f"  {row['split']:<8} {row['file']:<48} {row['time_signature']:>5} {row['tempo_mode']:<10} "
            f"{row['tempo_bpm']:6.1f} bpm {row['key']:>2} {row['mode']:<5} {row['duration_s']:5.1f} s "
            f"{row['soundfont']:<10} ({time.time() - t:.1f} s)",
            flush=True,
        )
    rows.sort(key=lambda r: r["file"])
    splits = {s: sum(r["split"] == s for r in rows) for s in ("dev", "heldout", "fit") if fit or s != "fit"}
    stats = write_set(out, rows, errors, started, splits=splits)
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/ood", help="output folder (audio/, manifest.json, labels.parquet)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N pieces of the list (a quick check)")
    ap.add_argument(
        "--seconds", type=float, default=None, help="excerpt cap, cut at the last bar line before it (30; --fit: 60)"
    )
    ap.add_argument(
        "--fit", action="store_true", help="build the fit set instead (FIT_PIECES, default SoundFont: fit_downbeats)"
    )
    args = ap.parse_args()
    seconds = args.seconds or (60.0 if args.fit else 30.0)
    stats = build_set(args.out, args.limit, max_seconds=seconds, fit=args.fit)
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
