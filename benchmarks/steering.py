"""Steering overhead: generation time with the SMITIN hooks (modes none / iti / smitin) against plain generation,
same model, same seed, same run, runs interleaved so machine load hits all modes alike. Prints a table.

Model: the trained generator in --generator when there is one, else the default architecture of params
`train_generator.model` (random weights: time does not depend on the values) with the codec's K and card from
params `fit_codec`. Probe sets: --probes DIR when given, else random ones of the right shape. Target: smitin
adds <= 5% (DESIGN: default model, CPU).

    python benchmarks/steering.py [--frames 200] [--repeats 15] [--threads 1] [--every 1] [--preset gpu]

The headline is the median step time: every cached generation step of every run of a mode is timed, and the
overhead is the ratio of the medians (a burst of load on a shared machine moves whole runs by 10-20%, but only
some steps). Also shown: the fastest run, and the paired median of whole runs (within each repeat the modes run
back to back; the median over repeats of mode / plain - 1, with its interquartile range). "plain again" (plain
generation run twice a repeat) is the A/A control: what this machine's noise alone produces. "floor" runs hooks that
do only the tensor work of pushing and monitoring (`floor_hooks`): the part of the overhead no bookkeeping change can
remove on this model.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.generator import Generator, GeneratorConfig, load_generator  # noqa: E402
from models.probes import ProbeSet  # noqa: E402
from models.steering import SteeringPlan, SteeringSession, _median_probability, steer  # noqa: E402
from pipelines.params import load_params  # noqa: E402


def default_generator(params_path: str, preset: str | None = None) -> Generator:
    train = load_params(params_path, "train_generator")
    codec = load_params(params_path, "fit_codec")
    model = dict(train.get("model", {}))
    if preset:  # e.g. gpu: the larger architecture, whose steps cost more while the hooks' cost per step stays
        model.update((train.get("presets", {}).get(preset) or {}).get("model", {}))
    model.update(n_codebooks=int(codec.get("n_codebooks", 4)), card=int(codec.get("card", 256)))
    torch.manual_seed(0)
    return Generator(GeneratorConfig.from_dict(model)).eval()


def random_probe_set(generator: Generator, trait: str, seed: int) -> ProbeSet:
    L, H, D = generator.n_layers, generator.n_heads, generator.head_dim
    rng = np.random.default_rng(seed)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    acc = rng.uniform(0.5, 0.95, (L, H)).astype(np.float32)
    d = unit(rng.standard_normal((L, H, D)))
    return ProbeSet(trait, generator.fingerprint(), (0.1 * d).astype(np.float32), np.zeros((L, H), np.float32), d,
                    np.ones((L, H), np.float32), acc, ((acc - acc.min()) / (acc.max() - acc.min())) ** 3, d,
                    np.ones((L, H), np.float32))


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
                probabilities.append(_median_probability(logits[0][:session.n_monitor]))
                stash.clear()
            return out
        return fn

    handles = [site.register_forward_hook(hook(layer)) for layer, site in enumerate(generator.head_sites())]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", default="data/generator")
    ap.add_argument("--probes", default=None, help="folder of probe sets (one subfolder per trait)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--frames", type=int, default=200, help="frames generated per run (5 s at 40 frames/s)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    ap.add_argument("--preset", default=None,
                    help="time a train_generator preset's architecture (random weights) instead of --generator")
    ap.add_argument("--every", type=int, default=None,
                    help="smitin push interval (default: params evaluate_steering.every)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.preset:
        generator = default_generator(args.params, args.preset)
        source = f"preset {args.preset} architecture, random weights"
    elif (Path(args.generator) / "generator.json").exists():
        generator, _ = load_generator(args.generator)
        source = f"trained ({args.generator})"
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
    every = args.every or int(load_params(args.params, "evaluate_steering").get("every", 1))
    plans = {mode: SteeringPlan.build(sets, strengths, mode=mode, every=every) for mode in ("none", "iti", "smitin")}
    condition = torch.randn(1, generator.cfg.cond_dim) if args.cfg != 1.0 else None

    # Step times: a stamp as each step's forward enters the first block (installed for every mode alike). The
    # median step over all runs of a mode shrugs off the bursts of a shared machine that move whole runs by 10-20%.
    stamps: list[float] = []
    generator.blocks[0].register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    step_times: dict[str, list[float]] = {}

    def run(mode: str) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one generation."""
        kwargs = dict(condition=condition, cfg_scale=args.cfg, seed=0, top_k=50, batch_size=1)
        stamps.clear()
        t, c = time.perf_counter(), time.process_time()
        if mode.startswith("plain"):
            generator.generate(frames, **kwargs)
        elif mode == "floor":
            with floor_hooks(generator, plans["smitin"], fingerprint):
                generator.generate(frames, **kwargs)
        else:
            with steer(generator, plans[mode], fingerprint):
                generator.generate(frames, **kwargs)
        out = time.perf_counter() - t, time.process_time() - c
        step_times.setdefault(mode, []).extend(b - a for a, b in zip(stamps[1:], stamps[2:]))  # cached steps
        return out

    # "plain again": plain generation a second time in each repeat, the A/A control: its overhead is the noise
    # "floor": the tensor work alone of a hook that pushes and monitors (see floor_hooks)
    modes = ["plain", "plain again", "none", "iti", "smitin", "floor"]
    for m in modes:  # warm-up
        run(m)
    step_times.clear()
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            w, c = run(m)
            wall[m].append(w)
            cpu[m].append(c)
    steps = frames + generator.cfg.n_codebooks - 1
    cfg = generator.cfg
    print(f"steering overhead: {source}; {cfg.n_layers} layers x {cfg.n_heads} heads, dim {cfg.dim}; "
          f"{frames} frames ({steps} steps), CFG {args.cfg:g}, batch 1, {args.threads} thread(s), "
          f"traits {strengths}, smitin push every {every} step(s), {args.repeats} interleaved runs per mode. "
          "CPU = this process's CPU time; best = fastest run (the estimator least disturbed by other load on a "
          "shared machine, as timeit uses)")
    print(f"| {'mode':<11} | {'median step ms':>14} | {'overhead (median step)':>22} | {'CPU best s':>10} | "
          f"{'overhead (best)':>15} | {'overhead (paired median, IQR)':>30} | {'wall median s':>13} |")
    print(f"|{'-' * 13}|{'-' * 16}|{'-' * 24}|{'-' * 12}|{'-' * 17}|{'-' * 32}|{'-' * 15}|")
    best0, step0 = min(cpu["plain"]), statistics.median(step_times["plain"])
    paired, per_step = {}, {}  # paired: median over repeats of (mode / plain) within a repeat (the runs of a
    for m in modes:  # repeat are adjacent in time, so slow phases of a shared machine hit both sides of each ratio)
        b, w = min(cpu[m]), statistics.median(wall[m])
        ratios = [x / p - 1 for x, p in zip(cpu[m], cpu["plain"])]
        paired[m] = statistics.median(ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        spread = f"{paired[m]:+.1%} ({q1:+.1%} to {q3:+.1%})"
        med_step = statistics.median(step_times[m])
        per_step[m] = med_step / step0 - 1
        print(f"| {m:<11} | {1000 * med_step:14.3f} | {per_step[m]:+22.1%} | {b:10.3f} | {b / best0 - 1:+15.1%} | "
              f"{spread:>30} | {w:13.3f} |")

    # noise-robust view: CPU time spent inside the hooks themselves (smitin), per step, against plain step time
    spent = [0.0]
    session = SteeringSession(generator, plans["smitin"], fingerprint)

    def timed(layer):
        fn = session.hook(layer)

        def wrapper(*a):
            t = time.perf_counter()
            out = fn(*a)
            spent[0] += time.perf_counter() - t
            return out
        return wrapper

    handles = [site.register_forward_hook(timed(layer)) for layer, site in enumerate(generator.head_sites())]
    try:
        generator.generate(frames, condition=condition, cfg_scale=args.cfg, seed=0, top_k=50, batch_size=1)
        base = min(wall["plain"])
    finally:
        for h in handles:
            h.remove()
    print(f"time inside the smitin hooks (wall): {1000 * spent[0] / steps:.3f} ms/step = {spent[0] / base:.1%} of "
          "plain generation's wall time (excludes the module-hook dispatch itself)")
    over = per_step["smitin"]
    print(f"smitin overhead (median step time) {over:+.1%}, A/A control {per_step['plain again']:+.1%}, the tensor "
          f"work alone (floor) {per_step['floor']:+.1%} (target <= 5%): {'OK' if over <= 0.05 else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
