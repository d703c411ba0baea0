"""Fit the learned downbeat evidence (pipelines/downbeat_model.json) on the rendered dev set.

    python benchmarks/fit_downbeats.py                      # render the dev set (offset 40) if absent, fit, write
    python benchmarks/fit_downbeats.py --work data/bench_dev --out /tmp/model.json

Every estimated beat of every 10 s clip is a sample: its features are the clip-z-scored cues of
`pipelines.features.downbeat_cues` at the beat and its two neighbours; its label is whether it lies within 70 ms of
a reference downbeat (beats that match no reference beat are left out). One logistic regression (sklearn) for
percussive clips and one for the rest; the percussiveness threshold is the one that best separates the clips with
and without a drum stem. The dev set (pieces 40-79 of each corpus' seeded order) is disjoint from the default
corpus (0-29) and from the held-out set of benchmarks/feature_accuracy.py (100 on), which is where to check the
result: `python benchmarks/feature_accuracy.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.audio import iter_clips  # noqa: E402
from pipelines.corpus import render_corpus  # noqa: E402
from pipelines.evaluate import cut_times  # noqa: E402
from pipelines.features import (DOWNBEAT_MODEL, ClipAnalyzer, FeatureParams, cue_matrix,  # noqa: E402
                                percussiveness)
from pipelines.params import load_params  # noqa: E402

CUES = ["bass", "chord_change", "novelty", "low_onset", "high_onset", "all_onset", "sustain", "mid_before",
        "novelty_1", "novelty_4"]
SHIFTS = [-1, 0, 1]
TOLERANCE_S = 0.07


def beat_labels(beats: np.ndarray, ref_beats: np.ndarray, ref_downbeats: np.ndarray) -> np.ndarray:
    """1 where the beat is a reference downbeat, 0 where it is another reference beat, -1 where it matches none."""
    out = np.full(len(beats), -1)
    for i, t in enumerate(beats):
        if len(ref_beats) and np.min(np.abs(ref_beats - t)) < TOLERANCE_S:
            out[i] = int(len(ref_downbeats) > 0 and np.min(np.abs(ref_downbeats - t)) < TOLERANCE_S)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="data/bench_dev")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=DOWNBEAT_MODEL)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import pyarrow.parquet as pq
    from sklearn.linear_model import LogisticRegression

    corpus_dir = os.path.join(args.work, "corpus")
    labels_path = os.path.join(corpus_dir, "labels.parquet")
    spec = {"pieces": {"bach_chorales": 40, "nottingham": 2, "essen": 40}, "piece_offset": 40, "piece_seconds": 20.0}
    if not os.path.exists(labels_path):
        corpus_params = load_params(args.params, "corpus")
        corpus_params.update({"corpora": ["bach_chorales", "nottingham", "essen"], "variants": 1, **spec})
        render_corpus(corpus_dir, corpus_params, workers=args.workers)

    build = load_params(args.params, "build_dataset")
    analyzer = ClipAnalyzer(FeatureParams.from_params({**build, "downbeat_evidence": "weighted"}))
    sr = int(build["analysis_sample_rate"])
    X, y, perc, drums = {True: [], False: []}, {True: [], False: []}, [], []
    samples = []
    for truth in pq.read_table(labels_path).to_pylist():
        has_drums = "drums" in truth["stems"]
        _, clips = iter_clips(truth["path"], sr, build["clip_seconds"], build["hop_seconds"], build["min_clip_seconds"])
        for _, start, wave in clips:
            found = analyzer.downbeat_inputs(wave)
            if found is None:
                continue
            beats, cues, env = found
            end = start + len(wave) / sr
            lab = beat_labels(beats, cut_times(truth["beats_s"], start, end), cut_times(truth["downbeats_s"], start, end))
            samples.append((cue_matrix(cues, CUES, SHIFTS)[lab >= 0], lab[lab >= 0], percussiveness(env)))
            perc.append(percussiveness(env))
            drums.append(has_drums)
    perc, drums = np.array(perc), np.array(drums)
    candidates = np.unique(perc)
    threshold = float(candidates[np.argmax([((perc > t) == drums).mean() for t in candidates])])
    for feats, lab, p in samples:
        X[p > threshold].append(feats)
        y[p > threshold].append(lab)
    weights, report = {}, {}
    for kind, gate in (("percussive", True), ("tonal", False)):
        xs, ys = np.vstack(X[gate]), np.concatenate(y[gate])
        clf = LogisticRegression(C=1.0, max_iter=2000).fit(xs, ys)
        weights[kind] = [round(float(w), 5) for w in clf.coef_[0]]
        report[kind] = {"beats": int(len(ys)), "downbeats": int(ys.sum()), "train_accuracy": round(clf.score(xs, ys), 4)}
    model = {
        "cues": CUES, "shifts": SHIFTS, "percussive_threshold": round(threshold, 5), "weights": weights,
        "fitted_on": {"set": "rendered dev set", **spec, "clips": len(samples),
                      "percussive_gate_accuracy": round(float(((perc > threshold) == drums).mean()), 4), **report},
    }
    with open(args.out, "w") as f:
        json.dump(model, f, indent=1)
        f.write("\n")
    print(json.dumps(model["fitted_on"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
