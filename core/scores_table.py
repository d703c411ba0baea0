"""The scores table (Coconet's training set): the one place that knows its columns, and its reader.

One row per piece: `roll` holds, for every 16th-note frame, the MIDI pitch of each of the four voices
(soprano, alto, tenor, bass; -1 where a voice is silent). Written by `smitin scores build` (pipelines.scores).
Side files start with "_" so that readers of the folder as one table (pandas, pyarrow.dataset) skip them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from core.errors import UserError

SCORES_SCHEMA = pa.schema(
    [
        ("piece_id", pa.string()),  # sha256 of the source (12 hex) + the piece's place in it: stable
        ("source_path", pa.string()),
        ("source_sha256", pa.string()),
        ("piece_index", pa.int32()),  # the piece's number in its source (JSB JSON: index within its split)
        ("title", pa.string()),
        ("split", pa.string()),  # train / valid / test: the source's own (JSB) or by hashing the source
        ("n_frames", pa.int32()),
        ("roll", pa.list_(pa.list_(pa.int16()))),  # [frames][voices] MIDI pitch, -1 silent
        ("key", pa.string()),  # e.g. "F# minor", where the source says
        ("time_signature", pa.string()),  # e.g. "3/4", where the source says
        ("min_pitch", pa.int16()),
        ("max_pitch", pa.int16()),
    ]
)
ERRORS_SCHEMA = pa.schema(
    [
        ("source_path", pa.string()),
        ("piece", pa.string()),  # the piece within the source ("" when the whole source failed)
        ("stage", pa.string()),  # read | parse | voices
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)
SOURCES_SCHEMA = pa.schema(
    [
        ("source_path", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.float64()),
        ("source_sha256", pa.string()),
        ("status", pa.string()),  # ok (every piece read) | partial | error | skipped (not a score type)
        ("n_pieces", pa.int32()),
    ]
)
SHARDS_GLOB = "scores-*.parquet"
ERRORS_FILE = "_errors.parquet"
SOURCES_FILE = "_sources.parquet"
STATS_FILE = "_stats.json"
SPLITS = ("train", "valid", "test")


def shard_name(index: int, count: int) -> str:
    return f"scores-{index:05d}-of-{count:05d}.parquet"


class ScoresTableError(UserError):
    """A scores table that is missing, empty or mid-rewrite."""


def read_scores(path: str, split: str | None = None) -> tuple[list[str], list[np.ndarray]]:
    """(piece ids, rolls [voices, frames]) of one split (or all), in piece-id order."""
    import fsspec
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from core.commit import check_readable

    fs, root = fsspec.core.url_to_fs(path)
    check_readable(path)
    shards = sorted(fs.glob(f"{root.rstrip('/')}/{SHARDS_GLOB}"))
    if not shards:
        raise ScoresTableError(f"no scores table at {path} (expected {SHARDS_GLOB}); run `smitin scores build` first")
    tables = []
    for shard in shards:
        with fs.open(shard, "rb") as f:
            tables.append(pq.read_table(f, columns=["piece_id", "split", "roll"]))
    table = pa.concat_tables(tables)
    if split is not None:
        if split not in SPLITS:
            raise ScoresTableError(f"unknown split {split!r} (train, valid, test)")
        table = table.filter(pc.equal(table["split"], split))
    table = table.sort_by("piece_id")
    ids = table["piece_id"].to_pylist()
    rolls = [np.asarray(r, dtype=np.int64).T for r in table["roll"].to_pylist()]
    return ids, rolls
