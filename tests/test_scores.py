"""`smitin scores build`: the JSB table with its own split, bad scores as error rows, refresh, and a commit that
survives a crash at any of its steps and a second build at the same time."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.errors import UserError
from core.scores_table import read_scores
from pipelines.scores import BuildScoresParams, build_scores

ROOT = Path(__file__).resolve().parents[1]
JSB = ROOT / "pipelines" / "data" / "jsb" / "Jsb16thSeparated.json.gz"


def _params(**kw) -> BuildScoresParams:
    return BuildScoresParams.parse(kw, "test")


def _write_score(path: Path, parts: list[list[tuple]], ts: str = "4/4") -> Path:
    """A MusicXML file: per part a list of (MIDI pitch or None for a rest, quarter length), or a list of pitches
    for a chord."""
    from music21 import chord, meter, note, stream

    score = stream.Score()
    for notes in parts:
        part = stream.Part()
        part.append(meter.TimeSignature(ts))
        for pitch, ql in notes:
            if pitch is None:
                part.append(note.Rest(quarterLength=ql))
            elif isinstance(pitch, list):
                part.append(chord.Chord(pitch, quarterLength=ql))
            else:
                part.append(note.Note(pitch, quarterLength=ql))
        score.insert(0, part)
    score.write("musicxml", fp=str(path))
    return path


SATB = [[(72, 2), (71, 2)], [(67, 2), (67, 2)], [(64, 2), (62, 2)], [(48, 2), (55, 2)]]


def test_jsb_table_keeps_the_papers_split(tmp_path):
    r = build_scores([str(JSB)], str(tmp_path / "s"), _params())
    assert r.stats["pieces_per_split"] == {"train": 229, "valid": 76, "test": 77}
    assert r.stats["frames_per_split"] == {"train": 55228, "valid": 18408, "test": 18900}
    data = json.loads(gzip.decompress(JSB.read_bytes()))
    ids, rolls = read_scores(str(tmp_path / "s"), "test")
    by_index = {int(i.rsplit("-", 1)[1]): r for i, r in zip(ids, rolls)}
    for i in (0, 40, 76):
        assert np.array_equal(by_index[i], np.array(data["test"][i]).T)
    # pandas reads the folder as one table (side files start with "_")
    assert len(pd.read_parquet(tmp_path / "s")) == 382
    again = build_scores([str(JSB)], str(tmp_path / "s"), _params())
    assert again.up_to_date


def test_bad_scores_become_error_rows_and_nothing_is_dropped(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _write_score(src / "good.musicxml", SATB)
    _write_score(src / "three.musicxml", SATB[:3])
    _write_score(src / "chord.musicxml", [[([72, 76], 4)]] + SATB[1:])
    # overlapping notes in one part: two voices written into one stream at overlapping offsets
    from music21 import note, stream

    s = stream.Score()
    for i, notes in enumerate(SATB):
        p = stream.Part()
        for k, (pitch, ql) in enumerate(notes):
            p.insert(k * 2, note.Note(pitch, quarterLength=ql))
        if i == 0:
            p.insert(1, note.Note(74, quarterLength=2))
        s.insert(0, p)
    s.write("musicxml", fp=str(src / "overlap.musicxml"))
    (src / "garbage.mid").write_bytes(b"not a midi file")
    (src / "empty.abc").write_text("")
    (src / "notes.txt").write_text("not a score")
    (src / "tracker.xm").write_bytes(b"\x00" * 10)
    r = build_scores([str(src)], str(tmp_path / "s"), _params())
    sources = pd.read_parquet(tmp_path / "s" / "_sources.parquet").set_index("source_path")
    errors = pd.read_parquet(tmp_path / "s" / "_errors.parquet")
    status = {Path(p).name: s for p, s in sources["status"].items()}
    assert status == {
        "good.musicxml": "ok",
        "three.musicxml": "error",
        "chord.musicxml": "error",
        "overlap.musicxml": "error",
        "garbage.mid": "error",
        "empty.abc": "error",
        "notes.txt": "skipped",
        "tracker.xm": "skipped",
    }
    why = {Path(p).name: m for p, m in zip(errors["source_path"], errors["message"])}
    assert "3 voices" in why["three.musicxml"]
    assert "2 notes at once" in why["chord.musicxml"]
    assert "overlapping notes" in why["overlap.musicxml"]
    assert "cannot be read as a score" in why["garbage.mid"]
    assert why["empty.abc"] == "empty file"
    assert all("\n" not in m for m in errors["message"])
    assert r.stats["pieces"] == 1 and r.stats["sources"] == {"ok": 1, "partial": 0, "error": 5, "skipped": 2}
    ids, rolls = read_scores(str(tmp_path / "s"))
    assert rolls[0].shape == (4, 16) and rolls[0][0, 0] == 72 and rolls[0][3, 15] == 55


def test_music21_work_names_are_sources(tmp_path):
    r = build_scores(["music21:bwv66.6"], str(tmp_path / "s"), _params())
    assert r.stats["pieces"] == 1
    row = pd.read_parquet(tmp_path / "s").iloc[0]
    assert row["source_path"] == "music21:bwv66.6" and row["key"] == "F# minor" and row["time_signature"] == "4/4"


def test_refresh_reads_only_what_changed_and_retries_errors(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _write_score(src / "a.musicxml", SATB)
    _write_score(src / "b.musicxml", SATB[:3])  # an error row at first
    out = str(tmp_path / "s")
    first = build_scores([str(src)], out, _params())
    assert first.stats["pieces"] == 1 and first.stats["errors"] == 1
    _write_score(src / "b.musicxml", SATB)  # fixed
    second = build_scores([str(src)], out, _params())
    assert second.stats["sources_read"] == 1 and second.stats["sources_unchanged"] == 1
    assert second.stats["pieces"] == 2 and second.stats["errors"] == 0
    (src / "a.musicxml").unlink()
    third = build_scores([str(src)], out, _params())
    assert third.stats["pieces"] == 1 and third.stats["sources_removed"] == 1


@pytest.mark.parametrize("crash_after", range(9))  # 2 removals + 6 moves, then after all of them
def test_a_crash_at_any_commit_step_is_completed_by_the_next_build(tmp_path, crash_after):
    src = tmp_path / "in"
    src.mkdir()
    _write_score(src / "a.musicxml", SATB)
    out = str(tmp_path / "s")
    build_scores([str(src)], out, _params(num_shards=2))
    _write_score(src / "b.musicxml", [[(p + 2, q) for p, q in part] for part in SATB])
    with pytest.raises(RuntimeError, match="injected crash"):
        build_scores([str(src)], out, _params(num_shards=3), commit_fail_after=crash_after)
    with pytest.raises(UserError, match="was being rewritten"):
        read_scores(out)  # a reader refuses the half-committed folder
    done = build_scores([str(src)], out, _params(num_shards=3))
    clean = build_scores([str(src)], str(tmp_path / "clean"), _params(num_shards=3))
    assert done.stats["pieces"] == clean.stats["pieces"] == 2
    names = sorted(p.name for p in Path(out).iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in Path(tmp_path / "clean").iterdir() if not p.name.startswith("."))
    assert not [p for p in Path(out).iterdir() if p.name.startswith(".tmp-")]
    for name in names:
        if name.endswith(".parquet") and not name.startswith("_"):
            assert (
                pd.read_parquet(Path(out) / name)
                .drop(columns=["source_path"])
                .equals(pd.read_parquet(Path(tmp_path / "clean") / name).drop(columns=["source_path"]))
            )


def test_a_second_build_of_the_same_output_is_refused_with_one_line(tmp_path):
    from filelock import FileLock

    from core.commit import LOCK, OutputBusy

    out = tmp_path / "s"
    out.mkdir()
    with FileLock(str(out / LOCK)):
        with pytest.raises(OutputBusy, match="another build is writing"):
            build_scores([str(JSB)], str(out), _params())
    assert build_scores([str(JSB)], str(out), _params()).stats["pieces"] == 382


def test_stale_temporary_folders_are_removed(tmp_path):
    out = tmp_path / "s"
    build_scores([str(JSB)], str(out), _params())
    (out / ".tmp-deadbeef").mkdir()
    (out / ".tmp-deadbeef" / "scores-00000-of-00001.parquet").write_bytes(b"half")
    build_scores([str(JSB)], str(out), _params())
    assert not (out / ".tmp-deadbeef").exists()
