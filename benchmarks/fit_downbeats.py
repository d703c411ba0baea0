"""Fit the learned downbeat evidence (pipelines/downbeat_model.json) on the default corpus and drum-free music.

    python benchmarks/beat_fit_set.py --out data/beat_fit                  # the beat network's fit set (docs/ood.md)
    python benchmarks/fit_beats.py --render-corpus data/beat_fit_corpus    # the default corpus' dev range, 4 stem mixes
    python benchmarks/fit_downbeats.py --corpus data/beat_fit_corpus --tonal-set data/beat_fit   # the builtin model
    python benchmarks/fit_downbeats.py --work data/bench_dev --out /tmp/model.json   # renders the dev range if absent

The builtin model was fitted by the first three lines, on the beats of params.yaml's tracker (the network's). The beat
fit set (121 openings: fiddle tunes, trecento and Palestrina consorts, Monteverdi, Beethoven quartets, a Schumann
song, through TimGM6mb and MuseScore's SoundFont) shares no work and no SoundFont with the out-of-domain evaluation
set, and teaches the model bars that no drum or bass stem marks; its clips join the training data after the
percussive gate is set (docs/ood.md). The earlier model used the smaller drum-free set of `benchmarks/ood_set.py
--fit` the same way.

Every estimated beat of every 10 s clip is a sample: its features are the clip-z-scored cues of
`pipelines.features.downbeat_cues` at the beat and its two neighbours; its label is whether it lies within 70 ms of
a reference downbeat (beats that match no reference beat are left out). One sklearn HistGradientBoostingClassifier
(100 trees of depth 3) for percussive clips and one for the rest, written out as plain arrays (no pickle) that
`pipelines.features.boosted_trees_score` evaluates; the percussiveness threshold is the one that best separates the
clips with and without a drum stem. `--cv` first scores boosted trees against a logistic regression by 5-fold
cross-validation over the dev set's pieces (downbeat F-measure of the whole pipeline), which is how the trees were
chosen. The dev set (pieces 40-79 of each corpus' seeded order) is disjoint from the default
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

from core.audio import iter_clips  # noqa: E402
from core.config import load_section  # noqa: E402
from pipelines.corpus import CorpusParams, render_corpus  # noqa: E402
from pipelines.dataset import BuildDatasetParams  # noqa: E402
from pipelines.evaluate import cut_times  # noqa: E402
from pipelines.features import (  # noqa: E402
    DOWNBEAT_CUES,
    DOWNBEAT_MODEL,
    ClipAnalyzer,
    FeatureParams,
    boosted_trees_score,
    cue_matrix,
    export_boosted_trees,
    file_bar_phase,
    percussiveness,
    stack_trees,
)

CUES = list(DOWNBEAT_CUES)
SHIFTS = [-1, 0, 1]  # the beats around each beat whose cues it reads (--shifts)
TOLERANCE_S = 0.07
TREES = {"max_iter": 100, "max_depth": 3, "early_stopping": False, "random_state": 0}


def pipeline_f(clips: list[dict], scorers: dict, meter_bias: dict, rephase_penalty: float | None = None) -> float:
    """Mean downbeat F of the file-level bar phase (the product's rule: meter bias and re-phase penalty) over `clips`
    with per-gate scoring functions."""
    import mir_eval

    files: dict[str, list[dict]] = {}
    for c in clips:
        files.setdefault(c["file"], []).append(c)
    scores = []
    for group in files.values():
        group.sort(key=lambda c: c["start"])
        downbeats, _ = file_bar_phase(
            [(c["start"], c["beats"], scorers[c["percussive"]](c["x"])) for c in group],
            (2, 3, 4),
            meter_bias,
            rephase_penalty,
        )
        scores += [mir_eval.beat.f_measure(c["ref_down"], d) for c, d in zip(group, downbeats) if len(c["ref_down"])]
    return float(np.mean(scores))


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
    ap.add_argument(
        "--corpus",
        default=None,
        help="an already rendered default-corpus folder (labels.parquet inside, e.g. the beat network's "
        "`fit_beats.py --render-corpus` output) instead of rendering the dev range into --work",
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=DOWNBEAT_MODEL)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cv", action="store_true", help="compare boosted trees and logistic regression by CV first")
    ap.add_argument(
        "--tonal-set",
        action="append",
        default=[],
        help="a labelled set of drum-free music (labels.parquet inside, e.g. `benchmarks/ood_set.py --fit`) whose "
        "clips join the training data; repeatable",
    )
    ap.add_argument(
        "--shifts",
        type=int,
        nargs="+",
        default=SHIFTS,
        help="read the cues of the beats this many beats away (0: the beat itself)",
    )
    ap.add_argument(
        "--cues",
        nargs="+",
        default=CUES,
        choices=CUES,
        help="the per-beat cues the trees read (default: all of pipelines.features.DOWNBEAT_CUES)",
    )
    args = ap.parse_args()
    shifts = sorted(set(args.shifts) | {0})
    cues_read = list(args.cues)
    import pyarrow.parquet as pq
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    corpus_dir = args.corpus or os.path.join(args.work, "corpus")
    labels_path = os.path.join(corpus_dir, "labels.parquet")
    spec = {"pieces": {"bach_chorales": 40, "nottingham": 2, "essen": 40}, "piece_offset": 40, "piece_seconds": 20.0}
    if args.corpus:
        if not os.path.exists(labels_path):
            raise SystemExit(f"--corpus {args.corpus}: no labels.parquet there")
        spec = {"corpus": os.path.normpath(args.corpus)}
    elif not os.path.exists(labels_path):
        corpus_params = load_section(CorpusParams, args.params, "corpus").with_overrides(
            {"corpora": ["bach_chorales", "nottingham", "essen"], "variants": 1, **spec}, "benchmark"
        )
        render_corpus(corpus_dir, corpus_params, workers=args.workers)

    build = load_section(BuildDatasetParams, args.params, "build_dataset")
    analyzer = ClipAnalyzer(FeatureParams.from_params(build.model_copy(update={"downbeat_evidence": "weighted"})))
    sr = build.analysis_sample_rate

    def clip_samples(labels: str, has_drums) -> list[dict]:
        out = []
        for truth in pq.read_table(labels).to_pylist():
            _, clips = iter_clips(truth["path"], sr, build.clip_seconds, build.hop_seconds, build.min_clip_seconds)
            for _, start, wave in clips:
                found = analyzer.downbeat_inputs(wave)
                if found is None:
                    continue
                beats, cues, env = found
                end = start + len(wave) / sr
                ref_down = cut_times(truth["downbeats_s"], start, end)
                out.append(
                    {
                        "file": truth["file"],
                        "piece": truth["piece_id"],
                        "start": start,
                        "beats": beats,
                        "x": cue_matrix(cues, cues_read, shifts),
                        "lab": beat_labels(beats, cut_times(truth["beats_s"], start, end), ref_down),
                        "perc": percussiveness(env),
                        "ref_down": ref_down,
                        "drums": has_drums(truth),
                    }
                )
        return out

    samples = clip_samples(labels_path, lambda truth: "drums" in truth["stems"])
    perc, drums = np.array([c["perc"] for c in samples]), np.array([c["drums"] for c in samples])
    candidates = np.unique(perc)
    threshold = float(candidates[np.argmax([((perc > t) == drums).mean() for t in candidates])])
    # the extra sets join the training data after the gate is set: the gate is fitted on mixes with and without a
    # drum stem, and these have none; their clips go to whichever model the gate sends them to, as in use
    extra = {path: clip_samples(os.path.join(path, "labels.parquet"), lambda truth: False) for path in args.tonal_set}
    for path, more in extra.items():
        print(f"{path}: {len(more)} clips, {sum(c['perc'] > threshold for c in more)} of them gated percussive")
        samples += more
    for c in samples:
        c["percussive"] = bool(c["perc"] > threshold)
    for gate, name in ((True, "percussive"), (False, "drum-free")):
        if not any(c["percussive"] == gate for c in samples):
            raise SystemExit(f"no {name} clip in {labels_path}: the set needs mixes with and without drums")
    meter_bias = dict(FeatureParams.from_params(build).meter_bias)
    rephase_penalty = build.downbeat_rephase_penalty

    def fit(clips, make):
        out = {}
        for gate in (True, False):
            xs = np.vstack([c["x"][c["lab"] >= 0] for c in clips if c["percussive"] == gate])
            ys = np.concatenate([c["lab"][c["lab"] >= 0] for c in clips if c["percussive"] == gate])
            out[gate] = make().fit(xs, ys)
        return out

    def trees():
        return HistGradientBoostingClassifier(**TREES)

    def logistic():
        return LogisticRegression(C=1.0, max_iter=3000)

    cv = {}
    if args.cv:
        pieces = sorted({c["piece"] for c in samples})
        fold = {p: i % 5 for i, p in enumerate(np.random.default_rng(0).permutation(pieces))}
        for name, make in (("logistic", logistic), ("boosted_trees", trees)):
            fs = []
            for k in range(5):
                models = fit([c for c in samples if fold[c["piece"]] != k], make)
                fs.append(
                    pipeline_f(
                        [c for c in samples if fold[c["piece"]] == k],
                        {g: m.decision_function for g, m in models.items()},
                        meter_bias,
                        rephase_penalty,
                    )
                )
            cv[name] = round(float(np.mean(fs)), 4)
            print(f"5-fold CV over pieces, downbeat F: {name} {cv[name]}", flush=True)
    models = fit(samples, trees)
    exported, report = {}, {}
    for kind, gate in (("percussive", True), ("tonal", False)):
        exported[kind] = export_boosted_trees(models[gate])
        xs = np.vstack([c["x"] for c in samples if c["percussive"] == gate])
        check = dict(exported[kind], _arrays=stack_trees(exported[kind]["trees"]))
        if not np.allclose(boosted_trees_score(xs, check), models[gate].decision_function(xs), atol=1e-9):
            raise AssertionError("exported trees do not reproduce sklearn's scores")
        n = sum(int((c["lab"] >= 0).sum()) for c in samples if c["percussive"] == gate)
        report[kind] = {"beats": n, "clips": sum(c["percussive"] == gate for c in samples)}
    model = {
        "cues": cues_read,
        "shifts": shifts,
        "percussive_threshold": round(threshold, 5),
        "models": exported,
        "fitted_on": {
            "set": "rendered dev set",
            **spec,
            **({"tonal_sets": {os.path.normpath(p): len(c) for p, c in extra.items()}} if extra else {}),
            "clips": len(samples),
            "trees": TREES,
            "percussive_gate_accuracy": round(float(((perc > threshold) == drums).mean()), 4),
            "in_sample_downbeat_f": round(
                pipeline_f(samples, {g: m.decision_function for g, m in models.items()}, meter_bias, rephase_penalty), 4
            ),
            **({"cv_downbeat_f": cv} if cv else {}),
            **report,
        },
    }
    with open(args.out, "w") as f:
        json.dump(model, f, indent=1)
        f.write("\n")
    print(json.dumps(model["fitted_on"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
