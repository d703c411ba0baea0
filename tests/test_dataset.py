"""`smitin dataset build` end to end on a folder of good and bad audio: nothing crashes, nothing is lost."""

from __future__ import annotations

import io
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from core import clips_table as schema
from core.audio import iter_clips
from core.config import load_section
from generation.cli import main as smitin
from pipelines.dataset import BuildDatasetParams, build_dataset
from tests.synth import chord_sequence, click_track

ROOT = Path(__file__).resolve().parents[1]
SR = 44100


def params(**overrides) -> BuildDatasetParams:
    p = load_section(BuildDatasetParams, ROOT / "params.yaml", "build_dataset")
    return p.with_overrides({"workers": 1, "num_shards": 2, **overrides}, "build_dataset")


def _music(seconds: float, sr: int = SR, bpm: float = 120.0) -> np.ndarray:
    wave, _ = chord_sequence([("C", "maj"), ("A", "min"), ("F", "maj"), ("G", "maj")], bpm, 4, seconds, SR)
    if sr != SR:
        from core.audio import resample

        wave = resample(wave, SR, sr)
    return wave


GOOD = {  # name -> expected clip count with clip 10 s / hop 10 s / min 4 s
    "good.wav": 3,  # 25 s: 0-10, 10-20, 20-25
    "stereo_96k.flac": 1,
    "phone_8k.wav": 1,
    "surround_6ch.wav": 1,
    "Schöne Müsik – 日本.ogg": 1,
    "lossy.mp3": 1,
    "nested/deeper/track.wav": 1,
    "silent.wav": 1,
}
BAD = {  # name -> stage of the error row
    "empty.wav": "read",
    "short.wav": "decode",
    "corrupt.flac": "decode",
    "text_with_audio_ext.mp3": "decode",
}


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("audio")
    sf.write(d / "good.wav", _music(25.0), SR)
    (d / "good.wav.json").write_text(
        json.dumps({"description": "A chorale for strings with drums.", "traits": {"drums": True, "piano": False}})
    )
    stereo = np.stack([_music(12.0, 96000), 0.5 * _music(12.0, 96000)], axis=1)
    sf.write(d / "stereo_96k.flac", stereo, 96000)
    sf.write(d / "phone_8k.wav", _music(12.0, 8000), 8000)
    sf.write(d / "surround_6ch.wav", np.stack([_music(12.0, 48000)] * 6, axis=1), 48000)
    sf.write(d / "Schöne Müsik – 日本.ogg", _music(12.0), SR, format="OGG", subtype="VORBIS")
    (d / "Schöne Müsik – 日本.txt").write_text("A folk tune on a fiddle.")
    sf.write(d / "lossy.mp3", _music(12.0), SR, format="MP3")
    (d / "nested" / "deeper").mkdir(parents=True)
    sf.write(d / "nested" / "deeper" / "track.wav", _music(11.0), SR)
    sf.write(d / "silent.wav", np.zeros(SR * 10, np.float32), SR)
    (d / "empty.wav").write_bytes(b"")
    sf.write(d / "short.wav", _music(1.0), SR)
    (d / "corrupt.flac").write_bytes(b"fLaC" + os.urandom(5000))
    (d / "text_with_audio_ext.mp3").write_text("this is not audio\n" * 50)
    (d / "README.txt").write_text("not audio, not an audio extension: ignored")
    return d


