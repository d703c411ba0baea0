"""Codec reconstruction quality and speed on held-out clips, against baselines in the same run.

    python benchmarks/codec.py --codec data/codec --clips data/clips --split test --clips-n 24 --png-dir plots/codec

Rows, all from the one fitted codec (same codebooks, so the same tokens):
- the learned decoder network on the codes (the default when the codec has one) and on the first k codebooks;
- Griffin-Lim on the codes, with the learned (ridge) and the pseudo-inverse mel->magnitude maps (Griffin-Lim with
  the learned map is the decoder every codec had before the network; the `vs GL` column is relative to it);
- oracles: the decoder network and Griffin-Lim fed the unquantised log-mel (what quantisation cannot beat);
- silence.
Metrics, all at the codec's sample rate against the resampled original:
- MR-STFT distance: spectral convergence + mean |log-magnitude| difference, FFT sizes 512/1024/2048 (lower is better);
- log-mel distance: mean |difference| of 64-band natural-log mel power (lower is better);
- chroma: mean cosine similarity of 12-bin chroma frames, where the original is not silent (higher is better);
- partial F: F-measure of spectral peaks (2048-point frames, peaks within 40 dB of the frame's loudest, matched
  within one bin: 7.8 Hz) - are the harmonics where the original has them (higher is better);
- decode speed: seconds of audio per wall-clock second (x real time), `--threads` torch threads.
`--png-dir` writes one clip's spectrogram through each decoder (the same colour scale) to look at.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

PEAK_FFT, PEAK_HOP, PEAK_RANGE_DB = 2048, 512, 40.0


def mrstft_distance(ref: np.ndarray, est: np.ndarray) -> float:
    from models.codec_decoder import mrstft_distance as distance

    n = min(len(ref), len(est))
    return float(distance(torch.from_numpy(ref[:n].copy())[None], torch.from_numpy(est[:n].copy())[None]))


def logmel_distance(ref: np.ndarray, est: np.ndarray, sr: int) -> float:
    import librosa

    n = min(len(ref), len(est))
    a = np.log(librosa.feature.melspectrogram(y=ref[:n], sr=sr, n_fft=1024, hop_length=256, n_mels=64) + 1e-6)
    b = np.log(librosa.feature.melspectrogram(y=est[:n], sr=sr, n_fft=1024, hop_length=256, n_mels=64) + 1e-6)
    return float(np.abs(a - b).mean())


def _magnitude(x: np.ndarray) -> np.ndarray:
    win = torch.hann_window(PEAK_FFT)
    return torch.stft(torch.from_numpy(x.copy()), PEAK_FFT, PEAK_HOP, window=win, return_complex=True).abs().numpy()


def _audible(mag: np.ndarray) -> np.ndarray:
    """Frames within 50 dB of the clip's loudest frame (silence has no harmonics to keep)."""
    peak = mag.max(axis=0)
    return peak > peak.max() * 10 ** (-50 / 20) if peak.size else peak.astype(bool)


def chroma_agreement(ref: np.ndarray, est: np.ndarray, sr: int) -> float:
    import librosa

    n = min(len(ref), len(est))
    a = librosa.feature.chroma_stft(S=_magnitude(ref[:n]) ** 2, sr=sr, n_fft=PEAK_FFT)
    b = librosa.feature.chroma_stft(S=_magnitude(est[:n]) ** 2, sr=sr, n_fft=PEAK_FFT)
    keep = _audible(_magnitude(ref[:n]))
    cos = (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + 1e-9)
    return float(cos[keep].mean()) if keep.any() else float("nan")


def _peaks(mag: np.ndarray) -> np.ndarray:
    """Boolean [freq, frames]: local maxima along frequency within PEAK_RANGE_DB of the frame's loudest bin."""
    floor = mag.max(axis=0, keepdims=True) * 10 ** (-PEAK_RANGE_DB / 20)
    peak = np.zeros_like(mag, dtype=bool)
    peak[1:-1] = (mag[1:-1] > mag[:-2]) & (mag[1:-1] >= mag[2:]) & (mag[1:-1] > floor)
    return peak


