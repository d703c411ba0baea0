"""`smitin coconet train | evaluate`: the DVC stages `train_coconet` and `evaluate_coconet` (thin: read the params
section, read the scores table, call models.coconet_train / models.coconet_eval, write outputs)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def in_range(rolls: list[np.ndarray], lo: int, hi: int) -> tuple[list[np.ndarray], int]:
    """The rolls whose every sounding pitch is within [lo, hi], and how many were left out."""
    kept = [r for r in rolls if not ((r >= 0) & ((r < lo) | (r > hi))).any()]
    return kept, len(rolls) - len(kept)


def _splits(scores: str, cfg) -> dict[str, list[np.ndarray]]:
    from core.scores_table import read_scores

    out = {}
    for split in ("train", "valid", "test"):
        _, rolls = read_scores(scores, split)
        rolls, dropped = in_range(rolls, cfg.min_pitch, cfg.max_pitch)
        if dropped:
            _say(
                f"{split}: {dropped} pieces reach outside the model's pitch range {cfg.min_pitch}..{cfg.max_pitch} "
                f"and are left out"
            )
        out[split] = rolls
    return out


def _train(args) -> int:
    from core.config import load_section
    from models.coconet_train import TrainCoconetParams, train_coconet
    from models.distributed import check_split, leave_group, relaunch_with_torchrun

    params = load_section(TrainCoconetParams, args.params, "train_coconet")
    if args.preset:
        params = params.with_overrides({"preset": args.preset}, "--preset")
    if args.nproc != 1:
        check_split(params.resolved().batch_size, args.nproc, "train_coconet")
        return relaunch_with_torchrun(args.nproc)
    rolls = _splits(args.scores, params.resolved().config())
    metrics = train_coconet(
        rolls["train"],
        rolls["valid"],
        args.out,
        params,
        checkpoint_dir=args.checkpoint,
        metrics_path=args.metrics,
        plot_path=args.plot,
        resume=not args.fresh,
        progress=_say,
    )
    if metrics.get("processes", 1) == 1 or os.environ.get("RANK") == "0":
        keys = ("steps", "stop_reason", "valid_loss", "train_seconds", "fingerprint")
        print(json.dumps({k: metrics[k] for k in keys}))
    leave_group()
    return 0


def _evaluate(args) -> int:
    from core.config import load_section
    from models.coconet import load_coconet
    from models.coconet_eval import EvaluateCoconetParams, SamplingParams, evaluate_coconet, write_metrics

    params = load_section(EvaluateCoconetParams, args.params, "evaluate_coconet")
    sampling = load_section(SamplingParams, args.params, "coconet_sampling")
    model, meta = load_coconet(args.model, precision=params.precision)
    params = params.for_preset((meta.get("train_params") or {}).get("preset"))
    rolls = _splits(args.scores, model.cfg)
    metrics = evaluate_coconet(model, rolls, params, sampling, progress=_say)
    write_metrics(metrics, args.out, args.table)
    _say(f"wrote {args.out}" + (f" and {args.table}" if args.table else ""))
    print(
        json.dumps(
            {
                "framewise_nll": metrics["framewise_nll"],
                "notewise_nll": metrics["notewise_nll"],
                "ngram_framewise_nll": metrics["ngram"]["framewise_nll"],
                "gibbs_beats_ancestral": metrics["gibbs_beats_ancestral"],
            }
        )
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    coconet = commands.add_parser("coconet", help="Coconet (four-part chorales): train and evaluate")
    sub = coconet.add_subparsers(dest="coconet_command", required=True, metavar="ACTION")
    train = sub.add_parser(
        "train",
        help="train Coconet on the scores table (orderless NADE; resumable)",
        description="Train on the train split of the scores table, keep the weights with the best "
        "validation loss (masked-cell cross-entropy on fixed crops and masks), write "
        "coconet.safetensors + coconet.json, metrics and the loss curve.",
    )
    train.add_argument("--scores", default="data/scores", help="scores table folder")
    train.add_argument("--out", default="data/coconet", help="model folder")
    train.add_argument("--checkpoint", default=None, help="resumable training state folder")
    train.add_argument("--metrics", default="metrics/train_coconet.json")
    train.add_argument("--plot", default="metrics/train_coconet_loss.json")
    train.add_argument("--params", default="params.yaml", help="params file (section train_coconet)")
    train.add_argument(
        "--preset", default=None, choices=["demo", "cpu", "gpu", "debug"], help="override params train_coconet.preset"
    )
    train.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (starts torchrun; the global batch_size is split over them)",
    )
    train.set_defaults(func=_train)

    ev = sub.add_parser(
        "evaluate",
        help="NLL on held-out chorales, sample quality, harmonization statistics",
        description="Framewise and notewise NLL of the held-out split (ensemble of random "
        "orderings, the paper's units) next to a per-voice n-gram; Gibbs against "
        "ancestral samples scored by the model; the model's harmonizations of the "
        "held-out sopranos against Bach's own voices.",
    )
    ev.add_argument("--model", default="data/coconet", help="model folder")
    ev.add_argument("--scores", default="data/scores", help="scores table folder")
    ev.add_argument("--out", default="metrics/coconet.json")
    ev.add_argument("--table", default="metrics/coconet.md")
    ev.add_argument("--params", default="params.yaml", help="params file (sections evaluate_coconet, coconet_sampling)")
    ev.set_defaults(func=_evaluate)
