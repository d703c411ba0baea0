"""Generation speed on the CPU: frames/s with and without the KV cache, and the real-time factor including decode.

    python benchmarks/generate.py [--generator data/generator] [--frames 120] [--threads 2] [--batch 1]

Prompt guidance (batch x2: rows without the prompt) is timed as well.
Without --generator it builds the default (`params.yaml` train_generator, cpu preset) architecture with random
weights and a debug-sized codec fitted on synthetic audio (speed does not depend on the weights). The uncached
path (recompute the whole sequence each step) is the baseline measured in the same run. Real-time factor =
(generation + decode seconds) / seconds of audio produced; below 1 is faster than real time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _default_model():
    from core.config import load_section
    from models.codec import MelRVQCodec
    from models.generator import Generator
    from models.train import FitCodecParams, TrainGeneratorParams, generator_config

    params = load_section(TrainGeneratorParams, "params.yaml", "train_generator")
    fit = load_section(FitCodecParams, "params.yaml", "fit_codec")
    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(32000).astype(np.float32) * 0.1, 16000) for _ in range(20)]
    codec = MelRVQCodec.fit(waves, fit.model_copy(update={"kmeans_iters": 2}).codec_config())
    torch.manual_seed(0)
    return Generator(generator_config(params, codec)).eval(), codec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", default=None, help="a saved generator folder (default: random default config)")
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--prompt-frames", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="prompts generated at once (evaluate_carrying: 48)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.generator:
        from models.generator import load_generator

        generator, codec = load_generator(args.generator)
    else:
        generator, codec = _default_model()
    K = generator.cfg.n_codebooks
    prompt = torch.randint(
        0, generator.cfg.card, (args.batch, K, args.prompt_frames), generator=torch.Generator().manual_seed(0)
    )
    cond = torch.randn(args.batch, generator.cfg.cond_dim)
    rows = []
    for name, kw in [
        ("no cache (baseline)", dict(use_cache=False)),
        ("KV cache", dict(use_cache=True)),
        ("KV cache + CFG 3.0 (batch x2)", dict(use_cache=True, condition=cond, cfg_scale=3.0)),
        (
            "KV cache + prompt guidance [3,1,1,1] (batch x2)",
            dict(use_cache=True, prompt_guidance=[3.0] + [1.0] * (K - 1)),
        ),
        (
            "KV cache + prompt guidance [6,1,1,1] + plausibility 0.003 (evaluate_carrying)",
            dict(use_cache=True, prompt_guidance=[6.0] + [1.0] * (K - 1), plausibility=0.003),
        ),
    ]:
        t0 = time.perf_counter()
        out = generator.generate(args.frames, prompt=prompt, seed=0, **kw)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        codec.decode(out[0, :, args.prompt_frames :])
        t_dec = time.perf_counter() - t0
        audio_s = args.frames / codec.frame_rate
        # frames/s and real-time factor count every row's audio (decoding timed on one row, scaled)
        rows.append(
            (
                name,
                args.batch * args.frames / t_gen,
                (t_gen + args.batch * t_dec) / (args.batch * audio_s),
                t_gen,
                t_dec,
            )
        )
    print(
        f"generator {generator.num_params() / 1e6:.2f}M params ({generator.cfg.n_layers} layers, dim "
        f"{generator.cfg.dim}), {K} codebooks at {codec.frame_rate:.0f} frames/s; prompt {args.prompt_frames} + "
        f"{args.frames} new frames ({args.frames / codec.frame_rate:.1f} s), batch {args.batch}, {args.threads} threads"
    )
    print("| path | frames/s | real-time factor (gen + decode) | gen s | decode s |")
    print("|---|---|---|---|---|")
    for name, fps, rtf, tg, td in rows:
        print(f"| {name} | {fps:.1f} | {rtf:.2f} | {tg:.2f} | {td:.2f} |")


if __name__ == "__main__":
    main()
