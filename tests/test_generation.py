"""Thin generation module: resolve the generator and probe sets by alias from a real registry (SQLite default and
a real `mlflow server`), refuse probe sets of another generator, generate a batch / a continuation in windows,
write WAV + steering report JSON + plot; the CLI front door. Uses the real debug generator, codec and probe sets."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from generation import GenerationSession, generate
from generation.session import GenerationError
from registry.errors import IncompatibleProbeSet, PromotionRefused
from registry.promotion import history, promote
from registry.registration import register_dir
from tests.model_fixtures import probe_set_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _boot_server_early_and_one_thread(mlflow_server):
    # Debug-sized models: one intra-op thread is fastest, and on a shared 2-core machine far faster than many.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two debug generators (same codec, different weights) and probe sets saved by the real `models` code."""
    from models.codec import MelCodecConfig, MelRVQCodec
    from models.generator import Generator, GeneratorConfig, save_generator

    root = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    codec = MelRVQCodec.fit(
        [(rng.standard_normal(16000).astype(np.float32) * 0.1, 16000) for _ in range(3)], MelCodecConfig.debug()
    )
    gens = {}
    for name, seed in (("gen", 0), ("other-gen", 1)):
        torch.manual_seed(seed)
        gens[name] = Generator(GeneratorConfig.debug()).eval()
        save_generator(gens[name], codec, root / name)
    g = gens["gen"]
    probe_set_for(g, "drums", 0.85, 1).save(root / "drums-v1")
    probe_set_for(g, "drums", 0.70, 2).save(root / "drums-worse")
    probe_set_for(g, "drums", 0.95, 3).save(root / "drums-better")
    probe_set_for(gens["other-gen"], "piano", 0.9, 4).save(root / "piano-other")
    wave = 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000 * 2) / 16000).astype(np.float32)
    sf.write(root / "prompt.wav", wave, 16000)
    return root


def test_generate_by_alias_follows_the_new_champion(any_registry, model_dirs, tmp_path):
    reg = any_registry
    register_dir(reg, model_dirs / "gen")
    promote(reg, "generator")
    register_dir(reg, model_dirs / "drums-v1")
    promote(reg, "drums")
    register_dir(reg, model_dirs / "drums-worse")
    with pytest.raises(PromotionRefused, match="gate metrics failed"):
        promote(reg, "drums")

    first = generate("", duration=0.5, steer={"drums": 5}, out=tmp_path / "a.wav", registry=reg, params=None, seed=1)
    assert first.info["probe_sets"]["drums"]["version"] == "1"
    assert first.info["generator"]["version"] == "1"

    better = register_dir(reg, model_dirs / "drums-better")
    assert promote(reg, "drums", better.version).promoted
    second = generate("", duration=0.5, steer={"drums": 5}, out=tmp_path / "b.wav", registry=reg, params=None, seed=1)
    assert second.info["probe_sets"]["drums"]["version"] == "3"

    wave, sr = sf.read(second.wavs[0])
    assert sr == 16000 and abs(len(wave) / sr - 0.5) < 0.05 and np.isfinite(wave).all() and np.abs(wave).max() > 0
    report = json.loads(second.report_json.read_text())
    assert report["plan"]["strengths"] == {"drums": 5.0} and report["plan"]["mode"] == "smitin"
    assert len(report["steps"]) >= 20 and "drums" in report["summary"]
    assert report["generation"]["probe_sets"]["drums"]["name"] == reg.model_name("probe_set", "drums")
    assert second.report_pngs[0].stat().st_size > 1000

    events = [(e["action"], e["to"]) for e in history(reg, "drums")[1] if e["alias"] == "champion"]
    assert events == [("promote", "1"), ("refused", "2"), ("promote", "3")]


def test_probe_set_of_another_generator_is_refused(sqlite_registry, model_dirs, tmp_path):
    reg = sqlite_registry
    register_dir(reg, model_dirs / "gen")
    promote(reg, "generator")
    register_dir(reg, model_dirs / "piano-other")
    promote(reg, "piano", force=True, reason="test")
    session = GenerationSession(None, registry=reg, params=None)
    with pytest.raises(IncompatibleProbeSet) as e:
        session.generate("", duration=0.25, steer="piano=-3", out=tmp_path / "x.wav")
    msg = str(e.value)
    assert "smitin-probes-piano v1" in msg and "smitin-generator v1" in msg and "\n" not in msg
    assert not (tmp_path / "x.wav").exists()
    assert session._generator is None  # refused before loading the generator
    with pytest.raises(GenerationError, match=r"no probe set for trait 'bass'.*traits with probe sets: piano"):
        session.generate("", duration=0.25, steer={"bass": 2}, out=tmp_path / "x.wav")


