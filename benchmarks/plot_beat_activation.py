"""The learned beat / downbeat activation on the first 10 s of a few OOD dev files, with the tempo HMM's beats and
the reference beats and downbeats (docs/ood_beat_network.png).

    python benchmarks/plot_beat_activation.py [--set data/ood] [--model builtin] [--out docs/ood_beat_network.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.beat_hmm import BeatHMM  # noqa: E402
from pipelines.beat_network import FPS, BeatNetwork, spectral_frames  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="data/ood")
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--out", default="docs/ood_beat_network.png")
    ap.add_argument("--meters", default="4/4,3/4", help="plot the first dev file of each of these time signatures")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import soundfile as sf

    net = BeatNetwork.load(args.model)
    with open(os.path.join(args.set, "manifest.json")) as f:
        files = [r for r in json.load(f)["files"] if r["split"] == "dev"]
    wanted = args.meters.split(",")
    pick = [next(r for r in files if r["time_signature"] == ts) for ts in wanted]
    pick += [r for r in files if r["time_signature"] == wanted[0] and r not in pick][:1]
    fig, axes = plt.subplots(len(pick), 1, figsize=(14, 3.2 * len(pick)), squeeze=False)
    for ax, r in zip(axes[:, 0], pick):
        wave, sr = sf.read(r["path"], dtype="float32", always_2d=True)
        wave = wave.mean(axis=1)[: sr * 10]
        act = net.activations(spectral_frames(wave, sr, net.features))
        beats = BeatHMM(fps=FPS).decode(act[:, 0])
        t = np.arange(len(act)) / FPS
        ax.plot(t, act[:, 0], lw=0.8, label="beat activation")
        ax.plot(t, act[:, 1], lw=0.8, label="downbeat activation")
        ax.vlines([b for b in r["beats_s"] if b < 10], 0.9, 1.0, color="k", label="reference beats")
        ax.vlines([b for b in r["downbeats_s"] if b < 10], 0.75, 1.0, color="r", lw=2, label="reference downbeats")
        ax.vlines(beats, -0.1, 0.0, color="g", label="HMM beats")
        ax.set_title(f"{r['file']} ({r['time_signature']}, {r['family']}, {r['soundfont']}, {r['tempo_mode']})")
        ax.set_xlim(0, 10)
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=5)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
