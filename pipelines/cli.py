"""`smitin dataset ...` and `smitin corpus ...` subcommands (thin: parse, read params, call, report)."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    dataset = commands.add_parser("dataset", help="build / evaluate the captioned clips table")
    dataset_cmds = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")

    build = dataset_cmds.add_parser(
        "build",
        help="audio files -> captioned clips table (Parquet), with Apache Beam",
        description="Match audio, cut clips, extract tempo/beats/downbeats/key/chords/loudness, caption, write "
        "Parquet shards + errors table + stats.json. Re-running on an existing --out refreshes it: only "
        "new or changed files are processed. Unknown --flags are passed to Beam "
        "(e.g. --runner FlinkRunner --flink_master=host:8081).",
    )
    build.add_argument("--input", help="folder, glob or fsspec URL of audio (default: params data.input)")
    build.add_argument("--out", default="data/clips", help="output folder or fsspec URL (default: data/clips)")
    build.add_argument("--params", default="params.yaml", help="params file (section build_dataset)")
    build.add_argument(
        "--runner",
        default=None,
        help="Beam runner: local (default: FnApiRunner in worker processes), DirectRunner, "
        "FlinkRunner, SparkRunner, DataflowRunner, ...",
    )
    build.add_argument("--workers", type=int, default=None, help="local worker processes (default: params)")
    build.add_argument("--metrics", default=None, help="also write the stats JSON here (a DVC metrics file)")
    build.add_argument(
        "--rehash",
        action="store_true",
        help="compare every file's content hash with the last build's, not only its size and mtime "
        "(reads every file; catches content replaced with size and mtime kept)",
    )
    build.add_argument(
        "--wait-seconds",
        dest="wait_seconds",
        type=float,
        default=0.0,
        help="wait this long for another build of the same --out to finish (default: fail at once)",
    )
    build.set_defaults(func=_dataset_build, accepts_beam_args=True)

    ev = dataset_cmds.add_parser(
        "eval",
        help="score the clips table's features against the rendered corpus' ground truth (mir_eval)",
        description="Join clips with labels by source file, cut the ground truth to each clip, report key "
        "(weighted/exact), tempo Acc1/Acc2, beat and downbeat F, chord majmin/root recall; overall and "
        "drums vs no drums. Writes a metrics JSON (DVC metrics) and a per-piece CSV.",
    )
    ev.add_argument("--clips", default="data/clips", help="clips table folder (default: data/clips)")
    ev.add_argument("--labels", default="data/corpus/labels.parquet", help="ground-truth labels table")
    ev.add_argument("--out", default="metrics/features.json", help="metrics JSON (default: metrics/features.json)")
    ev.add_argument("--table", default=None, help="per-piece CSV (default: beside --out, *_per_piece.csv)")
    ev.set_defaults(func=_dataset_eval)

    register_corpus(commands)
    register_scores(commands)


def register_scores(commands: argparse._SubParsersAction) -> None:
    scores = commands.add_parser("scores", help="build the scores table (four-voice rolls) Coconet trains on")
    scores_cmds = scores.add_subparsers(dest="scores_command", required=True, metavar="ACTION")
    build = scores_cmds.add_parser(
        "build",
        help="score files / music21 works / JSB JSON -> scores table (Parquet), with Apache Beam",
        description="Read MusicXML, MIDI, ABC and Humdrum files (folders and globs are searched), music21 corpus "
        "works (music21:bwv66.6) and JSB-style JSON, and write one row per four-voice piece: its roll on "
        "a 16th-note grid (MIDI pitch per voice and frame, -1 silent), key and time signature where the "
        "source has them, and its split (the JSON's own, else by hashing the source). Pieces that are "
        "not four single-note voices become rows of _errors.parquet; every file is listed in "
        "_sources.parquet. Re-running on an existing --out reads only new or changed sources. Unknown "
        "--flags are passed to Beam.",
        epilog="example: smitin scores build --input pipelines/data/jsb/Jsb16thSeparated.json.gz --input "
        "music21:bwv66.6 --out data/scores",
    )
    build.add_argument(
        "--input",
        action="append",
        default=None,
        metavar="PATH|music21:NAME",
        help="a folder, glob, file or music21 corpus work (repeatable; default: params build_scores.input)",
    )
    build.add_argument("--out", default="data/scores", help="output folder (default: data/scores)")
    build.add_argument("--params", default="params.yaml", help="params file (section build_scores)")
    build.add_argument("--runner", default=None, help="Beam runner (default: FnApiRunner)")
    build.add_argument("--workers", type=int, default=None, help="local worker processes (default: params)")
    build.add_argument(
        "--wait-seconds",
        dest="wait_seconds",
        type=float,
        default=None,
        help="wait this long for another build of the same --out (default: params, 0: fail at once)",
    )
    build.add_argument("--metrics", default=None, help="also write the stats JSON here (a DVC metrics file)")
    build.set_defaults(func=_scores_build, accepts_beam_args=True)


def _scores_build(args: argparse.Namespace) -> int:
    from core.config import load_section
    from pipelines.scores import BuildScoresParams, build_scores

    params = load_section(BuildScoresParams, args.params, "build_scores")
    over = {k: v for k, v in (("workers", args.workers), ("wait_seconds", args.wait_seconds)) if v is not None}
    params = params.with_overrides(over, "command line") if over else params
    result = build_scores(
        args.input or params.input, args.out, params, runner=args.runner, beam_args=getattr(args, "beam_args", None)
    )
    s = result.stats
    if args.metrics:
        from pathlib import Path

        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")
    if result.up_to_date:
        print(f"{args.out}: up to date ({s.get('pieces', '?')} pieces); nothing written")
    else:
        print(json.dumps({k: s[k] for k in ("sources_in", "sources", "pieces", "pieces_per_split", "errors")}))
    return 0


def _dataset_build(args: argparse.Namespace) -> int:
    from core.config import load_section
    from pipelines.dataset import BuildDatasetParams, DataParams, build_dataset

    params = load_section(BuildDatasetParams, args.params, "build_dataset")
    if args.workers is not None:
        params = params.with_overrides({"workers": args.workers}, "command line")
    input_spec = args.input or load_section(DataParams, args.params, "data").input
    if not input_spec:
        from pipelines.errors import PipelineUserError

        raise PipelineUserError("no --input given and params has no data.input")
    result = build_dataset(
        input_spec,
        args.out,
        params,
        runner=args.runner,
        beam_args=getattr(args, "beam_args", None),
        rehash=args.rehash,
        wait_seconds=args.wait_seconds,
    )
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


def register_corpus(commands: argparse._SubParsersAction) -> None:
    corpus = commands.add_parser("corpus", help="render real scores into audio + stems + ground truth")
    corpus_cmds = corpus.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    render = corpus_cmds.add_parser(
        "render",
        help="scores (music21's corpus and/or your folder) -> audio mixes, stems, labels, with Beam",
        description="Render Bach chorales / Nottingham / Essen tunes from music21's corpus, and any folder of "
        "MIDI/MusicXML/ABC (--scores), through a General-MIDI SoundFont with seeded instruments, tempo, "
        "transposition and drum/bass/piano stems. Writes OUT/audio (mixes + sidecar JSON, the input of "
        "`smitin dataset build`), OUT/stems, OUT/labels.parquet (ground truth). Unknown --flags go to Beam.",
    )
    render.add_argument("--out", default="data/corpus", help="output folder (default: data/corpus)")
    render.add_argument("--params", default="params.yaml", help="params file (section corpus)")
    render.add_argument("--scores", default=None, help="also render this folder of MIDI/MusicXML/ABC scores")
    render.add_argument("--soundfont", default=None, help="a .sf2 to use instead of pretty_midi's TimGM6mb.sf2")
    render.add_argument("--workers", type=int, default=None, help="local worker processes (default: params)")
    render.add_argument("--runner", default=None, help="Beam runner (default: FnApiRunner in worker processes)")
    render.add_argument("--metrics", default=None, help="also write the render stats JSON here")
    render.set_defaults(func=_corpus_render, accepts_beam_args=True)


def _corpus_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from core.config import load_section
    from pipelines.corpus import CorpusParams, render_corpus

    params = load_section(CorpusParams, args.params, "corpus")
    if args.scores and not Path(args.scores).is_dir():
        from pipelines.errors import PipelineUserError

        raise PipelineUserError(f"--scores folder not found: {args.scores}")
    over = {
        k: v
        for k, v in (("scores_dir", args.scores), ("soundfont", args.soundfont), ("workers", args.workers))
        if v is not None
    }
    params = params.with_overrides(over, "command line") if over else params
    result = render_corpus(args.out, params, runner=args.runner, beam_args=getattr(args, "beam_args", None))
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(json.dumps(result.stats, indent=2, sort_keys=True) + "\n")
    print(
        json.dumps(
            {
                k: result.stats[k]
                for k in ("pieces_rendered", "pieces_failed", "mixes", "audio_hours", "realtime_factor")
            }
        )
    )
    return 0


def _dataset_eval(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate_features, format_table, write_outputs

    metrics, rows = evaluate_features(args.clips, args.labels)
    table = write_outputs(metrics, rows, args.out, args.table)
    print(format_table(metrics))
    print(f"wrote {args.out} and {table}")
    return 0