def test_batch_continuation_in_windows_and_local_dirs(model_dirs, tmp_path):
    """Local directories work without any registry; a continuation longer than the context is generated in
    windows; one batch gives one WAV and one plot per prompt and a report with every row."""
    session = GenerationSession(model_dirs / "gen", params=None, probes={"drums": str(model_dirs / "drums-v1")})
    ctx = session.generator.cfg.max_frames
    duration = 1.5 * ctx / session.codec.frame_rate  # longer than the context: two windows or more
    res = session.generate(
        ["", ""],
        duration=duration,
        continue_from=model_dirs / "prompt.wav",
        steer="drums=+4",
        mode="iti",
        out=tmp_path / "batch.wav",
        seed=3,
    )
    assert [p.name for p in res.wavs] == ["batch_1.wav", "batch_2.wav"]
    assert res.info["windows"] >= 2
    for wav in res.wavs:
        assert abs(sf.info(str(wav)).duration - duration) < 0.05
    report = json.loads(res.report_json.read_text())
    n_steps = len(report["steps"])
    assert [s["step"] for s in report["steps"]] == list(range(n_steps))  # numbered on across windows
    assert n_steps >= res.info["frames"] and len(report["steps"][0]["traits"]["drums"]["probability"]) == 2
    assert all(s["traits"]["drums"]["on"] == [True, True] for s in report["steps"])  # iti: always on
    assert [p.name for p in res.report_pngs] == ["batch_1.steering.png", "batch_2.steering.png"]
    # the same seed gives the same audio; no steering gives no report
    again = session.generate(
        ["", ""],
        duration=duration,
        continue_from=model_dirs / "prompt.wav",
        steer="drums=+4",
        mode="iti",
        out=tmp_path / "again.wav",
        seed=3,
    )
    assert np.array_equal(sf.read(again.wavs[0])[0], sf.read(res.wavs[0])[0])
    plain = session.generate("", duration=0.25, out=tmp_path / "plain.wav")
    assert plain.report_json is None and plain.wavs[0].exists()
    # prompt guidance: another continuation of the same prompt and seed, recorded in the info
    guided = session.generate(
        ["", ""],
        duration=duration,
        continue_from=model_dirs / "prompt.wav",
        steer="drums=+4",
        mode="iti",
        out=tmp_path / "guided.wav",
        seed=3,
        prompt_guidance="20,20,1,1",
        prompt_plausibility=0.05,
    )
    assert guided.info["prompt_guidance"] == (20.0, 20.0, 1.0, 1.0) and guided.info["prompt_plausibility"] == 0.05
    assert not np.array_equal(sf.read(guided.wavs[0])[0], sf.read(res.wavs[0])[0])


