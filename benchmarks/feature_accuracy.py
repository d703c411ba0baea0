"""Feature accuracy on a held-out rendered corpus: render (or reuse) -> build the clips table -> mir_eval table.

    python benchmarks/feature_accuracy.py                       # >= 100 held-out pieces, drums and no drums
    python benchmarks/feature_accuracy.py --set rhythm_method=multifeature --set key_profile=edma
    python benchmarks/feature_accuracy.py --reuse               # keep the rendered audio, rebuild + evaluate
    python benchmarks/feature_accuracy.py --work data/bench_dev --offset 40 --chorales 40 --essen 40   # dev set

The held-out set skips the first `--offset` pieces of each corpus' seeded order; the default corpus (offset 0,
30 chorales / 28 Essen songs) and the dev set used while tuning (offset 40, 40 + 40 pieces) do not overlap it.
Each `--set` overrides one `build_dataset` param; several `--compare` names run the build once per params variant
and print the tables side by side (same audio, same run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.config import load_section  # noqa: E402
from pipelines.corpus import CorpusParams, render_corpus  # noqa: E402
from pipelines.dataset import BuildDatasetParams, build_dataset  # noqa: E402
from pipelines.evaluate import METRIC_ORDER, evaluate_features, write_outputs  # noqa: E402


def parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="data/bench_features", help="work folder (corpus/, clips-*/, metrics)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--chorales", type=int, default=60)
    ap.add_argument("--essen", type=int, default=50)
    ap.add_argument("--offset", type=int, default=100, help="pieces skipped per corpus (held out from tuning)")
    ap.add_argument("--seconds", type=float, default=20.0, help="piece duration cap")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse the rendered corpus in --work if present")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a build_dataset param (all variants)"
    )
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="an extra params variant to build and score on the same audio",
    )
    args = ap.parse_args()

    corpus_params = load_section(CorpusParams, args.params, "corpus").with_overrides(
        {
            "corpora": ["bach_chorales", "nottingham", "essen"],
            "pieces": {"bach_chorales": args.chorales, "nottingham": 2, "essen": args.essen},
            "piece_offset": args.offset,
            "piece_seconds": args.seconds,
            "variants": 1,
        },
        "benchmark",
    )
    corpus_dir = os.path.join(args.work, "corpus")
    labels = os.path.join(corpus_dir, "labels.parquet")
    if not (args.reuse and os.path.exists(labels)):
        t = time.time()
        r = render_corpus(corpus_dir, corpus_params, workers=args.workers)
        print(
            f"render: {r.stats['pieces_rendered']} pieces, {r.stats['mixes']} mixes, "
            f"{r.stats['audio_hours']:.2f} h audio in {time.time() - t:.0f}s "
            f"({r.stats['realtime_factor']:.0f}x real time)",
            flush=True,
        )

    base = load_section(BuildDatasetParams, args.params, "build_dataset")
    fixed = dict(kv.split("=", 1) for kv in args.set)
    base = base.with_overrides({k: parse_value(v) for k, v in fixed.items()}, "--set")
    variants = [("current", base)]
    for spec in args.compare:
        name, _, sets = spec.partition(":")
        over = {}
        for kv in re.split(r",(?=\s*\w+=)", sets):  # a comma inside a value (a YAML mapping) stays
            k, v = kv.split("=", 1)
            over[k] = parse_value(v)
        variants.append((name, base.with_overrides(over, f"--compare {name}")))

    results = {}
    for name, p in variants:
        clips = os.path.join(args.work, f"clips-{name}")
        shutil.rmtree(clips, ignore_errors=True)
        t = time.time()
        built = build_dataset(os.path.join(corpus_dir, "audio"), clips, p, workers=args.workers)
        wall = time.time() - t
        hours = built.stats["hours"]
        metrics, rows = evaluate_features(clips, labels)
        metrics["build"] = {
            "wall_seconds": round(wall, 1),
            "audio_hours": hours,
            "realtime_factor": round(hours * 3600 / wall, 1),
        }
        write_outputs(metrics, rows, os.path.join(args.work, f"metrics-{name}.json"))
        results[name] = metrics
        print(
            f"[{name}] built {built.stats['clips']} clips ({hours:.2f} h) in {wall:.0f}s = "
            f"{hours * 3600 / wall:.0f}x real time",
            flush=True,
        )

    header = f"{'metric':<14}" + "".join(f"{n[:8] + '/' + s:>18}" for n in results for s in ("all", "drums", "nodrum"))
    print(header)
    for k in ["clips", "pieces"] + METRIC_ORDER + ["key_weighted_global", "key_exact_global", "file_key_weighted"]:
        cells = []
        for m in results.values():
            for part in ("overall", "drums", "no_drums"):
                v = m[part].get(k)
                cells.append(f"{v:>18d}" if isinstance(v, int) else f"{(v if v is not None else float('nan')):>18.3f}")
        print(f"{k:<14}" + "".join(cells))
    with open(os.path.join(args.work, "summary.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
