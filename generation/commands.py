"""`smitin generate`: text (and optionally an audio prompt) -> WAV, steered toward / away from traits by the
champion probe sets of the registry. Thin: parse, call `generation.session`, print."""

from __future__ import annotations

import argparse
import sys
import time


def register(commands: argparse._SubParsersAction) -> None:
    g = commands.add_parser(
        "generate",
        help="generate music, optionally steered (SMITIN) toward / away from traits",
        description="Resolve the generator and each steered trait's probe set from the registry (alias champion "
        "unless told otherwise), refuse probe sets trained on another generator, generate, write the "
        "WAV (new audio only), the steering report OUT.steering.json and its plot OUT.steering.png. "
        "Several --prompt values make one batch (OUT_1.wav, OUT_2.wav, ...).",
        epilog='example: smitin generate --prompt "an upbeat chorale with drums" --duration 8 '
        "--steer drums=+5 --steer piano=-3 --out out.wav",
    )
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="caption (repeat for a batch); '' for unconditional",
    )
    g.add_argument("--prompts-file", default=None, help="one caption per line (adds to --prompt)")
    g.add_argument(
        "--continue",
        dest="continue_from",
        default=None,
        metavar="CLIP.wav",
        help="continue this audio (its last half-context is the prompt)",
    )
    g.add_argument("--duration", type=float, default=None, help="seconds of new audio (default: params generate)")
    g.add_argument(
        "--steer",
        action="append",
        default=[],
        metavar="TRAIT=STRENGTH",
        help="e.g. drums=+5 (add) or piano=-3 (remove); repeatable",
    )
    g.add_argument(
        "--mode",
        choices=["smitin", "iti", "none"],
        default="smitin",
        help="smitin: sparse, self-monitored (default); iti: always-on top heads; none: monitor only",
    )
    g.add_argument(
        "--generator",
        default=None,
        metavar="URI|DIR",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, a generator folder, or a local Hugging Face "
        "MusicGen folder (detected; its probe sets are smitin-probes-musicgen-TRAIT) "
        "(default: params generator, else models:/smitin-generator@champion)",
    )
    g.add_argument(
        "--probes",
        action="append",
        default=[],
        metavar="TRAIT=URI|DIR",
        help="use this probe set for a trait instead of its alias",
    )
    g.add_argument("--alias", default=None, help="alias of the probe sets (default: champion)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--cfg-scale", dest="cfg_scale", type=float, default=None)
    g.add_argument(
        "--temperature", default=None, help="one value, or one per codebook of the builtin generator: 1.0,0.7,0.7,0.7"
    )
    g.add_argument("--top-k", dest="top_k", type=int, default=None)
    g.add_argument(
        "--prompt-guidance",
        dest="prompt_guidance",
        default=None,
        help="> 1 amplifies what the --continue audio implies, e.g. its instruments: one scale or one per "
        "codebook, 3,1,1,1 (builtin generator; default: params generate.prompt_guidance, 1 = off)",
    )
    g.add_argument(
        "--prompt-plausibility",
        dest="prompt_plausibility",
        default=None,
        help="with --prompt-guidance: never sample a token the prompted model finds less than this share as "
        "likely as its top token (default: params generate.prompt_plausibility; 0 = off)",
    )
    g.add_argument("--bpm", type=float, default=None, help="tempo attribute (if the generator uses attributes)")
    g.add_argument("--key", default=None, help='key attribute, e.g. "F# minor"')
    g.add_argument("--out", default="out.wav", help="output WAV (default: out.wav)")
    g.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    g.add_argument("--params", default="params.yaml", help="params file (sections generate, registry, generator)")
    from models.steering_cli import add_backend_arguments

    add_backend_arguments(g)
    g.set_defaults(func=_generate)


def _generate(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the caption encoder's weight-loading bar
    from generation.session import GenerationError, GenerationSession

    prompts = list(args.prompt or [])
    if args.prompts_file:
        from pathlib import Path

        path = Path(args.prompts_file)
        if not path.exists():
            raise GenerationError(f"--prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        if not args.continue_from:
            raise GenerationError("give --prompt TEXT (or --prompts-file, or --continue CLIP.wav)")
        prompts = [""]
    probes = {}
    for item in args.probes:
        trait, eq, uri = item.partition("=")
        if not eq or not trait or not uri:
            raise GenerationError(f"--probes {item!r}: expected TRAIT=URI or TRAIT=DIR")
        probes[trait] = uri
    t0 = time.perf_counter()
    session = GenerationSession(
        args.generator,
        params=args.params,
        probes=probes,
        alias=args.alias,
        tracking_uri=args.tracking_uri,
        backend=args.backend,
        musicgen=args.musicgen,
        device=args.device,
        dtype=args.dtype,
        allow_pickle_weights=args.allow_pickle_weights,
    )
    ref = session.generator_ref
    if session.backend == "musicgen":
        sec = session.generator_section
        print(
            f"generator: MusicGen {ref.path} (local folder, not registered; {sec.device}, {sec.dtype})",
            file=sys.stderr,
        )
    else:
        origin = "from the local cache" if ref.cached else "downloaded" if ref.name else "local folder"
        print(
            f"generator: {ref.label()} ({origin}; resolved in {time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )

    from generation.progress import Progress

    progress = Progress("generating", "frames")

    result = session.generate(
        prompts,
        duration=args.duration,
        continue_from=args.continue_from,
        steer=",".join(args.steer) or None,
        mode=args.mode,
        out=args.out,
        seed=args.seed,
        cfg_scale=args.cfg_scale,
        temperature=args.temperature,
        top_k=args.top_k,
        bpm=args.bpm,
        key=args.key,
        prompt_guidance=args.prompt_guidance,
        prompt_plausibility=args.prompt_plausibility,
        progress=progress,
    )
    for trait, p in result.info["probe_sets"].items():
        print(
            f"probe set {trait}: {p['name'] or p['path']}" + (f" v{p['version']}" if p["version"] else ""),
            file=sys.stderr,
        )
    for wav in result.wavs:
        print(wav)
    if result.report_json:
        print(result.report_json)
        for png in result.report_pngs:
            print(png)
    return 0
