"""`smitin harmonize | infill | compose` on a small Coconet: the files a user gets, the given notes kept exactly,
and one clear line (exit 2) for every bad request. Also the registry path: register, promote, refuse a worse one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.score_io import read_voices, voices_to_roll, write_midi, write_musicxml
from generation.cli import main
from models.coconet import Coconet, CoconetConfig, save_coconet
from models.voice_leading import parallel_motions

MELODY = np.array([72, 72, 72, 72, 74, 74, 76, 76, 77, 77, 77, 77, 76, 76, 74, 74] * 2 + [72] * 16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("coconet") / "model"
    save_coconet(Coconet(CoconetConfig.preset("debug")).eval(), path, {"metrics": {"valid_loss": 3.0}})
    return path


@pytest.fixture
def melody_file(tmp_path) -> Path:
    return write_midi(MELODY[None], tmp_path / "tune.mid")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_harmonize_writes_four_files_and_keeps_the_melody(tmp_path, model_dir, melody_file, capsys):
    rc, out, err = run(
        capsys,
        "harmonize",
        "--melody",
        str(melody_file),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "chorale.mid"),
        "--steps",
        "8",
    )
    assert rc == 0, err
    files = [Path(line) for line in out.split()]
    assert sorted(p.suffix for p in files) == [".mid", ".musicxml", ".png", ".wav"]
    assert all(p.stat().st_size > 0 for p in files)
    for path in (tmp_path / "chorale.mid", tmp_path / "chorale.musicxml"):
        roll = voices_to_roll(read_voices(str(path)))
        assert np.array_equal(roll[0], MELODY)  # the soprano is the melody, note for note
    import soundfile as sf

    wave, sr = sf.read(tmp_path / "chorale.wav")
    assert sr == 32000 and len(wave) > sr * 3 and np.abs(wave).max() > 0.1  # 3 s of music at 80 qpm, audible


def test_infill_keeps_everything_outside_the_bars(tmp_path, model_dir, capsys):
    rng = np.random.default_rng(0)
    score = np.stack([rng.integers(lo, lo + 8, 64) for lo in (67, 60, 52, 43)])
    write_musicxml(score, tmp_path / "piece.musicxml")
    rc, _, err = run(
        capsys,
        "infill",
        "--score",
        str(tmp_path / "piece.musicxml"),
        "--bars",
        "2-3",
        "--voices",
        "AT",
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "new.mid"),
        "--steps",
        "8",
    )
    assert rc == 0, err
    new = voices_to_roll(read_voices(str(tmp_path / "new.musicxml")))
    keep = np.ones_like(score, bool)
    keep[1:3, 16:48] = False
    assert np.array_equal(new[keep], score[keep])
    assert not np.array_equal(new[~keep], score[~keep])


def test_compose_and_ancestral(tmp_path, model_dir, capsys):
    rc, out, err = run(
        capsys,
        "compose",
        "--bars",
        "2",
        "--sampler",
        "ancestral",
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "c"),
        "--seed",
        "3",
    )
    assert rc == 0, err
    report = json.loads(err.strip().splitlines()[-1])
    assert report["sampler"] == "ancestral+repair"  # the voice-leading repair runs by default
    roll = voices_to_roll(read_voices(str(tmp_path / "c.musicxml")))
    assert roll.shape == (4, 32)
    repaired = report["parallels_repaired"]
    rc, out, err = run(
        capsys, "compose", "--bars", "2", "--sampler", "ancestral", "--allow-parallels", "--model", str(model_dir),
        "--out", str(tmp_path / "raw"), "--seed", "3",
    )  # fmt: skip
    assert rc == 0, err
    report = json.loads(err.strip().splitlines()[-1])
    assert report["sampler"] == "ancestral" and report["parallels_repaired"] == 0
    # the same seed draws the same piece; the repair then removed exactly the parallels it reported
    raw = voices_to_roll(read_voices(str(tmp_path / "raw.musicxml")))
    assert len(parallel_motions(raw)) - repaired == len(parallel_motions(roll))


@pytest.mark.parametrize(
    "case",
    [
        "two_voices",
        "not_a_score",
        "no_notes",
        "too_high",
        "bad_bars",
        "bad_voices",
        "bars_past_end",
        "seed",
        "out_unwritable",
        "steps",
        "missing_file",
        "three_voice_score",
    ],
)
def test_bad_requests_get_one_line(tmp_path, model_dir, melody_file, capsys, case, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a request that wrongly succeeded would write its default output here, not in the repo
    write_musicxml(np.stack([MELODY, MELODY - 5, MELODY - 12, MELODY - 24]), tmp_path / "satb.musicxml")
    (tmp_path / "junk.mid").write_bytes(b"MThd but not really")
    write_musicxml(np.full((1, 16), -1), tmp_path / "rests.musicxml")
    wide = MELODY.copy()
    wide[:4], wide[-4:] = 30, 90  # a 60-semitone span: no octave shift fits 36..81
    write_midi(wide[None], tmp_path / "screech.mid")
    write_musicxml(np.stack([MELODY, MELODY - 5, MELODY - 12]), tmp_path / "three.musicxml")
    (tmp_path / "adir").mkdir()
    m = ["--model", str(model_dir)]
    argv, expect = {
        "two_voices": (["harmonize", "--melody", str(tmp_path / "satb.musicxml")], "give a melody of one voice"),
        "not_a_score": (["harmonize", "--melody", str(tmp_path / "junk.mid")], "cannot be read as a score"),
        "no_notes": (["harmonize", "--melody", str(tmp_path / "rests.musicxml")], "has no notes"),
        "too_high": (["harmonize", "--melody", str(tmp_path / "screech.mid")], "wider than the model's range"),
        "bad_bars": (["infill", "--score", str(tmp_path / "satb.musicxml"), "--bars", "three"], "--bars"),
        "bad_voices": (["harmonize", "--melody", str(melody_file), "--voices", "XYZ"], "--voices"),
        "bars_past_end": (["infill", "--score", str(tmp_path / "satb.musicxml"), "--bars", "9-12"], "has 3 bars"),
        "seed": (["compose", "--seed", str(2**70)], "outside 0..2^63-1"),
        "out_unwritable": (["compose", "--out", str(tmp_path / "junk.mid" / "x.mid")], "is a file, not a folder"),
        "steps": (["compose", "--steps", "0"], "--steps"),
        "missing_file": (["harmonize", "--melody", str(tmp_path / "nope.mid")], "not found"),
        "three_voice_score": (["infill", "--score", str(tmp_path / "three.musicxml"), "--bars", "1"], "4 are needed"),
    }[case]
    rc, out, err = run(capsys, *argv, *m)
    lines = [x for x in err.strip().splitlines() if x.startswith("smitin: error")]
    assert rc == 2 and len(lines) == 1 and expect in lines[0], err
    assert "Traceback" not in err


def test_a_melody_out_of_range_by_octaves_is_moved_and_says_so(tmp_path, model_dir, capsys):
    low = write_midi((MELODY - 48)[None], tmp_path / "low.mid")  # MIDI 24..29: below the range 36..81
    rc, _, err = run(
        capsys,
        "harmonize",
        "--melody",
        str(low),
        "--model",
        str(model_dir),
        "--steps",
        "4",
        "--out",
        str(tmp_path / "h.mid"),
    )
    assert rc == 0 and "moved +48 semitones" in err  # back to the soprano's octave, not just in range
    assert np.array_equal(voices_to_roll(read_voices(str(tmp_path / "h.musicxml")))[0], MELODY)


def test_out_naming_a_folder_writes_inside_it(tmp_path, model_dir, melody_file, capsys):
    (tmp_path / "outdir").mkdir()
    rc, out, _ = run(
        capsys,
        "harmonize",
        "--melody",
        str(melody_file),
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--out",
        str(tmp_path / "outdir"),
    )
    assert (
        rc == 0
        and (tmp_path / "outdir" / "harmonized.mid").is_file()
        and (tmp_path / "outdir" / "harmonized.wav").is_file()
    )


def test_registered_coconet_serves_by_alias_and_a_worse_one_is_refused(tmp_path, sqlite_registry, model_dir):
    import shutil

    from generation.coconet import CoconetSession
    from registry.errors import PromotionRefused
    from registry.promotion import history, promote
    from registry.registration import register_dir

    reg = sqlite_registry
    metrics = {"nll": {"frame": {"nll": 0.90, "ensemble": 5, "pieces": 77}}}
    first = register_dir(reg, model_dir, "coconet", extra_metrics=metrics)
    assert first.name == reg.settings.coconet_name
    promote(reg, "coconet")
    session = CoconetSession(registry=reg, params=None)
    assert session.ref.version == first.version
    result = session.harmonize(MELODY, steps=4)
    assert np.array_equal(result.roll[0], MELODY)
    # a challenger with a worse framewise NLL is refused and the refusal recorded
    worse_dir = tmp_path / "worse"
    shutil.copytree(model_dir, worse_dir)
    meta = json.loads((worse_dir / "coconet.json").read_text())
    meta["metrics"]["valid_loss"] = 3.5
    (worse_dir / "coconet.json").write_text(json.dumps(meta))
    worse = register_dir(
        reg, worse_dir, "coconet", extra_metrics={"nll": {"frame": {"nll": 1.20, "ensemble": 5, "pieces": 77}}}
    )
    with pytest.raises(PromotionRefused, match="nll.frame.nll"):
        promote(reg, "coconet")
    _, events = history(reg, "coconet")
    assert events[-1]["action"] == "refused" and events[-1]["to"] == worse.version
    # measured with another protocol (ensemble of 1), the NLLs are not compared
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    meta["metrics"]["valid_loss"] = 3.6
    (other / "coconet.json").write_text(json.dumps(meta))
    register_dir(reg, other, "coconet", extra_metrics={"nll": {"frame": {"nll": 1.5, "ensemble": 1, "pieces": 77}}})
    assert promote(reg, "coconet").promoted
