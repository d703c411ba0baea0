"""What SMITIN on Hugging Face MusicGen costs: memory, fingerprinting, probe capture and generation (plain vs steered,
same model, same seed, same run). Prints a table.

Model: `--musicgen DIR` (local weights) when given, else a random model with musicgen-small's architecture (T5-base
text encoder, 24-layer 1024-wide decoder with 16 heads, 4 x 2048 codes, 32 kHz EnCodec; time and memory do not depend
on the weight values, and nothing is downloaded). Probe sets are random, of the right shape.

    python benchmarks/musicgen.py [--musicgen DIR] [--device cpu|cuda] [--dtype float32|float16] [--seconds 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.musicgen import MusicGenGenerator, load_musicgen, weights_fingerprint  # noqa: E402
from models.probes import ProbeSet, capture_head_outputs  # noqa: E402
from models.steering import SteeringPlan, steer  # noqa: E402


def musicgen_small_random():
    """A random MusicgenForConditionalGeneration with facebook/musicgen-small's configuration."""
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )

    t5 = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
    enc = EncodecConfig(
        sampling_rate=32000,
        target_bandwidths=[2.2],
        hidden_size=128,
        num_filters=64,
        upsampling_ratios=[8, 5, 4, 4],
        codebook_size=2048,
        num_lstm_layers=2,
        normalize=False,
        pad_mode="reflect",
        use_causal_conv=False,
    )
    dec = MusicgenDecoderConfig(
        vocab_size=2048,
        max_position_embeddings=2048,
        num_hidden_layers=24,
        ffn_dim=4096,
        num_attention_heads=16,
        hidden_size=1024,
        num_codebooks=4,
        pad_token_id=2048,
        bos_token_id=2048,
    )
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(
        MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(), decoder=dec.to_dict())
    )
    g = model.generation_config
    g.decoder_start_token_id = g.pad_token_id = g.bos_token_id = 2048
    g.do_sample, g.guidance_scale, g.max_length = True, 3.0, 1500
    return model.eval()


def random_probe_set(gen: MusicGenGenerator) -> ProbeSet:
    L, H, D = gen.n_layers, gen.n_heads, gen.head_dim
    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    acc = rng.uniform(0.5, 0.95, (L, H)).astype(np.float32)
    return ProbeSet(
        trait="drums",
        generator_fingerprint=gen.fingerprint(),
        coef=unit(rng.standard_normal((L, H, D))),
        intercept=np.zeros((L, H), np.float32),
        direction=unit(rng.standard_normal((L, H, D))),
        sigma=np.ones((L, H), np.float32),
        accuracy=acc,
        weight=((acc - 0.5) / 0.45) ** 3,
        random_direction=unit(rng.standard_normal((L, H, D))),
        random_sigma=np.ones((L, H), np.float32),
    )


class _Rows(list):
    """Rows of the table, each also printed as it comes (a CPU run takes minutes)."""

    def append(self, row) -> None:
        super().append(row)
        print(f"  ... {row[0]}: {row[1]}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--musicgen", default=None, help="local MusicGen folder (default: random musicgen-small)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--seconds", type=float, default=2.0, help="audio generated per run")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = _Rows()
    t0 = time.perf_counter()
    if args.musicgen:
        gen, codec = load_musicgen(args.musicgen, args.device, args.dtype)
        rows.append(("load + fingerprint", f"{time.perf_counter() - t0:.1f} s"))
    else:
        model = musicgen_small_random()
        rows.append(("build random musicgen-small", f"{time.perf_counter() - t0:.1f} s"))
        t1 = time.perf_counter()
        fp = weights_fingerprint(model)
        rows.append(("fingerprint (sha256 of all weights)", f"{time.perf_counter() - t1:.1f} s"))
        model = model.to(args.device, getattr(torch, args.dtype))
        gen = MusicGenGenerator(model, fingerprint=fp)
    n_params = gen.num_params()
    rows.append(
        (
            "parameters",
            f"{n_params / 1e6:.0f} M "
            f"({n_params * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**30:.2f} GiB of weights)",
        )
    )
    fps = 50.0
    n = int(round(args.seconds * fps))

    # probe capture: teacher-forced 4 s windows (params probes.window_seconds), batch 4
    codes = [torch.randint(0, gen.card, (gen.n_codebooks, 200)) for _ in range(8)]
    t1 = time.perf_counter()
    capture_head_outputs(gen, codes, "last", batch_size=4)
    dt = time.perf_counter() - t1
    rows.append(("probe capture, 4 s clips", f"{len(codes) / dt:.2f} clips/s"))

    # generation: text prompt with CFG (batch doubles), plain vs smitin, interleaved
    ids = torch.randint(1, 1000, (1, 12))
    plan = SteeringPlan.build({"drums": random_probe_set(gen)}, {"drums": 5.0}, mode="smitin")  # default push interval
    times = {"plain": [], "smitin": []}
    for _ in range(2):
        for mode in times:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            if mode == "plain":
                gen.generate(n, condition=ids, cfg_scale=3.0, seed=0)
            else:
                with steer(gen, plan):
                    gen.generate(n, condition=ids, cfg_scale=3.0, seed=0)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t1)
    for mode, ts in times.items():
        best = min(ts)
        rows.append(
            (f"generate {args.seconds:g} s with CFG, {mode}", f"{best:.1f} s ({args.seconds / best:.2f}x real time)")
        )
    rows.append(("smitin overhead", f"{min(times['smitin']) / min(times['plain']) - 1:+.1%}"))
    rows.append(("peak process memory (RSS)", f"{peak_rss_gb():.1f} GiB"))
    if args.device.startswith("cuda"):
        rows.append(("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))
    print(
        f"MusicGen ({'local ' + args.musicgen if args.musicgen else 'random musicgen-small'}) on {args.device}, "
        f"{args.dtype}, {torch.get_num_threads()} CPU threads"
    )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
