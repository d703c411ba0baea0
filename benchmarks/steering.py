"""Steering overhead: generation time with SMITIN steering (modes none / iti / smitin) against plain generation,
same model, same seed, same run, runs interleaved so machine load hits all modes alike. Prints a table.

none / iti / smitin run the default, fused path (`steer`: push and monitor folded into each layer's output
projection); smitin uses the evaluated monitor (params `evaluate_steering`: the sustained-presence one), "smitin
paper" the paper's (one reading a step, no hold); "smitin hook" runs the paper's plan through hooks on `head_out`
(the path MusicGen takes), the baseline the fused path replaced. Every mode continues the same prompt of random
tokens (`--prompt-frames`, 40), so a prompt-relative monitor (params `evaluate_steering.prompt_relative`) is timed.

Model: the trained generator in --generator when there is one, else the default architecture of params
`train_generator.model` (random weights: time does not depend on the values) with the codec's K and card from
params `fit_codec`. Probe sets: --probes DIR when given, else data/probes for the trained generator when it exists
(one trait: drums, as `make demo` trains them), else two random ones of the right shape. Target: smitin
adds <= 5% (DESIGN: default model, CPU).

    python benchmarks/steering.py [--frames 200] [--repeats 30] [--threads 1] [--every 1] [--preset gpu] [--no-pin]

Each run's steps are timed (a stamp as each cached step's forward enters the first block) and summarised by the
run's median step, which shrugs off the bursts of a shared machine that hit a few steps. Every repeat runs each mode
once, in a fresh seeded random order; the overhead of a mode is the median over repeats of (its run's median step /
plain's in the same repeat) - 1, with a bootstrap 95% interval over repeats and the interquartile range. With one
thread the process is pinned to one core (`--no-pin` to turn off): on a 2-core virtual machine, migrating between
cores moved whole runs by 10-20% and the A/A control by several %. "plain again" (plain generation run twice a
repeat) is that A/A control: what this machine's noise alone produces. "floor hook" runs hooks that do only the tensor
work of pushing and monitoring (`floor_hooks`): the part of the hooks' overhead no bookkeeping change can remove.
The call counts (PyTorch calls a step makes, from the profiler) do not depend on the machine's load; they say
how much of a step's dispatch work steering adds.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import load_section  # noqa: E402
from models.evaluate_steering import EvaluateSteeringParams  # noqa: E402
from models.generator import Generator, load_generator  # noqa: E402
from models.probes import ProbeSet  # noqa: E402
from models.steering import SteeringPlan, SteeringSession, _median_probability, steer  # noqa: E402
from models.train import FitCodecParams, TrainGeneratorParams, generator_config  # noqa: E402


def default_generator(params_path: str, preset: str | None = None) -> Generator:
    train = load_section(TrainGeneratorParams, params_path, "train_generator")
    codec = load_section(FitCodecParams, params_path, "fit_codec")  # K and card of the generator
    if preset:  # e.g. gpu: the larger architecture, whose steps cost more while the hooks' cost per step stays
        train = train.with_overrides({"preset": preset}, "--preset")
    torch.manual_seed(0)
    return Generator(generator_config(train, codec)).eval()


def random_probe_set(generator: Generator, trait: str, seed: int) -> ProbeSet:
    L, H, D = generator.n_layers, generator.n_heads, generator.head_dim
    rng = np.random.default_rng(seed)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    acc = rng.uniform(0.5, 0.95, (L, H)).astype(np.float32)
    d = unit(rng.standard_normal((L, H, D)))
    return ProbeSet(
        trait,
        generator.fingerprint(),
        (0.1 * d).astype(np.float32),
        np.zeros((L, H), np.float32),
        d,
        np.ones((L, H), np.float32),
        acc,
        ((acc - acc.min()) / (acc.max() - acc.min())) ** 3,
        d,
        np.ones((L, H), np.float32),
    )


@contextmanager
def floor_hooks(generator: Generator, plan: SteeringPlan, fingerprint: str) -> Iterator[None]:
    """The least tensor work a pushing, self-monitoring hook does on a cached step, and nothing else: each layer
    adds its push (every step, the upper bound) and the last monitored layer evaluates the monitor (one cat, one
    matrix product, the logits to the host, a median). No step or position tracking, no report, no replay. What
    `smitin` costs beyond this "floor" is the session's bookkeeping; the floor itself is PyTorch's per-op cost."""
    session = SteeringSession(generator, plan, fingerprint)  # the same monitor matrix and push vectors
    pushes: dict[int, tuple[torch.Tensor, ...]] = {}
    stash: list[torch.Tensor] = []
    probabilities: list[float] = []

    def push_rows(B: int) -> tuple[torch.Tensor, ...]:
        if B not in pushes:
            rows = torch.zeros((B, 1, *session.delta.shape[1:]), dtype=session.delta.dtype)
            rows[0, 0] = session.delta.sum(0)
            pushes[B] = rows.unbind(2)
        return pushes[B]

    def hook(layer: int):
        monitored, last = session.monitor_layers[layer], layer == session.last_monitor_layer

        def fn(_module, _inputs, z):
            out = None
            if z.shape[1] != 1:  # the prompt's forward: the monitor reads its last position
                if monitored:
                    stash.append(z[:, -1:].clone())
            else:
                if monitored:
                    stash.append(z)
                out = torch.add(z, push_rows(z.shape[0])[layer], alpha=0.5)
            if last:
                logits = torch.addmm(session.monitor_b, torch.cat(stash, 2).flatten(1), session.monitor_w).tolist()
                probabilities.append(_median_probability(logits[0][: session.n_monitor]))
                stash.clear()
            return out

        return fn

    handles = [site.register_forward_hook(hook(layer)) for layer, site in enumerate(generator.head_sites())]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def pin_to_one_core() -> str:
    """Pin this process to the last core it may run on; returns what was done (for the table's header)."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"


def paired_overhead(runs: list[float], base: list[float], seed: int = 0) -> tuple[float, float, float, float, float]:
    """Median over repeats of run / base - 1 (runs of one repeat are adjacent in time), its bootstrap 95% interval
    over repeats, and the interquartile range: (median, ci_low, ci_high, q1, q3)."""
    ratio = np.asarray(runs) / np.asarray(base) - 1.0
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(ratio, (2000, len(ratio))), axis=1)
    return (
        float(np.median(ratio)),
        float(np.percentile(boot, 2.5)),
        float(np.percentile(boot, 97.5)),
        float(np.percentile(ratio, 25)),
        float(np.percentile(ratio, 75)),
    )


