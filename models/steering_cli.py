"""`smitin probes ...` and `smitin evaluate-steering`: thin DVC stage entry points for probes and steering
(parse, read the params section, call `models.probes` / `models.evaluate_steering`, write outputs).
Registered from `models.cli.register`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.generation_params import GeneratorChoice

log = logging.getLogger(__name__)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """--backend / --musicgen / --device / --dtype: override params `generator` (shared with `smitin generate`)."""
    parser.add_argument(
        "--backend",
        choices=["builtin", "musicgen"],
        default=None,
        help="generator backend (default: params generator.backend, else builtin)",
    )
    parser.add_argument(
        "--musicgen",
        default=None,
        metavar="DIR",
        help="local Hugging Face MusicGen weights (a save_pretrained folder or a hub cache folder "
        "such as ~/.cache/huggingface/hub/models--facebook--musicgen-small); implies "
        "--backend musicgen; default: params generator.path. Nothing is downloaded",
    )
    parser.add_argument("--device", default=None, help="MusicGen device: cpu | cuda | cuda:0 (default: params)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="MusicGen dtype (default: params generator.dtype; half precision on a GPU)",
    )
    parser.add_argument(
        "--allow-pickle-weights",
        dest="allow_pickle_weights",
        action="store_true",
        help="let MusicGen load pytorch_model.bin (a pickle, which can run code) when a folder has no "
        "safetensors weights; only for files you trust",
    )


def generator_section(args) -> GeneratorChoice:
    """The params `generator` section (absent: builtin) with this command's overrides; see
    `models.backends.choose_backend`."""
    from models.backends import choose_backend, read_generator_params

    return choose_backend(
        read_generator_params(getattr(args, "params", None)),
        generator=getattr(args, "generator", None),
        backend=args.backend,
        musicgen=args.musicgen,
        device=args.device,
        dtype=args.dtype,
        allow_pickle_weights=getattr(args, "allow_pickle_weights", None),
    )


def load_generator_for(section: GeneratorChoice):
    """(generator, codec) of a chosen backend; says on stderr which MusicGen it loads (it takes a while)."""
    from models.backends import load_backend

    if section.backend == "musicgen":
        print(
            f"generator: MusicGen from {section.path} on {section.device} ({section.dtype})",
            file=sys.stderr,
            flush=True,
        )
    return load_backend(section)


def _progress(stage: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\r{stage}: {done}/{total} clips", end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total or done % 128 == 0:
        print(f"{stage}: {done}/{total} clips", file=sys.stderr, flush=True)


def _probes_train(args) -> int:
    from core.config import load_section
    from models.probes import ProbesParams, probe_params, train_trait, write_probe_plots

    section = load_section(ProbesParams, args.params, "probes")
    over = {k: getattr(args, k) for k in ("max_train_pairs", "position", "direction") if getattr(args, k) is not None}
    section = section.with_overrides(over, "command line") if over else section  # a trait's own values still win
    probe_params(section, args.trait)  # unknown trait: one line before loading anything heavy
    import torch

    torch.set_num_threads(section.threads)  # see params probes.threads
    generator, codec = load_generator_for(generator_section(args))
    probe_set = train_trait(args.trait, generator, codec, args.clips, section, _progress)
    out = probe_set.save(Path(args.out) / args.trait)
    write_probe_plots(probe_set, Path(args.plots) / args.trait)
    metrics = {k: v for k, v in probe_set.metrics.items()}
    metrics["top_heads"] = [f"L{layer}H{head}" for layer, head in probe_set.top_heads(8)]
    if args.metrics:
        path = Path(args.metrics) / f"{args.trait}.json" if not args.metrics.endswith(".json") else Path(args.metrics)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    m = probe_set.metrics
    print(
        f"{args.trait}: best head acc {m['best_acc']:.3f}, top-16 {m['top16_acc']:.3f}, mean {m['mean_acc']:.3f} "
        f"({m['n_train']}/{m['n_valid']}/{m['n_tune']} train/valid/tune clips) -> {out}"
    )
    return 0


def _probes_show(args) -> int:
    from models.probes import ProbeSet

    ps = ProbeSet.load(args.dir)
    print(
        json.dumps(
            {
                "trait": ps.trait,
                "generator_fingerprint": ps.generator_fingerprint,
                "generator_backend": ps.generator_backend,
                **({"generator": ps.generator} if ps.generator else {}),
                "shape": [ps.n_layers, ps.n_heads, ps.head_dim],
                "metrics": ps.metrics,
                "top_heads": [[layer, h, round(float(ps.accuracy[layer, h]), 3)] for layer, h in ps.top_heads(8)],
            },
            indent=1,
        )
    )
    return 0


def _evaluate(args) -> int:
    from core.config import load_section
    from models.evaluate_steering import EvaluateSteeringParams, evaluate_steering
    from models.probes import ProbesParams

    params = load_section(EvaluateSteeringParams, args.params, "evaluate_steering")
    probes_section = load_section(ProbesParams, args.params, "probes")
    section = generator_section(args)
    result = evaluate_steering(
        section.builtin_dir or args.generator,
        args.probes,
        args.tokens,
        args.clips,
        params,
        probes_section,
        out_json=args.out,
        table_path=args.table,
        report_dir=args.reports,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        generator_section=section,
    )
    print(Path(args.table).read_text() if args.table else json.dumps(result["metrics"], indent=1))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    probes = commands.add_parser("probes", help="per-head trait probes (SMITIN): train, show")
    sub = probes.add_subparsers(dest="probes_command", required=True, metavar="ACTION")
    train = sub.add_parser(
        "train",
        help="train one trait's probe set on a generator",
        description="Teacher-force the trait's clips through the generator (unconditioned), "
        "fit a logistic regression per (layer, head), save the probe set "
        "(probe_set.json + probes.safetensors) and a layer x head accuracy heatmap.",
    )
    train.add_argument("--trait", required=True, help="a trait named in params probes.traits (e.g. drums)")
    train.add_argument(
        "--generator",
        default="data/generator",
        help="builtin generator folder (save_generator layout), or a MusicGen folder (detected)",
    )
    train.add_argument("--clips", default="data/clips", help="clips table (stems / predicate sources)")
    train.add_argument("--out", default="data/probes", help="probe sets folder; writes OUT/TRAIT/")
    train.add_argument("--plots", default="plots/probes", help="plots folder; writes PLOTS/TRAIT/")
    train.add_argument("--metrics", default="metrics/probes", help="metrics folder (TRAIT.json) or a .json path")
    train.add_argument(
        "--max-train-pairs",
        dest="max_train_pairs",
        type=int,
        default=None,
        help="use only this many training pairs (ablation)",
    )
    train.add_argument("--position", choices=["last", "mean"], default=None, help="override params probes.position")
    train.add_argument(
        "--direction", choices=["mass_mean", "probe"], default=None, help="override params probes.direction"
    )
    train.add_argument("--params", default="params.yaml")
    add_backend_arguments(train)
    train.set_defaults(func=_probes_train)

    show = sub.add_parser("show", help="print a probe set's metadata, metrics and best heads")
    show.add_argument("dir", help="probe set folder")
    show.set_defaults(func=_probes_show)

    ev = commands.add_parser(
        "evaluate-steering",
        help="steering success (independent detector), Frechet distance, continuation "
        "similarity per trait / task / mode, random control, n-pairs ablation",
    )
    ev.add_argument(
        "--generator", default="data/generator", help="builtin generator folder, or a MusicGen folder (detected)"
    )
    ev.add_argument("--probes", default="data/probes", help="folder of probe sets (one subfolder per trait)")
    ev.add_argument("--tokens", default="data/tokens", help="tokenized clips (prompts, captions, detector data)")
    ev.add_argument("--clips", default="data/clips", help="clips table (for the n-pairs ablation probes)")
    ev.add_argument("--out", default="metrics/evaluate_steering.json", help="metrics JSON (DVC / MLflow)")
    ev.add_argument("--table", default="metrics/evaluate_steering.md", help="markdown table of all rows")
    ev.add_argument("--reports", default="data/evaluate_steering", help="rows.json + example steering reports")
    ev.add_argument("--params", default="params.yaml")
    add_backend_arguments(ev)
    ev.set_defaults(func=_evaluate)
