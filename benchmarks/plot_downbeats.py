"""Estimated against reference downbeats on OOD files, over a spectrogram (docs/ood_downbeats.png).

    python benchmarks/plot_downbeats.py                  # reads metrics/ood/estimates.json (benchmarks/ood_features.py)

One row per file: white lines are the reference downbeats; markers are each system's downbeats (the product's
clips stitched back into file time). Systems missing from the estimates are left out.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

FILES = ["haydn-opus1no1-movement4.flac", "schumann_clara-polonaise_op1n4.flac", "monteverdi-madrigal_3_2.flac"]
SYSTEMS = [("product", "lime", "v"), ("product-one_phase", "deepskyblue", "s"), ("madmom_downbeats", "orange", "o")]


def downbeats(estimate) -> list[float]:
    """A whole-file system's downbeats, or a clip system's stitched back into file time."""
    if isinstance(estimate, dict):
        return list(estimate.get("downbeats") or [])
    return [clip["start_s"] + t for clip in estimate for t in (clip.get("downbeats") or [])]


def main(argv=None) -> None:
    import librosa
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq
    import soundfile as sf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="data/ood")
    ap.add_argument("--estimates", default="metrics/ood/estimates.json")
    ap.add_argument("--files", nargs="+", default=FILES)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--out", default="docs/ood_downbeats.png")
    args = ap.parse_args(argv)
    estimates = json.load(open(args.estimates))
    labels = {r["file"]: r for r in pq.read_table(f"{args.set}/labels.parquet").to_pylist()}
    fig, axes = plt.subplots(len(args.files), 1, figsize=(14, 3.2 * len(args.files)), squeeze=False)
    for ax, name in zip(axes[:, 0], args.files):
        wave, sr = sf.read(f"{args.set}/audio/{name}", dtype="float32", always_2d=True)
        wave = wave.mean(axis=1)[: int(args.seconds * sr)]
        spec = librosa.amplitude_to_db(np.abs(librosa.stft(wave, n_fft=2048, hop_length=512)), ref=np.max)
        top = 200  # bins: up to ~4.3 kHz
        ax.imshow(
            spec[:top],
            origin="lower",
            aspect="auto",
            extent=[0, len(wave) / sr, 0, top * sr / 2048],
            cmap="magma",
            vmin=-70,
        )
        for t in labels[name]["downbeats_s"]:
            ax.axvline(t, color="white", lw=1.5, alpha=0.8)
        for k, (system, colour, marker) in enumerate(s for s in SYSTEMS if s[0] in estimates):
            times = downbeats(estimates[system][name])
            ax.plot(times, [3700 - 1000 * k] * len(times), marker, color=colour, mec="black", ms=9, label=system)
        ax.set_title(f"{name} ({labels[name]['time_signature']}): white lines are the reference downbeats")
        ax.set_xlim(0, args.seconds)
        ax.set_ylabel("Hz")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=60)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(args.out, optimize=True)  # a third of the bytes
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