def calls_per_step(generate, steps: int) -> int:
    """PyTorch operator calls (top level: not counting the calls an operator makes inside itself) per generation
    step, averaged over one generation (its first step, the prompt's, makes more), from the profiler. A count: it
    does not depend on the machine's load."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate()
    n = sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    return round(n / steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", default="data/generator")
    ap.add_argument(
        "--probes",
        default=None,
        help="folder of probe sets (one subfolder per trait); default: data/probes with the trained generator",
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--frames", type=int, default=200, help="frames generated per run (5 s at 40 frames/s)")
    ap.add_argument(
        "--prompt-frames", type=int, default=40, help="frames of an audio prompt every mode continues (0: none)"
    )
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-pin", action="store_true", help="do not pin a one-thread run to one core")
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    ap.add_argument(
        "--preset",
        default=None,
        help="time a train_generator preset's architecture (random weights) instead of --generator",
    )
    ap.add_argument(
        "--every", type=int, default=None, help="smitin push interval (default: params evaluate_steering.every)"
    )
    args = ap.parse_args()
    if args.frames < 3:
        ap.error("--frames must be at least 3 (steps are timed from the second cached step on)")
    if args.preset and args.probes:
        ap.error("--probes belong to the trained generator; --preset times random weights with random probe sets")
    torch.set_num_threads(args.threads)
    pinned = pin_to_one_core() if args.threads == 1 and not args.no_pin else "not pinned"

    if args.preset:
        generator = default_generator(args.params, args.preset)
        source = f"preset {args.preset} architecture, random weights"
    elif (Path(args.generator) / "generator.json").exists():
        generator, _ = load_generator(args.generator)
        source = f"trained ({args.generator})"
        if args.probes is None and any(p.is_dir() for p in Path("data/probes").glob("*")):
            args.probes = "data/probes"
    else:
        generator = default_generator(args.params)
        source = "default architecture, random weights"
    frames = min(args.frames, generator.cfg.max_frames - generator.cfg.n_codebooks + 1)
    fingerprint = generator.fingerprint()
    if args.probes:
        from models.steering import load_probe_sets

        sets = load_probe_sets(sorted(str(p) for p in Path(args.probes).iterdir() if p.is_dir()))
    else:
        sets = {"drums": random_probe_set(generator, "drums", 0), "piano": random_probe_set(generator, "piano", 1)}
    strengths = {t: (5.0 if i % 2 == 0 else -3.0) for i, t in enumerate(sets)}
    evaluated = load_section(EvaluateSteeringParams, args.params, "evaluate_steering")
    every = args.every or evaluated.every
    plans = {mode: SteeringPlan.build(sets, strengths, mode=mode, every=every) for mode in ("none", "iti")}
    # smitin with the evaluated (sustained-presence) monitor, and with the paper's beside it
    # every step (the worst case: `add_every` would push an added trait less often), at the evaluated `add_gain`
    # and with its monitor reading the generated audio's share after the prompt where the stage's does
    keys = ("smooth_steps", "hold_steps", "hold_floor", "remove_floor", "add_gain", "prompt_relative")
    held = {k: getattr(evaluated, k) for k in keys}
    plans["smitin"] = SteeringPlan.build(sets, strengths, mode="smitin", every=every, decay=evaluated.decay, **held)
    plans["smitin paper"] = SteeringPlan.build(sets, strengths, mode="smitin", every=every, decay=evaluated.decay)
    condition = torch.randn(1, generator.cfg.cond_dim) if args.cfg != 1.0 else None
    steps = frames + generator.cfg.n_codebooks - 1
    prompt_n = max(0, min(args.prompt_frames, generator.cfg.max_frames - steps))
    prompt = (
        torch.randint(
            0, generator.cfg.card, (1, generator.cfg.n_codebooks, prompt_n), generator=torch.Generator().manual_seed(0)
        )
        if prompt_n
        else None
    )

    # a stamp as each step's forward enters the first block (installed for every mode alike)
    stamps: list[float] = []
    generator.blocks[0].register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))

    def generate(mode: str) -> None:
        kwargs = dict(condition=condition, cfg_scale=args.cfg, seed=0, top_k=50, batch_size=1, prompt=prompt)
        if mode.startswith("plain"):
            generator.generate(frames, **kwargs)
        elif mode == "floor hook":
            with floor_hooks(generator, plans["smitin paper"], fingerprint):
                generator.generate(frames, **kwargs)
        elif mode == "smitin hook":
            with steer(generator, plans["smitin paper"], fingerprint, fused=False):
                generator.generate(frames, **kwargs)
        else:
            with steer(generator, plans[mode], fingerprint):
                generator.generate(frames, **kwargs)

    def run(mode: str) -> tuple[float, float]:
        """(median cached-step seconds, process CPU seconds) of one generation."""
        stamps.clear()
        c = time.process_time()
        generate(mode)
        cpu_s = time.process_time() - c
        return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])), cpu_s  # cached steps only

    # "plain again": plain generation a second time in each repeat, the A/A control: its overhead is the noise
    # "floor hook": the tensor work alone of a hook that pushes and monitors (see floor_hooks)
    modes = ["plain", "plain again", "none", "iti", "smitin", "smitin paper", "smitin hook", "floor hook"]
    for m in modes:  # warm-up
        run(m)
    step: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    order = random.Random(0)
    for _ in range(args.repeats):
        for m in order.sample(modes, len(modes)):
            a, c = run(m)
            step[m].append(a)
            cpu[m].append(c)
    calls = {
        m: calls_per_step(lambda m=m: generate(m), steps) for m in ("plain", "smitin", "smitin hook", "floor hook")
    }

    cfg = generator.cfg
    print(
        f"steering overhead: {source}; {cfg.n_layers} layers x {cfg.n_heads} heads, dim {cfg.dim}; "
        f"{frames} frames ({steps} steps), CFG {args.cfg:g}, batch 1, {args.threads} thread(s), {pinned}, "
        f"traits {strengths}, smitin push every {every} step(s), {args.repeats} repeats, modes in random order. "
        "overhead = median over repeats of (the run's median step / plain's in the same repeat) - 1; "
        "CI = bootstrap 95% over repeats; CPU best = this process's CPU time of the fastest run"
    )
    print(
        f"| {'mode':<12} | {'median step ms':>14} | {'overhead':>8} | {'95% CI':>17} | {'IQR':>17} | "
        f"{'CPU best s':>10} | {'calls / step':>12} |"
    )
    print(f"|{'-' * 14}|{'-' * 16}|{'-' * 10}|{'-' * 19}|{'-' * 19}|{'-' * 12}|{'-' * 14}|")
    over = {}
    for m in modes:
        med, lo, hi, q1, q3 = paired_overhead(step[m], step["plain"])
        over[m] = (med, lo, hi)
        n_calls = calls.get(m)
        extra = "" if n_calls is None else f"{n_calls}" if m == "plain" else f"{n_calls} (+{n_calls - calls['plain']})"
        print(
            f"| {m:<12} | {1000 * statistics.median(step[m]):14.3f} | {med:+8.1%} | "
            f"{f'{lo:+.1%} to {hi:+.1%}':>17} | {f'{q1:+.1%} to {q3:+.1%}':>17} | {min(cpu[m]):10.3f} | "
            f"{extra:>12} |"
        )

    med, lo, hi = over["smitin"]
    # OK / OVER when the whole interval is on one side of the target; otherwise the point estimate decides, said so
    verdict = (
        "OK"
        if hi <= 0.05
        else "OVER"
        if lo > 0.05
        else f"{'OK' if med <= 0.05 else 'OVER'} (point estimate; the interval spans 5%)"
    )
    print(
        f"smitin overhead {med:+.1%} (95% CI {lo:+.1%} to {hi:+.1%}), A/A control {over['plain again'][0]:+.1%}, "
        f"through hooks {over['smitin hook'][0]:+.1%}; PyTorch calls a step: plain {calls['plain']}, smitin "
        f"{calls['smitin'] - calls['plain']:+d}, through hooks {calls['smitin hook'] - calls['plain']:+d} "
        f"(target <= 5%): {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
