"""Fault injection on the dataset build (issue: nothing lost, nothing silently wrong): a crash at every step of the
commit, two builds at once, changes refresh cannot see by size and mtime, hostile directory entries, bad output
paths. Each case names what the output must look like afterwards."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from core import clips_table as schema
from core.commit import JOURNAL, LOCK, OutputBusy
from core.config import load_section
from core.errors import UserError
from pipelines.dataset import BuildDatasetParams, build_dataset
from tests.synth import chord_sequence

ROOT = Path(__file__).resolve().parents[1]
SR = 44100


def params(**overrides) -> BuildDatasetParams:
    p = load_section(BuildDatasetParams, ROOT / "params.yaml", "build_dataset")
    fixed = {"workers": 1, "num_shards": 2, "clip_seconds": 4.0, "hop_seconds": 4.0, "min_clip_seconds": 2.0}
    return p.with_overrides({**fixed, **overrides}, "build_dataset")


def _wave(seconds: float, seed: int) -> np.ndarray:
    chords = [("C", "maj"), ("A", "min"), ("F", "maj"), ("G", "maj")]
    wave, _ = chord_sequence(chords[seed % 4 :] + chords[: seed % 4], 100 + 7 * seed, 4, seconds, SR)
    return wave


def _folder(path: Path, n: int = 3) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(path / f"piece{i}.wav", _wave(8.5, i), SR)
        (path / f"piece{i}.json").write_text(json.dumps({"description": f"piece number {i}"}))
    return path


def _table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out).sort_values("clip_id").reset_index(drop=True)


def _clean_copy(src: Path, tmp: Path, **kw) -> pd.DataFrame:
    out = tmp / "clean"
    build_dataset(str(src), str(out), params(**kw))
    return _table(out)


COMMIT_OPS = 9  # 2 removals + 6 moves in the commit below (2 -> 3 shards), and a crash after all of them


@pytest.mark.parametrize("crash_after", range(COMMIT_OPS))
def test_crash_at_every_commit_step_never_loses_or_mixes_clips(tmp_path, crash_after):
    src = _folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    build_dataset(str(src), str(out), params())
    sf.write(src / "piece9.wav", _wave(8.5, 9), SR)
    with pytest.raises(RuntimeError, match="injected crash"):
        build_dataset(str(src), str(out), params(num_shards=3), commit_fail_after=crash_after)
    # a reader is told, in one line, instead of reading a mix of two builds
    with pytest.raises(UserError, match="was being rewritten"):
        schema.read_clips_table(str(out))
    assert (out / JOURNAL).exists()
    again = build_dataset(str(src), str(out), params(num_shards=3))
    assert not (out / JOURNAL).exists() and not list(out.glob(".tmp-*"))
    clean = _clean_copy(src, tmp_path, num_shards=3)
    table = _table(out)
    assert len(table) == len(clean) == 6 and table["clip_id"].tolist() == clean["clip_id"].tolist()
    assert again.stats["clips"] == 6 and again.stats["files_in"] == again.stats["files_ok"] == 3
    assert sorted(p.name for p in out.glob("clips-*.parquet")) == [f"clips-0000{i}-of-00003.parquet" for i in range(3)]


def test_a_damaged_commit_journal_is_one_line_and_touches_nothing(tmp_path):
    src = _folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    build_dataset(str(src), str(out), params())
    before = sorted(p.name for p in out.iterdir())
    (out / JOURNAL).write_text('{"tmp": "half wri')  # a journal cut short
    with pytest.raises(UserError, match="journal .* is damaged") as e:
        build_dataset(str(src), str(out), params())
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, JOURNAL])


def _build_in_process(src: str, out: str, queue) -> None:
    try:
        r = build_dataset(src, out, params())
        queue.put(("ok", r.stats["clips"]))
    except UserError as e:
        queue.put(("refused", str(e)))


def test_two_builds_at_once_one_refused_output_consistent(tmp_path):
    src = _folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(src), str(out), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    results = sorted(queue.get(timeout=5) for _ in procs)
    kinds = [r[0] for r in results]
    # either the second waited out the first (then found it up to date) or it was refused with one line
    assert kinds.count("ok") >= 1
    for kind, detail in results:
        if kind == "refused":
            assert "another build is writing" in detail and "\n" not in detail
    table = _table(out)
    assert len(table) == 6 and table["clip_id"].is_unique
    errors = pd.read_parquet(out / schema.ERRORS_FILE)
    sources = pd.read_parquet(out / schema.SOURCES_FILE)
    assert len(errors) == 0 and sorted(sources["status"]) == ["ok"] * 3


def test_a_held_lock_refuses_a_build_with_one_line(tmp_path):
    from filelock import FileLock

    src = _folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / LOCK)):
        with pytest.raises(OutputBusy, match="another build is writing"):
            build_dataset(str(src), str(out), params())
    assert not list(out.glob("clips-*"))


def test_refresh_sees_an_edited_sidecar(tmp_path):
    src = _folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    build_dataset(str(src), str(out), params())
    (src / "piece1.json").write_text(json.dumps({"description": "a brand new description"}))
    r = build_dataset(str(src), str(out), params())
    assert r.stats["files_processed"] == 1 and r.stats["files_unchanged"] == 1
    table = _table(out)
    assert table[table["source_path"].str.endswith("piece1.wav")]["caption_base"].eq("a brand new description").all()


def test_refresh_retries_a_file_whose_permissions_were_fixed(tmp_path):
    if os.geteuid() == 0:
        # root reads any file: simulate the unreadable state with a file that is not audio, then fix it in place
        src = _folder(tmp_path / "in", 1)
        broken = src / "late.wav"
        broken.write_bytes(b"not audio yet")
    else:  # pragma: no cover - the same case with real permissions
        src = _folder(tmp_path / "in", 1)
        broken = src / "late.wav"
        sf.write(broken, _wave(8.5, 3), SR)
        broken.chmod(0)
    out = tmp_path / "out"
    first = build_dataset(str(src), str(out), params())
    assert first.stats["files_failed"] == 1
    stat = broken.stat()
    if os.geteuid() == 0:
        sf.write(broken, _wave(8.5, 3), SR)
        os.utime(broken, (stat.st_atime, stat.st_mtime))  # same mtime: only the retry of errors catches it
    else:  # pragma: no cover
        broken.chmod(0o644)
    second = build_dataset(str(src), str(out), params())
    assert second.stats["files_failed"] == 0 and second.stats["files_ok"] == 2
    assert len(pd.read_parquet(out / schema.ERRORS_FILE)) == 0


def test_rehash_catches_content_replaced_with_size_and_mtime_kept(tmp_path):
    src = _folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    build_dataset(str(src), str(out), params())
    before = _table(out)
    target = src / "piece0.wav"
    stat = target.stat()
    data, sr = sf.read(target)
    sf.write(target, -data, sr)  # same length, same format: same size
    os.utime(target, (stat.st_atime, stat.st_mtime))
    assert target.stat().st_size == stat.st_size
    assert build_dataset(str(src), str(out), params()).up_to_date  # size + mtime cannot see it ...
    r = build_dataset(str(src), str(out), params(), rehash=True)  # ... the content hash does
    assert r.stats["files_processed"] == 1
    after = _table(out)
    old = set(before[before["source_path"].str.endswith("piece0.wav")]["source_sha256"])
    new = set(after[after["source_path"].str.endswith("piece0.wav")]["source_sha256"])
    assert old != new and len(after) == len(before)


def test_hostile_entries_become_error_rows_and_other_types_are_listed(tmp_path):
    src = _folder(tmp_path / "in", 1)
    os.mkfifo(src / "pipe.wav")  # opening it would block forever
    os.symlink(src / "loop.wav", src / "loop.wav")  # a link to itself
    os.symlink(src / "nowhere.wav", src / "dangling.wav")
    (src / "tracker.xm").write_bytes(b"\x00" * 64)
    (src / "score.mid").write_bytes(b"MThd")
    (src / "notes.txt").write_text("a note")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from pipelines.dataset import build_dataset; "
            f"from tests.test_faults import params; "
            f"build_dataset({str(src)!r}, {str(out)!r}, params())",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    sources = pd.read_parquet(out / schema.SOURCES_FILE)
    status = {Path(p).name: s for p, s in zip(sources["source_path"], sources["status"])}
    assert status == {
        "piece0.wav": "ok",
        "pipe.wav": "error",
        "loop.wav": "error",
        "dangling.wav": "error",
        "tracker.xm": "skipped",
        "score.mid": "skipped",
        "notes.txt": "skipped",
    }
    errors = pd.read_parquet(out / schema.ERRORS_FILE)
    why = {Path(p).name: m for p, m in zip(errors["source_path"], errors["message"])}
    assert "FIFO" in why["pipe.wav"] and "symlink loop" in why["loop.wav"] and "broken link" in why["dangling.wav"]
    stats = json.loads((out / schema.STATS_FILE).read_text())
    assert stats["files_in"] == 4 and stats["files_ok"] == 1 and stats["files_failed"] == 3
    assert stats["files_skipped"] == 3


def test_stale_temporary_folders_of_killed_builds_are_removed(tmp_path):
    src = _folder(tmp_path / "in", 1)
    out = tmp_path / "out"
    build_dataset(str(src), str(out), params())
    (out / ".tmp-0badf00d").mkdir()
    (out / ".tmp-0badf00d" / "clips-00000-of-00002.parquet").write_bytes(b"half a shard")
    sf.write(src / "piece5.wav", _wave(8.5, 5), SR)
    build_dataset(str(src), str(out), params())
    assert not (out / ".tmp-0badf00d").exists() and len(_table(out)) == 4


def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys):
    from generation.cli import main

    src = _folder(tmp_path / "in", 1)
    out = tmp_path / "a_file"
    out.write_text("not a folder")
    rc = main(["dataset", "build", "--input", str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "smitin: error:" in err and "Traceback" not in err
    assert out.read_text() == "not a folder"


# ----------------------------------------------------------------------------------------------------- artifacts
def _probe_set(trait: str = "drums"):
    from models.probes import ARRAY_NAMES, ProbeSet

    rng = np.random.default_rng(0)
    L, H, D = 2, 2, 4
    arrays = {
        n: rng.standard_normal((L, H, D) if n in ("coef", "direction", "random_direction") else (L, H)).astype(
            np.float32
        )
        for n in ARRAY_NAMES
    }
    arrays["accuracy"] = np.abs(arrays["accuracy"]) % 1
    return ProbeSet(trait=trait, generator_fingerprint="f" * 32, **arrays)


@pytest.mark.parametrize("damage", ["nan", "random_same_size"])
def test_damaged_probe_arrays_are_refused_on_load(tmp_path, damage):
    from safetensors.numpy import load_file, save_file

    from models.probes import PROBE_ARRAYS, ProbeError, ProbeSet

    _probe_set().save(tmp_path / "p")
    ProbeSet.load(tmp_path / "p")  # intact: loads
    arrays = load_file(str(tmp_path / "p" / PROBE_ARRAYS))
    if damage == "nan":
        arrays["coef"][0, 0, 0] = np.nan
    else:
        arrays = {k: np.random.default_rng(1).standard_normal(v.shape).astype(np.float32) for k, v in arrays.items()}
    size = (tmp_path / "p" / PROBE_ARRAYS).stat().st_size
    save_file(arrays, str(tmp_path / "p" / PROBE_ARRAYS))
    assert (tmp_path / "p" / PROBE_ARRAYS).stat().st_size == size  # a size check alone would pass it
    with pytest.raises(ProbeError, match="corrupted or replaced"):
        ProbeSet.load(tmp_path / "p")
    # without the recorded hash (a probe set saved before it was recorded), NaN is still refused
    meta = json.loads((tmp_path / "p" / "probe_set.json").read_text())
    meta.pop("arrays_sha256")
    (tmp_path / "p" / "probe_set.json").write_text(json.dumps(meta))
    if damage == "nan":
        with pytest.raises(ProbeError, match="non-finite"):
            ProbeSet.load(tmp_path / "p")


def test_a_corrupted_registry_cache_entry_is_fetched_again(tmp_path, sqlite_registry):
    from registry.loading import fetch
    from registry.registration import register_dir
    from tests.conftest_registry import make_generator_dir

    reg = sqlite_registry
    fp = make_generator_dir(tmp_path / "g")
    register_dir(reg, tmp_path / "g", "generator")
    first = fetch(reg, f"models:/{reg.settings.generator_name}/1")
    weights = first.path / "generator.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(bytes(b ^ 0xFF for b in good[:64]) + good[64:])  # same size, other content
    again = fetch(reg, f"models:/{reg.settings.generator_name}/1")
    assert not again.cached and weights.read_bytes() == good and again.fingerprint == fp


@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "overwritten"])
def test_a_damaged_registry_database_is_refused_and_left_alone(tmp_path, mlflow_template_db, capsys, damage):
    from generation.cli import main

    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template_db, db)
    good = db.read_bytes()
    if damage == "zero_bytes":
        db.write_bytes(b"")
    elif damage == "truncated":
        db.write_bytes(good[: len(good) // 3])
    else:
        db.write_bytes(b"SQLite format 3\x00" + os.urandom(len(good) - 16))
    before = db.read_bytes()
    for argv in (["registry", "list"], ["registry", "promote", "drums"], ["harmonize", "--melody", "x.mid"]):
        rc = main(
            [*argv, "--tracking-uri", f"sqlite:///{db}"]
            if argv[0] != "harmonize"
            else [*argv, "--tracking-uri", f"sqlite:///{db}", "--params", str(tmp_path / "none.yaml")]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len([x for x in err if x.startswith("smitin: error")]) == 1, err
        assert "Traceback" not in "\n".join(err)
        assert any(w in err[-1] for w in ("empty (0 bytes)", "damaged", "not an MLflow registry")), err
    assert db.read_bytes() == before  # never replaced, never "repaired"


def test_wav_writes_are_atomic_on_a_full_disk(tmp_path, monkeypatch):
    import soundfile

    from core.audio import write_wav

    target = tmp_path / "out.wav"
    sf.write(target, np.zeros(100), 16000)
    before = target.read_bytes()
    real_write = soundfile.write

    def full_disk(path, data, sr, **kw):
        real_write(path, data[: len(data) // 2], sr, **kw)  # half the file lands, then the disk is full
        raise soundfile.LibsndfileError(2)  # libsndfile's error on a full disk (not an OSError)

    monkeypatch.setattr(soundfile, "write", full_disk)
    with pytest.raises(OSError, match="cannot write .*out.wav"):
        write_wav(target, np.ones(16000), 16000)
    assert target.read_bytes() == before and not list(tmp_path.glob(".out.wav.*"))


def _listening_ips(tmp_path: Path, patched: bool) -> tuple[int, set]:
    import psutil

    src = _folder(tmp_path / f"in{patched}", 4)
    unpatch = (
        "" if patched else ("import contextlib, pipelines.runner as r; r.loopback_only = contextlib.nullcontext; ")
    )
    code = (
        f"{unpatch}from pipelines.dataset import build_dataset; from tests.test_faults import params; "
        f"build_dataset({str(src)!r}, {str(tmp_path / f'out{patched}')!r}, params(workers=2))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    seen = set()
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [parent, *parent.children(recursive=True)]:
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        seen.add(c.laddr.ip)
        except psutil.Error:
            pass
    return proc.returncode, seen


def test_beam_local_runner_listens_on_loopback_only(tmp_path):
    rc, seen = _listening_ips(tmp_path, patched=True)
    assert rc == 0 and seen, "the build never listened: the check saw nothing to check"
    assert seen <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, seen
    # the same build without the fix listens on every interface: the check above can tell them apart
    rc, seen = _listening_ips(tmp_path, patched=False)
    assert rc == 0 and "::" in seen


def test_musicgen_pickled_weights_are_refused_without_the_flag(tmp_path):
    from models.musicgen import MusicGenError, load_musicgen

    folder = tmp_path / "mg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "musicgen"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(MusicGenError, match="no safetensors weights.*pickle"):
        load_musicgen(folder)


def test_a_full_disk_during_harmonize_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):

    import torch

    from core.score_io import write_midi
    from generation.cli import main
    from models.coconet import Coconet, CoconetConfig, save_coconet

    torch.manual_seed(0)
    save_coconet(Coconet(CoconetConfig.preset("debug")).eval(), tmp_path / "model")
    melody = write_midi(np.array([[72] * 16 + [74] * 16]), tmp_path / "tune.mid")
    import soundfile

    real = soundfile.write

    def full_disk(path, data, sr, **kw):
        real(path, data[: len(data) // 3], sr, **kw)
        raise soundfile.LibsndfileError(2)  # what libsndfile raises when the disk fills (not an OSError)

    monkeypatch.setattr(soundfile, "write", full_disk)
    rc = main(
        [
            "harmonize",
            "--melody",
            str(melody),
            "--model",
            str(tmp_path / "model"),
            "--steps",
            "2",
            "--out",
            str(tmp_path / "out" / "c.mid"),
        ]
    )
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("smitin:")]
    assert rc == 2 and len(err) == 1 and "cannot write" in err[0] and "c.wav" in err[0]
    assert not (tmp_path / "out" / "c.wav").exists() and not list((tmp_path / "out").glob(".c.wav.*"))


def test_a_file_the_runner_returns_nothing_for_stops_the_commit(tmp_path, monkeypatch):
    from pipelines import dataset

    src = _folder(tmp_path / "in", n=3)
    real = dataset.ProcessFile.process

    def loses_one(self, source):
        if source.path.endswith("piece1.wav"):
            return  # as a runner that dropped the work would: no clips, no error row, no sources row
        yield from real(self, source)

    monkeypatch.setattr(dataset.ProcessFile, "process", loses_one)
    with pytest.raises(UserError, match=r"returned no result for 1 of 3 files \(first: .*piece1.wav\)"):
        build_dataset(str(src), str(tmp_path / "out"), params())
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("clips-*.parquet"))
