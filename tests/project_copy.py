"""A copy of the project as a fresh clone of the working tree has it, for tests and benchmarks that run the whole
pipeline somewhere else."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_OUTPUTS = ("data/", "metrics/", "plots/", "demo/", "dvc_plots/")


def copy_project(dest: Path) -> None:
    """The tracked and new untracked files of the working tree (what a fresh clone of this change has), without
    the outputs of an earlier run, as a git repository of its own."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not name.startswith(RUN_OUTPUTS):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
