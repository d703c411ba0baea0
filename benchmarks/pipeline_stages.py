"""Wall time, CPU time and peak memory of every DVC stage of the main job, in a fresh copy of the project.

Runs `dvc repro --single-item STAGE` stage by stage in dvc.yaml order (which is topological), each inside its own
wrapper process so that RUSAGE_CHILDREN's peak RSS belongs to that stage alone (the largest process among the
stage command and its descendants, DVC itself included). Then a second `dvc repro` must find everything up to date,
and `smitin refresh` (the scheduled job) must do no training. Prints a table and writes JSON.

    python benchmarks/pipeline_stages.py                      # the default params (the README's main job)
    python benchmarks/pipeline_stages.py -S train_generator.preset=debug --keep /tmp/e2e
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from registry.refresh import venv_env  # noqa: E402
from tests.project_copy import copy_project  # noqa: E402

# Runs one command and reports its wall time, the CPU time and the peak RSS of its whole process tree.
WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[1:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_mb": ru.ru_maxrss / 1024}), file=sys.stderr)
"""


def measured(cmd: list[str], cwd: Path, log) -> dict:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], cwd=cwd, stderr=subprocess.PIPE, text=True, stdout=log)
    *lines, last = proc.stderr.rstrip().splitlines() or ["{}"]
    log.write("\n".join(lines) + "\n")
    log.flush()
    return json.loads(last)


# outputs of an earlier run in this working tree (DVC keeps them out of git, but not all of them out of git's view)
def set_params(workdir: Path, overrides: list[str]) -> None:
    import yaml

    path = workdir / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        node = params
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stage_names(workdir: Path, dvc: str) -> list[str]:
    out = subprocess.run(
        [dvc, "stage", "list", "--name-only"], cwd=workdir, check=True, capture_output=True, text=True
    ).stdout
    return [s for s in out.split() if s]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="params override in the copy (like dvc exp run -S), repeatable",
    )
    ap.add_argument("--keep", default=None, help="work in this folder (kept) instead of a temporary one")
    ap.add_argument("--out", default=str(ROOT / "metrics" / "pipeline_stages.json"))
    ap.add_argument("--log", default=None, help="stage output goes here (default: WORKDIR/stages.log)")
    args = ap.parse_args()

    bindir = Path(sys.executable).parent
    dvc, smitin = str(bindir / "dvc"), str(bindir / "smitin")
    env_note = f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f} at start"
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="smitin-e2e-"))
    if workdir.exists() and any(workdir.iterdir()):
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    copy_project(workdir)
    set_params(workdir, args.overrides)
    os.environ["DVC_NO_ANALYTICS"] = "1"
    os.environ["PATH"] = venv_env()["PATH"]  # the stage commands call `smitin`: this venv's, activated or not
    log = open(args.log or workdir / "stages.log", "w")

    rows = []
    for stage in stage_names(workdir, dvc):
        print(f"... {stage}", file=sys.stderr, flush=True)
        r = measured([dvc, "repro", "--single-item", stage], workdir, log)
        rows.append({"stage": stage, **r})
        print(
            f"    {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, {r['peak_rss_mb']:.0f} MB peak, rc {r['rc']}",
            file=sys.stderr,
            flush=True,
        )
        if r["rc"]:
            print(f"stage {stage} failed: see {log.name}", file=sys.stderr)
            break
    else:
        for name, cmd in [
            ("promote (smitin refresh, after the run)", [smitin, "refresh"]),
            ("second dvc repro (nothing changed)", [dvc, "repro"]),
            (
                "generate 8 s steered (drums=+5)",
                [
                    smitin,
                    "generate",
                    "--prompt",
                    "a chorale for strings",
                    "--steer",
                    "drums=+5",
                    "--duration",
                    "8",
                    "--out",
                    "demo/steered.wav",
                ],
            ),
        ]:
            print(f"... {name}", file=sys.stderr, flush=True)
            r = measured(cmd, workdir, log)
            rows.append({"stage": name, **r})
            if r["rc"]:
                print(f"{name} failed: see {log.name}", file=sys.stderr)
                break

    total = [r for r in rows if not r["stage"].startswith(("second", "promote", "generate"))]
    print(f"\npipeline stages ({env_note}; overrides: {' '.join(args.overrides) or 'none'})")
    print(f"{'stage':42s} {'wall s':>8s} {'CPU s':>8s} {'peak MB':>8s} {'rc':>3s}")
    for r in rows:
        print(f"{r['stage']:42s} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_rss_mb']:8.0f} {r['rc']:3d}")
    print(
        f"{'dvc repro total':42s} {sum(r['wall_s'] for r in total):8.1f} {sum(r['cpu_s'] for r in total):8.1f} "
        f"{max(r['peak_rss_mb'] for r in total):8.0f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"overrides": args.overrides, "machine": env_note, "stages": rows}, indent=1))
    print(f"workdir: {workdir}", file=sys.stderr)
    return max((r["rc"] for r in rows), default=1)


if __name__ == "__main__":
    sys.exit(main())
