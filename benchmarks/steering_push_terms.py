"""What a steering push does to the audio: the evaluation's Frechet distance split into its mean and covariance terms,
and where each row sits against real music with and without the trait (docs/steering.md, "What the push adds").

    python benchmarks/steering_push_terms.py                                    # the demo's stage cells (test split)
    python benchmarks/steering_push_terms.py --set split=valid --set takes_per_prompt=3 --set add_every=8
    python benchmarks/steering_push_terms.py --probes /tmp/directions/orthogonal --save /tmp/cells.npz

`--probes`: another probe-sets folder (e.g. one benchmarks/steering_directions.py wrote); `--save`: every cell's
projected and standardised embeddings, per-take strength, detector probability, monitor verdict, the judges'
verdict, the monitor's trace and (with `--own-takes`) the own trait-bearing takes, as one .npz.

Runs `models.evaluate_steering` (after `make demo`: the trained generator, probes, tokens and clips) with
params.yaml's `evaluate_steering` section plus the `--set` overrides, keeps each cell's audio embeddings (per-clip
mean and spread over time of 64 log-mel bands), and prints per row: success and Frechet rise (as the stage reports
them), the two terms of the Frechet distance in the stage's 16-d space, the position of the row's mean on the axis
from the real trait-free continuations' mean (0) to the real trait-bearing ones' (1), and the high band's (mel bands
40-63) mean level and spread over time, in z units of the reference, and the row's strength on the generator's own
scale (median) and, for removal, the strength left. "Spread" is the row's total variance across takes in the
stage's 16-d space over the real continuations' (1: as varied as real music; a push that makes every take alike
lowers it, and the Frechet distance's covariance term rises).

`--own-takes K`: the generator's own trait-bearing music, the ceiling a push that adds the trait can hope to reach:
K unsteered takes from each trait-bearing prompt (the removal rows' prompts), of which those the judges call
trait-bearing are compared with the real continuations at the smitin add row's size (the median and 5-95% range
over random subsets), and their rise over the unsteered add row.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import yaml
from scipy import linalg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models.evaluate_steering as es  # noqa: E402
from core.config import load_section  # noqa: E402
from models.probes import ProbesParams  # noqa: E402

HIGH = slice(40, 64)  # mel bands of the high band; the embedding's second half holds each band's spread over time


def frechet_terms(x: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """The Frechet distance's two terms for projected embeddings: |mu_x - mu_ref|^2 and
    tr(S_x + S_ref - 2 (S_x S_ref)^1/2)."""
    sx, sr = np.cov(x, rowvar=False), np.cov(ref, rowvar=False)
    return float(np.sum((x.mean(0) - ref.mean(0)) ** 2)), float(np.trace(sx + sr - 2 * linalg.sqrtm(sx @ sr).real))


def own_trait_takes(contexts: dict, rows: list[dict], takes: int, subsets: int = 200, seed: int = 0) -> dict:
    """Per (trait, task) the generator's own trait-bearing music: `takes` unsteered takes from each trait-bearing
    prompt; of those the judges call trait-bearing (the stage's `judged_has`: the detector's verdict, and at least
    `strength_threshold` strong on the scale of the stage's unsteered rows, `rows`), the Frechet distance at the
    stage's row size (median, 5% and 95% over random subsets; all of them when fewer; nan under 3), their spread, how
    many were judged trait-bearing, of how many, and their projected embeddings."""
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    out = {}
    for (trait, task), (run, prompts, probes) in contexts.items():
        p = run.params
        own_run = replace(run, params=p.model_copy(update={"takes_per_prompt": takes}))
        none = es._Mode("none", probes, dict(mode="none", prompt_relative=p.prompt_relative), 1.0)
        row, emb, _ = es._run_cell(own_run, trait, task, "remove", prompts, none)
        stage = {
            r["direction"]: r["clips"] for r in rows if (r["trait"], r["task"], r["mode"]) == (trait, task, "none")
        }
        threshold = run.detector.threshold
        scale = es._own_scale(stage["add"], stage["remove"], threshold)
        present = np.asarray(row["clips"]["detector_p"]) >= threshold
        has = present & (scale.strength(np.asarray(row["clips"]["descriptors"])) >= p.strength_threshold)
        ref = prompts.space.reference
        z = prompts.space.project(emb)[has]
        n = min(len(z), len(prompts.picked[False]) * p.takes_per_prompt)
        if n < 3:  # too few for a covariance: the ceiling is not measurable at this K (said as nan, not a crash)
            out[(trait, task)] = (float("nan"),) * 4 + (len(z), len(emb), z)
            continue
        fds = [es.frechet_distance(z[rng.choice(len(z), n, replace=False)], ref) for _ in range(subsets)]
        lo, hi = np.percentile(fds, [5, 95])
        out[(trait, task)] = (float(np.median(fds)), float(lo), float(hi), es.takes_spread(z, ref), len(z), len(emb), z)
    return out


def mask_silent_tokens(level: float, generator_dir: str = "data/generator", tokens_dir: str = "data/tokens") -> list:
    """Make the generator's sampler skip the codebook-0 tokens that stand for silence: those whose frames in the
    training tokens (20 or more) average below `level` (`models.train.frame_levels`). Returns them."""
    import torch

    import models.generator as generator_module
    from models.train import TokenSet, frame_levels

    _, codec = generator_module.load_generator(generator_dir)
    train = TokenSet(tokens_dir, "train")
    first = train.codes[0].numpy()
    levels = frame_levels(codec, train.codes).numpy()
    silent = [t for t in range(codec.card) if (first == t).sum() >= 20 and levels[first == t].mean() < level]
    mask = torch.zeros(codec.card, dtype=torch.bool)
    mask[silent] = True
    sample = generator_module._sample

    def without_silence(logits, temperature, top_k, top_p, gen):
        logits = logits.clone()
        logits[:, 0, :][:, mask] = float("-inf")
        return sample(logits, temperature, top_k, top_p, gen)

    generator_module._sample = without_silence
    share = float(np.isin(first, silent).mean())
    print(f"masked {len(silent)} codebook-0 tokens ({share:.1%} of the training frames)")
    return silent


def print_agreement_by_window(rows: list[dict], traces: dict, windows: list[int]) -> None:
    """Each monitor's agreement with the judges (its takes pooled with the unsteered ones, as the stage pools them)
    when its verdict is the mean reading over the last N steps (the judges' answer per take: the stage's
    `judged_has`)."""
    judged = {
        (r["trait"], r["task"], r["direction"], r["mode"]): (np.asarray(r["clips"]["judged_has"]), r["tau"])
        for r in rows
    }
    modes = [m for m in dict.fromkeys(k[3] for k in judged) if m != "none"]
    print("| verdict over the last N steps | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for w in windows:
        cells = []
        for mode in modes:
            right = []
            for key, (has, tau) in judged.items():
                if key[3] in ("none", mode):
                    right += list((traces[key][-w:].mean(0) >= tau) == has)
            cells.append(f"{np.mean(right):.3f}")
        print(f"| {w} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an evaluate_steering override")
    ap.add_argument("--probes", default="data/probes", help="probe sets folder (one subfolder a trait)")
    ap.add_argument(
        "--mask-silent-tokens",
        type=float,
        metavar="LEVEL",
        help="a diagnostic: never sample the codebook-0 tokens whose training frames average below LEVEL (standardised "
        "log-mel, e.g. -1.5), in every row",
    )
    ap.add_argument("--save", help="write every cell's projected embeddings and the reference's to this .npz")
    ap.add_argument("--modes", default="smitin,smitin_paper,random_control", help="rows besides `none`")
    ap.add_argument(
        "--own-takes",
        type=int,
        metavar="K",
        help="also draw K unsteered takes from each trait-bearing prompt and place the judged trait-bearing ones",
    )
    ap.add_argument(
        "--windows",
        help="also print each monitor's agreement with the judges with its verdict over the last N steps, for each N "
        "of this comma list (e.g. 20,40,60,90,120; the stage uses evaluate_steering.monitor_window)",
    )
    args = ap.parse_args(argv)
    if args.mask_silent_tokens is not None:
        mask_silent_tokens(args.mask_silent_tokens)
    update = {"modes": args.modes.split(",")}
    for item in args.set:
        key, _, value = item.partition("=")
        update[key] = yaml.safe_load(value)
    params = load_section(es.EvaluateSteeringParams, args.params, "evaluate_steering").model_copy(update=update)

    # the stage keeps neither its embeddings nor the reference's classes: catch them on the way (private functions,
    # wrapped, not changed)
    cells, spaces, n_with, traces, contexts = {}, {}, {}, {}, {}
    run_cell, trait_prompts, space_class = es._run_cell, es._trait_prompts, es.EmbeddingSpace

    class KeepReference(space_class):
        def __init__(self, reference, dims=16):
            super().__init__(reference, dims)
            self.raw_reference = reference

    def keep_cell(run, trait, task, direction, prompts, mode):
        row, emb, report = run_cell(run, trait, task, direction, prompts, mode)
        cells[(trait, task, direction, mode.name)] = emb
        traces[(trait, task, direction, mode.name)] = np.array(
            [s["traits"][trait]["probability"] for s in report.steps]
        )  # [steps, takes]
        spaces[trait] = prompts.space
        contexts[(trait, task)] = (run, prompts, mode.probes)
        return row, emb, report

    def keep_prompts(run, trait):
        prompts = trait_prompts(run, trait)
        n_with[trait] = len(prompts.picked[True])  # the reference is the trait-bearing continuations, then the others
        return prompts

    es._run_cell, es._trait_prompts, es.EmbeddingSpace = keep_cell, keep_prompts, KeepReference
    try:
        result = es.evaluate_steering(
            "data/generator", args.probes, "data/tokens", "data/clips", params,
            load_section(ProbesParams, args.params, "probes"),
        )  # fmt: skip
    finally:
        es._run_cell, es._trait_prompts, es.EmbeddingSpace = run_cell, trait_prompts, space_class
    own = own_trait_takes(contexts, result["rows"], args.own_takes) if args.own_takes else {}

    if args.save:
        arrays = {f"ref_{t}": s.reference for t, s in spaces.items()}
        arrays.update({f"ref_with_{t}": np.asarray(n) for t, n in n_with.items()})  # the first n hold the trait
        arrays.update({"/".join(k): spaces[k[0]].project(e) for k, e in cells.items()})
        arrays.update({"std/" + "/".join(k): spaces[k[0]].standardise(e) for k, e in cells.items()})
        for row in result["rows"]:
            key = "/".join((row["trait"], row["task"], row["direction"], row["mode"]))
            for name in ("strength_own", "detector_p", "monitor_end"):
                arrays[f"{name}/{key}"] = np.asarray(row["clips"][name], dtype=float)
            arrays[f"judged/{key}"] = np.asarray(row["clips"]["judged_has"])  # the judges' verdict
            arrays[f"tau/{key}"] = np.asarray(row["tau"], dtype=float)
        for k, trace in traces.items():
            arrays["trace/" + "/".join(k)] = trace  # monitored probability [steps, takes]
        for (trait, task), found in own.items():
            arrays[f"own/{trait}/{task}"] = found[-1]  # the judged trait-bearing own takes, projected
        np.savez(args.save, **arrays)
    print(f"split {params.split}, {params.prompts_per_class} prompts a class, {params.takes_per_prompt} take(s) each")
    if args.windows:
        print_agreement_by_window(result["rows"], traces, [int(w) for w in args.windows.split(",")])
    print("| trait | task | direction | mode | success | Frechet rise | mean term | covariance term | on the axis "
          "| high band: mean | high band: spread | strength (own) | strength left | spread |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for trait, space in spaces.items():
        ref, k = space.reference, n_with[trait]
        with_mean, without_mean = ref[:k].mean(0), ref[k:].mean(0)
        axis = with_mean - without_mean
        raw = space.standardise(space.raw_reference)
        for label, z, std in (("real, with", ref[:k], raw[:k]), ("real, without", ref[k:], raw[k:])):
            m, c = frechet_terms(z, ref)
            pos = float((z.mean(0) - without_mean) @ axis / (axis @ axis))
            high = f"{std[:, HIGH].mean():+.2f} | {std[:, 64:][:, HIGH].mean():+.2f}"
            print(
                f"| {trait} | | | {label} | | | {m:.1f} | {c:.1f} | {pos:.2f} | {high} | | "
                f"| {es.takes_spread(z, ref):.2f} |"
            )
        for row in result["rows"]:
            if row["trait"] != trait:
                continue
            emb = cells[(trait, row["task"], row["direction"], row["mode"])]
            z, std = space.project(emb), space.standardise(emb)
            m, c = frechet_terms(z, ref)
            pos = float((z.mean(0) - without_mean) @ axis / (axis @ axis))
            left = f"{row['strength_left']:.0%}" if row.get("strength_left") is not None else ""
            print(
                f"| {trait} | {row['task']} | {row['direction']} | {row['mode']} "
                f"| {row.get('success', float('nan')):.2f} | {row.get('frechet_rise', 0.0):+.0%} "
                f"| {m:.1f} | {c:.1f} | {pos:.2f} "
                f"| {std[:, HIGH].mean():+.2f} | {std[:, 64:][:, HIGH].mean():+.2f} "
                f"| {row.get('strength_own', float('nan')):.2f} | {left} | {es.takes_spread(z, ref):.2f} |"
            )
        unsteered = {r["task"]: r["frechet"] for r in result["rows"] if r["trait"] == trait and r["mode"] == "none"
                     and r["direction"] == "add"}  # fmt: skip
        for (t, task), (fd, lo, hi, sp, m, total, _) in own.items():
            if t == trait:
                rise = fd / unsteered[task] - 1
                print(
                    f"| {trait} | {task} | own | judged trait-bearing, {m} of {total} takes | | {rise:+.0%} "
                    f"(FD {fd:.1f}, 5-95% {lo:.1f}-{hi:.1f}) | | | | | | | | {sp:.2f} |"
                )
        agreement = result["metrics"][trait].get("monitor_agreement", {})
        print(f"{trait}: monitor agreement with the judges, " + ", ".join(f"{m} {a:.3f}" for m, a in agreement.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