@pytest.fixture(scope="module")
def built(audio_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clips")
    # Two worker processes: the default local mode (essentia is not thread-safe).
    result = build_dataset(str(audio_dir), str(out), params(workers=2))
    assert not result.up_to_date
    return out


def test_every_file_accounted_for(built):
    stats = json.loads((built / schema.STATS_FILE).read_text())
    assert stats["files_in"] == len(GOOD) + len(BAD)
    assert stats["files_ok"] == len(GOOD)
    assert stats["files_failed"] == len(BAD)
    assert stats["files_ok"] + stats["files_failed"] == stats["files_in"]
    clips = schema.read_clips_table(str(built), columns=["source_path"]).to_pydict()
    errors = pd.read_parquet(built / schema.ERRORS_FILE)
    with_clips = {Path(p).name for p in clips["source_path"]}
    failed = {Path(p).name for p in errors["source_path"]}
    assert with_clips == {Path(n).name for n in GOOD}
    assert failed == set(BAD)
    assert not with_clips & failed


def test_error_rows_name_stage_and_reason(built):
    errors = pd.read_parquet(built / schema.ERRORS_FILE)
    by_name = {Path(r.source_path).name: r for r in errors.itertuples()}
    for name, stage in BAD.items():
        assert by_name[name].stage == stage, name
        assert by_name[name].message and by_name[name].error_type
    assert "shorter than min_clip_seconds" in by_name["short.wav"].message


def test_clip_counts_and_audio_decodes(built):
    table = schema.read_clips_table(str(built))
    assert table.schema.equals(schema.CLIPS_SCHEMA)
    rows = table.to_pylist()
    counts = {}
    for r in rows:
        counts[Path(r["source_path"]).name] = counts.get(Path(r["source_path"]).name, 0) + 1
        wave, sr = sf.read(io.BytesIO(r["audio"]["bytes"]))
        assert sr == r["sample_rate"] == 32000
        assert wave.ndim == 1
        assert len(wave) / sr == pytest.approx(r["duration_s"], abs=1e-3)
    assert counts == {Path(n).name: c for n, c in GOOD.items()}
    assert len({r["clip_id"] for r in rows}) == len(rows)
    starts = sorted(r["start_s"] for r in rows if r["source_path"].endswith("good.wav"))
    assert starts == [0.0, 10.0, 20.0]


def test_features_of_real_music_clip(built):
    rows = schema.read_clips_table(str(built)).to_pylist()
    good = [r for r in rows if r["source_path"].endswith("good.wav") and r["duration_s"] == 10.0]
    for r in good:
        assert r["tempo_bpm"] == pytest.approx(120.0, rel=0.02)
        assert f"{r['key']} {r['mode']}" in ("C major", "A minor")
        assert (r["file_key"], r["file_mode"]) == ("C", "major")  # C-Am-F-G
        assert {c["label"] for c in r["chords"]} >= {"C:maj", "F:maj", "G:maj"}
        assert r["time_signature"] == "4/4"
        assert -40 < r["loudness_lufs"] < 0
        assert r["beats_s"] == sorted(r["beats_s"]) and 15 <= len(r["beats_s"]) <= 22
        assert set(r["downbeats_s"]) <= set(r["beats_s"])
        assert schema.traits_dict(r["traits"]) == {"drums": True, "piano": False}


def test_downbeats_of_a_files_clips_lie_on_one_bar_grid(built):
    # good.wav changes chord every 4 beats at 120 bpm: bars start at 0, 2, 4, ... s of the file. The meter and
    # bar phase are decided over the whole file, so every clip (the 5 s tail too) follows the same grid.
    rows = schema.read_clips_table(str(built)).to_pylist()
    good = [r for r in rows if r["source_path"].endswith("good.wav")]
    assert len(good) == 3
    assert {r["time_signature"] for r in good} == {"4/4"}
    absolute = np.concatenate([r["start_s"] + np.asarray(r["downbeats_s"]) for r in good])
    assert len(absolute) >= 10
    off_grid = np.abs(absolute / 2.0 - np.round(absolute / 2.0)) * 2.0
    assert np.all(off_grid < 0.07), absolute


def test_silence_is_flagged_without_claims(built):
    rows = [r for r in schema.read_clips_table(str(built)).to_pylist() if r["source_path"].endswith("silent.wav")]
    assert rows and all(r["is_silent"] for r in rows)
    assert all(r["tempo_bpm"] is None and r["key"] is None and r["chords"] == [] for r in rows)
    assert all(r["file_key"] is None and r["file_mode"] is None for r in rows)
    assert all(r["caption"] == "A music clip." for r in rows)


def test_captions_musicbench_style(built):
    rows = schema.read_clips_table(str(built)).to_pylist()
    for r in rows:
        assert r["caption"].startswith(r["caption_base"])
        for col in schema.CAPTION_SENTENCE_COLUMNS:  # every sentence in the caption is one of the columns
            if r[col] and r[col] in r["caption"]:
                assert r[col].endswith(".")
        rest = r["caption"][len(r["caption_base"]) :]
        used = [r[c] for c in schema.CAPTION_SENTENCE_COLUMNS if r[c] and r[c] in rest]
        assert len(rest.strip()) == len(" ".join(used))
    base = {Path(r["source_path"]).name: r["caption_base"] for r in rows}
    assert base["good.wav"] == "A chorale for strings with drums."
    assert base["Schöne Müsik – 日本.ogg"] == "A folk tune on a fiddle."
    assert base["phone_8k.wav"] == "A music clip."
    good = next(r for r in rows if r["source_path"].endswith("good.wav"))
    assert "C" in (good["caption_chords"] or "") and "4/4" in good["caption_beats"] or "4" in good["caption_beats"]


def test_split_by_source(built):
    rows = schema.read_clips_table(str(built), columns=["source_path", "split"]).to_pylist()
    per_source = {}
    for r in rows:
        per_source.setdefault(r["source_path"], set()).add(r["split"])
    assert all(len(s) == 1 for s in per_source.values())
    assert {s for v in per_source.values() for s in v} <= {"train", "valid", "test"}


def test_readers_pandas_and_hf_datasets(built):
    df = pd.read_parquet(built)
    assert len(df) == sum(GOOD.values()) and "caption" in df.columns
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(built / "clips-*.parquet"), split="train")
    assert ds.num_rows == len(df)
    row = ds[0]
    wave, sr = sf.read(io.BytesIO(row["audio"]["bytes"]))
    assert sr == 32000 and len(wave) > 0


