"""`smitin corpus render`: real scores -> audio mixtures + stems + ground truth, with Apache Beam.

    pieces (listed on the driver from music21's corpus and/or a user folder, seeded selection)
      -> Reshuffle -> RenderPiece (parse, analyse, arrange, synthesise every stem, write mixes + sidecars)
      -> labels rows (one per mixture file) -> labels.parquet;  failures -> errors.parquet

Output folder (default data/corpus):
    audio/<piece>-v<k>-<stems>.flac + .json   mixtures that `smitin dataset build` ingests unchanged
    stems/<piece>-v<k>/<stem>.flac            score / drums / bass / piano, exactly what the mixes sum
    labels.parquet                            ground truth per mixture file (see LABELS_SCHEMA)
    errors.parquet, render.json               failed pieces; counts and speed

Synthesis: tinysoundfont (TinySoundFont, a PyPI wheel) with the General-MIDI SoundFont shipped inside
pretty_midi (TimGM6mb.sf2) or a user .sf2. Each stem is synthesised alone, scaled by one gain shared by all
mixes of a variant and quantised to 16 bit; a mix is the integer sum of its stems, so a mixture with trait T
minus the same mixture without T is exactly the T stem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Literal

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationInfo, field_validator

from core.config import Section
from core.synth import default_soundfont, synthesize
from pipelines.corpus_arrange import Arrangement, arrange, choose_tempo, describe, mixes_of
from pipelines.corpus_scores import (
    EPS,
    PieceRef,
    Score,
    analyse_chords,
    harmonise_melody,
    key_name,
    key_segments,
    list_corpus,
    load_score,
    score_key,
    symbol_chords,
    transpose_label,
)
from pipelines.errors import PipelineUserError

log = logging.getLogger(__name__)

Trait = Literal["drums", "bass", "piano"]
Program = Annotated[int, Field(ge=0, le=127)]  # General-MIDI program number


class CorpusParams(Section):
    """params.yaml `corpus` (every default is here)."""

    seed: int = 0
    corpora: list[Literal["bach_chorales", "nottingham", "essen", "user"]] = Field(
        default_factory=lambda: ["bach_chorales", "nottingham", "essen"]
    )  # user: the scores of scores_dir
    # pieces per corpus after a seeded shuffle: one count for every corpus, or per corpus (a corpus not listed,
    # or null: all of its pieces)
    pieces: dict[str, Annotated[int, Field(ge=0)]] | Annotated[int, Field(ge=0)] | None = Field(
        default_factory=lambda: {"bach_chorales": 30, "nottingham": 2, "essen": 28}
    )
    piece_offset: int = Field(0, ge=0)  # skip this many per corpus first (another offset = a disjoint set)
    scores_dir: str | None = None  # a folder of MIDI / MusicXML / ABC to render as well
    soundfont: str | None = None  # null: TimGM6mb.sf2 inside pretty_midi
    variants: int = Field(2, ge=1)  # tempo / transposition / instrumentation variants per piece
    piece_seconds: float = Field(30.0, gt=0)  # duration cap per rendered file (cut at the last bar line before it)
    tail_seconds: float = Field(0.5, ge=0)  # rendered past the cut (release tails)
    sample_rate: int = Field(44100, gt=0)
    tempo_bpm: tuple[float, float] = (76.0, 132.0)  # beat tempo range (quarter / eighth beats)
    compound_tempo_bpm: tuple[float, float] = (56.0, 92.0)  # dotted-quarter beats (6/8)
    transpose: tuple[int, int] = (-3, 3)  # semitones
    traits: list[Trait] = Field(default_factory=lambda: ["drums", "bass", "piano"])  # accompaniment stems
    # gain range (dB) drawn per variant for each trait's stem; every trait needs one
    stem_gain_db: dict[Trait, tuple[float, float]] = Field(
        default_factory=lambda: {"drums": (-3.0, 1.0), "bass": (-3.0, 1.0), "piano": (2.0, 6.0)}
    )
    voice_programs: list[Program] = Field(
        default_factory=lambda: [40, 41, 42, 48, 49, 19, 20, 52, 56, 57, 60, 68, 70, 71, 73], min_length=1
    )  # chorale voices
    melody_programs: list[Program] = Field(
        default_factory=lambda: [73, 74, 40, 110, 22, 21, 71, 68, 65], min_length=1
    )  # folk melody
    pad_programs: list[Program] = Field(
        default_factory=lambda: [48, 49, 19, 21, 24, 25, 89], min_length=1
    )  # sustained chords under a monophonic tune
    bass_programs: list[Program] = Field(default_factory=lambda: [32, 33, 34, 35], min_length=1)
    piano_programs: list[Program] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    workers: int = Field(2, ge=1)  # local worker processes

    @field_validator("stem_gain_db")
    @classmethod
    def _every_trait_has_a_gain_range(cls, value: dict, info: ValidationInfo) -> dict:
        missing = [t for t in info.data.get("traits") or () if t not in value]
        if missing:
            raise ValueError(f"no range for trait {', '.join(missing)}")
        return value

    def piece_limit(self, corpus: str) -> int | None:
        """How many pieces of `corpus` to take (None: all)."""
        if isinstance(self.pieces, dict):
            return self.pieces[corpus] if corpus in self.pieces else None
        return self.pieces


LABELS_FILE = "labels.parquet"
ERRORS_FILE = "errors.parquet"
STATS_FILE = "render.json"
STEM_ORDER = ("drums", "bass", "piano")
_SEGMENT = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("label", pa.string())])
_KEY_SEGMENT = pa.struct(
    [("start_s", pa.float64()), ("end_s", pa.float64()), ("key", pa.string()), ("mode", pa.string())]
)
_TRAIT = pa.struct([("name", pa.string()), ("present", pa.bool_())])

LABELS_SCHEMA = pa.schema(
    [
        ("file", pa.string()),  # file name inside audio/ (the join key with the clips table)
        ("path", pa.string()),  # absolute path at render time
        ("sha256", pa.string()),
        ("piece_id", pa.string()),
        ("corpus", pa.string()),
        ("title", pa.string()),
        ("score_path", pa.string()),
        ("variant", pa.int32()),
        ("mix_id", pa.string()),  # same mixture up to trait stems
        ("split_group", pa.string()),  # the piece: all its variants land in one split
        ("stems", pa.list_(pa.string())),
        ("traits", pa.list_(_TRAIT)),
        ("instrumentation", pa.list_(pa.string())),
        ("description", pa.string()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("tempo_bpm", pa.float64()),
        ("beat_unit", pa.string()),  # quarter | dotted quarter | eighth
        ("time_signature", pa.string()),
        ("beats_s", pa.list_(pa.float64())),
        ("downbeats_s", pa.list_(pa.float64())),
        ("key", pa.string()),  # global key of the rendered span
        ("mode", pa.string()),
        ("key_segments", pa.list_(_KEY_SEGMENT)),  # local keys (modulations)
        ("chords", pa.list_(_SEGMENT)),  # Harte labels
        ("chord_source", pa.string()),  # symbols | analysis | harmonisation
        ("transpose", pa.int32()),
        ("styles", pa.string()),  # JSON: drum/bass/piano pattern styles
    ]
)
ERRORS_SCHEMA = pa.schema(
    [("piece_id", pa.string()), ("score_path", pa.string()), ("error_type", pa.string()), ("message", pa.string())]
)


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


# ----------------------------------------------------------------------------------------------------------
# Driver: which pieces


def select_pieces(params: CorpusParams) -> list[PieceRef]:
    """Seeded selection: per corpus, shuffle (seed) and take `pieces[corpus]` after skipping `piece_offset`
    (a different offset gives a disjoint, held-out set)."""
    offset = params.piece_offset
    refs: list[PieceRef] = []
    for name in params.corpora:
        listed = list_corpus(name, params.scores_dir)
        random.Random(f"{params.seed}:{name}").shuffle(listed)
        limit = params.piece_limit(name)
        refs += listed[offset:] if limit is None else listed[offset : offset + limit]
    if params.scores_dir and "user" not in params.corpora:
        refs += list_corpus("user", params.scores_dir)
    if not refs:
        raise PipelineUserError("no pieces selected: check corpus.corpora / corpus.pieces / corpus.scores_dir")
    return refs


# ----------------------------------------------------------------------------------------------------------
# Synthesis


def mix_stems(
    stems: dict[str, np.ndarray], gains_db: dict[str, float], mixes: list[frozenset[str]], peak: float = 0.89
) -> tuple[dict[str, np.ndarray], dict[frozenset, np.ndarray]]:
    """Scale all stems by their gain and one shared normaliser (the loudest mix peaks at `peak`), quantise them
    to int16, and sum: every mix is an exact integer sum of its stems."""
    scaled = {k: v * 10 ** (gains_db.get(k, 0.0) / 20) for k, v in stems.items()}
    # Sum in a fixed order: a frozenset of strings iterates in an order that changes per process (hash
    # randomisation), and a float sum in another order moved `loudest` by an ulp, flipping LSBs between runs.
    loudest = max(np.abs(sum(scaled[s] for s in ("score", *sorted(m)))).max() for m in mixes)
    norm = peak / max(loudest, 1e-9)
    q = {k: np.round(v * norm * 32767).astype(np.int32) for k, v in scaled.items()}
    out = {m: sum(q[s] for s in ("score", *sorted(m))) for m in mixes}
    for m, v in out.items():
        out[m] = np.clip(v, -32768, 32767).astype(np.int16)
    return {k: v.astype(np.int16) for k, v in q.items()}, out


# ----------------------------------------------------------------------------------------------------------
# One piece


@dataclass
class PieceTruth:
    """Ground truth of a score over the rendered span, in ql and untransposed."""

    cut: float
    chords_ql: list[tuple[float, float, str]]
    chord_source: str
    key: tuple[int, str]
    key_segments: list[tuple[float, float, int, str]]


def piece_truth(score: Score, max_ql: float) -> PieceTruth:
    """Where to stop (the last downbeat within the duration cap, so the piece ends on a bar line) and the
    harmonic ground truth up to there."""
    cut = min(score.end, max_ql)
    if cut < score.end - EPS:
        downs = [d for d in score.downbeats if d <= cut + EPS and d > cut * 0.6]
        cut = downs[-1] if downs else cut
    key = score_key(score, cut)
    if score.chord_symbols:
        chords, source = symbol_chords(score, cut), "symbols"
    elif score.polyphonic:
        chords, source = analyse_chords(score, cut), "analysis"
    else:
        chords, source = harmonise_melody(score, cut, *key), "harmonisation"
    return PieceTruth(cut, chords, source, key, key_segments(score, cut))


def mix_name(piece_id: str, variant: int, traits: frozenset[str]) -> str:
    tag = "".join(t[0] for t in STEM_ORDER if t in traits) or "none"
    return f"{piece_id}-v{variant}-{tag}"


def render_piece(ref: PieceRef, params: CorpusParams, out_root: str, sf2_bytes: bytes) -> list[dict]:
    """Render every variant of one piece; write stems, mixes and sidecars; return one labels row per mix."""
    import soundfile as sf

    sr = params.sample_rate
    score = load_score(ref)
    seed = params.seed
    rows = []
    for v in range(params.variants):
        rng = _rng(seed, ref.piece_id, v)
        # tempo first: the duration cap in ql depends on it
        bpm = choose_tempo(score, params, _rng(seed, ref.piece_id, v))
        spq = 60.0 / (bpm * score.beat_ql)
        truth = piece_truth(score, params.piece_seconds / spq)
        arr: Arrangement = arrange(score, truth.chords_ql, truth.cut, v, params, rng)
        tail_s = params.tail_seconds
        n = int(round((truth.cut * spq + tail_s) * sr))
        stems = {name: synthesize(sf2_bytes, stem, spq, n, sr) for name, stem in arr.stems.items()}
        mixes = mixes_of(arr)
        q_stems, q_mixes = mix_stems(stems, arr.gains_db, mixes)

        mix_id = f"{ref.piece_id}-v{v}"
        stem_dir = os.path.join(out_root, "stems", mix_id)
        os.makedirs(stem_dir, exist_ok=True)
        for name, wave in q_stems.items():
            sf.write(os.path.join(stem_dir, f"{name}.flac"), wave, sr, subtype="PCM_16")

        t = arr.transpose
        beats = [float(b * spq) for b in score.beats if b < truth.cut - EPS]
        downbeats = [float(b * spq) for b in score.downbeats if b < truth.cut - EPS]
        chords = [
            {"start_s": a * spq, "end_s": b * spq, "label": transpose_label(lab, t)} for a, b, lab in truth.chords_ql
        ]
        ksegs = [
            {"start_s": a * spq, "end_s": b * spq, "key": key_name(k + t), "mode": m}
            for a, b, k, m in truth.key_segments
        ]
        ground = {
            "tempo_bpm": arr.bpm,
            "time_signature": score.time_signature,
            "beat_unit": {1.0: "quarter", 1.5: "dotted quarter", 0.5: "eighth"}[score.beat_ql],
            "beats_s": beats,
            "downbeats_s": downbeats,
            "key": key_name(truth.key[0] + t),
            "mode": truth.key[1],
            "key_segments": ksegs,
            "chords": chords,
            "chord_source": truth.chord_source,
            "transpose": t,
        }
        score_words = arr.instruments("score")
        for traits in mixes:
            present = [s for s in STEM_ORDER if s in traits]
            name = mix_name(ref.piece_id, v, traits)
            audio_path = os.path.join(out_root, "audio", f"{name}.flac")
            sf.write(audio_path, q_mixes[traits], sr, subtype="PCM_16")
            description = describe(ref.corpus, score_words, present)
            trait_map = {s: (s in traits) for s in STEM_ORDER if s in arr.stems}
            instrumentation = score_words + [w for s in present for w in arr.instruments(s)]
            sidecar = {
                "description": description,
                "traits": trait_map,
                "split_group": ref.piece_id,
                "mix_id": mix_id,
                "piece_id": ref.piece_id,
                "title": score.title,
                "instrumentation": instrumentation,
                "stems": ["score", *present],
                **ground,
            }
            with open(os.path.join(out_root, "audio", f"{name}.json"), "w") as f:
                json.dump(sidecar, f, indent=1)
            with open(audio_path, "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
            rows.append(
                {
                    "file": f"{name}.flac",
                    "path": os.path.abspath(audio_path),
                    "sha256": sha,
                    "piece_id": ref.piece_id,
                    "corpus": ref.corpus,
                    "title": score.title,
                    "score_path": ref.path,
                    "variant": v,
                    "mix_id": mix_id,
                    "split_group": ref.piece_id,
                    "stems": ["score", *present],
                    "traits": [{"name": k, "present": b} for k, b in sorted(trait_map.items())],
                    "instrumentation": instrumentation,
                    "description": description,
                    "duration_s": n / sr,
                    "sample_rate": sr,
                    **{
                        k: ground[k]
                        for k in (
                            "tempo_bpm",
                            "beat_unit",
                            "time_signature",
                            "beats_s",
                            "downbeats_s",
                            "key",
                            "mode",
                            "key_segments",
                            "chords",
                            "chord_source",
                            "transpose",
                        )
                    },
                    "styles": json.dumps(arr.styles, sort_keys=True),
                }
            )
    return rows


class RenderPiece(beam.DoFn):
    """One score -> its labels rows, or one error row. Writes audio as a side effect."""

    def __init__(self, params: CorpusParams, out_root: str, soundfont: str):
        self.params = params
        self.out_root = out_root
        self.soundfont = soundfont

    def setup(self):
        import music21  # noqa: F401  (heavy import once per worker)

        with open(self.soundfont, "rb") as f:
            self.sf2 = f.read()
        self.failed = beam.metrics.Metrics.counter("corpus", "pieces_failed")

    def process(self, ref: PieceRef):
        try:
            rows = render_piece(ref, self.params, self.out_root, self.sf2)
        except Exception as e:  # a score music21 cannot read, or one too short: an error row, never a crash
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(
                "errors",
                {
                    "piece_id": ref.piece_id,
                    "score_path": ref.path,
                    "error_type": type(e).__name__,
                    "message": str(e)[:500],
                },
            )
            return
        yield from rows


def _write_table(rows: list[dict], path: str, schema: pa.Schema, sort_key: str) -> str:
    rows = sorted(rows, key=lambda r: r[sort_key])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")
    return path


@dataclass
class RenderResult:
    out: str
    stats: dict


def render_corpus(
    out: str,
    params: CorpusParams,
    workers: int | None = None,
    runner: str | None = None,
    beam_args: list[str] | None = None,
) -> RenderResult:
    """Render the selected pieces into `out` (audio/, stems/, labels.parquet). Previous audio/ and stems/ in
    `out` are replaced: the folder is this stage's output."""
    from pipelines.runner import AsRecords, is_local, make_pipeline, write_tables

    soundfont = params.soundfont or default_soundfont()
    if not os.path.exists(soundfont):
        raise PipelineUserError(f"soundfont not found: {soundfont}")
    refs = select_pieces(params)
    workers = workers or params.workers
    for sub in ("audio", "stems"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    out_abs = os.path.abspath(out)
    started = time.time()
    log.info("rendering %d pieces x %d variants into %s", len(refs), params.variants, out)
    if is_local(runner):
        with make_pipeline(runner, workers, beam_args) as p:
            results = (
                p
                | "Pieces" >> beam.Create(refs)
                | "Spread" >> beam.Reshuffle()
                | "Render" >> beam.ParDo(RenderPiece(params, out_abs, soundfont)).with_outputs("errors", main="labels")
            )
            (
                results.labels
                | "CollectLabels" >> beam.combiners.ToList()
                | "WriteLabels" >> beam.Map(_write_table, os.path.join(out_abs, LABELS_FILE), LABELS_SCHEMA, "file")
            )
            (
                results.errors
                | "CollectErrors" >> beam.combiners.ToList()
                | "WriteErrors" >> beam.Map(_write_table, os.path.join(out_abs, ERRORS_FILE), ERRORS_SCHEMA, "piece_id")
            )
    else:  # one sink: see pipelines/runner.py (the local runner keeps one branch per table)
        with make_pipeline(runner, workers, beam_args) as p:
            records = (
                p
                | "Pieces" >> beam.Create(refs)
                | "Spread" >> beam.Reshuffle()
                | "Render" >> beam.ParDo(AsRecords(RenderPiece(params, out_abs, soundfont), main="labels"))
            )
            write_tables(
                p,
                records,
                write_side={
                    "labels": partial(
                        _write_table, path=os.path.join(out_abs, LABELS_FILE), schema=LABELS_SCHEMA, sort_key="file"
                    ),
                    "errors": partial(
                        _write_table, path=os.path.join(out_abs, ERRORS_FILE), schema=ERRORS_SCHEMA, sort_key="piece_id"
                    ),
                },
            )
    elapsed = time.time() - started
    labels = pq.read_table(os.path.join(out_abs, LABELS_FILE)).to_pylist()
    errors = pq.read_table(os.path.join(out_abs, ERRORS_FILE)).to_pylist()
    audio_s = sum(r["duration_s"] for r in labels)
    stats = {
        "pieces_selected": len(refs),
        "pieces_rendered": len({r["piece_id"] for r in labels}),
        "pieces_failed": len(errors),
        "mixes": len(labels),
        "audio_hours": round(audio_s / 3600, 4),
        "render_seconds": round(elapsed, 2),
        "realtime_factor": round(audio_s / max(elapsed, 1e-9), 1),
        "traits_present": {
            t: sum(any(x["name"] == t and x["present"] for x in r["traits"]) for r in labels) for t in STEM_ORDER
        },
        "corpora": {
            c: len({r["piece_id"] for r in labels if r["corpus"] == c}) for c in sorted({r["corpus"] for r in labels})
        },
    }
    with open(os.path.join(out_abs, STATS_FILE), "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    return RenderResult(out, stats)
