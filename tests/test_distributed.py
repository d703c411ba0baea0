"""Data-parallel training under torchrun (gloo on this CPU): `--nproc 2` against one process with the same global
batch, checkpoints resumed across a change of process count, and only rank 0 writing and reporting.

Coconet's batch norm computes its statistics over each rank's rows on CPU (torch's SyncBatchNorm is GPU-only), so
its curves agree within a tolerance. The generator is compared without dropout (each rank draws its own dropout
masks, which makes two runs differ as two seeds do); then only the order of floating-point sums differs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from models.train import FitCodecParams, fit_codec, tokenize
from pipelines.scores import BuildScoresParams, build_scores
from tests.clips_fixtures import fake_embed, write_clips_table

ROOT = Path(__file__).resolve().parents[1]
JSB = ROOT / "pipelines" / "data" / "jsb" / "Jsb16thSeparated.json.gz"
COCONET_TOLERANCE = 0.03  # relative, per evaluation of the loss curve
GENERATOR_TOLERANCE = 1e-3


def _run(argv: list[str], nproc: int) -> list[dict]:
    """Runs `smitin ARGV [--nproc N]`; returns the JSON lines it printed (rank 0's report only)."""
    cmd = [sys.executable, "-m", "generation.cli", *argv] + (["--nproc", str(nproc)] if nproc > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _curve(path: Path) -> np.ndarray:
    return np.array([[r["train_loss"], r["valid_loss"]] for r in json.loads(path.read_text())])


def _params(path: Path, section: str, values: dict) -> Path:
    path.write_text(yaml.safe_dump({section: values}))
    return path


# ----------------------------------------------------------------------------------------------------- Coconet
@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("scores")
    data = json.loads(gzip.decompress(JSB.read_bytes()))
    small = {"train": data["train"][:12], "valid": data["valid"][:4], "test": data["test"][:2]}
    src = root / "jsb_small.json.gz"
    src.write_bytes(gzip.compress(json.dumps(small).encode()))
    build_scores([str(src)], str(root / "table"), BuildScoresParams.parse({}, "test"))
    return root / "table"


def _coconet(tmp: Path, scores: Path, name: str, steps: int, nproc: int, ckpt: Path | None = None) -> np.ndarray:
    params = _params(
        tmp / f"{name}.yaml",
        "train_coconet",
        {
            "preset": "debug",
            "seed": 3,
            "crop_frames": 32,
            "batch_size": 8,
            "lr": 0.003,
            "warmup": 2,
            "ema_decay": 0.0,
            "transpose": 1,
            "eval_every": 5,
            "patience": 100,
            "threads": 2,
            "presets": {"debug": {"steps": steps, "max_minutes": 10}},
        },
    )
    argv = ["coconet", "train", "--scores", str(scores), "--out", str(tmp / name), "--params", str(params)]
    argv += ["--metrics", str(tmp / f"{name}.json"), "--plot", str(tmp / f"{name}_curve.json")]
    # without a checkpoint of its own the run is fresh, and writes its state under tmp (never the repo's data/)
    argv += ["--checkpoint", str(ckpt)] if ckpt else ["--checkpoint", str(tmp / f"{name}_ckpt"), "--fresh"]
    reports = _run(argv, nproc)
    assert len(reports) == 1 and reports[0]["steps"] == steps  # one report: rank 0's
    return _curve(tmp / f"{name}_curve.json")


def test_coconet_on_two_processes_follows_one_process_with_the_same_global_batch(tmp_path, scores):
    one = _coconet(tmp_path, scores, "one", 20, 1)
    two = _coconet(tmp_path, scores, "two", 20, 2)
    assert one.shape == two.shape == (4, 2)
    assert np.allclose(two, one, rtol=COCONET_TOLERANCE), np.c_[one, two]
    assert two[-1, 1] < two[0, 1]  # and it trains
    meta = json.loads((tmp_path / "two" / "coconet.json").read_text())
    assert meta["metrics"]["processes"] == 2 and (tmp_path / "two.json").is_file()


def test_coconet_checkpoint_resumes_across_a_change_of_process_count(tmp_path, scores):
    # two processes for 10 steps, then one process to 20, against one process all the way
    _coconet(tmp_path, scores, "a10", 10, 2, tmp_path / "ckpt_a")
    mixed = _coconet(tmp_path, scores, "a20", 20, 1, tmp_path / "ckpt_a")
    _coconet(tmp_path, scores, "b10", 10, 1, tmp_path / "ckpt_b")
    plain = _coconet(tmp_path, scores, "b20", 20, 1, tmp_path / "ckpt_b")
    assert len(mixed) == len(plain) == 4  # the resumed run continued the curve (steps 5..20), not a new one
    assert np.allclose(mixed, plain, rtol=COCONET_TOLERANCE), np.c_[mixed, plain]


# ----------------------------------------------------------------------------------------------------- generator
@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    clips = write_clips_table(root / "clips")
    codec = FitCodecParams(
        n_mels=32, n_codebooks=2, card=16, kmeans_iters=5, griffin_lim_iters=4, decoder="griffin_lim", seed=0
    )
    fit_codec(str(clips), str(root / "codec"), codec)
    tokenize(str(clips), str(root / "codec"), str(root / "tokens"), embed=fake_embed)
    return root


def _generator(tmp: Path, data: Path, name: str, steps: int, nproc: int, ckpt: Path | None = None) -> np.ndarray:
    debug = {
        "steps": steps,
        "batch_size": 8,
        "window_frames": 32,
        "eval_every": 5,
        "eval_clips": 4,
        "max_minutes": 10,
        "lr": 0.01,
        "warmup": 2,
        "patience": 100,
        # without dropout the only randomness is the batch, drawn alike for any number of processes
        "model": {"max_frames": 48, "dropout": 0.0, "cond_dropout": 0.0},
    }
    params = _params(
        tmp / f"{name}.yaml",
        "train_generator",
        {"preset": "debug", "seed": 0, "threads": 2, "ema_decay": 0.0, "presets": {"debug": debug}},
    )
    argv = ["train", "--tokens", str(data / "tokens"), "--codec", str(data / "codec"), "--out", str(tmp / name)]
    argv += ["--params", str(params), "--metrics", str(tmp / f"{name}.json"), "--plot", str(tmp / f"{name}_c.json")]
    # without a checkpoint of its own the run is fresh, and writes its state under tmp (never the repo's data/)
    argv += ["--checkpoint", str(ckpt)] if ckpt else ["--checkpoint", str(tmp / f"{name}_ckpt"), "--fresh"]
    reports = _run(argv, nproc)
    assert len(reports) == 1 and reports[0]["steps"] == steps
    return _curve(tmp / f"{name}_c.json")


def test_generator_on_two_processes_follows_one_process_and_resumes_on_one(tmp_path, tokens):
    one = _generator(tmp_path, tokens, "one", 20, 1)
    two = _generator(tmp_path, tokens, "two", 20, 2)
    assert np.allclose(two, one, rtol=GENERATOR_TOLERANCE), np.c_[one, two]
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    # two processes for 10 steps, then one to 20, against one process all the way
    _generator(tmp_path, tokens, "a10", 10, 2, tmp_path / "ckpt_a")
    mixed = _generator(tmp_path, tokens, "a20", 20, 1, tmp_path / "ckpt_a")
    _generator(tmp_path, tokens, "b10", 10, 1, tmp_path / "ckpt_b")
    plain = _generator(tmp_path, tokens, "b20", 20, 1, tmp_path / "ckpt_b")
    assert len(mixed) == len(plain) == 4  # the resumed runs continued the curve (steps 5..20), not a new one
    assert np.allclose(mixed, plain, rtol=GENERATOR_TOLERANCE), np.c_[mixed, plain]


def test_nproc_that_does_not_split_the_batch_is_one_line(tmp_path, scores):
    params = _params(tmp_path / "p.yaml", "train_coconet", {"preset": "debug", "presets": {"debug": {"batch_size": 5}}})
    cmd = [sys.executable, "-m", "generation.cli", "coconet", "train", "--scores", str(scores)]
    cmd += ["--out", str(tmp_path / "m"), "--params", str(params), "--nproc", "2", "--fresh"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "smitin: error: train_coconet.batch_size 5 does not split evenly over 2 processes"
    ]
    assert not (tmp_path / "m").exists()
