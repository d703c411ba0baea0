"""Coconet on this machine: training throughput per preset (bfloat16 convolutions against float32 in the same run,
and bfloat16 under torch.compile, `train_coconet.compile`), and the time to harmonize an 8-bar melody with the
default Gibbs schedule against ancestral sampling.

    python benchmarks/coconet.py [--model data/coconet] [--threads 2] [--repeats 3]

Without --model the harmonization is timed on the default preset's architecture (params train_coconet) with random
weights (speed does not depend on the weights). The melody is the first 8 bars (128 frames) of the first JSB test
chorale's soprano; three voices are written (384 cells). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def train_throughput(
    preset: str, precision: str, steps: int = 6, batch: int = 24, frames: int = 64, compiled: bool = False
) -> float:
    """Training frames per second (forward + backward + step) of a preset's network; compiling is not timed."""
    from models.coconet import Coconet, CoconetConfig, orderless_loss, orderless_mask

    torch.manual_seed(0)
    model = Coconet(CoconetConfig.preset(preset)).use_precision(precision)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    net = torch.compile(model) if compiled else model
    classes = torch.randint(0, model.cfg.n_classes, (batch, model.cfg.n_voices, frames))
    valid = torch.ones_like(classes, dtype=torch.bool)
    times = []
    for i in range(steps + 2):
        mask = orderless_mask(valid)
        t0 = time.perf_counter()
        loss = orderless_loss(net(classes, mask), classes, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # the first steps pick kernels (and compile)
            times.append(time.perf_counter() - t0)
    return batch * frames / statistics.median(times)


def main(argv=None) -> None:
    from core.config import load_section
    from models.coconet import Coconet, CoconetConfig, fill, given_cells, load_coconet
    from models.coconet_eval import SamplingParams
    from models.coconet_train import TrainCoconetParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a trained Coconet folder (default: random weights, params preset)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="debug,demo,cpu,gpu", help="presets whose training throughput is timed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"## Training throughput ({args.threads} threads, batch 24 x 64 frames; frames / s, higher is better)\n")
    print("| preset | layers x filters | params | float32 | bfloat16 | speed-up | bfloat16, compiled | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        cfg = CoconetConfig.preset(preset)
        n = Coconet(cfg).num_params()
        fp32 = train_throughput(preset, "fp32", steps=3 if preset == "gpu" else 6)
        bf16 = train_throughput(preset, "bf16", steps=3 if preset == "gpu" else 6)
        fused = train_throughput(preset, "bf16", steps=3 if preset == "gpu" else 6, compiled=True)
        print(
            f"| {preset} | {cfg.n_layers} x {cfg.filters} | {n / 1e6:.2f}M | {fp32:,.0f} | {bf16:,.0f} | "
            f"{bf16 / fp32:.1f}x | {fused:,.0f} | {fused / fp32:.1f}x |",
            flush=True,
        )

    if args.model:
        model, _ = load_coconet(args.model)
        label = args.model
    else:
        p = load_section(TrainCoconetParams, "params.yaml", "train_coconet").resolved()
        torch.manual_seed(0)
        model = Coconet(p.config()).eval().use_precision("auto")
        label = f"random weights, preset {p.preset}"
    sampling = load_section(SamplingParams, "params.yaml", "coconet_sampling")
    import gzip
    import json

    data = json.loads(gzip.open("pipelines/data/jsb/Jsb16thSeparated.json.gz").read())
    roll = np.array(data["test"][0]).T[:, :128]
    melody = np.full_like(roll, -1)
    melody[0] = roll[0]
    given = given_cells(4, 128, [1, 2, 3])
    print(
        f"\n## Harmonizing an 8-bar melody (128 frames, 384 cells to write; {label}, {args.threads} threads; "
        f"median of {args.repeats})\n"
    )
    print("| sampler | model calls | seconds | parallels repaired | target |")
    print("|---|---|---|---|---|")
    for kind, repair in (("gibbs", True), ("gibbs", False), ("ancestral", False)):
        sampler = sampling.make(kind, int((~given).sum()), repair=repair)
        base = sampler.base if repair else sampler
        fill(model, melody, given, sampler, seed=0)  # warm-up
        times, repaired = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            fill(model, melody, given, sampler, seed=r)
            times.append(time.perf_counter() - t0)
            repaired += [x["parallels_before"] - x["parallels_after"] for x in getattr(sampler, "reports", [])]
        calls = base.steps + 1 if kind == "gibbs" else int((~given).sum())
        what = f"default schedule, {base.steps} steps" if kind == "gibbs" else base.order
        if repair:
            what += ", then the voice-leading repair (the CLI's default)"
        target = "<= 5 s" if repair else "baseline"
        print(
            f"| {kind} ({what}) | {calls}{' + repair' if repair else ''} | {statistics.median(times):.2f} | "
            f"{statistics.mean(repaired) if repaired else 0:.1f} | {target} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
