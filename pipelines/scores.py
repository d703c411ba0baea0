"""`smitin scores build`: the Apache Beam pipeline from score files to the scores table (Coconet's training set).

    sources (matched on the driver: folders, globs, files, music21 corpus names; compared with the last build)
      -> Reshuffle (spread sources over workers)
      -> ReadSource: hash, parse, one row per piece                  -> errors, sources (tagged outputs)
      -> + rows of unchanged sources, read back from the previous shards
      -> key by shard (hash of the piece id) -> GroupByKey -> WriteShard (rows sorted by piece_id)
      -> commit (core.commit: journaled, under the output's lock)

Inputs: MusicXML / MIDI / ABC / Humdrum files (one piece per score, each tune of an ABC or MIDI opus a piece),
`music21:NAME` corpus works, and JSB-style JSON (`{"train": [piece, ...], "valid": ..., "test": ...}`, each piece a
list of frames of four MIDI pitches, -1 silent; gzip allowed), whose pieces keep the split they are filed under.
Other sources get their split by hashing the source's content, so every piece of a file lands in one split.

A piece that is not four voices, has overlapping notes or chords in a voice, or cannot be parsed is an error row
with a one-line reason; a file of a type the pipeline does not read is listed as skipped. Nothing is dropped
silently: every matched file is in `_sources.parquet`, every piece is a row or an error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from core import scores_table as schema
from core.commit import commit, new_tmp_dir, output_lock, recover
from core.config import Section
from core.errors import UserError
from core.score_io import (
    MUSIC21_PREFIX,
    SCORE_EXTENSIONS,
    ScoreError,
    parse_scores,
    resolve_music21,
    score_voices,
    voices_to_roll,
)
from core.splits import assign_split

log = logging.getLogger(__name__)
JSON_EXTENSIONS = (".json", ".json.gz")
N_VOICES = 4


class BuildScoresParams(Section):
    """params.yaml `build_scores` (every default is here)."""

    seed: int = 0
    input: list[str] = Field(default_factory=lambda: ["pipelines/data/jsb/Jsb16thSeparated.json.gz"])
    split_fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "valid": 0.1, "test": 0.1})
    num_shards: int = Field(1, ge=1)
    workers: int = Field(1, ge=1)
    wait_seconds: float = Field(0.0, ge=0)  # how long to wait for another build of the same output


# ----------------------------------------------------------------------------------------------------------
# Driver: what to read


@dataclass(frozen=True)
class ScoreSource:
    path: str  # a local path, fsspec URL, or music21:NAME
    size: int
    mtime: float
    kind: str  # score | jsb | music21 | skipped


def _kind(path: str) -> str:
    low = path.lower()
    if low.endswith(JSON_EXTENSIONS):
        return "jsb"
    if low.endswith(SCORE_EXTENSIONS):
        return "score"
    return "skipped"


def match_sources(inputs: list[str]) -> list[ScoreSource]:
    """Every file under the given folders / globs / files, and the music21 works named. Files whose type is not
    read are kept as `skipped` (listed, not analysed); a path that matches nothing is an error."""
    out: dict[str, ScoreSource] = {}
    for spec in inputs:
        if spec.startswith(MUSIC21_PREFIX):
            resolved = resolve_music21(spec)
            st = os.stat(resolved)
            out[spec] = ScoreSource(spec, st.st_size, st.st_mtime, "music21")
            continue
        fs, root = fsspec.core.url_to_fs(spec)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if any(ch in root for ch in "*?["):
            paths = fs.glob(root)
        elif fs.isdir(root):
            paths = fs.find(root)
        elif fs.exists(root):
            paths = [root]
        else:
            raise UserError(f"scores input not found: {spec}")
        for p in sorted(paths):
            if "/." in p or os.path.basename(p).startswith((".", "_")):
                continue
            info = fs.info(p)
            if info.get("type") == "directory":
                continue
            mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or 0
            mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
            url = p if protocol in ("file", "local") else f"{protocol}://{p}"
            out[url] = ScoreSource(url, int(info.get("size") or 0), float(mtime), _kind(url))
    return sorted(out.values(), key=lambda s: s.path)


_CODE = ("pipelines/scores.py", "core/score_io.py", "core/scores_table.py")


def build_fingerprint(params: BuildScoresParams) -> str:
    """What makes rows from a source: the split fractions and the reading code."""
    h = hashlib.sha256(json.dumps(params.split_fractions, sort_keys=True).encode())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for rel in _CODE:
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@dataclass
class Plan:
    to_read: list[ScoreSource]
    kept: dict[str, dict]  # source path -> previous sources row (unchanged, fully read last time)
    dropped: list[str]

    @property
    def up_to_date(self) -> bool:
        return not self.to_read and not self.dropped


def plan_refresh(sources: list[ScoreSource], out: str, fingerprint: str) -> Plan:
    """Unchanged sources (same size and mtime, read without errors last time, same fingerprint) are kept; the
    rest are read again (a source that failed is retried every build)."""
    previous = _read_side(out, schema.SOURCES_FILE)
    stats = _read_stats(out)
    seen = {s.path for s in sources}
    dropped = sorted(r["source_path"] for r in previous if r["source_path"] not in seen)
    if stats.get("build_fingerprint") != fingerprint or not _shards(out):
        return Plan(list(sources), {}, dropped)
    before = {r["source_path"]: r for r in previous}
    kept, to_read = {}, []
    for s in sources:
        row = before.get(s.path)
        if row and row["status"] in ("ok", "skipped") and row["size"] == s.size and abs(row["mtime"] - s.mtime) < 1e-3:
            kept[s.path] = row
        else:
            to_read.append(s)
    return Plan(to_read, kept, dropped)


def _read_side(out: str, name: str) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(out)
    path = f"{root.rstrip('/')}/{name}"
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pylist()


def _read_stats(out: str) -> dict:
    fs, root = fsspec.core.url_to_fs(out)
    path = f"{root.rstrip('/')}/{schema.STATS_FILE}"
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        return json.load(f)


def _shards(out: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(out)
    return sorted(fs.glob(f"{root.rstrip('/')}/{schema.SHARDS_GLOB}"))


# ----------------------------------------------------------------------------------------------------------
# Worker side


def roll_row(
    roll: np.ndarray,
    source: ScoreSource,
    sha: str,
    index: int,
    split: str,
    title: str = "",
    key: str | None = None,
    time_signature: str | None = None,
    label: str | None = None,
) -> dict:
    sounding = roll[roll >= 0]
    return {
        "piece_id": f"{sha[:12]}-{label or f'{index:04d}'}",
        "source_path": source.path,
        "source_sha256": sha,
        "piece_index": index,
        "title": title,
        "split": split,
        "n_frames": int(roll.shape[1]),
        "roll": roll.T.astype(np.int16).tolist(),
        "key": key,
        "time_signature": time_signature,
        "min_pitch": int(sounding.min()) if sounding.size else None,
        "max_pitch": int(sounding.max()) if sounding.size else None,
    }


def jsb_rolls(data) -> list[tuple[str, int, np.ndarray | str]]:
    """(split, index, roll [4, T] or the reason it is not one) of every piece of a JSB-style JSON document."""
    if not isinstance(data, dict) or not data:
        raise ValueError("a JSB JSON file must map split names (train, valid, test) to lists of pieces")
    out = []
    for split, pieces in data.items():
        if split not in schema.SPLITS:
            raise ValueError(f"unknown split {split!r} in the JSON (expected train, valid, test)")
        if not isinstance(pieces, list):
            raise ValueError(f"split {split!r} must hold a list of pieces")
        for i, piece in enumerate(pieces):
            try:
                arr = np.asarray(piece)
                if arr.ndim != 2 or arr.shape[1] != N_VOICES or arr.shape[0] == 0:
                    raise ValueError(
                        f"a piece must be a non-empty list of frames of {N_VOICES} pitches, got shape {list(arr.shape)}"
                    )
                if not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
                    raise ValueError("pitches must be whole MIDI numbers")
                arr = arr.astype(np.int64)
                if arr.min() < -1 or arr.max() > 127:
                    raise ValueError("pitches must be MIDI numbers 0..127 or -1 for silence")
                if (arr < 0).all():
                    raise ValueError("the piece has no notes")
                out.append((split, i, arr.T))
            except (ValueError, TypeError) as e:
                out.append((split, i, str(e)))
    return out


class ReadSource(beam.DoFn):
    """One source -> its piece rows, an error row per piece that fails (or one for the whole source), and one
    sources row."""

    def __init__(self, split_fractions: dict[str, float]):
        self.split_fractions = split_fractions

    def process(self, source: ScoreSource):
        errors, rows = [], []
        sha = None
        stage = "read"
        try:
            real = resolve_music21(source.path) if source.kind == "music21" else source.path
            with fsspec.open(real, "rb") as f:
                data = f.read()
            if not data:
                raise ValueError("empty file")
            sha = hashlib.sha256(data).hexdigest()
            if source.kind == "skipped":
                yield beam.pvalue.TaggedOutput("sources", self._source_row(source, sha, "skipped", 0))
                return
            stage = "parse"
            if source.kind == "jsb":
                text = gzip.decompress(data) if source.path.lower().endswith(".gz") else data
                for split, i, roll in jsb_rolls(json.loads(text)):
                    label = f"{split}-{i:04d}"
                    if isinstance(roll, str):
                        errors.append(self._error(source, label, "voices", "ValueError", roll))
                    else:
                        rows.append(roll_row(roll, source, sha, i, split, label=label))
            else:
                split = assign_split(sha, self.split_fractions)
                local = real if "://" not in real else None
                if local is None:
                    raise ValueError("scores other than JSB JSON must be local files (music21 reads from disk)")
                scores = parse_scores(local)
                for i, score in enumerate(scores):
                    where = f"{os.path.basename(source.path)}" + (f" #{i + 1}" if len(scores) > 1 else "")
                    try:
                        voices = score_voices(score, where=where)
                        roll = voices_to_roll(voices, N_VOICES, where=where)
                        rows.append(
                            roll_row(roll, source, sha, i, split, voices.title, voices.key, voices.time_signature)
                        )
                    except ScoreError as e:
                        errors.append(self._error(source, str(i), "voices", "ScoreError", str(e)))
        except Exception as e:  # every failure becomes an error row; the pipeline goes on
            errors.append(self._error(source, "", stage, type(e).__name__, str(e)))
            rows = []
        status = "ok" if rows and not errors else "partial" if rows else "error"
        for e in errors:
            yield beam.pvalue.TaggedOutput("errors", e)
        yield beam.pvalue.TaggedOutput("sources", self._source_row(source, sha, status, len(rows)))
        yield from rows

    @staticmethod
    def _error(source: ScoreSource, piece: str, stage: str, kind: str, message: str) -> dict:
        one_line = " ".join(str(message).split())[:500]
        return {"source_path": source.path, "piece": piece, "stage": stage, "error_type": kind, "message": one_line}

    @staticmethod
    def _source_row(source: ScoreSource, sha: str | None, status: str, n: int) -> dict:
        return {
            "source_path": source.path,
            "size": source.size,
            "mtime": source.mtime,
            "source_sha256": sha,
            "status": status,
            "n_pieces": n,
        }


class WriteShard(beam.DoFn):
    def __init__(self, tmp_url: str, num_shards: int):
        self.tmp_url, self.num_shards = tmp_url, num_shards

    def process(self, keyed):
        index, rows = keyed
        table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["piece_id"]), schema=schema.SCORES_SCHEMA)
        path = f"{self.tmp_url}/{schema.shard_name(index, self.num_shards)}"
        with fsspec.open(path, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        yield path


def shard_of(piece_id: str, n: int) -> int:
    return int(hashlib.sha256(piece_id.encode()).hexdigest()[:8], 16) % n


def _write_side(rows: list[dict], path: str, table_schema: pa.Schema, extra: list[dict], key) -> str:
    # ties broken on every field: runners that group rows in another order write the same bytes
    rows = sorted(list(rows) + list(extra), key=lambda r: (key(r), json.dumps(r, sort_keys=True, default=str)))
    with fsspec.open(path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=table_schema), f, compression="zstd")
    return path


# ----------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class ScoresBuild:
    out: str
    up_to_date: bool
    stats: dict = field(default_factory=dict)


def build_scores(
    inputs: list[str],
    out: str,
    params: BuildScoresParams,
    runner: str | None = None,
    beam_args: list[str] | None = None,
    commit_fail_after: int | None = None,
) -> ScoresBuild:
    """Build (or refresh) the scores table in folder `out`."""
    from pipelines.runner import AsRecords, ReadKeptRows, is_local, make_pipeline, write_tables

    if not inputs:
        raise UserError("no scores input given (--input or params build_scores.input)")
    with output_lock(out, params.wait_seconds):
        recover(out)
        sources = match_sources(inputs)
        fingerprint = build_fingerprint(params)
        plan = plan_refresh(sources, out, fingerprint)
        if plan.up_to_date and len(_shards(out)) == params.num_shards:
            return ScoresBuild(out, True, _read_stats(out))
        log.info(
            "%d sources: %d to read, %d unchanged, %d gone",
            len(sources),
            len(plan.to_read),
            len(plan.kept),
            len(plan.dropped),
        )
        fs, root = fsspec.core.url_to_fs(out)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        tmp_root = new_tmp_dir(fs, root)
        tmp_url = tmp_root if protocol in ("file", "local") else f"{protocol}://{tmp_root}"
        old_shards = (
            [s if protocol in ("file", "local") else f"{protocol}://{s}" for s in _shards(out)] if plan.kept else []
        )
        old_errors = [r for r in _read_side(out, schema.ERRORS_FILE) if r["source_path"] in plan.kept]
        old_sources = list(plan.kept.values())
        n = params.num_shards
        started = time.time()
        if is_local(runner):
            with make_pipeline(runner, params.workers, beam_args) as p:
                res = (
                    p
                    | "Sources" >> beam.Create(plan.to_read)
                    | "Spread" >> beam.Reshuffle()
                    | "Read"
                    >> beam.ParDo(ReadSource(dict(params.split_fractions))).with_outputs(
                        "errors", "sources", main="pieces"
                    )
                )
                pieces = res.pieces
                if old_shards:
                    kept = (
                        p
                        | "OldShards" >> beam.Create(old_shards)
                        | "ReadKept" >> beam.ParDo(ReadKeptRows(sorted(plan.kept)))
                    )
                    pieces = (pieces, kept) | "All" >> beam.Flatten()
                (
                    pieces
                    | "KeyByShard" >> beam.Map(lambda r, n=n: (shard_of(r["piece_id"], n), r))
                    | "Group" >> beam.GroupByKey()
                    | "Write" >> beam.ParDo(WriteShard(tmp_url, n))
                )
                (
                    res.errors
                    | "Errors" >> beam.combiners.ToList()
                    | "WriteErrors"
                    >> beam.Map(
                        _write_side,
                        f"{tmp_url}/{schema.ERRORS_FILE}",
                        schema.ERRORS_SCHEMA,
                        old_errors,
                        lambda r: (r["source_path"], r["piece"]),
                    )
                )
                (
                    res.sources
                    | "SourcesRows" >> beam.combiners.ToList()
                    | "WriteSources"
                    >> beam.Map(
                        _write_side,
                        f"{tmp_url}/{schema.SOURCES_FILE}",
                        schema.SOURCES_SCHEMA,
                        old_sources,
                        lambda r: r["source_path"],
                    )
                )
        else:  # one sink: see pipelines/runner.py (the local runner keeps one branch per table)
            with make_pipeline(runner, params.workers, beam_args) as p:
                records = (
                    p
                    | "Sources" >> beam.Create(plan.to_read)
                    | "Spread" >> beam.Reshuffle()
                    | "Read" >> beam.ParDo(AsRecords(ReadSource(dict(params.split_fractions)), main="pieces"))
                )
                kept = None
                if old_shards:
                    kept = (
                        p
                        | "OldShards" >> beam.Create(old_shards)
                        | "ReadKept" >> beam.ParDo(ReadKeptRows(sorted(plan.kept)))
                    )
                write_tables(
                    p,
                    records,
                    kept_rows=kept,
                    main="pieces",
                    shard_key=lambda r, n=n: shard_of(r["piece_id"], n),
                    write_shard=WriteShard(tmp_url, n),
                    write_side={
                        "errors": partial(
                            _write_side,
                            path=f"{tmp_url}/{schema.ERRORS_FILE}",
                            table_schema=schema.ERRORS_SCHEMA,
                            extra=old_errors,
                            key=lambda r: (r["source_path"], r["piece"]),
                        ),
                        "sources": partial(
                            _write_side,
                            path=f"{tmp_url}/{schema.SOURCES_FILE}",
                            table_schema=schema.SOURCES_SCHEMA,
                            extra=old_sources,
                            key=lambda r: r["source_path"],
                        ),
                    },
                )
        for i in range(n):  # empty shards too: the set of file names never depends on the data
            path = f"{tmp_root}/{schema.shard_name(i, n)}"
            if not fs.exists(path):
                with fs.open(path, "wb") as f:
                    pq.write_table(schema.SCORES_SCHEMA.empty_table(), f, compression="zstd")
        stats = compute_stats(tmp_url, len(sources))
        stats.update(
            build_seconds=round(time.time() - started, 2),
            sources_read=len(plan.to_read),
            sources_unchanged=len(plan.kept),
            sources_removed=len(plan.dropped),
            build_fingerprint=fingerprint,
        )
        with fs.open(f"{tmp_root}/{schema.STATS_FILE}", "w") as f:
            json.dump(stats, f, indent=2, sort_keys=True)
        commit(
            fs,
            tmp_root,
            root,
            (schema.SHARDS_GLOB, schema.ERRORS_FILE, schema.SOURCES_FILE, schema.STATS_FILE),
            fail_after=commit_fail_after,
        )
    return ScoresBuild(out, False, stats)


def compute_stats(out: str, n_sources: int) -> dict:
    """Counts (DVC metrics): sources by status, pieces and frames per split, errors by stage."""
    fs, root = fsspec.core.url_to_fs(out)
    tables = []
    for shard in sorted(fs.glob(f"{root.rstrip('/')}/{schema.SHARDS_GLOB}")):
        with fs.open(shard, "rb") as f:
            tables.append(pq.read_table(f, columns=["split", "n_frames"]))
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    sources = _read_side(out, schema.SOURCES_FILE)
    errors = _read_side(out, schema.ERRORS_FILE)
    per_split = {s: sum(1 for r in rows if r["split"] == s) for s in schema.SPLITS}
    frames = {s: sum(r["n_frames"] for r in rows if r["split"] == s) for s in schema.SPLITS}
    status = {k: sum(1 for r in sources if r["status"] == k) for k in ("ok", "partial", "error", "skipped")}
    return {
        "sources_in": n_sources,
        "sources": status,
        "pieces": len(rows),
        "pieces_per_split": per_split,
        "frames_per_split": frames,
        "errors": len(errors),
        "errors_by_stage": {k: sum(1 for e in errors if e["stage"] == k) for k in ("read", "parse", "voices")},
    }
