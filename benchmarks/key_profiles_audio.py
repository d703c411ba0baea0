"""The file key matched against key profiles learned from rendered audio, beside the product's symbolic consensus
(docs/ood.md, "Key profiles learned from audio").

    python benchmarks/key_profiles_audio.py         # ~1 min; needs data/ood, data/beat_fit, data/beat_fit_chorales

The product's file key (`file_key_profile: consensus`) correlates the file's HPCP (KeyExtractor's chain summed over
its 10 s clips, scaled to max 1, bins under 0.2 cleared) with four symbolic profiles. Audio chroma is not a
pitch-class count: partials add weight a fifth and a third above each note. Here the major and minor profiles are
learned instead as the mean tonic-aligned file HPCP of the beat-fit sets (benchmarks/beat_fit_set.py: 121 openings
and 70 chorales, none of them in the OOD set), and a file's keys are scored by consensus + w x learned (w = 0: the
product; a very large w: the learned profiles alone). Scores are mir_eval's weighted key score, weighted by the
file's number of 10 s windows as in benchmarks/ood_features.py; choose w on OOD dev, report on heldout.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 1e6)


def rotations(major: np.ndarray, minor: np.ndarray, h: np.ndarray) -> np.ndarray:
    """(24,) Pearson correlation of `h` with the 12 major then 12 minor rotations."""
    return np.array([np.corrcoef(h, np.roll(p, t))[0, 1] for p in (major, minor) for t in range(12)])


def main(argv=None) -> int:
    import mir_eval
    import pandas as pd

    from core.audio import iter_clips
    from core.config import load_section
    from pipelines.corpus_scores import key_correlations, key_name
    from pipelines.dataset import BuildDatasetParams
    from pipelines.features import ClipAnalyzer, FeatureParams, file_profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--fit", nargs="+", default=["data/beat_fit", "data/beat_fit_chorales"])
    ap.add_argument("--ood", default="data/ood")
    args = ap.parse_args(argv)

    build = load_section(BuildDatasetParams, args.params, "build_dataset")
    analyzer = ClipAnalyzer(FeatureParams.from_params(build))
    files = []
    for folder in [*args.fit, args.ood]:
        labels = pd.read_parquet(os.path.join(folder, "labels.parquet"))
        for _, row in labels.iterrows():
            path = os.path.join(folder, "audio", row["file"])
            _, clips = iter_clips(
                path, build.analysis_sample_rate, build.clip_seconds, build.hop_seconds, build.min_clip_seconds
            )
            pcps = [analyzer._key_pcp(wave) for _, _, wave in clips]
            profile = file_profile(pcps)
            files.append(
                dict(
                    split="fit" if folder != args.ood else row["split"],
                    windows=len(pcps),
                    h=np.zeros(12) if profile is None else np.roll(profile, -3),  # A-based -> C-based
                    tonic=mir_eval.key.KEY_TO_SEMITONE[row["key"].lower()],
                    mode=row["mode"],
                    ref=f"{row['key']} {row['mode']}",
                )
            )
    fit = [f for f in files if f["split"] == "fit"]
    learned = {
        mode: np.mean([np.roll(f["h"], -f["tonic"]) for f in fit if f["mode"] == mode], axis=0)
        for mode in ("major", "minor")
    }
    for mode, profile in learned.items():
        n = sum(f["mode"] == mode for f in fit)
        print(f"learned {mode} profile ({n} files; C = tonic):", np.round(profile / profile.max(), 2).tolist())

    print("| split | files | " + " | ".join("learned alone" if w >= 1e6 else f"w = {w:g}" for w in WEIGHTS) + " |")
    print("|---|---|" + "---|" * len(WEIGHTS))
    for split in ("fit", "dev", "heldout"):
        chosen = [f for f in files if f["split"] == split]
        scores = np.zeros((len(chosen), len(WEIGHTS)))
        for i, f in enumerate(chosen):
            corr, mine = key_correlations(f["h"]), rotations(learned["major"], learned["minor"], f["h"])
            for j, w in enumerate(WEIGHTS):
                best = int(np.argmax(corr + w * mine))
                est = f"{key_name(best % 12)} {'major' if best < 12 else 'minor'}"
                scores[i, j] = mir_eval.key.weighted_score(f["ref"], est)
        weights = np.array([f["windows"] for f in chosen], float)
        means = scores.T @ weights / weights.sum()
        print(f"| {split} | {len(chosen)} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