def test_shard_names_stable(built):
    names = sorted(p.name for p in built.glob("clips-*.parquet"))
    assert names == ["clips-00000-of-00002.parquet", "clips-00001-of-00002.parquet"]


# ---------------------------------------------------------------------------------------------------------
# Refresh


def _snapshot(out: Path) -> dict[str, tuple[float, bytes]]:
    return {p.name: (p.stat().st_mtime, p.read_bytes()) for p in out.iterdir() if p.is_file()}


def test_refresh_processes_only_changes(tmp_path):
    src, out = tmp_path / "audio", tmp_path / "clips"
    src.mkdir()
    for i, bpm in enumerate((100.0, 120.0, 140.0)):
        sf.write(src / f"t{i}.wav", click_track(bpm, 6.0, seed=i), SR)
    first = build_dataset(str(src), str(out), params())
    assert first.stats["files_processed"] == 3 and first.stats["clips"] == 3
    before = schema.read_clips_table(str(out)).to_pylist()

    # Nothing changed: nothing is written (same bytes, same mtimes).
    snap = _snapshot(out)
    second = build_dataset(str(src), str(out), params())
    assert second.up_to_date
    assert _snapshot(out) == snap

    # One file added, one removed, one rewritten with other audio.
    sf.write(src / "t3.wav", click_track(90.0, 6.0, seed=3), SR)
    (src / "t0.wav").unlink()
    sf.write(src / "t1.wav", click_track(160.0, 6.0, seed=9), SR)
    third = build_dataset(str(src), str(out), params())
    assert third.stats["files_processed"] == 2
    assert third.stats["files_unchanged"] == 1 and third.stats["files_removed"] == 1
    after = schema.read_clips_table(str(out)).to_pylist()
    names = sorted(Path(r["source_path"]).name for r in after)
    assert names == ["t1.wav", "t2.wav", "t3.wav"]
    kept_before = next(r for r in before if r["source_path"].endswith("t2.wav"))
    kept_after = next(r for r in after if r["source_path"].endswith("t2.wav"))
    assert kept_after == kept_before  # unchanged file: row carried over untouched
    t1 = next(r for r in after if r["source_path"].endswith("t1.wav"))
    assert t1["tempo_bpm"] == pytest.approx(160.0, rel=0.03)
    assert not list(out.glob(".tmp-*"))

    # Other build params (or analysis code): every file is analysed again, none of the old rows is kept.
    fourth = build_dataset(str(src), str(out), params(caption_sentence_probs=[0.0, 0.0, 0.0, 0.0, 1.0]))
    assert not fourth.up_to_date
    assert fourth.stats["files_processed"] == 3 and fourth.stats["files_unchanged"] == 0
    rows = schema.read_clips_table(str(out)).to_pylist()
    assert all(r["caption"] != r["caption_base"] for r in rows)  # 4 control sentences each, under the new params
    # a file removed together with a params change is reported as removed
    (src / "t3.wav").unlink()
    fifth = build_dataset(str(src), str(out), params())
    assert fifth.stats["files_processed"] == 2 and fifth.stats["files_removed"] == 1
    # the worker count is not a build input: still up to date
    assert build_dataset(str(src), str(out), params(workers=2)).up_to_date
    # another shard count rewrites the shards
    resharded = build_dataset(str(src), str(out), params(num_shards=3))
    assert not resharded.up_to_date and len(list(out.glob("clips-*.parquet"))) == 3


