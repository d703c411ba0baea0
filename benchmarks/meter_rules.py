"""Meter and bar-phase decision rules compared offline, on the product's own per-beat downbeat evidence.

    python benchmarks/meter_rules.py --set data/ood                           # the out-of-domain set (dev / heldout)
    python benchmarks/meter_rules.py --set data/corpus --one-per-piece 60     # in-domain: the default corpus

The product's expensive part (beat tracking and the per-beat downbeat evidence, `ClipAnalyzer.analyze_clips` with
params.yaml's `build_dataset`) runs once per 10 s clip; every rule then decides the file's meter and bar phase
from the same evidence, so rules differ only in the decision. Scored like
`pipelines.evaluate`: meter right (beats per bar against the labels) and mir_eval downbeat F per 10 s window.

Rules:
- `product`: `pipelines.features.file_bar_phase` with params.yaml's `meter_bias` and `downbeat_rephase_penalty`
  (what `smitin dataset build` does);
- `one phase per file` / `re-phase penalty x`: the same with another penalty (none: the stitched count fixes every
  clip's phase);
- `bias 2:x 3:y`: the product's rule with another bias per meter;
- `autocorrelation`: the meter whose lag (and twice it) correlates the evidence best against the other lags up to 8
  beats; the phase as the product picks it for that meter;
- `hybrid`: `autocorrelation` where it says 3, else the product's rule between 2 and 4;
- `bar pointer, slip x`: Viterbi over each beat's bar position, scored as the product's clip contrast, where the
  count may slip at any beat (not only at a clip boundary) for x / clips;
- `likelihood`: the evidence read as a downbeat's log-odds, the (meter, phase) of the likeliest labelling.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.features import _best_meter_phase, beat_numbers, file_bar_phase  # noqa: E402

CLIP_SECONDS, MIN_SECONDS, SR = 10.0, 4.0, 44100


def extract(set_dir: str, one_per_piece: int | None, downbeat_model: str | None = None) -> list[dict]:
    """Per file: labels, and per 10 s clip (start, beats, evidence) exactly as `smitin dataset build` computes them
    with params.yaml's `build_dataset` (`ClipAnalyzer.analyze_clips`: beats tracked with the clips around them, the
    trees' evidence plus the network's weighted log-odds)."""
    import pyarrow.parquet as pq

    from core.audio import iter_clips
    from core.config import load_section
    from pipelines.dataset import BuildDatasetParams
    from pipelines.features import ClipAnalyzer, FeatureParams

    build = load_section(BuildDatasetParams, "params.yaml", "build_dataset")
    if downbeat_model:
        build = build.model_copy(update={"downbeat_model": downbeat_model})
    analyzer = ClipAnalyzer(FeatureParams.from_params(build))
    rows = pq.read_table(f"{set_dir}/labels.parquet").to_pylist()
    if one_per_piece:
        first = {}
        for r in rows:
            first.setdefault(r["piece_id"], r)
        rows = list(first.values())[:one_per_piece]
    files = []
    for r in rows:
        _, pieces = iter_clips(f"{set_dir}/audio/{r['file']}", SR, CLIP_SECONDS, CLIP_SECONDS, MIN_SECONDS)
        clips = [
            (float(start), np.asarray(f.beats_s), f.beat_evidence)
            for _, start, f in analyzer.analyze_clips(pieces)
            if f.beat_evidence is not None
        ]
        files.append({**r, "clips": clips})
    return files


def beats_per_bar(f: dict) -> int:
    if f.get("beats_per_bar"):
        return int(f["beats_per_bar"])
    beats, downs = np.asarray(f["beats_s"]), np.asarray(f["downbeats_s"])
    counts = [np.sum((beats >= a - 1e-3) & (beats < b - 1e-3)) for a, b in zip(downs[:-1], downs[1:])]
    return int(np.median(counts)) if counts else 4


def _stitched(clips: list) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Each clip's beat numbers on the file's one count (the product's `beat_numbers`), all numbers, all evidence."""
    index = beat_numbers([(start, beats) for start, beats, _ in clips])
    return index, np.concatenate(index), np.concatenate([e for _, _, e in clips])


