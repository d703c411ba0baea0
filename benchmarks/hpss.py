"""The drum judges' harmonic/percussive separation: `models.detectors.hpss` against librosa.decompose.hpss, the
baseline, in the same run, on the same spectrograms; checks that the values are identical and prints the time of each.

    python benchmarks/hpss.py [--audio 'data/corpus/audio/*.flac'] [--segments 200] [--seconds 3]

Segments are cut from the audio at 16 kHz (the codec's rate) and turned into the magnitude STFT the detector
uses (`models.detectors.spectral_parts`, FFT 1024, hop 256). Both separations run single-threaded.
"""

from __future__ import annotations

import argparse
import glob
import time

import librosa
import numpy as np

from models.detectors import hpss


def _spectrograms(pattern: str, n: int, seconds: float) -> list[np.ndarray]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no audio matches {pattern!r}")
    out, size = [], int(seconds * 16000)
    for path in files:
        wave, _ = librosa.load(path, sr=16000, mono=True)
        for start in range(0, len(wave) - size + 1, size):
            seg = wave[start : start + size]
            seg = seg / (np.abs(seg).max() + 1e-6)
            out.append(np.abs(librosa.stft(seg, n_fft=1024, hop_length=256)))
            if len(out) == n:
                return out
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audio", default="data/corpus/audio/*.flac")
    ap.add_argument("--segments", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    specs = _spectrograms(args.audio, args.segments, args.seconds)
    times, results = {}, {}
    for name, separate in [
        ("librosa.decompose.hpss (baseline)", lambda S: librosa.decompose.hpss(S, margin=1.0)),
        ("models.detectors.hpss", hpss),
    ]:
        t0 = time.perf_counter()
        results[name] = [separate(S) for S in specs]
        times[name] = time.perf_counter() - t0
    base, fast = results.values()
    same = all(np.array_equal(a, b) for x, y in zip(base, fast) for a, b in zip(x, y))
    print(f"{len(specs)} segments of {args.seconds:g} s ({specs[0].shape[1]} frames x {specs[0].shape[0]} bins)")
    print("| separation | ms a segment | x baseline |")
    print("|---|---|---|")
    first = next(iter(times.values()))
    for name, t in times.items():
        print(f"| {name} | {1000 * t / len(specs):.1f} | {first / t:.2f} |")
    print(f"identical values: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