def test_rerun_from_scratch_is_byte_identical(tmp_path):
    src = tmp_path / "audio"
    src.mkdir()
    for i in range(2):
        sf.write(src / f"t{i}.wav", click_track(110.0 + 10 * i, 5.0, seed=i), SR)
    a, b = tmp_path / "a", tmp_path / "b"
    build_dataset(str(src), str(a), params())
    build_dataset(str(src), str(b), params())
    for name in ("clips-00000-of-00002.parquet", "clips-00001-of-00002.parquet", schema.ERRORS_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_remote_url_decodes_like_the_local_file(tmp_path):
    """Local files go to libsndfile by path; other fsspec URLs (s3://, gs://, memory://) through a file object.
    Both give the same samples, and a corrupt remote file is a one-line AudioDecodeError."""
    import fsspec

    from core.audio import AudioDecodeError, decode_audio

    local = tmp_path / "song.flac"
    sf.write(local, _music(6.0, 22050), 22050)
    fs = fsspec.filesystem("memory")
    fs.pipe("/smitin-test/song.flac", local.read_bytes())
    fs.pipe("/smitin-test/broken.flac", b"fLaC" + b"\x00" * 64)
    try:
        expected = decode_audio(str(local), SR)
        assert len(expected) == pytest.approx(6.0 * SR, abs=2)
        assert np.array_equal(decode_audio("memory://smitin-test/song.flac", SR), expected)
        with pytest.raises(AudioDecodeError, match="not decodable audio"):
            decode_audio("memory://smitin-test/broken.flac", SR)
    finally:
        fs.rm("/smitin-test", recursive=True)


# ---------------------------------------------------------------------------------------------------------
# Long files and the CLI


def test_one_hour_file_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "hour.wav"
    block = _music(60.0, 8000)
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, subtype="PCM_16") as f:
        for _ in range(60):
            f.write(block)
    tracemalloc.start()
    info, clips = iter_clips(str(path), SR, 10.0, 10.0, 4.0)
    n = 0
    for _, _, wave in clips:
        n += 1
        assert len(wave) == SR * 10
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 360 and info.duration_s == pytest.approx(3600.0)
    # 1 h at 44.1 kHz float32 would be 635 MB; the clipper holds about one clip plus one block.
    assert peak < 20 * 2**20


