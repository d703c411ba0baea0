"""Codec reconstruction quality and speed on held-out clips, against baselines in the same run.

    python benchmarks/codec.py --codec data/codec --clips data/clips --split test --clips-n 24

Rows: the fitted mel-RVQ codec with its learned inversion (default) and with the mel pseudo-inverse, the same with
only the first k codebooks, and the unquantised log-mel through each inversion (the ceiling that quantisation
cannot beat). Metrics (lower is better), all at the codec's sample rate against the resampled original:
multi-resolution STFT distance (spectral convergence + mean |log-magnitude| difference, FFT sizes 512/1024/2048)
and log-mel distance (mean |difference| of 64-band natural-log mel power, dB-like units / 4.34). Speed: seconds of
audio encoded / decoded per wall-clock second (x real time), one thread per process as measured.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def mrstft_distance(ref: np.ndarray, est: np.ndarray) -> float:
    n = min(len(ref), len(est))
    ref, est = torch.from_numpy(ref[:n].copy()), torch.from_numpy(est[:n].copy())
    total = 0.0
    for n_fft in (512, 1024, 2048):
        win = torch.hann_window(n_fft)
        R = torch.stft(ref, n_fft, n_fft // 4, window=win, return_complex=True).abs()
        E = torch.stft(est, n_fft, n_fft // 4, window=win, return_complex=True).abs()
        sc = torch.linalg.norm(R - E) / (torch.linalg.norm(R) + 1e-9)
        mag = (torch.log(R + 1e-5) - torch.log(E + 1e-5)).abs().mean()
        total += float(sc + mag)
    return total / 3


def logmel_distance(ref: np.ndarray, est: np.ndarray, sr: int) -> float:
    import librosa

    n = min(len(ref), len(est))
    a = np.log(librosa.feature.melspectrogram(y=ref[:n], sr=sr, n_fft=1024, hop_length=256, n_mels=64) + 1e-6)
    b = np.log(librosa.feature.melspectrogram(y=est[:n], sr=sr, n_fft=1024, hop_length=256, n_mels=64) + 1e-6)
    return float(np.abs(a - b).mean())


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

    rows = []

    def measure(name: str, fn) -> None:
        mr, lm, t_dec = [], [], 0.0
        for ref, (w, s) in zip(refs, waves):
            t0 = time.perf_counter()
            est = fn(w, s)
            t_dec += time.perf_counter() - t0
            mr.append(mrstft_distance(ref, est))
            lm.append(logmel_distance(ref, est, sr))
        rows.append((name, float(np.mean(mr)), float(np.mean(lm)), seconds / t_dec))

    t0 = time.perf_counter()
    codes = [codec.encode(w, s) for w, s in waves]
    encode_xrt = seconds / (time.perf_counter() - t0)
    code_iter = iter(codes * 100)

    def rvq(k: int, inversion: str):
        def fn(w, s):
            c = next(code_iter)
            feats = sum(codec.codebooks[j][c[j]] for j in range(k))
            return codec.features_to_wave(feats, inversion)

        return fn

    def unquantised(inversion: str):
        return lambda w, s: codec.features_to_wave(codec.features(w, s), inversion)

    K = codec.n_codebooks
    measure("baseline: silence", lambda w, s: np.zeros(int(len(w) * sr / s), np.float32) + 1e-4)
    measure(f"mel-RVQ K={K}, pinv + Griffin-Lim", rvq(K, "pinv"))
    for k in range(1, K + 1):
        measure(f"mel-RVQ K={k}, learned + Griffin-Lim{' (default)' if k == K else ''}", rvq(k, "learned"))
    measure("unquantised log-mel, pinv + GL (ceiling)", unquantised("pinv"))
    measure("unquantised log-mel, learned + GL (ceiling)", unquantised("learned"))
    kbps = K * np.log2(codec.card) * codec.frame_rate / 1000
    print(
        f"codec: {K} x {codec.card} codes, {codec.frame_rate:.1f} frames/s ({kbps:.2f} kbit/s), {sr} Hz; "
        f"{len(refs)} {args.split} clips, {seconds:.0f} s; encode {encode_xrt:.0f}x real time "
        f"({args.threads} thread)"
    )
    print(f"| {'decoder':48s} | MR-STFT dist | log-mel dist | decode x real time |")
    print(f"|{'-' * 50}|--------------|--------------|--------------------|")
    for name, mr, lm, xrt in rows:
        print(f"| {name:48s} | {mr:12.3f} | {lm:12.3f} | {xrt:18.1f} |")


if __name__ == "__main__":
    main()
