"""The clips table: the one place that knows its columns (DESIGN.md, "Clips table").

Readers elsewhere (codec, generator, probes) use `read_clips_table` and the column names below, so a schema
change happens here and nowhere else.
"""

from __future__ import annotations

import pyarrow as pa

CHORD_SEGMENT = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("label", pa.string())])
# Hugging Face `datasets` reads a struct {bytes, path} as its Audio feature.
AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TRAIT = pa.struct([("name", pa.string()), ("present", pa.bool_())])

CAPTION_SENTENCE_COLUMNS = ("caption_tempo", "caption_key", "caption_chords", "caption_beats")

CLIPS_SCHEMA = pa.schema(
    [
        # identity
        ("clip_id", pa.string()),
        ("source_path", pa.string()),
        ("source_sha256", pa.string()),
        ("clip_index", pa.int32()),
        ("start_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("split", pa.string()),
        # sidecar `mix_id`: files sharing it are the same mixture with/without some stems (trait pairs)
        ("mix_id", pa.string()),
        # audio (FLAC, mono, `sample_rate`)
        ("audio", AUDIO),
        ("is_silent", pa.bool_()),
        # rhythm
        ("tempo_bpm", pa.float64()),
        ("tempo_confidence", pa.float64()),
        ("beats_s", pa.list_(pa.float64())),
        ("downbeats_s", pa.list_(pa.float64())),
        ("time_signature", pa.string()),
        # tonality
        ("key", pa.string()),
        ("mode", pa.string()),
        ("key_strength", pa.float64()),
        # the whole source file's key (a piece's key; `key` is the clip's local key), the same on all its clips
        ("file_key", pa.string()),
        ("file_mode", pa.string()),
        # harmony (Harte labels)
        ("chords", pa.list_(CHORD_SEGMENT)),
        # level
        ("loudness_lufs", pa.float64()),
        # traits known from the source's sidecar (e.g. rendered stems): list of {name, present}
        ("traits", pa.list_(TRAIT)),
        # text
        ("caption", pa.string()),
        ("caption_base", pa.string()),
        ("caption_tempo", pa.string()),
        ("caption_key", pa.string()),
        ("caption_chords", pa.string()),
        ("caption_beats", pa.string()),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        ("source_path", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)

# One row per source file seen by the last build: what refresh compares against.
SOURCES_SCHEMA = pa.schema(
    [
        ("source_path", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.float64()),
        ("source_sha256", pa.string()),
        ("status", pa.string()),  # "ok" (has clips) | "error" | "skipped" (not a file type the pipeline reads)
        ("n_clips", pa.int32()),
        ("sidecar_sha256", pa.string()),  # the description sidecar's hash ("" without one): edits re-analyse
    ]
)

CLIPS_GLOB = "clips-*.parquet"
# Side files start with "_" so that readers of the folder as one table (pandas.read_parquet, pyarrow.dataset,
# Hugging Face `datasets`) skip them and see only the clip shards.
ERRORS_FILE = "_errors.parquet"
SOURCES_FILE = "_sources.parquet"
STATS_FILE = "_stats.json"


def shard_name(index: int, count: int) -> str:
    return f"clips-{index:05d}-of-{count:05d}.parquet"


def traits_dict(traits: list[dict] | None) -> dict[str, bool]:
    """The `traits` column value as a plain {name: present} mapping."""
    return {t["name"]: bool(t["present"]) for t in (traits or [])}


class ClipsTableError(ValueError):
    """A clips table that is missing, empty or lacks required columns."""


def read_clips_table(path: str, columns: list[str] | None = None, split: str | None = None) -> pa.Table:
    """Read the clips table in folder `path` (all shards), optionally only some columns and one split."""
    import fsspec
    import pyarrow.parquet as pq

    from core.commit import check_readable

    fs, root = fsspec.core.url_to_fs(path)
    check_readable(path)
    shards = sorted(fs.glob(f"{root.rstrip('/')}/{CLIPS_GLOB}"))
    if not shards:
        raise ClipsTableError(f"no clips table at {path} (expected {CLIPS_GLOB}); run `smitin dataset build` first")
    missing = [c for c in (columns or []) if c not in CLIPS_SCHEMA.names]
    if missing:
        raise ClipsTableError(f"unknown clips-table column(s): {', '.join(missing)}")
    want = list(columns) if columns else None
    if want is not None and split is not None and "split" not in want:
        want.append("split")
    tables = []
    for shard in shards:
        with fs.open(shard, "rb") as f:
            table = pq.read_table(f, columns=want)
        absent = [c for c in (want or []) if c not in table.column_names]
        if absent:
            raise ClipsTableError(f"{shard} lacks column(s) {', '.join(absent)}: rebuild the dataset")
        tables.append(table)
    table = pa.concat_tables(tables)
    if split is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["split"], split))
        if columns and "split" not in columns:
            table = table.drop_columns(["split"])
    return table
