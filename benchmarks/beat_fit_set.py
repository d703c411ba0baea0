"""Training set for the learned beat / downbeat activation (`pipelines/beat_model.npz`, `benchmarks/fit_beats.py`).

    python benchmarks/beat_fit_set.py --out data/beat_fit            # ~140 openings, ~10 min on 2 cores
    python benchmarks/beat_fit_set.py --take 1 --seconds 80 --out data/beat_fit_take1   # a second rendering
    python benchmarks/beat_fit_set.py --chorales --out data/beat_fit_chorales   # Bach chorales played bare

music21 corpus pieces outside the default corpora and outside every work of the out-of-domain set
(`benchmarks/ood_set.py` PIECES; not even another movement of one): Ryan's Mammoth Collection fiddle tunes (reels,
jigs, hornpipes, strathspeys, clogs) played bare on a melody instrument, trecento ballate and madrigals, Josquin
chansons, Palestrina mass movements and Monteverdi's fourth and fifth books for voices or a consort, and the
downbeat fit set (`FIT_PIECES`: Beethoven quartets, Monteverdi's third book, a Schumann song). Each opening is
rendered as written, with the OOD set's seeded tempo plans (constant, ritardando, a step at a bar line), through the
project's default SoundFont or MuseScore's General SoundFont (`musescore-general-soundfont-lossless`, installed by
`ensure_training_soundfonts` where missing). The OOD set uses neither SoundFont. Labels are the OOD set's
(beats and downbeats from the score's metric grid through the tempo map), in `manifest.json` / `labels.parquet`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ood_set import FIT_PIECES, PIECES, _hash, ensure_soundfonts, render_piece, write_set  # noqa: E402

TRAINING_SOUNDFONTS = {
    "MuseScore_General": ("/usr/share/sounds/sf2/MuseScore_General_Full.sf2", "musescore-general-soundfont-lossless")
}

# (glob under music21's corpus folder, family, how many, seconds cap); a seeded draw from each glob.
SOURCES: list[tuple[str, str, int]] = [
    ("ryansMammoth/*Reel*.abc", "folk", 14),
    ("ryansMammoth/*Jig*.abc", "folk", 14),
    ("ryansMammoth/*Hornpipe*.abc", "folk", 10),
    ("ryansMammoth/*Strathspey*.abc", "folk", 4),
    ("ryansMammoth/*Clog*.abc", "folk", 4),
    ("trecento/*.xml", "consort", 30),
    ("josquin/*.abc", "consort", 8),
    ("palestrina/Agnus_0*.krn", "madrigal", 12),
    ("monteverdi/madrigal.[45].*.mxl", "madrigal", 16),
]


# `--chorales`: the default corpus' Bach chorales at these places of its seeded order (the demo's corpus takes 0-29,
# the in-domain held-out set of benchmarks/feature_accuracy.py 100 on), played bare by one of these families
CHORALE_RANGE = (30, 100)
CHORALE_FAMILIES = ("quartet", "keyboard", "madrigal")


def chorale_pieces(corpus_root: str) -> list[tuple[str, str]]:
    """(family, path) of the default corpus' chorales in CHORALE_RANGE, each with a seeded family: four-part
    common-practice harmony in 4/4 and 3/4, most of it with a pickup, as a string quartet, a keyboard or a
    consort."""
    from core.config import load_section
    from pipelines.corpus import CorpusParams, select_pieces

    # the corpus' own seeded order (params.yaml's seed), so the range is the one the demo and benchmarks skip
    corpus = load_section(CorpusParams, "params.yaml", "corpus").model_copy(
        update={
            "corpora": ["bach_chorales"],
            "pieces": CHORALE_RANGE[1] - CHORALE_RANGE[0],
            "piece_offset": CHORALE_RANGE[0],
        }
    )
    chosen = []
    for ref in (r for r in select_pieces(corpus) if r.corpus == "bach_chorales"):
        rel = os.path.relpath(ref.path, corpus_root)
        chosen.append((CHORALE_FAMILIES[_hash("beat-fit-chorale", rel) % len(CHORALE_FAMILIES)], rel))
    return chosen


def work_of(rel: str) -> str:
    """The work a corpus path belongs to: its folder for multi-movement works (composer/opus/movement.mxl), else the
    file itself (composer/piece.mxl)."""
    parts = rel.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else os.path.splitext(rel)[0]


def ensure_training_soundfonts() -> dict[str, str]:
    from core.synth import default_soundfont

    return {"TimGM6mb": default_soundfont(), **ensure_soundfonts(TRAINING_SOUNDFONTS)}


def beat_fit_pieces(corpus_root: str) -> list[tuple[str, str]]:
    """(family, path) of the set: a seeded draw per source, minus any work of the OOD set."""
    ood_works = {work_of(rel) for _, rel in PIECES}
    chosen: list[tuple[str, str]] = []
    for pattern, family, count in SOURCES:
        paths = sorted(os.path.relpath(p, corpus_root) for p in glob.glob(os.path.join(corpus_root, pattern)))
        paths = [p for p in paths if work_of(p) not in ood_works]
        paths.sort(key=lambda p: _hash("beat-fit", p))
        chosen += [(family, p) for p in paths[:count]]
    chosen += [(f, p) for f, p in FIT_PIECES if work_of(p) not in ood_works]
    return chosen


def build(
    out: str, limit: int | None, max_seconds: float, sr: int = 44100, take: int = 0, chorales: bool = False
) -> dict:
    import music21

    corpus_root = os.path.join(os.path.dirname(music21.__file__), "corpus")
    soundfonts = ensure_training_soundfonts()
    shutil.rmtree(os.path.join(out, "audio"), ignore_errors=True)
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    rows, errors, started = [], [], time.time()
    pieces = chorale_pieces(corpus_root) if chorales else beat_fit_pieces(corpus_root)
    for family, rel in pieces[:limit]:
        t = time.time()
        try:
            row = render_piece(family, rel, corpus_root, out, soundfonts, sr, max_seconds, take)
        except Exception as e:  # a score music21 cannot read, or one without a metric grid: listed, not rendered
            errors.append({"score_path": rel, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"  skip {rel}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        if len(row["beats_s"]) < 8:
            errors.append({"score_path": rel, "error": "fewer than 8 beats"})
            os.remove(row["path"])
            continue
        row["split"] = "fit"
        rows.append(row)
        print(
            f"  {row['file']:<56} {row['time_signature']:>5} {row['tempo_mode']:<10} {row['tempo_bpm']:6.1f} bpm "
            f"{row['duration_s']:5.1f} s {row['soundfont']:<17} ({time.time() - t:.1f} s)",
            flush=True,
        )
    return write_set(out, rows, errors, started)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/beat_fit")
    ap.add_argument("--limit", type=int, default=None, help="only the first N pieces (a quick check)")
    ap.add_argument("--seconds", type=float, default=40.0, help="excerpt cap, cut at the last bar line before it")
    ap.add_argument(
        "--take",
        type=int,
        default=0,
        help="render take N of every piece (N > 0: its own tempo plan and instruments, the other SoundFont)",
    )
    ap.add_argument(
        "--chorales",
        action="store_true",
        help="render the default corpus' chorales at places {}-{} of its seeded order instead".format(*CHORALE_RANGE),
    )
    args = ap.parse_args()
    stats = build(args.out, args.limit, args.seconds, take=args.take, chorales=args.chorales)
    print(json.dumps({k: v for k, v in stats.items() if k != "failed"}, indent=1), f"\nfailed: {len(stats['failed'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
