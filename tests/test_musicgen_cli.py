"""MusicGen through the user-facing commands, on tiny random MusicGen checkpoints saved to local folders (no download):
`smitin probes train` with params `generator.backend: musicgen`, `smitin registry register/promote` (the probe set is
registered as smitin-probes-musicgen-drums with the MusicGen reference and fingerprint; the weights are not),
`smitin generate` steering that MusicGen, and one-line refusals of a mismatched generator (other weights, another
size, the builtin backend)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from tests.clips_fixtures import write_clips_table
from tests.conftest_registry import make_generator_dir
from tests.test_musicgen import _tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one intra-op thread is fastest on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """MusicGen folders (save_pretrained + a tiny tokenizer): `musicgen` (seed 0), `other` (seed 1, same shape),
    `narrow` (2 heads instead of 4); a clips table with drum / drum-free pairs."""
    from models.musicgen import debug_musicgen

    root = tmp_path_factory.mktemp("musicgen-cli")
    for name, kwargs in (("musicgen", {"seed": 0}), ("other", {"seed": 1}), ("narrow", {"seed": 0, "heads": 2})):
        debug_musicgen(**kwargs).save_pretrained(root / name)
        _tiny_tokenizer().save_pretrained(root / name)
    write_clips_table(root / "clips", n_per_split=(16, 4, 4), seconds=1.0)
    return root


def _params(tmp_path, folders, reg) -> str:
    params = {
        "seed": 0,
        "generator": {"backend": "musicgen", "path": str(folders / "musicgen"), "device": "cpu", "dtype": "float32"},
        "probes": {
            "traits": {"drums": {"source": {"kind": "stems", "pairs_only": True}}},
            "window_seconds": 0.5,
            "batch_size": 16,
            "max_iter": 200,
            "threads": 1,
        },
        "registry": {
            "tracking_uri": reg.uri,
            "artifact_root": str(tmp_path / "mlartifacts"),
            "cache_dir": str(tmp_path / "cache"),
        },
        "generate": {"duration": 0.3, "steering": {"every": 2}},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def _last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_train_register_generate_and_refuse_mismatches(tmp_path, folders, sqlite_registry, capsys):
    from generation.cli import main
    from models.musicgen import load_musicgen
    from models.probes import ProbeSet

    reg = sqlite_registry
    params = _params(tmp_path, folders, reg)
    # 1. probes on MusicGen, selected by params generator.backend (the DVC stage passes --generator data/generator,
    #    a builtin folder, which does not override params)
    rc = main(
        [
            "probes",
            "train",
            "--trait",
            "drums",
            "--generator",
            str(tmp_path / "no-builtin-here"),
            "--clips",
            str(folders / "clips"),
            "--out",
            str(tmp_path / "probes"),
            "--plots",
            str(tmp_path / "plots"),
            "--metrics",
            str(tmp_path / "metrics"),
            "--params",
            params,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "MusicGen from" in capsys.readouterr().err
    ps = ProbeSet.load(tmp_path / "probes" / "drums")
    gen, _ = load_musicgen(folders / "musicgen")
    assert ps.generator_fingerprint == gen.fingerprint() and ps.generator_backend == "musicgen"
    assert ps.generator["path"] == str((folders / "musicgen").resolve()) and ps.coef.shape == (2, 4, 4)
    assert json.loads((tmp_path / "metrics" / "drums.json").read_text())["best_acc"] > 0

    # 2. registered under its own name, with the MusicGen reference; the compatibility gate does not need a
    #    registered generator
    base = ["registry", "--tracking-uri", reg.uri, "--params", params]
    assert main(base + ["register", "--probes", str(tmp_path / "probes" / "drums")]) == 0
    assert "smitin-probes-musicgen-drums: registered as version 1" in capsys.readouterr().out
    assert main(base + ["promote", "musicgen-drums"]) == 0
    assert "champion none -> v1" in capsys.readouterr().out
    mv = reg.client.get_model_version("smitin-probes-musicgen-drums", "1")
    assert mv.tags["smitin.generator_backend"] == "musicgen"
    assert mv.tags["smitin.generator_fingerprint"] == gen.fingerprint()
    assert mv.tags["smitin.generator_path"] == str((folders / "musicgen").resolve())
    assert mv.tags["smitin.generator_shape"] == "2x4x4"

    # 3. generate: params pick the MusicGen, the probe-set champion is resolved by name, steering runs
    out = tmp_path / "steered.wav"
    gen_args = [
        "generate",
        "--tracking-uri",
        reg.uri,
        "--params",
        params,
        "--prompt",
        "rock drums",
        "--steer",
        "drums=+5",
        "--seed",
        "3",
    ]
    assert main(gen_args + ["--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.split()
    assert printed == [str(out), str(out.with_suffix(".steering.json")), str(out.with_suffix(".steering.png"))]
    wave, sr = sf.read(out)
    assert sr == 800 and abs(len(wave) / sr - 0.3) < 0.03 and np.isfinite(wave).all()
    report = json.loads(out.with_suffix(".steering.json").read_text())
    info = report["generation"]
    assert info["generator"]["backend"] == "musicgen" and info["generator"]["fingerprint"] == gen.fingerprint()
    assert info["probe_sets"]["drums"]["name"] == "smitin-probes-musicgen-drums"
    assert len(report["steps"]) == 15 + 4 - 1  # 0.3 s at 50 frames/s + the delay pattern's K - 1 steps

    # 4. the same probe set against other MusicGen weights of the same shape: refused once they are loaded
    other = tmp_path / "other.wav"
    assert main(gen_args + ["--generator", str(folders / "other"), "--out", str(other)]) == 2
    line = _last_error(capsys)
    assert (
        line.startswith(
            "smitin: error: probe set smitin-probes-musicgen-drums v1 (trait drums) was trained on "
            f"MusicGen {gen.fingerprint()[:12]}"
        )
        and "retrain the probes" in line
    )
    assert not other.exists()

    # 5. ... against the builtin generator: refused before loading anything
    make_generator_dir(tmp_path / "builtin")
    assert (
        main(
            gen_args
            + [
                "--generator",
                str(tmp_path / "builtin"),
                "--out",
                str(other),
                "--probes",
                "drums=models:/smitin-probes-musicgen-drums@champion",
            ]
        )
        == 2
    )
    assert "not on the builtin generator" in _last_error(capsys)
    # and the builtin backend looks for the builtin probe sets, where there is none for drums
    assert main(gen_args + ["--generator", str(tmp_path / "builtin"), "--out", str(other)]) == 2
    assert "no probe set for trait 'drums'" in _last_error(capsys)
    assert not other.exists()


def test_other_model_size_is_refused_before_loading(tmp_path, folders):
    from generation.session import GenerationSession
    from models.musicgen import load_musicgen
    from models.probes import ProbeSet
    from registry.errors import IncompatibleProbeSet

    gen, _ = load_musicgen(folders / "musicgen")
    rng = np.random.default_rng(0)
    L, H, D = 2, 4, 4
    arrays = {n: rng.standard_normal((L, H, D)).astype(np.float32) for n in ("coef", "direction", "random_direction")}
    arrays.update(
        {n: np.ones((L, H), np.float32) for n in ("intercept", "sigma", "accuracy", "weight", "random_sigma")}
    )
    ProbeSet(trait="drums", generator_fingerprint=gen.fingerprint(), generator=gen.describe(), **arrays).save(
        tmp_path / "drums"
    )
    session = GenerationSession(folders / "narrow", params=None, probes={"drums": str(tmp_path / "drums")})
    assert session.backend == "musicgen"
    with pytest.raises(IncompatibleProbeSet, match=r"layers x heads x head dim 2x4x4, not on MusicGen .*\(2x2x8\)"):
        session.generate("rock", steer={"drums": 5}, out=tmp_path / "x.wav")
    assert session._generator is None  # refused from config.json alone
    # the right MusicGen, loaded in another dtype, has the same (checkpoint) fingerprint
    half, _ = load_musicgen(folders / "musicgen", dtype="bfloat16")
    assert half.fingerprint() == gen.fingerprint()
    assert next(half.model.parameters()).dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # Frechet distance of a random model's few clips
def test_evaluate_steering_on_musicgen(tmp_path, folders, capsys):
    """`smitin evaluate-steering` with a MusicGen folder: prompts and detector data are the clips encoded with
    MusicGen's EnCodec (8 kHz here, so the drum descriptors have a high band), the text task uses the captions."""
    from generation.cli import main
    from models.musicgen import debug_musicgen, load_musicgen
    from models.probes import ProbeSet

    folder = tmp_path / "musicgen-8k"
    debug_musicgen(seed=0, sample_rate=8000).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    gen, _ = load_musicgen(folder)
    rng = np.random.default_rng(0)
    L, H, D = gen.n_layers, gen.n_heads, gen.head_dim
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    acc = rng.uniform(0.5, 0.9, (L, H)).astype(np.float32)
    ProbeSet(
        trait="drums",
        generator_fingerprint=gen.fingerprint(),
        generator=gen.describe(),
        coef=unit(rng.standard_normal((L, H, D))),
        intercept=np.zeros((L, H), np.float32),
        direction=unit(rng.standard_normal((L, H, D))),
        sigma=np.ones((L, H), np.float32),
        accuracy=acc,
        weight=acc**3,
        random_direction=unit(rng.standard_normal((L, H, D))),
        random_sigma=np.ones((L, H), np.float32),
        metrics={"best_acc": float(acc.max())},
    ).save(tmp_path / "probes" / "drums")
    params = {
        "seed": 0,
        "probes": {"traits": {"drums": {"source": {"kind": "stems"}}}, "window_seconds": 0.3, "max_iter": 100},
        "evaluate_steering": {
            "traits": ["drums"],
            "tasks": ["continuation", "text"],
            "prompt_seconds": 0.2,
            "continuation_seconds": 0.4,
            "prompts_per_class": 2,
            "takes_per_prompt": 1,
            "n_pairs": [2],
            "alpha": 10.0,
            "every": 2,
            "monitor_heads": 4,
            "iti_top_k": 4,
            "embedding_dims": 2,
            "detector_max_segments": 40,
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc = main(
        [
            "evaluate-steering",
            "--generator",
            str(folder),
            "--probes",
            str(tmp_path / "probes"),
            "--tokens",
            str(tmp_path / "no-tokens"),
            "--clips",
            str(folders / "clips"),
            "--out",
            str(tmp_path / "m.json"),
            "--table",
            str(tmp_path / "t.md"),
            "--reports",
            str(tmp_path / "reports"),
            "--params",
            str(tmp_path / "params.yaml"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "with MusicGen's codec" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "m.json").read_text())
    for task in ("continuation", "text"):
        for direction in ("add", "remove"):
            assert {"none", "iti", "smitin", "random_control", "smitin_2pairs"} <= set(
                metrics["drums"][task][direction]
            )
            # each mode's numbers carry the settings they were run at (the registry gates compare like with like):
            # the push interval of the row's trait, `add_every` (default 12) while adding, and its multiple of the
            # strength, `add_gain` (default 2) while adding
            smitin = metrics["drums"][task][direction]["smitin"]
            assert smitin["strength"] == (10.0 if direction == "add" else -10.0)
            assert smitin["every"] == (12 if direction == "add" else 2)
            assert smitin["gain"] == (2.0 if direction == "add" else 1.0)
            assert smitin["hold_floor"] == (0.25 if direction == "add" else 0.125)  # `remove_floor` while removing
            assert smitin["prompt_relative"] == 1.0  # the monitor after a prompt reads the generated audio's share
            assert "every" not in metrics["drums"][task][direction]["iti"]  # ITI pushes every step by definition
            assert "frechet_sd" not in smitin and np.isfinite(smitin["frechet"])  # 2 clips: no spread, and no NaN
    rows = json.loads((tmp_path / "reports" / "rows.json").read_text())
    assert rows["generator"]["backend"] == "musicgen" and rows["generator_fingerprint"] == gen.fingerprint()

    # a probe set of another MusicGen is refused before the detector is fitted
    other, _ = load_musicgen(folders / "other")
    ps = ProbeSet.load(tmp_path / "probes" / "drums")
    ps.generator_fingerprint = other.fingerprint()
    ps.save(tmp_path / "probes" / "drums")
    assert (
        main(
            [
                "evaluate-steering",
                "--musicgen",
                str(folder),
                "--probes",
                str(tmp_path / "probes"),
                "--clips",
                str(folders / "clips"),
                "--out",
                str(tmp_path / "m2.json"),
                "--params",
                str(tmp_path / "params.yaml"),
            ]
        )
        == 2
    )
    assert "retrain the probes" in _last_error(capsys) and not (tmp_path / "m2.json").exists()
