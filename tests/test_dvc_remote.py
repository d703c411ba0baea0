"""What docs/pipeline.md promises of a DVC remote: after `dvc push`, a fresh clone elsewhere runs `dvc pull && dvc
repro` and recomputes nothing, with outputs byte-identical to the original run's; a changed param still re-runs
the stage that reads it. The full pipeline takes ~20 minutes, so this runs the real build_scores and train_coconet
stages of dvc.yaml (their commands, params, outs, metrics and plots) in a throwaway project on a tiny JSB subset."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from registry.refresh import venv_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("build_scores", "train_coconet")
JSB = "pipelines/data/jsb/Jsb16thSeparated.json.gz"  # the path params build_scores.input names by default
PIECES = {"train": 6, "valid": 2, "test": 2}  # enough for every split the two stages read
MIN_FRAMES = 64  # train_coconet's crop_frames: shorter pieces cannot be cropped


def _env(tmp: Path) -> dict[str, str]:
    # venv_env: the stage commands call `smitin`, this venv's, though CI does not activate it. A git identity of
    # our own and no global/system git config, so commits work on a clean CI machine and a user's config (signing,
    # hooks) cannot interfere; DVC's site cache in tmp so runs do not share state through /var/tmp.
    return {
        **venv_env(),
        "GIT_AUTHOR_NAME": "smitin test",
        "GIT_AUTHOR_EMAIL": "test@smitin.invalid",
        "GIT_COMMITTER_NAME": "smitin test",
        "GIT_COMMITTER_EMAIL": "test@smitin.invalid",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),
        "MPLBACKEND": "Agg",
    }


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command, fail with its output if it fails; returns stdout + stderr (DVC logs to both)."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode:
        tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return proc.stdout + proc.stderr


def _dvc(*args: str) -> list[str]:
    return [str(BIN / "dvc"), *args]


def _tiny_jsb() -> bytes:
    """The first few long-enough chorales of each split of the real JSB JSON, gzipped reproducibly (mtime 0)."""
    with gzip.open(ROOT / JSB, "rt") as f:
        full = json.load(f)
    tiny = {split: [p for p in full[split] if len(p) >= MIN_FRAMES][:n] for split, n in PIECES.items()}
    return gzip.compress(json.dumps(tiny).encode(), mtime=0)


def _real_stages() -> dict:
    """build_scores and train_coconet as dvc.yaml defines them, less the deps on code (core, models,
    pipelines/*.py): the throwaway project has no code of its own, its commands run the venv's installed smitin."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name in STAGES:
        stage = dict(stages[name])
        stage["deps"] = [d for d in stage["deps"] if d.startswith(("data/", "pipelines/data/"))]
        out[name] = stage
    return out


def _tiny_params() -> dict:
    """The real params of the two stages, with Coconet's debug preset (a few seconds of training)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    small = {k: params[k] for k in ("seed", "build_scores", "train_coconet")}
    small["train_coconet"]["preset"] = "debug"
    return small


def _output_paths(stages: dict) -> list[str]:
    """Every path the stages write: cached outs and the git-tracked (cache: false) metrics and plots."""
    paths = []
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            paths += [next(iter(o)) if isinstance(o, dict) else o for o in stage.get(key, [])]
    return paths


def _digests(project: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under the given paths, by path relative to the project."""
    files = []
    for p in paths:
        root = project / p
        files += sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    return {str(f.relative_to(project)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _make_project(origin: Path, remote: Path, env: dict[str, str]) -> None:
    """git + DVC project with the two stages and a default local remote, committed (the remote's URL included, so
    a clone knows where to pull from)."""
    (origin / JSB).parent.mkdir(parents=True)
    (origin / JSB).write_bytes(_tiny_jsb())
    (origin / "dvc.yaml").write_text(yaml.safe_dump({"stages": _real_stages()}, sort_keys=False))
    (origin / "params.yaml").write_text(yaml.safe_dump(_tiny_params(), sort_keys=False))
    _run(["git", "init", "-q", "-b", "main"], origin, env)
    _run(_dvc("init", "-q"), origin, env)
    _run(_dvc("remote", "add", "-d", "store", str(remote)), origin, env)


def _ran(log: str) -> set[str]:
    """The stages a `dvc repro` log says it ran (or restored from the run cache rather than finding up to date)."""
    return {s for s in STAGES if f"Running stage '{s}'" in log or f"Stage '{s}' is cached" in log}


@pytest.mark.slow
def test_pushed_run_is_pulled_not_recomputed_in_a_fresh_clone(tmp_path, record_property):
    env = _env(tmp_path)
    origin, remote, clone = tmp_path / "origin", tmp_path / "remote", tmp_path / "clone"
    origin.mkdir()
    _make_project(origin, remote, env)

    start = time.perf_counter()
    log = _run(_dvc("repro"), origin, env)
    original_s = time.perf_counter() - start
    assert _ran(log) == set(STAGES), log[-3000:]

    # what a team commits after a run: dvc.lock (the outputs by hash) and the cache: false metrics and plots,
    # which live in git, not in the remote; then the cached outputs go to the remote
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-q", "-m", "run"], origin, env)
    _run(_dvc("push"), origin, env)

    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    start = time.perf_counter()
    _run(_dvc("pull"), clone, env)
    log = _run(_dvc("repro"), clone, env)
    clone_s = time.perf_counter() - start

    print(f"\noriginal dvc repro: {original_s:.1f} s; clone dvc pull + dvc repro: {clone_s:.1f} s")
    record_property("original_repro_s", round(original_s, 2))
    record_property("clone_pull_repro_s", round(clone_s, 2))

    assert _ran(log) == set(), f"the clone recomputed stages:\n{log[-3000:]}"
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in log, log[-3000:]
    assert "Data and pipelines are up to date." in _run(_dvc("status"), clone, env)
    assert (clone / "dvc.lock").read_bytes() == (origin / "dvc.lock").read_bytes()
    paths = _output_paths(_real_stages())
    want = _digests(origin, paths)
    assert all(any(f == p or f.startswith(p + "/") for f in want) for p in paths), want  # no empty output
    assert _digests(clone, paths) == want

    # the clone is not merely frozen: a changed Coconet param re-runs train_coconet (and not build_scores)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["train_coconet"]["lr"] *= 0.5
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = _run(_dvc("repro"), clone, env)
    assert _ran(log) == {"train_coconet"}, log[-3000:]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert lock["train_coconet"]["params"]["params.yaml"]["train_coconet"]["lr"] == params["train_coconet"]["lr"]
