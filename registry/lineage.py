"""Where an artifact came from: the git commit, the dvc.lock hashes of the stages that made it (the producing
stage and everything upstream of it), and the clips-table hash. Written as tags on the run, the logged model and
the model version, so the MLflow UI shows them next to the metrics."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import yaml


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    def run(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if not commit:
        return {"git_commit": "unknown"}
    dirty = run("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": "true" if dirty else "false"}


def _norm(path: str) -> str:
    return Path(path).as_posix().rstrip("/").removeprefix("./")


def _covers(out: str, path: str) -> bool:
    return path == out or path.startswith(out + "/") or out.startswith(path + "/")


def _out_hash(outs: list[dict]) -> str:
    hashes = [(o["path"], o.get("md5") or o.get("hash") or o.get("etag") or "") for o in outs]
    if len(hashes) == 1:
        return hashes[0][1]
    return hashlib.sha256("\n".join(f"{p}:{h}" for p, h in sorted(hashes)).encode()).hexdigest()[:32]


def dvc_lineage(
    artifact_path: str | Path,
    lock_path: str | Path = "dvc.lock",
    root: str | Path = ".",
    clips_table: str = "data/clips",
) -> dict[str, str]:
    """{'dvc/<stage>': output hash of each stage upstream of `artifact_path` (inclusive),
    'clips_table_hash': md5 of the clips table in dvc.lock} — empty when there is no dvc.lock or no stage
    produced the artifact (e.g. a hand-made directory)."""
    lock_path = Path(lock_path)
    if not lock_path.exists():
        return {}
    try:
        stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages") or {}
    except yaml.YAMLError:
        return {}
    root = Path(root).resolve()
    try:
        target = _norm(str(Path(artifact_path).resolve().relative_to(root)))
    except ValueError:
        target = _norm(str(artifact_path))
    producers = {name: [_norm(o["path"]) for o in (st.get("outs") or [])] for name, st in stages.items()}
    out: dict[str, str] = {}
    todo, seen = [target], set()
    while todo:
        path = todo.pop()
        for name, outs in producers.items():
            if name in seen or not any(_covers(o, path) for o in outs):
                continue
            seen.add(name)
            out["dvc/" + re.sub(r"[^A-Za-z0-9_.\-/ ]", "/", name)] = _out_hash(stages[name]["outs"])
            todo.extend(_norm(d["path"]) for d in (stages[name].get("deps") or []))
    for st in stages.values():
        for o in st.get("outs") or []:
            if _norm(o["path"]) == _norm(clips_table):
                out["clips_table_hash"] = o.get("md5") or o.get("hash") or ""
    return out