def _lag_correlations(idx: np.ndarray, ev: np.ndarray, max_lag: int = 8) -> dict[int, float]:
    series = np.full(idx.max() - idx.min() + 1, np.nan)
    series[idx - idx.min()] = ev
    out = {}
    for lag in range(1, max_lag + 1):
        a, b = series[:-lag], series[lag:]
        ok = ~np.isnan(a) & ~np.isnan(b)
        good = ok.sum() >= 6 and a[ok].std() > 0 and b[ok].std() > 0
        out[lag] = float(np.corrcoef(a[ok], b[ok])[0, 1]) if good else 0.0
    return out


def _autocorrelation_meter(idx: np.ndarray, ev: np.ndarray) -> int:
    c = _lag_correlations(idx, ev)
    odd = (c[1] + c[3] + c[5] + c[7]) / 4
    score = {
        2: (c[2] + c[4] + c[6] + c[8]) / 4 - odd,
        3: (c[3] + c[6]) / 2 - (c[1] + c[2] + c[4] + c[5]) / 4,
        4: (c[4] + c[8]) / 2 - odd,
    }
    return max(score, key=score.get)


def _with_meter(clips: list, meter_of) -> tuple[list[np.ndarray], int]:
    """Downbeats per clip for the meter `meter_of(idx, ev)` picks, at the phase the product's rule picks for it."""
    index, idx, ev = _stitched(clips)
    m = meter_of(idx, ev)
    phase = max(range(m), key=lambda p: ev[(idx - p) % m == 0].mean() - ev[(idx - p) % m != 0].mean())
    return [b[(i - phase) % m == 0] for i, (_, b, _) in zip(index, clips)], m


def _likelihood_meter_phase(clips: list, product_bias: dict) -> tuple[list[np.ndarray], int]:
    """The (meter, phase) under which the file's beats are likeliest when each beat's evidence is read as log-odds
    of a downbeat: sum of log P(downbeat) on the bar's first beats and log P(not) on the others, per beat, plus the
    meter's bias. (Scaling the log-odds by 0.5, or dropping the bias, chose the same on every OOD file.)"""
    index, idx, ev = _stitched(clips)
    logp, lognot = -np.logaddexp(0.0, -ev), -np.logaddexp(0.0, ev)
    best = (-np.inf, 4, 0)
    for m in (2, 3, 4):
        for p in range(m):
            on = (idx - p) % m == 0
            score = (logp[on].sum() + lognot[~on].sum()) / len(idx) + product_bias.get(m, 0.0)
            if score > best[0]:
                best = (score, m, p)
    _, m, phase = best
    return [b[(i - phase) % m == 0] for i, (_, b, _) in zip(index, clips)], m


def _bar_pointer(clips: list, meter_bias: dict, penalty: float) -> tuple[list[np.ndarray], int]:
    """Each beat's bar position by Viterbi over the file's stitched beats: a beat on position 0 earns its clip's
    contrast weight x (evidence - the clip's mean), so a path that keeps one phase per clip scores exactly the
    product's mean clip contrast; the count may leave the grid at any beat (a slip of the beat count) for
    `penalty` / clips. The meter with the best path (+ its bias) wins."""
    index = beat_numbers([(start, beats) for start, beats, _ in clips])
    used = [(i, e) for i, (_, _, e) in zip(index, clips) if i is not None]
    if not used:
        return [b[:1] for _, b, _ in clips], 4
    n_clips = len(used)
    idx = np.concatenate([i for i, _ in used])
    best: tuple = (-np.inf, 4, None)
    for m in (2, 3, 4):
        if len(idx) < 2 * m:
            continue
        gain = np.concatenate([m * m / ((m - 1) * len(e)) * (e - e.mean()) / n_clips for _, e in used])
        step_cost = penalty / n_clips
        score = np.where(np.arange(m) == 0, gain[0], 0.0)
        back = np.zeros((len(idx), m), int)
        for t in range(1, len(idx)):
            d = int(idx[t] - idx[t - 1])
            kept = np.roll(score, d)  # position q came from q - d
            jump = score.max() - step_cost
            take_jump = jump > kept
            back[t] = np.where(take_jump, int(np.argmax(score)), (np.arange(m) - d) % m)
            score = np.maximum(kept, jump) + np.where(np.arange(m) == 0, gain[t], 0.0)
        total = float(score.max()) + float(meter_bias.get(m, 0.0))
        if total > best[0]:
            pos = np.zeros(len(idx), int)
            pos[-1] = int(np.argmax(score))
            for t in range(len(idx) - 1, 0, -1):
                pos[t - 1] = back[t, pos[t]]
            best = (total, m, pos)
    _, m, pos = best
    if pos is None:
        return [b[:1] for _, b, _ in clips], 4
    out, at = [], 0
    for i, (_, b, _) in zip(index, clips):
        if i is None:
            out.append(b[:1])
            continue
        out.append(b[pos[at : at + len(i)] == 0])
        at += len(i)
    return out, m