def partial_f(ref: np.ndarray, est: np.ndarray) -> float:
    n = min(len(ref), len(est))
    R, E = _magnitude(ref[:n]), _magnitude(est[:n])
    keep = _audible(R)
    pr, pe = _peaks(R)[:, keep], _peaks(E)[:, keep]

    def near(p: np.ndarray) -> np.ndarray:  # a peak within one bin
        out = p.copy()
        out[1:] |= p[:-1]
        out[:-1] |= p[1:]
        return out

    hits_ref = (pr & near(pe)).sum()  # reference partials the estimate has
    hits_est = (pe & near(pr)).sum()  # estimate peaks the reference has
    recall, precision = hits_ref / max(pr.sum(), 1), hits_est / max(pe.sum(), 1)
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def save_spectrograms(path: Path, ref: np.ndarray, named: dict[str, np.ndarray], sr: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"original": ref, **named}
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.3 * len(panels)), sharex=True)
    top = 20 * np.log10(_magnitude(ref).max() + 1e-9)
    for ax, (name, x) in zip(axes, panels.items()):
        db = 20 * np.log10(_magnitude(x[: len(ref)]) + 1e-9)
        seconds = db.shape[1] * PEAK_HOP / sr
        ax.imshow(db, origin="lower", aspect="auto", vmin=top - 80, vmax=top, cmap="magma",
                  extent=[0, seconds, 0, sr / 2000])  # fmt: skip
        ax.set_ylabel("kHz")
        ax.set_title(name, fontsize=9, loc="left")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    from core.audio import decode_flac, resample
    from models.codec import load_codec
    from models.train import read_clips

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", default="data/codec")
    ap.add_argument("--clips", default="data/clips")
    ap.add_argument("--split", default="test")
    ap.add_argument("--clips-n", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png-dir", default=None, help="write one clip's spectrograms through each decoder here")
    ap.add_argument("--png-clip", type=int, default=0, help="which of the measured clips to draw")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    codec = load_codec(args.codec)
    table = read_clips(args.clips, args.split, ["audio"])
    n = min(args.clips_n, table.num_rows)
    step = max(1, table.num_rows // n)
    waves = [decode_flac(table["audio"][i].as_py()["bytes"]) for i in range(0, table.num_rows, step)][:n]
    sr = codec.sample_rate
    refs = [resample(w, s, sr) for w, s in waves]
    seconds = sum(len(r) for r in refs) / sr
    has_network = codec.network is not None

    rows, drawn = [], {}

    def measure(name: str, fn, draw: str | None = None) -> None:
        scores, t_dec = [], 0.0
        for i, (ref, feats) in enumerate(zip(refs, features)):
            t0 = time.perf_counter()
            est = fn(i, feats)
            t_dec += time.perf_counter() - t0
            scores.append(
                (
                    mrstft_distance(ref, est),
                    logmel_distance(ref, est, sr),
                    chroma_agreement(ref, est, sr),
                    partial_f(ref, est),
                )
            )
            if draw and i == args.png_clip:
                drawn[draw] = est
        rows.append((name, *np.nanmean(scores, axis=0), seconds / t_dec))

    t0 = time.perf_counter()
    codes = [codec.encode(w, s) for w, s in waves]
    encode_xrt = seconds / (time.perf_counter() - t0)
    features = [codec.features(w, s) for w, s in waves]

    def rvq(k: int, decoder: str, inversion: str | None = None):
        def fn(i, feats):
            return codec.features_to_wave(
                sum(codec.codebooks[j][codes[i][j]] for j in range(k)), inversion=inversion, decoder=decoder
            )

        return fn

    def unquantised(decoder: str):
        return lambda i, feats: codec.features_to_wave(feats, decoder=decoder)

    K = codec.n_codebooks
    measure("baseline: silence", lambda i, feats: np.zeros(len(refs[i]), np.float32) + 1e-4)
    if has_network:
        for k in range(K, 0, -1):
            tag = " (default)" if k == K and codec.decoder == "network" else ""
            measure(f"mel-RVQ K={k}, decoder network{tag}", rvq(k, "network"), "decoder network" if k == K else None)
    measure(f"mel-RVQ K={K}, pinv + Griffin-Lim", rvq(K, "griffin_lim", "pinv"))
    for k in range(K, 0, -1):
        tag = " (before the network)" if k == K else ""
        draw = "Griffin-Lim (the decoder before the network)" if k == K else None
        measure(f"mel-RVQ K={k}, learned + Griffin-Lim{tag}", rvq(k, "griffin_lim", "learned"), draw)
    if has_network:
        measure("oracle: unquantised log-mel, decoder network", unquantised("network"), "oracle: unquantised, network")
    measure("oracle: unquantised log-mel, learned + GL", unquantised("griffin_lim"))

    kbps = K * np.log2(codec.card) * codec.frame_rate / 1000
    print(
        f"codec: {K} x {codec.card} codes, {codec.frame_rate:.1f} frames/s ({kbps:.2f} kbit/s), {sr} Hz; "
        f"{len(refs)} {args.split} clips, {seconds:.0f} s; encode {encode_xrt:.0f}x real time "
        f"({args.threads} thread{'s' if args.threads > 1 else ''})"
    )
    gl = next(r for r in rows if "(before the network)" in r[0])
    print(f"| {'decoder':52s} | MR-STFT dist | vs GL | log-mel dist | chroma | partial F | decode x real time |")
    print(f"|{'-' * 54}|--------------|-------|--------------|--------|-----------|--------------------|")
    for name, mr, lm, ch, pf, xrt in rows:
        print(f"| {name:52s} | {mr:12.3f} | {mr / gl[1]:5.2f} | {lm:12.3f} | {ch:6.3f} | {pf:9.3f} | {xrt:18.1f} |")
    if args.png_dir:
        path = Path(args.png_dir) / f"codec_{args.split}_clip{args.png_clip}.png"
        save_spectrograms(path, refs[args.png_clip], drawn, sr)
        print(f"spectrograms -> {path}")


if __name__ == "__main__":
    main()
