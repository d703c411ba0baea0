"""Other steering directions for drums, built from the demo's probe data (docs/steering.md, "Other directions").

    python benchmarks/steering_directions.py --out /tmp/directions          # ~1.5 min after `make demo`
    python benchmarks/steering_push_terms.py --probes /tmp/directions/orthogonal --set split=valid \\
        --set takes_per_prompt=3 --modes smitin

Teacher-forces the drums probe set's stem pairs (the same clip rendered with and without its drum stem) through the
demo's generator, keeping every position's head outputs, and writes copies of `data/probes/drums` whose steering
direction (and its sigma on the tune split) is replaced:
- `onset`: the paired difference (with - without), weighted by the drum stem's onset strength at the frame each
  position predicts: what the model carries just before a hit;
- `hits`: within the drum renderings, positions before the stem's strongest 15% of onsets less the others;
- `orthogonal`: the shipped mass-mean direction with the head's brightness direction projected out. Brightness
  is the covariance of a head's output with the high band's level (log-mel bands 40-63) of the frame it predicts,
  on the renderings *without* drums, so it is what moves with a bright timbre rather than with drums.
Prints, per direction, the cosine with the shipped one; for `orthogonal`, each head's cosine between the shipped
direction and brightness. Probes (coef, intercept) and head weights are the shipped ones, so the monitor is unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.config import load_section  # noqa: E402
from models.probes import ProbeSet, ProbesParams, encode_clips, load_trait_clips, probe_params  # noqa: E402

SKIP = 20  # positions whose context is too short to say much
HIGH = slice(40, 64)


def capture_all_positions(generator, codes: torch.Tensor) -> np.ndarray:
    """Head outputs [positions, L, H, Dh] of one teacher-forced, unconditioned clip."""
    sites = generator.head_sites()
    outs: list = [None] * len(sites)
    handles = [
        s.register_forward_hook(lambda _m, _i, o, layer=layer: outs.__setitem__(layer, o[0]))
        for layer, s in enumerate(sites)
    ]
    try:
        with torch.no_grad():
            generator(codes.unsqueeze(0), condition=None)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs, 1).float().numpy()


def frame_series(values: np.ndarray, n_positions: int, n_prefix: int) -> np.ndarray:
    """Per position, the value of the codec frame it predicts (position n_prefix + s predicts frame s); nan
    elsewhere."""
    out = np.full(n_positions, np.nan)
    m = min(n_positions - n_prefix, len(values))
    out[n_prefix : n_prefix + m] = values[:m]
    return out


def unit(d: np.ndarray) -> np.ndarray:
    return d / (np.linalg.norm(d, axis=-1, keepdims=True) + 1e-12)


def main(argv=None) -> int:
    import librosa

    from models.generator import load_generator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--generator", default="data/generator")
    ap.add_argument("--probes", default="data/probes")
    ap.add_argument("--clips", default="data/clips")
    ap.add_argument("--out", required=True, help="folder for one probe-sets folder per direction")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    section = load_section(ProbesParams, args.params, "probes")
    params, source = probe_params(section, "drums")
    clips = load_trait_clips("drums", source, args.clips, params.split_fractions, params.seed)
    generator, codec = load_generator(args.generator)
    generator.eval()
    fps = float(codec.frame_rate)
    window = int(round(params.window_seconds * fps))
    pairs: dict[str, dict[int, object]] = {}
    for c in clips:
        pairs.setdefault(c.key, {})[c.label] = c
    keys = sorted(k for k, v in pairs.items() if set(v) == {0, 1})

    acts = {0: [], 1: []}
    onset, bright, split = [], [], []
    for key in keys:
        without, with_ = pairs[key][0], pairs[key][1]
        codes = encode_clips(codec, [with_, without], window)
        if codes[0].shape != codes[1].shape:
            continue
        a1, a0 = capture_all_positions(generator, codes[0]), capture_all_positions(generator, codes[1])
        acts[1].append(a1)
        acts[0].append(a0)
        sr, n = with_.sample_rate, min(len(with_.audio), len(without.audio))
        hop = int(round(sr / fps))
        stem = (with_.audio[:n] - without.audio[:n]).astype(np.float32)  # the renderings differ by the drum stem
        env = librosa.onset.onset_strength(y=stem, sr=sr, hop_length=hop)
        mel = librosa.power_to_db(
            librosa.feature.melspectrogram(y=without.audio.astype(np.float32), sr=sr, hop_length=hop, n_mels=64)
        )
        onset.append(frame_series(env, len(a1), generator.n_prefix))
        bright.append(frame_series(mel[HIGH].mean(0), len(a1), generator.n_prefix))
        split.append(with_.split)
    A1, A0 = np.stack(acts[1]), np.stack(acts[0])
    W, B, S = np.nan_to_num(np.stack(onset)), np.stack(bright), np.array(split)
    train, tune = S == "train", S == "tune"
    print(f"{len(S)} stem pairs ({train.sum()} train, {tune.sum()} tune), {A1.shape[1]} positions each")

    base = ProbeSet.load(os.path.join(args.probes, "drums"))
    a1, a0, w = A1[train, SKIP:], A0[train, SKIP:], W[train, SKIP:]
    weights = w / (w.sum(1, keepdims=True) + 1e-9)
    hits = w >= np.quantile(w, 0.85, axis=1, keepdims=True)
    directions = {
        "onset": unit(np.einsum("nt,ntlhd->lhd", weights, a1 - a0)),
        "hits": unit(
            np.einsum("nt,ntlhd->lhd", hits.astype(float), a1) / hits.sum()
            - np.einsum("nt,ntlhd->lhd", (~hits).astype(float), a1) / (~hits).sum()
        ),
    }
    # brightness: per head, the covariance of its output with the predicted frame's high-band level, drum-free
    x = A0[train, SKIP:].reshape(-1, *A0.shape[2:]).astype(np.float64)
    y = B[train, SKIP:].reshape(-1)
    keep = np.isfinite(y)
    x, y = x[keep] - x[keep].mean(0), y[keep] - y[keep].mean()
    brightness = unit(np.einsum("nlhd,n->lhd", x, y) / len(y))
    shipped = base.direction.astype(np.float64)
    along = (shipped * brightness).sum(-1)
    directions["orthogonal"] = unit(shipped - along[..., None] * brightness)
    print("cosine of the shipped direction with brightness, per layer (rows) and head:")
    print(np.array2string(along, precision=2, suppress_small=True))

    tune_last = np.concatenate([A1[tune, -1], A0[tune, -1]])
    print("| direction | cosine with the shipped one: mean | min | sigma / shipped sigma |")
    print("|---|---|---|---|")
    for name, d in directions.items():
        probe_set = ProbeSet.load(os.path.join(args.probes, "drums"))
        probe_set.direction = d.astype(np.float32)
        probe_set.sigma = np.einsum("nlhd,lhd->nlh", tune_last, d).std(0).astype(np.float32)
        probe_set.save(os.path.join(args.out, name, "drums"))
        cos = (d * shipped).sum(-1)
        ratio = float((probe_set.sigma / base.sigma).mean())
        print(f"| {name} | {cos.mean():+.2f} | {cos.min():+.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
