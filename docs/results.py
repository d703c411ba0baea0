"""Write docs/results.md from the metrics the DVC stages wrote (metrics/), so the results page is never retyped.

    python docs/results.py [--metrics metrics] [--out docs/results.md]

Run it after `dvc repro` (or `make demo`). A metrics file that a stage has not written yet is reported as missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def features(m: Path) -> list[str]:
    d = _load(m / "features.json")
    if d is None:
        return ["(metrics/features.json not written yet: run `dvc repro evaluate_features`)"]
    rows = [
        "| clips | key weighted | key exact | tempo Acc1 | tempo Acc2 | beat F | downbeat F | chords majmin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("overall", "drums", "no_drums"):
        r = d.get(name) or {}
        rows.append(
            f"| {name.replace('_', ' ')} ({r.get('clips', '-')}) | {_f(r.get('key_weighted'))} | "
            f"{_f(r.get('key_exact'))} | {_f(r.get('tempo_acc1'))} | {_f(r.get('tempo_acc2'))} | "
            f"{_f(r.get('beat_f'))} | {_f(r.get('downbeat_f'))} | {_f(r.get('chord_majmin'))} |"
        )
    return rows


def generator(m: Path) -> list[str]:
    d = _load(m / "train_generator.json")
    c = _load(m / "trait_carrying.json")
    if d is None:
        return ["(metrics/train_generator.json not written yet)"]
    rows = [
        f"- validation loss {_f(d.get('valid_loss'))} nats/token at step {d.get('best_step')} of {d.get('steps')} "
        f"({d.get('stop_reason')}), unigram floor {_f(d.get('unigram_valid_loss'))}; {d.get('params'):,} "
        f"parameters; fingerprint `{d.get('fingerprint')}`"
    ]
    if c:
        rows.append("- drums carried into continuations (judged drums, drum prompts / drum-free prompts):")
        for mode, r in sorted((c.get("summary") or {}).items()):
            if isinstance(r, dict) and "drum_prompts" in r and "drumfree_prompts" in r:
                rows.append(
                    f"  - {mode.replace('_', ' ')}: {_f(r['drum_prompts']['judged_drums_generated'])} / "
                    f"{_f(r['drumfree_prompts']['judged_drums_generated'])} (real continuations "
                    f"{_f(r['drum_prompts']['judged_drums_real_continuation'])} / "
                    f"{_f(r['drumfree_prompts']['judged_drums_real_continuation'])}; "
                    f"{r['drum_prompts']['n']} a class)"
                )
    return rows


def probes(m: Path) -> list[str]:
    folder = m / "probes"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return ["(no probe metrics yet)"]
    rows = ["| trait | best head | top-16 mean | mean | tau |", "|---|---|---|---|---|"]
    for f in files:
        d = json.loads(f.read_text())
        rows.append(
            f"| {f.stem} | {_f(d.get('best_acc'))} | {_f(d.get('top16_acc'))} | {_f(d.get('mean_acc'))} | "
            f"{_f(d.get('tau'))} |"
        )
    return rows


def monitor_and_taggers(m: Path) -> list[str]:
    """Per trait: how often each monitor's verdict is the judges' (its takes pooled with the unsteered ones), and
    the probes read as taggers of the held-out split's real clips."""
    d = _load(m / "evaluate_steering.json")
    if d is None:
        return []
    rows = []
    for trait, node in sorted(d.items()):
        agreement, tagging = node.get("monitor_agreement") if isinstance(node, dict) else None, node.get("tagging")
        if agreement:
            rows += ["", f"Monitor agreement with the judges ({trait}; a monitor's takes and the unsteered ones):", ""]
            rows += ["| mode | agreement |", "|---|---|"]
            rows += [f"| {mode} | {_f(v)} |" for mode, v in sorted(agreement.items())]
        if tagging:
            rows += ["", f"Probes read as taggers of {tagging.get('n', '-')} held-out clips ({trait}):", ""]
            rows += [
                "| AUC vs truth (monitor median) | best head | detector's own AUC | AUC vs detector | Pearson with "
                "detector p | accuracy at tau |",
                "|---|---|---|---|---|---|",
                f"| {_f(tagging.get('auc_truth_median'))} | {_f(tagging.get('auc_truth_best_head'))} | "
                f"{_f(tagging.get('auc_truth_detector'))} | {_f(tagging.get('auc_detector_median'))} | "
                f"{_f(tagging.get('pearson_detector_median'))} | {_f(tagging.get('accuracy_truth_median_at_tau'))} |",
            ]
    return rows


def table_file(path: Path) -> list[str]:
    return path.read_text().rstrip().splitlines() if path.is_file() else [f"({path} not written yet)"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", default="metrics")
    ap.add_argument("--out", default="docs/results.md")
    args = ap.parse_args(argv)
    m = Path(args.metrics)
    lines = [
        "# Results",
        "",
        "Generated by `python docs/results.py` from `metrics/` (the files the DVC stages write); "
        "`docs/measurements.md` has the history, the benchmarks and the known limits.",
        "",
        "## Feature accuracy on the rendered corpus (`metrics/features.json`)",
        "",
        *features(m),
        "",
        "## Generator (`metrics/train_generator.json`, `metrics/trait_carrying.json`)",
        "",
        *generator(m),
        "",
        "## Probes (`metrics/probes/`)",
        "",
        *probes(m),
        "",
        "## Steering (`metrics/evaluate_steering.md`)",
        "",
        *table_file(m / "evaluate_steering.md"),
        *monitor_and_taggers(m),
        "",
        "## Coconet (`metrics/coconet.md`)",
        "",
        *table_file(m / "coconet.md"),
        "",
    ]
    cpu = m / "coconet_cpu.md"
    if cpu.is_file():
        lines += ["## Coconet, `cpu` preset (`metrics/coconet_cpu.md`, see docs/coconet.md)", "", *table_file(cpu), ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
