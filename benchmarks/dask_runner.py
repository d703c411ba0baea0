"""`smitin dataset build` on Beam's Dask runner against the local runner, on the same audio in the same run.

A dask.distributed scheduler and two single-threaded workers are started as separate processes on 127.0.0.1
(tests/dask_cluster.py); the local runner gets the same two cores (`workers: 2`). Both builds start from an empty
output. Prints a Markdown table: wall time, clips, and whether the tables are byte-identical.

    python benchmarks/dask_runner.py --input data/corpus/audio --files 24
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import load_section  # noqa: E402
from pipelines.dataset import BuildDatasetParams, build_dataset  # noqa: E402
from tests.dask_cluster import local_cluster  # noqa: E402


def table_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.parquet"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default="data/corpus/audio", help="a folder of audio (default: the rendered corpus)")
    ap.add_argument("--files", type=int, default=24, help="how many audio files (sorted by name) to build from")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    audio = sorted(p for p in Path(args.input).iterdir() if p.suffix in (".flac", ".wav"))[: args.files]
    if not audio:
        print(f"no audio in {args.input} (run `make demo` first, or pass --input)", file=sys.stderr)
        return 2
    params = load_section(BuildDatasetParams, ROOT / "params.yaml", "build_dataset").with_overrides(
        {"workers": args.workers}, "benchmark"
    )
    with tempfile.TemporaryDirectory(prefix="dask-bench-") as tmp:
        tmp = Path(tmp)
        src = tmp / "audio"
        src.mkdir()
        for a in audio:  # with their sidecar captions
            shutil.copy(a, src / a.name)
            if a.with_suffix(".json").exists():
                shutil.copy(a.with_suffix(".json"), src / a.with_suffix(".json").name)
        seconds = sum(sf.info(str(a)).duration for a in audio)
        rows = []
        t0 = time.perf_counter()
        local = build_dataset(str(src), str(tmp / "local"), params)
        rows.append(("local (FnApiRunner, 2 worker processes)", time.perf_counter() - t0, local.stats["clips"]))
        with local_cluster(workers=args.workers) as address:
            t0 = time.perf_counter()
            dask = build_dataset(
                str(src),
                str(tmp / "dask"),
                params,
                runner="DaskRunner",
                beam_args=[f"--dask_client_address={address}"],
            )
            rows.append((f"Dask ({args.workers} workers x 1 thread)", time.perf_counter() - t0, dask.stats["clips"]))
        same = table_bytes(tmp / "local") == table_bytes(tmp / "dask")
    print(f"\n## dataset build: {len(audio)} files, {seconds / 60:.1f} min of audio, 2 cores\n")
    print("| runner | wall s | x real time | clips | tables byte-identical to local |")
    print("|---|---|---|---|---|")
    for name, wall, clips in rows:
        identical = "-" if name.startswith("local") else ("yes" if same else "NO")
        print(f"| {name} | {wall:.1f} | {seconds / wall:.0f} | {clips} | {identical} |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