def test_cli_build_and_one_line_errors(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "a.wav", click_track(120.0, 5.0), SR)
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    out = tmp_path / "out"
    assert (
        smitin(
            [
                "dataset",
                "build",
                "--input",
                str(src),
                "--out",
                str(out),
                "--params",
                str(p),
                "--workers",
                "1",
                "--metrics",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "m.json").read_text())["clips"] == 1
    assert smitin(["dataset", "build", "--input", str(tmp_path / "nope"), "--out", str(out), "--params", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"smitin: error: input not found: {tmp_path / 'nope'}"]
    assert (
        smitin(["dataset", "build", "--input", str(src), "--out", str(out), "--params", str(tmp_path / "missing.yaml")])
        == 2
    )
    assert pq.read_table(out / "clips-00000-of-00002.parquet").schema.equals(schema.CLIPS_SCHEMA)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"downbeat_evidence": "learnd"}, r"build_dataset\.downbeat_evidence: Input should be 'learned', 'weighted'"),
        ({"downbeat_model": "/nope/model.json"}, "downbeat_model /nope/model.json does not exist"),
        ({"key_file_context": -1.0}, r"build_dataset\.key_file_context: Input should be greater than or equal to 0"),
        ({"key_profiles": []}, "key_file_context needs key_profiles"),
        ({"beat_tracker": "network", "beat_model": "/nope/net.npz"}, "beat_model /nope/net.npz does not exist"),
        ({"beat_tracker": "essentia", "downbeat_evidence": "network"}, "downbeat_evidence network needs beat_tracker"),
    ],
)
def test_bad_feature_params_are_one_line_errors(tmp_path, override, message):
    from pipelines.errors import PipelineUserError

    with pytest.raises(PipelineUserError, match=message):
        build_dataset(str(tmp_path), str(tmp_path / "out"), params(**override))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"clip_secs": 5.0}, "build_dataset.clip_secs: Extra inputs are not permitted"),
        ({"num_shards": "two"}, "build_dataset.num_shards: Input should be a valid integer"),
    ],
)
def test_unknown_or_mistyped_build_params_are_one_line_errors(tmp_path, capsys, section, message):
    import yaml

    settings = yaml.safe_load((ROOT / "params.yaml").read_text())
    settings["build_dataset"].update(section)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(settings))
    argv = ["dataset", "build", "--input", str(tmp_path), "--out", str(tmp_path / "out"), "--params", str(p)]
    assert smitin(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"smitin: error: {p}: {message}"), err
    assert not (tmp_path / "out").exists()


def test_a_malformed_beat_network_is_refused_before_any_work(tmp_path):
    from pipelines.errors import PipelineUserError

    bad = tmp_path / "net.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(PipelineUserError, match=r"beat_model .*net\.npz is not a beat network"):
        build_dataset(str(tmp_path), str(tmp_path / "out"), params(beat_tracker="network", beat_model=str(bad)))
    assert not (tmp_path / "out").exists()


def test_a_malformed_downbeat_model_is_refused_before_any_work(tmp_path):
    from pipelines.errors import PipelineUserError

    bad = tmp_path / "model.json"
    bad.write_text(
        json.dumps(
            {
                "cues": ["bass", "tempo"],
                "shifts": [0],
                "percussive_threshold": 1.0,
                "models": {"percussive": {"baseline": 0, "trees": []}, "tonal": {"baseline": 0, "trees": []}},
            }
        )
    )
    with pytest.raises(PipelineUserError, match=r"is not a downbeat model: .*unknown cues \['tempo'\]"):
        build_dataset(str(tmp_path), str(tmp_path / "out"), params(downbeat_model=str(bad)))


def test_analysis_fingerprint_follows_the_models_weights_not_only_their_paths(tmp_path):
    """A refit that rewrites the beat network's or the downbeat model's file in place (same path, same params) must
    invalidate every kept row on the next refresh, as a change of params or analysis code does; the worker count
    must not."""
    from pipelines.beat_network import BUILTIN as BEAT_MODEL
    from pipelines.dataset import analysis_fingerprint
    from pipelines.features import DOWNBEAT_MODEL

    beat, down = tmp_path / "beat.npz", tmp_path / "downbeat.json"
    shutil.copy(BEAT_MODEL, beat)
    shutil.copy(DOWNBEAT_MODEL, down)
    p = params(beat_model=str(beat), downbeat_model=str(down))
    first = analysis_fingerprint(p)
    assert analysis_fingerprint(params(beat_model=str(beat), downbeat_model=str(down), workers=2)) == first
    with np.load(beat) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["out.bias"] = arrays["out.bias"] + 0.1
    np.savez(beat, **arrays)
    second = analysis_fingerprint(p)
    assert second != first
    down.write_text(down.read_text() + "\n")
    assert analysis_fingerprint(p) != second


def test_the_dvc_build_stage_depends_on_everything_the_fingerprint_reads():
    """`dvc repro` reruns build_dataset only when a dep changes: every file `analysis_fingerprint` hashes (the
    analysis modules and the builtin model weights) must be a dep of the stage, itself or through its folder."""
    import yaml

    from pipelines.dataset import _ANALYSIS_MODULES

    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["build_dataset"]["deps"]
    for path in (*_ANALYSIS_MODULES, "pipelines/beat_model.npz", "pipelines/downbeat_model.json"):
        assert path in deps or any(path.startswith(d.rstrip("/") + "/") for d in deps), path
