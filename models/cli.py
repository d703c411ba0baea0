"""`smitin` subcommands of the models package: thin DVC stage entry points (read a params section, call a function
in `models.train` / `models.detectors`, write outputs). Other engineers may add their commands to `register`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger(__name__)


def _codec_fit(args) -> int:
    from core.config import load_section
    from models.train import FitCodecParams, fit_codec

    params = load_section(FitCodecParams, args.params, "fit_codec")
    codec = fit_codec(args.clips, args.out, params)
    print(f"codec: {codec.n_codebooks} x {codec.card} codes at {codec.frame_rate:.1f} frames/s -> {args.out}")
    return 0


def _tokenize(args) -> int:
    from models.train import tokenize

    counts = tokenize(args.clips, args.codec, args.out)
    print(f"tokens -> {args.out}: " + ", ".join(f"{k} {v} clips" for k, v in counts.items()))
    return 0


def _train(args) -> int:
    from core.config import load_section
    from models.distributed import check_split, leave_group, relaunch_with_torchrun
    from models.train import TrainGeneratorParams, train_generator

    params = load_section(TrainGeneratorParams, args.params, "train_generator")
    if args.preset:
        params = params.with_overrides({"preset": args.preset}, "--preset")
    if args.nproc != 1:
        check_split(params.resolved().batch_size, args.nproc, "train_generator")
        return relaunch_with_torchrun(args.nproc)
    metrics = train_generator(
        args.tokens,
        args.codec,
        args.out,
        params,
        checkpoint_dir=args.checkpoint,
        metrics_path=args.metrics,
        plot_path=args.plot,
        resume=not args.fresh,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    if metrics.get("processes", 1) == 1 or os.environ.get("RANK") == "0":
        print(json.dumps({k: metrics[k] for k in ("steps", "stop_reason", "valid_loss", "unigram_valid_loss")}))
    leave_group()
    return 0


def _carrying(args) -> int:
    from core.config import load_section
    from models.carrying import EvaluateCarryingParams
    from models.detectors import evaluate_trait_carrying

    params = load_section(EvaluateCarryingParams, args.params, "evaluate_carrying")
    report = evaluate_trait_carrying(
        args.generator, args.tokens, args.clips, params, args.out, args.samples, detector_path=args.detector
    )
    print(json.dumps(report["summary"], indent=1))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    codec = commands.add_parser("codec", help="audio codec: fit the default mel-RVQ codec")
    codec_sub = codec.add_subparsers(dest="codec_command", required=True, metavar="ACTION")
    fit = codec_sub.add_parser("fit", help="fit the mel residual-k-means codec on the clips table's train split")
    fit.add_argument("--clips", default="data/clips", help="clips table folder")
    fit.add_argument("--out", default="data/codec", help="codec output folder")
    fit.add_argument("--params", default="params.yaml")
    fit.set_defaults(func=_codec_fit)

    tok = commands.add_parser("tokenize", help="encode every clip with the codec and embed its caption")
    tok.add_argument("--clips", default="data/clips")
    tok.add_argument("--codec", default="data/codec")
    tok.add_argument("--out", default="data/tokens")
    tok.set_defaults(func=_tokenize)

    train = commands.add_parser("train", help="train the generator on token files (resumable, early stopping)")
    train.add_argument("--tokens", default="data/tokens")
    train.add_argument("--codec", default="data/codec")
    train.add_argument("--out", default="data/generator")
    train.add_argument("--checkpoint", default="data/generator_ckpt", help="resumable training state folder")
    train.add_argument("--metrics", default="metrics/train_generator.json")
    train.add_argument("--plot", default="metrics/train_generator_loss.json")
    train.add_argument("--params", default="params.yaml")
    train.add_argument("--preset", default=None, help="override params: demo | cpu | gpu | debug")
    train.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (starts torchrun; the global batch_size is split over them)",
    )
    train.set_defaults(func=_train)

    carry = commands.add_parser(
        "evaluate-carrying", help="fit the drum detector, then judge continuations of drum / drum-free prompts"
    )
    carry.add_argument("--generator", default="data/generator")
    carry.add_argument("--tokens", default="data/tokens")
    carry.add_argument("--clips", default="data/clips")
    carry.add_argument("--out", default="metrics/trait_carrying.json")
    carry.add_argument("--samples", default=None, help="folder for a few WAVs of prompts + continuations")
    carry.add_argument(
        "--detector", default=None, help="reuse this saved drum detector when it was fitted for this codec and length"
    )
    carry.add_argument("--params", default="params.yaml")
    carry.set_defaults(func=_carrying)

    # probes / steering evaluation (issue 5): their commands live in models/steering_cli.py
    from models import steering_cli

    steering_cli.register(commands)

    from models import coconet_cli

    coconet_cli.register(commands)
