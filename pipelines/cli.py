"""`smitin dataset ...` and `smitin corpus ...` subcommands (thin: parse, read params, call, report)."""
from __future__ import annotations

import argparse
import json

from pipelines.params import load_params


def register(commands: argparse._SubParsersAction) -> None:
    dataset = commands.add_parser("dataset", help="build / evaluate the captioned clips table")
    dataset_cmds = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")

    build = dataset_cmds.add_parser(
        "build", help="audio files -> captioned clips table (Parquet), with Apache Beam",
        description="Match audio, cut clips, extract tempo/beats/downbeats/key/chords/loudness, caption, write "
                    "Parquet shards + errors table + stats.json. Re-running on an existing --out refreshes it: only "
                    "new or changed files are processed. Unknown --flags are passed to Beam "
                    "(e.g. --runner FlinkRunner --flink_master=host:8081).")
    build.add_argument("--input", help="folder, glob or fsspec URL of audio (default: params data.input)")
    build.add_argument("--out", default="data/clips", help="output folder or fsspec URL (default: data/clips)")
    build.add_argument("--params", default="params.yaml", help="params file (section build_dataset)")
    build.add_argument("--runner", default=None,
                       help="Beam runner: local (default: FnApiRunner in worker processes), DirectRunner, "
                            "FlinkRunner, SparkRunner, DataflowRunner, ...")
    build.add_argument("--workers", type=int, default=None, help="local worker processes (default: params)")
    build.add_argument("--metrics", default=None, help="also write the stats JSON here (a DVC metrics file)")
    build.set_defaults(func=_dataset_build, accepts_beam_args=True)


def _dataset_build(args: argparse.Namespace) -> int:
    from pipelines.dataset import build_dataset

    params = load_params(args.params, "build_dataset")
    input_spec = args.input or load_params(args.params).get("data", {}).get("input")
    if not input_spec:
        from pipelines.errors import PipelineUserError

        raise PipelineUserError("no --input given and params has no data.input")
    result = build_dataset(input_spec, args.out, params, runner=args.runner, workers=args.workers,
                           beam_args=getattr(args, "beam_args", None))
    s = result.stats
    if args.metrics:
        from pathlib import Path

        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")
    if result.up_to_date:
        print(f"{args.out}: up to date ({s.get('clips', '?')} clips); nothing written")
    else:
        print(json.dumps({k: s[k] for k in ("files_in", "files_ok", "files_failed", "clips", "hours")}))
    return 0