def test_cli_generate_with_text_prompt(sqlite_registry, model_dirs, tmp_path, capsys, monkeypatch):
    from generation.cli import main

    reg = sqlite_registry
    monkeypatch.setenv("SMITIN_CACHE_DIR", str(tmp_path / "cache"))
    register_dir(reg, model_dirs / "gen")
    promote(reg, "generator")
    register_dir(reg, model_dirs / "drums-v1")
    base = ["generate", "--tracking-uri", reg.uri, "--params", str(tmp_path / "none.yaml")]
    # champion alias missing: one line naming the fix
    assert main(base + ["--prompt", "a chorale", "--steer", "drums=+5", "--out", str(tmp_path / "o.wav")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("smitin: error: smitin-probes-drums has no version with alias 'champion'")
    promote(reg, "drums")
    t0 = time.perf_counter()
    rc = main(
        base
        + [
            "--prompt",
            "an upbeat chorale with drums",
            "--duration",
            "0.5",
            "--steer",
            "drums=+5",
            "--mode",
            "smitin",
            "--out",
            str(tmp_path / "o.wav"),
            "--seed",
            "2",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "o.wav"), str(tmp_path / "o.steering.json"), str(tmp_path / "o.steering.png")]
    report = json.loads((tmp_path / "o.steering.json").read_text())
    info = report["generation"]
    assert info["prompts"] == ["an upbeat chorale with drums"] and info["cfg_scale"] == 3.0
    # params generate.steering reach the plan (its floors: hold_floor adding, remove_floor removing)
    assert report["plan"]["params"]["hold_floor"] == 0.25 and report["plan"]["params"]["remove_floor"] == 0.125
    assert report["plan"]["params"]["prompt_relative"] is True
    print(f"cli generate (resolve + load + caption encoder + generate): {time.perf_counter() - t0:.1f} s")
    assert main(base + ["--prompt", "x", "--steer", "drums=lots", "--out", str(tmp_path / "o.wav")]) == 2
    assert "strength of 'drums' is not a number" in capsys.readouterr().err


def test_resolving_and_loading_from_a_local_registry_is_fast(sqlite_registry, model_dirs):
    reg = sqlite_registry
    register_dir(reg, model_dirs / "gen")
    promote(reg, "generator")
    register_dir(reg, model_dirs / "drums-v1")
    promote(reg, "drums")
    cold = GenerationSession(None, registry=reg, params=None)
    cold.probe_set("drums"), cold.generator
    assert not cold.generator_ref.cached
    t0 = time.perf_counter()
    warm = GenerationSession(None, registry=reg, params=None)  # cache hit: one registry query, no download
    warm.probe_set("drums"), warm.generator
    elapsed = time.perf_counter() - t0
    assert warm.generator_ref.cached and warm.probe_refs["drums"].cached
    assert warm.generator_ref.path == cold.generator_ref.path
    print(f"cold {cold.timings}, warm {warm.timings}, warm total {elapsed:.2f} s")
    assert elapsed < 10


def test_cli_generate_user_errors_are_one_line(model_dirs, tmp_path, capsys):
    from generation.cli import main
    from tests.conftest_registry import _free_port

    cases = [
        (
            ["--tracking-uri", f"http://127.0.0.1:{_free_port()}", "--prompt", "x"],
            "is unreachable (connection refused)",
        ),
        (
            ["--generator", str(model_dirs / "gen"), "--prompt", "x", "--continue", str(tmp_path / "nope.wav")],
            "nope.wav does not exist",
        ),
        (["--generator", str(model_dirs / "drums-v1"), "--prompt", "x"], "is a probe set, not a generator"),
        (
            ["--generator", str(model_dirs / "gen"), "--prompt", "x", "--duration", "0.2", "--temperature", "1,0.7"],
            "temperature has 2 values, the generator has",
        ),
        (
            ["--generator", str(model_dirs / "gen"), "--prompt", "x", "--temperature", "warm"],
            "temperature must be a number",
        ),
        (
            ["--generator", str(model_dirs / "gen"), "--prompt", "x", "--prompt-guidance", "0.5"],
            "prompt_guidance must be >= 1 and finite",
        ),
        (
            ["--generator", str(model_dirs / "gen"), "--prompt", "x", "--prompt-guidance", "3,1"],
            "prompt_guidance has 2 values, the generator has",
        ),
        (
            ["--generator", str(model_dirs / "gen"), "--prompt", "x", "--prompt-plausibility", "high"],
            "plausibility must be a number in [0, 1), got 'high'",
        ),
        (
            ["--generator", str(model_dirs / "gen"), "--prompt", "x", "--prompt-plausibility", "1"],
            "plausibility must be a number in [0, 1), got '1'",
        ),
        (
            [
                "--generator",
                "models:/smitin-generator@champion",
                "--tracking-uri",
                f"sqlite:///{tmp_path}/none.db",
                "--prompt",
                "x",
            ],
            "no MLflow registry at",
        ),
        (["--generator", str(model_dirs / "gen"), "--prompt", "x", "--duration", "nan"], "not a finite number"),
        (["--generator", str(model_dirs / "gen"), "--prompt", "x", "--duration", "inf"], "not a finite number"),
        (["--generator", str(model_dirs / "gen"), "--prompt", "x", "--duration", "100000"], "at most 600 s"),
        (["--generator", str(model_dirs / "gen"), "--prompt", "x", "--seed", str(2**70)], "outside 0..2^63-1"),
        (["--generator", str(model_dirs / "gen"), "--prompt", "x", "--steer", "drums=1e30"], "must lie within"),
        (["--generator", str(model_dirs / "gen"), "--prompt", "x", "--out", str(tmp_path)], "--out must be a .wav"),
    ]
    for extra, expected in cases:
        rc = main(["generate", "--params", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o.wav"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("smitin: error: ") and expected in err[-1], (extra, err)
    # --out's folder is created; where it cannot be (a file is in the way), one line before any generating
    (tmp_path / "a-file").write_text("")
    rc = main(
        [
            "generate",
            "--params",
            str(tmp_path / "none.yaml"),
            "--generator",
            str(model_dirs / "gen"),
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "a-file" / "o.wav"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 2 and err[-1].startswith("smitin: error: cannot write --out") and "is a file, not a folder" in err[-1]
    ), err
