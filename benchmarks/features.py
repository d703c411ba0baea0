"""Throughput of `smitin dataset build` (Beam, local worker processes) vs a naive sequential librosa script.

Both compute comparable features on the same audio in the same run: tempo + beats, key, beat-synchronous
chords, loudness; the pipeline also writes FLAC clips, captions and Parquet. Prints a table; the targets
(issue 2) are >= 150x real time for the pipeline on 2 cores and >= 3x the naive script.

    python benchmarks/features.py [--minutes 20] [--workers 2] [--input DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.audio import AUDIO_EXTENSIONS  # noqa: E402
from core.config import load_section  # noqa: E402
from pipelines.dataset import BuildDatasetParams, build_dataset  # noqa: E402
from tests.synth import chord_sequence  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def make_audio(folder: Path, minutes: float, seconds_per_file: float = 90.0) -> None:
    rng = np.random.default_rng(0)
    roots = ["C", "D", "E", "F", "G", "A", "Bb"]
    n = int(np.ceil(minutes * 60 / seconds_per_file))
    for i in range(n):
        prog = [(roots[j], q) for j, q in zip(rng.integers(0, 7, 4), rng.choice(["maj", "min"], 4))]
        wave, _ = chord_sequence(prog, float(rng.uniform(80, 160)), 4, seconds_per_file)
        sf.write(folder / f"piece{i:03d}.flac", wave, 44100)


def naive_file(path: str, harmonic: bool = True) -> dict:
    """What a first script would do: librosa, one file at a time, one process. With `harmonic`, chroma is
    taken from the harmonic part (HPSS), as librosa's documentation does for chord/key features."""
    import librosa
    import pyloudnorm

    y, sr = librosa.load(path, sr=22050, mono=True)
    tempo, beat_frames = librosa.beat.beat_track(y=y, sr=sr)
    beats = librosa.frames_to_time(beat_frames, sr=sr)
    bpm = 60.0 / np.median(np.diff(beats)) if len(beats) > 1 else float(tempo)
    chroma = librosa.feature.chroma_cqt(y=librosa.effects.harmonic(y) if harmonic else y, sr=sr)
    profile = chroma.mean(axis=1)
    scores = [np.corrcoef(np.roll(t, k), profile)[0, 1] for t in (MAJOR, MINOR) for k in range(12)]
    key = int(np.argmax(scores))
    sync = librosa.util.sync(chroma, beat_frames, aggregate=np.median)
    templates = np.zeros((24, 12))
    for r in range(12):
        templates[r, [r, (r + 4) % 12, (r + 7) % 12]] = 1
        templates[12 + r, [r, (r + 3) % 12, (r + 7) % 12]] = 1
    chords = np.argmax(templates @ sync, axis=0)
    lufs = pyloudnorm.Meter(sr).integrated_loudness(y.astype(np.float64))
    return {"bpm": bpm, "key": key, "n_chords": len(chords), "lufs": lufs}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the Beam worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def audio_seconds(folder: Path) -> float:
    return sum(sf.info(str(p)).duration for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="synthetic audio to make when no --input")
    ap.add_argument("--input", default=None, help="a folder of audio to use instead")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = Path(args.input) if args.input else tmp / "audio"
        if not args.input:
            src.mkdir()
            make_audio(src, args.minutes)
        total = audio_seconds(src)
        files = sorted(str(p) for p in src.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)

        import librosa  # warm-up outside the timing (numba compilation happens once per process)

        y = np.random.default_rng(0).standard_normal(22050 * 3).astype(np.float32)
        librosa.beat.beat_track(y=y, sr=22050)
        librosa.feature.chroma_cqt(y=y, sr=22050)

        rows = []
        for name, harmonic in (
            ("naive librosa script, HPSS + CQT chroma (1 proc): baseline", True),
            ("naive librosa script, CQT chroma without HPSS (1 proc)", False),
        ):
            t0, c0 = time.perf_counter(), cpu_seconds()
            for f in files:
                naive_file(f, harmonic=harmonic)
            rows.append((name, time.perf_counter() - t0, cpu_seconds() - c0))

        params = load_section(BuildDatasetParams, ROOT / "params.yaml", "build_dataset")
        essentia = {"beat_tracker": "essentia", "downbeat_network_weight": 0.0}
        variants = {
            "beats=essentia multifeature": {**essentia, "rhythm_method": "multifeature"},
            "beats=essentia degara": {**essentia, "rhythm_method": "degara"},
            "beats=network, each clip alone": {"beat_tracker": "network", "beat_context_seconds": 0.0},
            "beats=network (default)": {"beat_tracker": "network"},
        }
        for i, (label, update) in enumerate(variants.items()):
            p = params.model_copy(update=update)
            t0, c0 = time.perf_counter(), cpu_seconds()
            build_dataset(str(src), str(tmp / f"clips-{i}"), p, workers=args.workers)
            rows.append(
                (
                    f"smitin dataset build (Beam, {args.workers} procs, {label})",
                    time.perf_counter() - t0,
                    cpu_seconds() - c0,
                )
            )

    load = os.getloadavg()[0]
    print(
        f"\naudio: {len(files)} files, {total / 60:.1f} min; machine: {os.cpu_count()} cores, "
        f"load average {load:.2f} at the end\n"
    )
    base_wall = rows[0][1]
    print(
        f"| {'method':<60} | {'wall s':>7} | {'x real time':>11} | {'vs baseline':>11} | {'CPU s':>7} |"
        f" {'audio s / CPU s':>15} |"
    )
    print(f"|{'-' * 62}|{'-' * 9}|{'-' * 13}|{'-' * 13}|{'-' * 9}|{'-' * 17}|")
    for name, wall, cpu in rows:
        print(
            f"| {name:<60} | {wall:7.1f} | {total / wall:11.1f} | {base_wall / wall:11.2f} | {cpu:7.1f} |"
            f" {total / cpu:15.1f} |"
        )
    print(
        "\nWall times include the Beam workers' start-up, FLAC/Parquet writing and captions. CPU s counts this "
        "process and its worker processes; on a busy machine the wall numbers understate what 2 free cores do."
    )


if __name__ == "__main__":
    main()
