"""`smitin dataset build`: the Apache Beam pipeline from audio files to the captioned clips table.

    files (matched on the driver, compared with the last build for refresh)
      -> Reshuffle (spread files over worker processes)
      -> ProcessFile: hash, decode, cut clips, analyse, caption     -> errors (tagged output)
      -> + rows of unchanged files, read back from the previous shards
      -> key by shard (hash of the source) -> GroupByKey -> WriteShard (rows sorted by clip_id)

Shard contents and names depend only on the data, never on worker timing, so an unchanged input gives
byte-identical shards and DVC sees no change. Files in = files with clips + files in the errors table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Literal

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from core import clips_table as schema
from core.audio import AUDIO_EXTENSIONS, encode_flac, iter_clips, resample, sha256_of
from core.commit import commit, new_tmp_dir, output_lock, recover
from core.config import Section
from core.splits import assign_split
from pipelines.captions import base_description, clip_rng, compose_caption, control_sentences, read_sidecar
from pipelines.errors import PipelineUserError
from pipelines.features import DOWNBEAT_CUES, ClipAnalyzer, FeatureParams, file_bar_phase
from pipelines.runner import AsRecords, ReadKeptRows, is_local, make_pipeline, write_tables

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Params

# essentia KeyExtractor's profileType values
KeyProfile = Literal[
    "diatonic",
    "krumhansl",
    "temperley",
    "weichai",
    "tonictriad",
    "temperley2005",
    "thpcp",
    "shaath",
    "gomez",
    "noland",
    "faraldo",
    "pentatonic",
    "edmm",
    "edma",
    "bgate",
    "braw",
]
Fraction = Annotated[float, Field(ge=0, le=1)]


class DataParams(Section):
    """params.yaml `data` (every default is here)."""

    input: str | None = "data/corpus/audio"  # folder, glob or fsspec URL of the audio `smitin dataset build` reads


class BuildDatasetParams(Section):
    """params.yaml `build_dataset` (every default is here)."""

    seed: int = 0
    analysis_sample_rate: int = Field(44100, gt=0)  # essentia's RhythmExtractor2013 and KeyExtractor expect 44.1 kHz
    store_sample_rate: int = Field(32000, gt=0)  # clip audio embedded in the table
    clip_seconds: float = Field(10.0, gt=0)
    hop_seconds: float = Field(10.0, gt=0)
    min_clip_seconds: float = Field(4.0, ge=0)  # a shorter tail is dropped; a shorter file is an error row
    max_file_seconds: float | None = Field(7200.0, gt=0)  # longer files are analysed up to this point (null: all)
    silence_dbfs: float = -60.0  # clips quieter than this are flagged is_silent, with no tempo/key/chord claims
    key_profile: KeyProfile = "bgate"  # essentia KeyExtractor's profile when key_profiles is empty
    key_profiles: list[KeyProfile] = Field(
        default_factory=lambda: ["bgate", "braw", "edma", "krumhansl", "shaath", "temperley", "tonictriad"]
    )  # vote of these on one HPCP ([]: key_profile alone)
    key_file_context: float = Field(1.0, ge=0)  # weight of the file's mean key profile added to each clip's
    # the whole file's key (file_key / file_mode) on its summed HPCP: the four symbolic profiles the corpus labels
    # use ("consensus") or one essentia profile ("bgate" = KeyExtractor's default over the file; docs/ood.md)
    file_key_profile: Literal["consensus"] | KeyProfile = "consensus"
    rhythm_method: Literal["degara", "multifeature"] = "degara"  # essentia RhythmExtractor2013's method
    # beats from essentia's RhythmExtractor2013 (`rhythm_method`) or from the learned activation + tempo HMM
    # (pipelines/beat_network.py, pipelines/beat_hmm.py)
    beat_tracker: Literal["essentia", "network"] = "network"
    beat_model: str = "builtin"  # the network's weights: builtin or an .npz from benchmarks/fit_beats.py
    # the network's beats: each clip's tracked with the network run across its neighbours and the HMM decoding this
    # much of their activation on either side (back-to-back clips only; 0: each clip alone)
    beat_context_seconds: float = Field(2.5, ge=0)
    chord_method: Literal["hmm", "essentia"] = "hmm"  # beat-synchronous chroma + Viterbi | essentia ChordsDetection
    chord_self_transition: float = Field(0.3, ge=0, le=1)  # HMM: P(same chord next beat)
    tempo_halve_above_bpm: float = Field(150.0, ge=0)  # faster beat level + weak alternate beats: every other (0: off)
    # halve only where the two phases' bass / harmonic-change evidence differs by this much (z units; docs/ood.md)
    tempo_halve_min_contrast: float = 0.15
    # the network's beats: a beat level still faster than this is a subdivision; its beats are grouped in twos or
    # threes, whichever the downbeat evidence supports (0: off; docs/ood.md)
    beat_group_above_bpm: float = Field(160.0, ge=0)
    # `network`: the learned activation's downbeat output at each beat (needs beat_tracker network)
    downbeat_evidence: Literal["learned", "weighted", "chroma_bass", "onsets_chords", "network"] = "learned"
    # `learned` evidence plus this x the network's downbeat log-odds at each beat (beat_tracker network; essentia's
    # tracker has no such output, so there it does nothing)
    downbeat_network_weight: float = Field(0.5, ge=0)
    downbeat_model: str = "builtin"  # `learned` evidence's model: builtin or a model JSON (benchmarks/fit_downbeats.py)
    downbeat_file_context: bool = True  # meter and bar phase over the whole file (clips' beat grids stitched)
    # a clip leaves the file's bar phase where its own evidence beats it by this much (a beat-count slip at a clip
    # boundary; null: never)
    downbeat_rephase_penalty: float | None = Field(1.5, ge=0)
    meter_bias: dict[int, float] = Field(default_factory=lambda: {2: -0.5, 3: 0.0, 4: 0.0})  # bar-phase bonus
    # `weighted` evidence: weight of each z-scored cue
    downbeat_weights: dict[Literal[DOWNBEAT_CUES], float] = Field(
        default_factory=lambda: {
            "bass": 1.0,
            "chord_change": 0.6,
            "novelty": 0.45,
            "low_onset": 0.1,
            "high_onset": -0.35,
        }
    )
    # essentia's beats only: settle first/last beats, fix off-beat phase and compound (6/8) beats (the network's beats
    # are only halved when too fast: refining them lost beat F on the OOD dev set)
    beat_refine: bool = True
    beat_phase_margin: float = 0.5  # off-beat evidence above on-beat by this much: shift half a beat
    beat_compound_margin: float = 0.8  # dotted-beat evidence above 2-tatum evidence by this much: compound metre
    split_fractions: dict[Literal["train", "valid", "test"], Fraction] = Field(
        default_factory=lambda: {"train": 0.8, "valid": 0.1, "test": 0.1}
    )
    num_shards: int = Field(2, ge=1)
    workers: int = Field(2, ge=1)  # local worker processes
    caption_sentence_probs: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [0.15, 0.25, 0.30, 0.20, 0.10], min_length=1
    )  # P(0, 1, ... control sentences in a caption), as MusicBench


# ----------------------------------------------------------------------------------------------------------
# Driver side: what to process


@dataclass(frozen=True)
class SourceFile:
    path: str
    size: int
    mtime: float
    sidecar_sha256: str = ""  # the description sidecar's hash: an edited caption re-analyses the file
    problem: str = ""  # why the entry cannot be read at all (not a regular file, a broken link): an error row


SIDECAR_EXTENSIONS = (".json", ".txt")


def _sidecar_hash(fs, path: str) -> str:
    """sha256 of the sidecars `read_sidecar` would read for this audio file ("" when there are none)."""
    stem = path.rsplit(".", 1)[0]
    h = hashlib.sha256()
    found = False
    for ext in SIDECAR_EXTENSIONS:
        for candidate in (path + ext, stem + ext):
            try:
                with fs.open(candidate, "rb") as f:
                    h.update(candidate.encode() + b"\0" + f.read())
                found = True
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
                continue
            except OSError as e:
                h.update(f"{candidate}: {e}".encode())
                found = True
    return h.hexdigest() if found else ""


def _local_problem(path: str) -> str:
    """Why a local directory entry cannot be read as a file, or "" when it can (checked without opening it: a
    FIFO named x.wav would block an open forever)."""
    import stat as st

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        kind = "a symlink loop" if e.errno == 40 else "a broken link" if os.path.islink(path) else "unreadable"
        return f"{kind} ({e.strerror})"
    if not st.S_ISREG(mode):
        what = (
            "a FIFO"
            if st.S_ISFIFO(mode)
            else "a socket"
            if st.S_ISSOCK(mode)
            else "a device"
            if (st.S_ISCHR(mode) or st.S_ISBLK(mode))
            else "not a regular file"
        )
        return f"not a regular file ({what})"
    return ""


@dataclass
class Matched:
    audio: list[SourceFile]
    skipped: list[str]  # files of a type the pipeline does not read (sidecars excluded)


def match_inputs(input_spec: str) -> Matched:
    """Audio files under a folder, matching a glob, or a single file; local paths or fsspec URLs. Entries that are
    not regular files keep their place with a `problem`; other file types are listed as skipped."""
    fs, root = fsspec.core.url_to_fs(input_spec)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    try:
        if any(ch in root for ch in "*?["):
            paths = fs.glob(root)
        elif fs.isdir(root):
            paths = list(fs.find(root))
        elif fs.exists(root) or (local and os.path.lexists(root)):
            paths = [root]
        else:
            raise PipelineUserError(f"input not found: {input_spec}")
    except OSError as e:
        raise PipelineUserError(f"cannot list {input_spec}: {e.strerror or e}") from None
    audio, others = [], []
    for p in sorted(paths):
        if "/." in p:
            continue
        url = p if local else f"{protocol}://{p}"
        if not p.lower().endswith(AUDIO_EXTENSIONS):
            others.append(url)
            continue
        problem = _local_problem(p) if local else ""
        if problem:
            audio.append(SourceFile(url, 0, 0.0, "", problem))
            continue
        try:
            info = fs.info(p)
        except OSError as e:
            audio.append(SourceFile(url, 0, 0.0, "", f"unreadable ({e.strerror or e})"))
            continue
        if info.get("type") == "directory":
            continue
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or 0
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        audio.append(SourceFile(url, int(info.get("size") or 0), float(mtime), _sidecar_hash(fs, p)))
    sidecars = {a.path + ext for a in audio for ext in SIDECAR_EXTENSIONS} | {
        a.path.rsplit(".", 1)[0] + ext for a in audio for ext in SIDECAR_EXTENSIONS
    }
    return Matched(audio, [o for o in others if o not in sidecars])


def match_audio(input_spec: str) -> list[SourceFile]:
    """The readable audio files of `input_spec` (see `match_inputs`)."""
    return [f for f in match_inputs(input_spec).audio if not f.problem]


@dataclass
class RefreshPlan:
    to_process: list[SourceFile]
    kept: dict[str, dict]  # source_path -> previous sources row, for unchanged files
    dropped: list[str]  # sources that disappeared since the last build

    @property
    def up_to_date(self) -> bool:
        return not self.to_process and not self.dropped


# Modules whose code decides a clip row: a change in any of them (or in the build params, or in the beat network's
# or the downbeat model's weights) invalidates every kept row.
_ANALYSIS_MODULES = (
    "pipelines/beat_hmm.py",
    "pipelines/beat_network.py",
    "pipelines/captions.py",
    "pipelines/chords.py",
    "pipelines/dataset.py",
    "pipelines/features.py",
    "pipelines/loudness.py",
    "core/audio.py",
    "core/clips_table.py",
)


def analysis_fingerprint(params: BuildDatasetParams) -> str:
    """sha256 of what makes a clip row from a file: the build params (not the worker count, runner or shard
    count, which do not change rows), the analysis code, the downbeat model and the beat network's weights."""
    from pipelines.beat_network import BUILTIN as BEAT_MODEL
    from pipelines.features import DOWNBEAT_MODEL

    h = hashlib.sha256(
        json.dumps(
            params.model_dump(exclude={"workers", "num_shards"}),
            sort_keys=True,
            default=str,
        ).encode()
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    models = [
        DOWNBEAT_MODEL if params.downbeat_model == "builtin" else params.downbeat_model,
        BEAT_MODEL if params.beat_model == "builtin" else params.beat_model,
    ]
    for path in [os.path.join(root, m) for m in _ANALYSIS_MODULES] + models:
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def plan_refresh(
    files: list[SourceFile], out: str, fingerprint: str | None = None, rehash: bool = False
) -> RefreshPlan:
    """Which files to (re)analyse: new and changed ones (size, mtime or sidecar differ; with `rehash`, content
    that differs whatever its size and mtime say), every file whose last analysis failed (a fixed permission or
    a file replaced in place is retried), or all of them when the previous build was made with other params or
    analysis code (`fingerprint`, see `analysis_fingerprint`)."""
    previous = _read_small(out, schema.SOURCES_FILE)
    seen = {f.path for f in files}
    if fingerprint is not None and previous and _read_stats(out).get("analysis_fingerprint") != fingerprint:
        log.info("%s was built with other params or analysis code: every file is analysed again", out)
        return RefreshPlan(
            list(files), {}, sorted(row["source_path"] for row in previous if row["source_path"] not in seen)
        )
    before = {row["source_path"]: row for row in previous}
    kept, to_process = {}, []
    for f in files:
        row = before.get(f.path)
        same = row is not None and row["status"] == "ok" and row.get("sidecar_sha256", None) == f.sidecar_sha256
        if same and rehash:
            same = sha256_of(f.path)[0] == row["source_sha256"]
        elif same:
            same = row["size"] == f.size and abs(row["mtime"] - f.mtime) < 1e-3
        if same:
            kept[f.path] = {**row, "size": f.size, "mtime": f.mtime}
        else:
            to_process.append(f)
    # A previous build whose shards are missing cannot be trusted for kept rows.
    if kept and not _list_shards(out):
        to_process = files
        kept = {}
    dropped = sorted(p for p in before if p not in seen)
    return RefreshPlan(to_process, kept, dropped)


def _read_small(out: str, name: str) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(out)
    path = f"{root.rstrip('/')}/{name}"
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pylist()


def _list_shards(out: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(out)
    return sorted(fs.glob(f"{root.rstrip('/')}/{schema.CLIPS_GLOB}"))


# ----------------------------------------------------------------------------------------------------------
# Worker side


def shard_of(source_sha256: str, num_shards: int) -> int:
    return int(source_sha256[:8], 16) % num_shards


class ProcessFile(beam.DoFn):
    """One source file -> all its clip rows, or one error row. Never both: a file that fails part-way
    through is reported as an error and none of its clips are kept, so files in = files ok + files failed."""

    def __init__(self, params: BuildDatasetParams):
        self.params = params

    def setup(self):
        from threadpoolctl import threadpool_limits

        # One BLAS thread per worker process: the workers already fill the cores, and several processes each
        # spinning up BLAS threads for small matrix products (the beat network, the spectral bases) cost more CPU
        # than the products themselves (a 6-minute build: 25 s of CPU against 19 s).
        threadpool_limits(limits=1, user_api="blas")
        self.analyzer = ClipAnalyzer(FeatureParams.from_params(self.params))
        self.clips_counter = beam.metrics.Metrics.counter("dataset", "clips")
        self.failed_counter = beam.metrics.Metrics.counter("dataset", "files_failed")

    def process(self, source: SourceFile):
        p = self.params
        stage = "read"
        try:
            sha, size = sha256_of(source.path)
            if size == 0:
                raise ValueError("empty file")
            sidecar = read_sidecar(source.path)
            stage = "decode"
            sr = p.analysis_sample_rate
            info, clips = iter_clips(
                source.path, sr, p.clip_seconds, p.hop_seconds, p.min_clip_seconds, p.max_file_seconds
            )
            stored = {}  # clip index -> (duration_s, FLAC bytes): each wave is encoded as it passes, never kept

            def decoded():
                nonlocal stage
                for index, start_s, wave in clips:
                    stored[index] = (len(wave) / sr, self._encode(wave))
                    stage = "analyze"
                    yield index, start_s, wave
                    stage = "decode"

            analysed = []
            for index, start_s, features in self.analyzer.analyze_clips(decoded()):
                duration_s, flac = stored.pop(index)
                analysed.append((index, start_s, duration_s, features, flac))
            if not analysed:
                raise ValueError(
                    f"shorter than min_clip_seconds={p.min_clip_seconds}s ({info.duration_s:.2f}s decoded)"
                )
            stage = "analyze"
            self._keys_in_file_context([features for _, _, _, features, _ in analysed])
            self._file_key([features for _, _, _, features, _ in analysed])
            self._downbeats_in_file_context([(start_s, features) for _, start_s, _, features, _ in analysed])
            rows = [self._row(source, sha, sidecar, *clip) for clip in analysed]
        except Exception as e:  # every failure becomes an error row; the pipeline goes on
            self.failed_counter.inc()
            yield beam.pvalue.TaggedOutput(
                "errors",
                {"source_path": source.path, "stage": stage, "error_type": type(e).__name__, "message": str(e)[:1000]},
            )
            yield beam.pvalue.TaggedOutput(
                "sources",
                {
                    "source_path": source.path,
                    "size": source.size,
                    "mtime": source.mtime,
                    "source_sha256": None,
                    "status": "error",
                    "n_clips": 0,
                    "sidecar_sha256": source.sidecar_sha256,
                },
            )
            return
        self.clips_counter.inc(len(rows))
        yield beam.pvalue.TaggedOutput(
            "sources",
            {
                "source_path": source.path,
                "size": source.size,
                "mtime": source.mtime,
                "source_sha256": sha,
                "status": "ok",
                "n_clips": len(rows),
                "sidecar_sha256": source.sidecar_sha256,
            },
        )
        yield from rows

    def _encode(self, wave: np.ndarray) -> bytes:
        """The clip's audio as stored in the table: FLAC at `store_sample_rate`."""
        sr, store_sr = self.params.analysis_sample_rate, self.params.store_sample_rate
        return encode_flac(resample(wave, sr, store_sr), store_sr)

    def _keys_in_file_context(self, features: list) -> None:
        """Re-vote each clip's key with the file's mean key profile added (`key_file_context`)."""
        if not self.analyzer.params.key_file_context:
            return
        pcps = [f.key_pcp for f in features if f.key_pcp is not None]
        for f in features:
            if f.key_pcp is not None:
                f.key, f.mode, f.key_strength = self.analyzer.key_in_context(f.key_pcp, pcps)

    def _file_key(self, features: list) -> None:
        """Every clip of the file carries the file's key beside its own (a piece's key: `file_key`)."""
        key, mode = self.analyzer.file_key([f.key_pcp for f in features])
        for f in features:
            f.file_key, f.file_mode = key, mode

    def _downbeats_in_file_context(self, clips: list) -> None:
        """Meter and bar phase decided over the whole file (`downbeat_file_context`): a 10 s clip holds 4-6 bars,
        too few to tell 2/4 from 4/4 or to find the phase of a chorale, and the meter rarely changes within a
        file. Clips without beat evidence (silent, too few beats) keep their own."""
        params = self.analyzer.params
        usable = [(s, f) for s, f in clips if f.beat_evidence is not None]
        if not params.downbeat_file_context or len(usable) < 2:
            return
        downbeats, meter = file_bar_phase(
            [(s, np.asarray(f.beats_s), f.beat_evidence) for s, f in usable],
            params.meters,
            dict(params.meter_bias),
            params.downbeat_rephase_penalty,
        )
        for (_, f), d in zip(usable, downbeats):
            f.downbeats_s, f.time_signature = [float(t) for t in d], f"{meter}/4"

    def _row(
        self,
        source: SourceFile,
        sha: str,
        sidecar: dict,
        index: int,
        start_s: float,
        duration_s: float,
        features,
        audio_bytes: bytes,
    ) -> dict:
        p = self.params
        store_sr = p.store_sample_rate
        clip_id = f"{sha[:16]}-{int(round(start_s * 1000)):09d}"
        rng = clip_rng(p.seed, clip_id)
        base = base_description(sidecar)
        sentences = control_sentences(features, rng)
        caption = compose_caption(base, sentences, rng, p.caption_sentence_probs)
        traits = sidecar.get("traits") or {}
        name = os.path.basename(source.path)
        return {
            "clip_id": clip_id,
            "source_path": source.path,
            "source_sha256": sha,
            "clip_index": index,
            "start_s": float(start_s),
            "duration_s": duration_s,
            "sample_rate": store_sr,
            "split": assign_split(str(sidecar.get("split_group") or sha), p.split_fractions),
            "mix_id": str(sidecar["mix_id"]) if sidecar.get("mix_id") is not None else None,
            "audio": {"bytes": audio_bytes, "path": f"{name}#{index:05d}.flac"},
            "is_silent": features.is_silent,
            "tempo_bpm": features.tempo_bpm,
            "tempo_confidence": features.tempo_confidence,
            "beats_s": features.beats_s,
            "downbeats_s": features.downbeats_s,
            "time_signature": features.time_signature,
            "key": features.key,
            "mode": features.mode,
            "key_strength": features.key_strength,
            "file_key": features.file_key,
            "file_mode": features.file_mode,
            "chords": features.chords,
            "loudness_lufs": features.loudness_lufs,
            "traits": [{"name": str(k), "present": bool(v)} for k, v in sorted(traits.items())],
            "caption": caption,
            "caption_base": base,
            **sentences,
        }


class WriteShard(beam.DoFn):
    def __init__(self, tmp_dir: str, num_shards: int):
        self.tmp_dir = tmp_dir
        self.num_shards = num_shards

    def process(self, keyed):
        index, rows = keyed
        rows = sorted(rows, key=lambda r: r["clip_id"])
        table = pa.Table.from_pylist(rows, schema=schema.CLIPS_SCHEMA)
        path = f"{self.tmp_dir}/{schema.shard_name(index, self.num_shards)}"
        with fsspec.open(path, "wb") as f:
            # Row groups of ~64 clips keep readers' memory small (each row carries its FLAC audio).
            pq.write_table(table, f, compression="zstd", row_group_size=64)
        yield path


# ----------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class BuildResult:
    out: str
    up_to_date: bool
    stats: dict = field(default_factory=dict)


def build_dataset(
    input_spec: str,
    out: str,
    params: BuildDatasetParams,
    runner: str | None = None,
    workers: int | None = None,
    beam_args: list[str] | None = None,
    rehash: bool = False,
    wait_seconds: float = 0.0,
    commit_fail_after: int | None = None,
) -> BuildResult:
    """Build (or refresh) the clips table in folder `out` from the audio at `input_spec`: one build at a time per
    output (a second waits `wait_seconds`, then stops with one line), committed through a journal so that a
    crash at any point leaves the previous table or, after the next build, the new one (core.commit)."""
    _check_params(params)
    workers = workers or params.workers
    matched = match_inputs(input_spec)
    with output_lock(out, wait_seconds):
        recover(out)
        return _build_locked(matched, out, params, runner, workers, beam_args, rehash, commit_fail_after)


def _build_locked(
    matched: Matched,
    out: str,
    params: BuildDatasetParams,
    runner,
    workers: int,
    beam_args,
    rehash: bool,
    commit_fail_after: int | None,
) -> BuildResult:
    readable = [f for f in matched.audio if not f.problem]
    unreadable = [f for f in matched.audio if f.problem]
    fs, out_root = fsspec.core.url_to_fs(out)
    fingerprint = analysis_fingerprint(params)
    plan = plan_refresh(readable, out, fingerprint, rehash=rehash)
    previous_sources = {r["source_path"]: r for r in _read_small(out, schema.SOURCES_FILE)}
    side_rows = [_problem_source_row(f) for f in unreadable] + [_skipped_source_row(p) for p in matched.skipped]
    skipped_before = {p for p, r in previous_sources.items() if r["status"] == "skipped"}
    # unreadable entries are retried (and reported) every build, like every other failure
    side_changed = bool(unreadable) or skipped_before != set(matched.skipped)
    if plan.up_to_date and not side_changed and len(_list_shards(out)) == params.num_shards:
        log.info("dataset at %s is up to date (%d files); nothing written", out, len(readable))
        return BuildResult(out, True, _read_stats(out))
    log.info(
        "%d files matched: %d to process, %d unchanged, %d gone, %d unreadable, %d skipped",
        len(readable),
        len(plan.to_process),
        len(plan.kept),
        len(plan.dropped),
        len(unreadable),
        len(matched.skipped),
    )

    num_shards = params.num_shards
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    tmp_root = new_tmp_dir(fs, out_root)
    tmp_url = tmp_root if protocol in ("file", "local") else f"{protocol}://{tmp_root}"
    old_shards = _list_shards(out) if plan.kept else []
    old_shard_urls = [s if protocol in ("file", "local") else f"{protocol}://{s}" for s in old_shards]
    old_errors = [r for r in _read_small(out, schema.ERRORS_FILE) if r["source_path"] in plan.kept]
    old_errors += [
        {"source_path": f.path, "stage": "read", "error_type": "NotReadable", "message": f.problem} for f in unreadable
    ]
    old_sources = list(plan.kept.values()) + side_rows

    started = time.time()
    if is_local(runner):
        with make_pipeline(runner, workers, beam_args) as p:
            results = (
                p
                | "Files" >> beam.Create(plan.to_process)
                | "Spread" >> beam.Reshuffle()
                | "ProcessFile" >> beam.ParDo(ProcessFile(params)).with_outputs("errors", "sources", main="clips")
            )
            clips = results.clips
            if old_shard_urls:
                kept_rows = (
                    p
                    | "OldShards" >> beam.Create(old_shard_urls)
                    | "ReadKept" >> beam.ParDo(ReadKeptRows(sorted(plan.kept)))
                )
                clips = (clips, kept_rows) | "AllClips" >> beam.Flatten()
            (
                clips
                | "KeyByShard" >> beam.Map(lambda r, n=num_shards: (shard_of(r["source_sha256"], n), r))
                | "GroupShards" >> beam.GroupByKey()
                | "WriteShards" >> beam.ParDo(WriteShard(tmp_url, num_shards))
            )
            (
                results.errors
                | "CollectErrors" >> beam.combiners.ToList()
                | "WriteErrors"
                >> beam.Map(_write_small, f"{tmp_url}/{schema.ERRORS_FILE}", schema.ERRORS_SCHEMA, old_errors)
            )
            (
                results.sources
                | "CollectSources" >> beam.combiners.ToList()
                | "WriteSources"
                >> beam.Map(_write_small, f"{tmp_url}/{schema.SOURCES_FILE}", schema.SOURCES_SCHEMA, old_sources)
            )
    else:  # one sink: see pipelines/runner.py (the local runner keeps one branch per table)
        with make_pipeline(runner, workers, beam_args) as p:
            records = (
                p
                | "Files" >> beam.Create(plan.to_process)
                | "Spread" >> beam.Reshuffle()
                | "ProcessFile" >> beam.ParDo(AsRecords(ProcessFile(params), main="clips"))
            )
            kept_rows = None
            if old_shard_urls:
                kept_rows = (
                    p
                    | "OldShards" >> beam.Create(old_shard_urls)
                    | "ReadKept" >> beam.ParDo(ReadKeptRows(sorted(plan.kept)))
                )
            write_tables(
                p,
                records,
                kept_rows=kept_rows,
                main="clips",
                shard_key=lambda r, n=num_shards: shard_of(r["source_sha256"], n),
                write_shard=WriteShard(tmp_url, num_shards),
                write_side={
                    "errors": partial(
                        _write_small,
                        path=f"{tmp_url}/{schema.ERRORS_FILE}",
                        table_schema=schema.ERRORS_SCHEMA,
                        extra=old_errors,
                    ),
                    "sources": partial(
                        _write_small,
                        path=f"{tmp_url}/{schema.SOURCES_FILE}",
                        table_schema=schema.SOURCES_SCHEMA,
                        extra=old_sources,
                    ),
                },
            )
    elapsed = time.time() - started

    # Empty shards are still written, so the set of file names is always the same.
    for i in range(num_shards):
        path = f"{tmp_root}/{schema.shard_name(i, num_shards)}"
        if not fs.exists(path):
            with fs.open(path, "wb") as f:
                pq.write_table(schema.CLIPS_SCHEMA.empty_table(), f, compression="zstd")
    # every file given must come back with its sources row, whatever the runner did: a runner that drops work
    # would otherwise commit a table that silently lacks it
    returned = {r["source_path"] for r in _read_small(tmp_url, schema.SOURCES_FILE)}
    missing = sorted(f.path for f in matched.audio if f.path not in returned)
    if missing:
        raise PipelineUserError(
            f"the runner returned no result for {len(missing)} of {len(matched.audio)} files (first: {missing[0]}); "
            f"nothing was committed to {out}"
        )
    stats = compute_stats(tmp_url, n_files=len(readable) + len(unreadable))
    stats["build_seconds"] = round(elapsed, 2)
    stats["files_processed"] = len(plan.to_process)
    stats["files_unchanged"] = len(plan.kept)
    stats["files_removed"] = len(plan.dropped)
    stats["files_skipped"] = len(matched.skipped)
    stats["analysis_fingerprint"] = fingerprint
    with fs.open(f"{tmp_root}/{schema.STATS_FILE}", "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    commit(
        fs,
        tmp_root,
        out_root,
        (schema.CLIPS_GLOB, schema.ERRORS_FILE, schema.SOURCES_FILE, schema.STATS_FILE),
        fail_after=commit_fail_after,
    )
    log.info(
        "wrote %d clips (%.2f h) from %d files (%d failed) to %s in %.1fs",
        stats["clips"],
        stats["hours"],
        stats["files_in"],
        stats["files_failed"],
        out,
        elapsed,
    )
    return BuildResult(out, False, stats)


def _problem_source_row(f: SourceFile) -> dict:
    return {
        "source_path": f.path,
        "size": f.size,
        "mtime": f.mtime,
        "source_sha256": None,
        "status": "error",
        "n_clips": 0,
        "sidecar_sha256": f.sidecar_sha256,
    }


def _skipped_source_row(path: str) -> dict:
    return {
        "source_path": path,
        "size": 0,
        "mtime": 0.0,
        "source_sha256": None,
        "status": "skipped",
        "n_clips": 0,
        "sidecar_sha256": "",
    }


def _write_small(rows: list[dict], path: str, table_schema: pa.Schema, extra: list[dict]) -> str:
    # a total order (every field), so that runners that group rows in another order write the same bytes
    all_rows = sorted(
        list(rows) + list(extra), key=lambda r: (r["source_path"], json.dumps(r, sort_keys=True, default=str))
    )
    with fsspec.open(path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(all_rows, schema=table_schema), f, compression="zstd")
    return path


def _read_stats(out: str) -> dict:
    fs, root = fsspec.core.url_to_fs(out)
    path = f"{root.rstrip('/')}/{schema.STATS_FILE}"
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        return json.load(f)


def _check_params(params: BuildDatasetParams) -> None:
    """What the field types cannot say: clip lengths that fit together, a downbeat model that loads."""
    if params.min_clip_seconds > params.clip_seconds:
        raise PipelineUserError("min_clip_seconds must not exceed clip_seconds")
    if params.downbeat_evidence == "learned":
        from pipelines.features import load_downbeat_model

        model = params.downbeat_model
        if model != "builtin" and not os.path.exists(model):
            raise PipelineUserError(f"downbeat_model {model} does not exist")
        try:
            load_downbeat_model(model)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise PipelineUserError(f"downbeat_model {model} is not a downbeat model: {e}") from None
    if params.downbeat_evidence == "network" and params.beat_tracker != "network":
        raise PipelineUserError("downbeat_evidence network needs beat_tracker network (it reads the same activation)")
    if params.beat_tracker == "network":
        from pipelines.beat_network import BeatNetwork

        if params.beat_model != "builtin" and not os.path.exists(params.beat_model):
            raise PipelineUserError(f"beat_model {params.beat_model} does not exist")
        try:
            BeatNetwork.load(params.beat_model)
        except (ValueError, KeyError, OSError) as e:
            raise PipelineUserError(f"beat_model {params.beat_model} is not a beat network: {e}") from None
    if params.key_file_context and not params.key_profiles:
        raise PipelineUserError("key_file_context needs key_profiles (the file context is added to their vote)")


def _summary(values) -> dict:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(arr):
        return {"count": 0}
    q = np.percentile(arr, [5, 25, 50, 75, 95])
    return {
        "count": int(len(arr)),
        "mean": round(float(arr.mean()), 3),
        "p05": round(float(q[0]), 3),
        "p25": round(float(q[1]), 3),
        "median": round(float(q[2]), 3),
        "p75": round(float(q[3]), 3),
        "p95": round(float(q[4]), 3),
    }


def compute_stats(out: str, n_files: int) -> dict:
    """Counts and feature distributions (DVC metrics); reads no audio bytes."""
    cols = [
        "source_path",
        "split",
        "duration_s",
        "is_silent",
        "tempo_bpm",
        "tempo_confidence",
        "key",
        "mode",
        "key_strength",
        "loudness_lufs",
        "time_signature",
        "chords",
    ]
    table = schema.read_clips_table(out, columns=cols)
    rows = table.to_pydict()
    errors = _read_small(out, schema.ERRORS_FILE)
    failed = len({e["source_path"] for e in errors})
    ok = len(set(rows["source_path"]))
    count = lambda xs: dict(sorted({str(x): xs.count(x) for x in set(xs) if x is not None}.items()))  # noqa: E731
    keys = [f"{k} {m}" for k, m in zip(rows["key"], rows["mode"]) if k]
    n_chords = [len({seg["label"] for seg in c}) for c in rows["chords"]]
    return {
        "files_in": n_files,
        "files_ok": ok,
        "files_failed": failed,
        "clips": table.num_rows,
        "silent_clips": int(sum(bool(s) for s in rows["is_silent"])),
        "hours": round(float(sum(rows["duration_s"])) / 3600, 4),
        "clips_per_split": count(rows["split"]),
        "tempo_bpm": _summary(rows["tempo_bpm"]),
        "tempo_confidence": _summary(rows["tempo_confidence"]),
        "key_strength": _summary(rows["key_strength"]),
        "loudness_lufs": _summary(rows["loudness_lufs"]),
        "distinct_chords_per_clip": _summary(n_chords),
        "modes": count(rows["mode"]),
        "keys": count(keys),
        "time_signatures": count(rows["time_signature"]),
    }