def rules(product_bias: dict, rephase_penalty: float | None = None) -> dict:
    def bias(b2: float, b3: float):
        return lambda clips: file_bar_phase(clips, (2, 3, 4), {2: b2, 3: b3, 4: 0.0}, rephase_penalty)

    def rephase(penalty: float | None):
        return lambda clips: file_bar_phase(clips, (2, 3, 4), product_bias, penalty)

    def pointer(penalty: float):
        return lambda clips: _bar_pointer(clips, product_bias, penalty)

    def hybrid_meter(idx, ev):
        if _autocorrelation_meter(idx, ev) == 3:
            return 3
        return _best_meter_phase(idx, ev, (2, 4), product_bias)[0]

    return {
        "product": rephase(rephase_penalty),
        "one phase per file": rephase(None),
        **{f"re-phase penalty {x:g}": rephase(x) for x in (0.0, 0.5, 1.0, 1.5, 2.0)},
        "bias 2:-0.2 3:-0.35": bias(-0.2, -0.35),
        "bias 2:0 3:0": bias(0.0, 0.0),
        "bias 2:-0.2 3:0": bias(-0.2, 0.0),
        "autocorrelation": lambda clips: _with_meter(clips, _autocorrelation_meter),
        "hybrid": lambda clips: _with_meter(clips, hybrid_meter),
        **{f"bar pointer, slip {x:g}": pointer(x) for x in (0.5, 1.0, 1.5, 2.0, 3.0, 1e9)},
        "likelihood": lambda clips: _likelihood_meter_phase(clips, product_bias),
    }


def score(files: list[dict], rule) -> dict[str, tuple[float, float, int]]:
    import mir_eval

    per_split: dict[str, list] = {}
    for f in files:
        clips = [c for c in f["clips"] if len(c[1]) >= 4]
        if len(clips) < 2:
            continue
        downbeats, m = rule(clips)
        for (start, _, _), est in zip(clips, downbeats):
            ref = np.array([t - start for t in f["downbeats_s"] if start <= t < start + CLIP_SECONDS])
            if len(ref):
                f_measure = mir_eval.beat.f_measure(ref, np.asarray(est, float))
                per_split.setdefault(f.get("split") or "all", []).append((m == beats_per_bar(f), f_measure))
    return {s: (*np.mean(v, axis=0), len(v)) for s, v in sorted(per_split.items())}


def main(argv=None) -> None:
    from core.config import load_section
    from pipelines.dataset import BuildDatasetParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", required=True, help="a folder with labels.parquet and audio/ (benchmarks/ood_set.py)")
    ap.add_argument("--one-per-piece", type=int, default=None, help="only the first file of each piece, up to N")
    ap.add_argument("--downbeat-model", default=None, help="model JSON (fit_downbeats.py)")
    args = ap.parse_args(argv)
    t0 = time.time()
    files = extract(args.set, args.one_per_piece, args.downbeat_model)
    print(f"{len(files)} files from {args.set}, evidence in {time.time() - t0:.0f} s")
    section = load_section(BuildDatasetParams, "params.yaml", "build_dataset")
    product_bias = {int(k): float(v) for k, v in section.meter_bias.items()}
    print("| rule | split | windows | meter right | downbeat F |")
    print("|---|---|---|---|---|")
    for name, rule in rules(product_bias, section.downbeat_rephase_penalty).items():
        for split, (meter, downbeat_f, n) in score(files, rule).items():
            print(f"| {name} | {split} | {n} | {meter:.3f} | {downbeat_f:.3f} |")


if __name__ == "__main__":
    main()
