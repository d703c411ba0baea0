"""Where is a trait readable? Probe accuracy of one head (what SMITIN uses) against wider readers on the same clips:
a layer's heads together, all heads together, each at the last position and averaged over time, plus two readers
that do not use the generator: a logistic regression on a bag of the window's codec codes, and (drums) the
independent drum detector on the decoded window. Prints a table.

Same data, splits and window as `smitin probes train` (params `probes`): readers are fitted on the probe set's
train split and scored on its valid split (balanced accuracy, as the probe sets report). If the wider readers score
far above the best head, the information is in the generator but spread over heads; if the codes or audio score far
above every generator reader, the generator does not hold it.

    python benchmarks/probe_ceiling.py [--trait drums] [--generator data/generator] [--clips data/clips]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import load_section  # noqa: E402
from models.generator import load_generator  # noqa: E402
from models.probes import ProbesParams, capture_head_outputs, encode_clips, load_trait_clips, probe_params  # noqa: E402


def accuracy(X: np.ndarray, y: np.ndarray, train: np.ndarray, valid: np.ndarray, C: float) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
    model.fit(X[train], y[train])
    return float(balanced_accuracy_score(y[valid], model.predict(X[valid])))  # as the probe sets report it


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trait", default="drums")
    ap.add_argument("--generator", default="data/generator")
    ap.add_argument("--clips", default="data/clips")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--detector", default="metrics/drum_detector.json", help="drums: the saved independent detector")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    generator, codec = load_generator(args.generator)
    params, source = probe_params(load_section(ProbesParams, args.params, "probes"), args.trait)
    C = params.C
    clips = load_trait_clips(args.trait, source, args.clips, params.split_fractions, params.seed, None, None)
    window = int(round(params.window_seconds * codec.frame_rate)) if params.window_seconds else None
    codes = encode_clips(codec, clips, window)
    y = np.array([c.label for c in clips])
    split = np.array([c.split for c in clips])
    train, valid = split == "train", split == "valid"
    print(
        f"trait {args.trait}: {train.sum()} train / {valid.sum()} valid clips, {window}-frame windows, "
        f"generator {generator.n_layers} layers x {generator.n_heads} heads of {generator.head_dim}"
    )
    rows: list[tuple[str, str, float]] = []
    for position in ("last", "mean"):
        acts = capture_head_outputs(generator, codes, position, params.batch_size)
        N, L, H, _ = acts.shape
        heads = [accuracy(acts[:, layer, head], y, train, valid, C) for layer in range(L) for head in range(H)]
        layers = [accuracy(acts[:, layer].reshape(N, -1), y, train, valid, C) for layer in range(L)]
        rows += [
            (f"best single head ({position})", "generator", max(heads)),
            (f"median head ({position})", "generator", float(np.median(heads))),
            (f"best layer, its {H} heads together ({position})", "generator", max(layers)),
            (
                f"all {L * H} heads together ({position})",
                "generator",
                accuracy(acts.reshape(N, -1), y, train, valid, C),
            ),
        ]
    card = int(getattr(codec, "card", 0)) or max(int(c.max()) for c in codes) + 1  # codebook size
    bags = np.stack(
        [np.concatenate([np.bincount(c[k].numpy(), minlength=card) for k in range(c.shape[0])]) for c in codes]
    ).astype(np.float32)
    rows.append(("bag of the window's codes", "tokens", accuracy(bags, y, train, valid, 0.05)))
    if args.trait == "drums" and Path(args.detector).exists():
        from models.detectors import DrumDetector

        detector = DrumDetector.load(args.detector)
        idx = np.flatnonzero(valid)
        fitted = int(round(float(detector.info.get("seconds", 2.0)) * codec.frame_rate))  # the length it was fitted on
        for name, start in ((f"the window's last {fitted} frames", window - fitted), ("the whole window", 0)):
            p = np.array(
                [detector.probability(codec.decode(codes[i][:, max(0, start) :]), codec.sample_rate) for i in idx]
            )
            rows.append(
                (
                    f"independent drum detector, decoded: {name}",
                    "audio",
                    float(balanced_accuracy_score(y[idx], p > 0.5)),
                )
            )
    print("| reader | reads | valid balanced accuracy |")
    print("|---|---|---|")
    for name, reads, acc in rows:
        print(f"| {name} | {reads} | {acc:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
