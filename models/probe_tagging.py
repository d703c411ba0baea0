"""Probes as taggers: how well a trait's probes tell, from the generator's heads alone, whether real audio has
the trait.

The SMITIN paper reads its probes as taggers of real audio before trusting them as a steering monitor: if the
median probability of the top heads does not separate clips with and without the trait, the monitor's "is the
trait already there?" is noise, and so is every decision the steering schedule takes on it. Here the reading is
made on the dataset's held-out split: the first `window_frames` tokens of each labelled clip are teacher-forced
through the generator, unconditioned, and the heads are read at the position the probes were trained at (the last
one, as SMITIN does). Three readings per clip: the median over the `monitor_heads` top heads (what the steering
monitor thresholds against tau), their mean, and the single best head.

Two references:
- ground truth (the clip's trait label): AUC of each reading, and the accuracy of "median >= tau";
- the independent drum detector (`models.detectors`, audio descriptors, never sees the generator or the probes),
  run on the codec-decoded window: the AUC of the monitor against its verdict, the correlation of the two
  probabilities, and the detector's own AUC against the truth, the bar the probes are measured against.

The result is a flat dict of numbers (MLflow metric names). An AUC whose reference has a single class is left out
(not NaN), and so is a correlation with a constant side; a log line says which.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from models.probes import ProbeError, ProbeSet, capture_head_outputs

log = logging.getLogger(__name__)


def probe_tagging(
    generator,
    codec,
    probe_set: ProbeSet,
    tokens,
    detector,
    window_frames: int,
    monitor_heads: int = 16,
    max_clips: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    per_clip: list | None = None,
) -> dict[str, float | int]:
    """Read `probe_set` as a tagger of the clips of `tokens` (one split's `TokenSet`) that have a known label for
    its trait and at least `window_frames` frames (a seeded random subset of at most `max_clips`). Returns the
    metrics described in the module docstring; when `per_clip` is a list, one dict per clip read is appended to it
    (index, clip_id when known, label, median, mean, best, detector_p)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    trait = probe_set.trait
    window = int(window_frames)
    if window < 1:
        raise ProbeError(f"probe tagging needs a window of at least 1 frame, got {window_frames!r}")
    context = getattr(generator, "context_frames", None)
    if context is not None and window > context:
        raise ProbeError(f"window of {window} frames exceeds the generator's context of {context} frames")
    if monitor_heads < 1:
        raise ProbeError(f"monitor_heads must be at least 1, got {monitor_heads!r}")
    if max_clips is not None and max_clips < 1:
        raise ProbeError(f"max_clips must be at least 1 (or None for all), got {max_clips!r}")
    fingerprint = generator.fingerprint()
    if probe_set.generator_fingerprint != fingerprint:
        raise ProbeError(
            f"probe set {trait!r} was trained on generator {probe_set.generator_fingerprint}, not on this "
            f"generator ({fingerprint}); its readings here would mean nothing"
        )

    picked, labels, n_unlabelled, n_short = _pick_clips(tokens, trait, window, max_clips, seed)
    if not picked:
        raise ProbeError(
            f"no clip of the split has a known {trait!r} label and at least {window} frames "
            f"({n_unlabelled} unlabelled, {n_short} shorter)"
        )
    heads = probe_set.top_heads(monitor_heads)
    rows, cols = (np.array(v) for v in zip(*heads))
    # a probe set trained on time-averaged heads must be read that way; the default (SMITIN's) is the last position
    position = probe_set.params.get("position") or "last"
    log.info(
        "probe tagging %s: %d clips (%d with the trait), %d frames, median of %d heads",
        trait,
        len(picked),
        int(sum(labels)),
        window,
        len(heads),
    )

    median, mean, best, detector_p = [], [], [], []
    with ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        for start in range(0, len(picked), batch_size):
            codes = [torch.as_tensor(tokens.clip(i)[:, :window]).long() for i in picked[start : start + batch_size]]
            # top_heads is sorted by validation accuracy, so column 0 is the best head
            probs = probe_set.probability(capture_head_outputs(generator, codes, position, batch_size))[:, rows, cols]
            probs = probs.astype(np.float64)
            median.extend(np.median(probs, axis=1))
            mean.extend(probs.mean(axis=1))
            best.extend(probs[:, 0])
            # decoding and the detector's HPSS release the GIL: two threads halve the wall time
            detector_p.extend(
                pool.map(lambda c: float(detector.probability(codec.decode(c), codec.sample_rate)), codes)
            )

    y = np.array(labels, dtype=int)
    median, mean, best, detector_p = (np.array(v, dtype=np.float64) for v in (median, mean, best, detector_p))
    verdict = (detector_p >= detector.threshold).astype(int)
    tau = probe_set.tau()
    flagged = (median >= tau).astype(int)
    n, n_with, n_detected = len(y), int(y.sum()), int(verdict.sum())
    out: dict[str, float | int] = {
        "n": n,
        "n_with": n_with,
        "n_without": n - n_with,
        "n_skipped_unlabelled": n_unlabelled,
        "n_skipped_short": n_short,
        "n_detector_with": n_detected,
        "monitor_heads": len(heads),
        "tau": float(tau),
        "accuracy_truth_median_at_tau": float(np.mean(flagged == y)),
        "accuracy_truth_detector": float(np.mean(verdict == y)),
        "agreement_detector_median_at_tau": float(np.mean(flagged == verdict)),
    }
    if n_with:
        out["mean_median_with"] = float(median[y == 1].mean())
    if n - n_with:
        out["mean_median_without"] = float(median[y == 0].mean())
    if 0 < n_with < n:
        out["auc_truth_median"] = float(roc_auc_score(y, median))
        out["auc_truth_mean"] = float(roc_auc_score(y, mean))
        out["auc_truth_best_head"] = float(roc_auc_score(y, best))
        out["auc_truth_detector"] = float(roc_auc_score(y, detector_p))
        # tau comes from the probes' balanced validation accuracy; the held-out split need not be balanced
        out["balanced_accuracy_truth_median_at_tau"] = float(balanced_accuracy_score(y, flagged))
    else:
        _no_auc(trait, "every clip read is", n_with, "the truth")
    if 0 < n_detected < n:
        out["auc_detector_median"] = float(roc_auc_score(verdict, median))
    else:
        _no_auc(trait, "the detector judges every clip", n_detected, "it")
    if n >= 2 and np.ptp(median) > 0 and np.ptp(detector_p) > 0:
        out["pearson_detector_median"] = float(pearsonr(median, detector_p).statistic)
        out["spearman_detector_median"] = float(spearmanr(median, detector_p).statistic)
    else:
        log.info("probe tagging %s: monitor or detector reading is constant; no correlation", trait)

    if per_clip is not None:
        clip_ids = tokens.meta.get("clip_id")
        for j, i in enumerate(picked):
            entry = {"index": i, "label": int(y[j])}
            if clip_ids is not None:
                entry["clip_id"] = clip_ids[i]
            entry.update(
                median=float(median[j]), mean=float(mean[j]), best=float(best[j]), detector_p=float(detector_p[j])
            )
            per_clip.append(entry)
    return out


def _no_auc(trait: str, who: str, n_with: int, against: str) -> None:
    log.info(
        "probe tagging %s: %s %s the trait; no AUC against %s", trait, who, "with" if n_with else "without", against
    )


def _pick_clips(
    tokens, trait: str, window: int, max_clips: int | None, seed: int
) -> tuple[list[int], list[int], int, int]:
    """(clip indices, their labels, unlabelled count, too-short count): the labelled clips long enough for the
    window, a seeded random subset of at most `max_clips`, in index order."""
    traits = tokens.meta["traits"]
    eligible, n_unlabelled, n_short = [], 0, 0
    for i in range(len(tokens)):
        if (traits[i] or {}).get(trait) is None:
            n_unlabelled += 1
        elif tokens.clip(i).shape[-1] < window:
            n_short += 1
        else:
            eligible.append(i)
    if max_clips is not None and len(eligible) > max_clips:
        eligible = sorted(np.random.default_rng(seed).permutation(eligible)[:max_clips].tolist())
    return eligible, [int(bool(traits[i][trait])) for i in eligible], n_unlabelled, n_short
