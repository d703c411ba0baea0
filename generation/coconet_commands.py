"""`smitin harmonize | infill | compose`: Coconet from the registry (thin: parse, call generation.coconet, print)."""

from __future__ import annotations

import argparse
import json
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output name: OUT.mid, OUT.musicxml, OUT.wav and OUT.png are written")
    p.add_argument(
        "--sampler",
        choices=["gibbs", "ancestral"],
        default=None,
        help="gibbs: blocked Gibbs with the annealed schedule (default); ancestral: one cell at a time",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Gibbs steps (default: params coconet_sampling, one per cell to write up to max_steps)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature (default: params coconet_sampling.temperature)",
    )
    p.add_argument(
        "--allow-parallels",
        action="store_true",
        help="keep the sampler's draw as it is: no repair of parallel fifths and octaves afterwards",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qpm", type=float, default=80.0, help="tempo of the MIDI and the rendered audio (quarters/min)")
    p.add_argument(
        "--model",
        default=None,
        metavar="URI|DIR",
        help="models:/smitin-coconet@ALIAS, models:/smitin-coconet/VERSION or a model folder (default: the champion)",
    )
    p.add_argument("--alias", default="champion", help="alias of the registered model (default: champion)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else params)")
    p.add_argument("--params", default="params.yaml", help="params file (sections coconet_sampling, registry)")


def register(commands: argparse._SubParsersAction) -> None:
    h = commands.add_parser(
        "harmonize",
        help="write alto, tenor and bass under a melody (Coconet)",
        description="Read a one-voice melody (MIDI, MusicXML, ABC), keep it exactly, and let Coconet write the other "
        "voices. A melody outside the model's pitch range is moved by octaves (and says so).",
        epilog="example: smitin harmonize --melody tune.mid --out chorale.mid",
    )
    h.add_argument("--melody", required=True, help="a score file with one voice")
    h.add_argument("--voices", default="ATB", help="the three voices to write (default ATB: the melody is the soprano)")
    _common(h)
    h.set_defaults(func=_harmonize)

    i = commands.add_parser(
        "infill",
        help="rewrite bars of a four-voice score, keeping the rest exactly (Coconet)",
        description="Read a four-voice score, rewrite the given voices over the given bars, keep every other note.",
        epilog="example: smitin infill --score chorale.musicxml --bars 3-5 --voices AT --out rewritten.mid",
    )
    i.add_argument("--score", required=True, help="a four-voice score file")
    i.add_argument("--bars", required=True, help="bars to rewrite, counted from 1: 3-5 or 4")
    i.add_argument("--voices", default="SATB", help="voices to rewrite in those bars (default all: SATB)")
    i.add_argument("--time-signature", default=None, help="bar length when the score has no time signature (4/4)")
    _common(i)
    i.set_defaults(func=_infill)

    c = commands.add_parser(
        "compose",
        help="a four-part chorale from nothing (Coconet)",
        epilog="example: smitin compose --bars 8 --out chorale.mid",
    )
    c.add_argument("--bars", type=int, default=8, help="length in bars of 4/4 (default 8)")
    _common(c)
    c.set_defaults(func=_compose)


REPORTED = ("task", "model", "sampler", "steps", "seed", "frames", "parallels_repaired", "seconds")


def _session(args):
    from generation.coconet import CoconetSession

    session = CoconetSession(args.model, params=args.params, tracking_uri=args.tracking_uri, alias=args.alias)
    print(
        f"coconet: {session.label()} ({_origin(session.ref)}; loaded in {session.load_seconds:.1f} s)",
        file=sys.stderr,
    )
    return session


def _origin(ref) -> str:
    if not ref.name:
        return "local folder"
    return "from the cache" if ref.cached else "downloaded"


def _options(args) -> dict:
    from generation.coconet import stderr_progress

    return dict(
        sampler=args.sampler,
        steps=args.steps,
        temperature=args.temperature,
        repair=False if args.allow_parallels else None,
        seed=args.seed,
        qpm=args.qpm,
        progress=stderr_progress(args.sampler or "sampling"),
    )


def _report(result) -> int:
    info = result.info
    if info.get("transposed"):
        print(f"note: the melody was moved {info['transposed']:+d} semitones to fit the model's range", file=sys.stderr)
    print(
        json.dumps({k: info[k] for k in REPORTED}),
        file=sys.stderr,
    )
    for path in result.files.values():
        print(path)
    return 0


def _out(args, default: str) -> str:
    from pathlib import Path

    if args.out and Path(args.out).is_dir():
        return str(Path(args.out) / default)
    return args.out or default


def _harmonize(args) -> int:
    from generation.coconet import output_paths

    out = _out(args, "harmonized.mid")
    output_paths(out)  # a bad --out fails before the model loads
    return _report(_session(args).harmonize(args.melody, voices=args.voices, out=out, **_options(args)))


def _infill(args) -> int:
    from generation.coconet import output_paths, parse_bars, parse_voices

    out = _out(args, "infilled.mid")
    output_paths(out)
    parse_bars(args.bars), parse_voices(args.voices)
    return _report(
        _session(args).infill(
            args.score,
            bars=args.bars,
            voices=args.voices,
            out=out,
            time_signature=args.time_signature,
            **_options(args),
        )
    )


def _compose(args) -> int:
    from generation.coconet import output_paths

    out = _out(args, "composed.mid")
    output_paths(out)
    return _report(_session(args).compose(bars=args.bars, out=out, **_options(args)))
