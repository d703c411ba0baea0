"""Peer trackers on the out-of-domain set, inside their own virtualenv (benchmarks/ood_peers_setup.sh).

    benchmarks/.venv-peers/bin/python benchmarks/ood_peers_run.py --manifest data/ood/manifest.json \
        --out metrics/ood/peers.json [--systems madmom,beatnet]

Runs on whole files and writes, per system and file, plain estimates (times in seconds from the file's start):
{"systems": {name: {file: {"beats": [...], "downbeats": [...] | null, "meter": int | null, "key": "C major" | null,
"seconds": float}}}, "errors": {name: message}}. Scoring happens in the product's venv (benchmarks/ood_features.py).
This script imports nothing from the project: the peers' venv holds numpy < 2, the project's does not.

- madmom_beats: RNNBeatProcessor + DBNBeatTrackingProcessor (fps 100), and madmom's CNN key recogniser.
- madmom_downbeats: RNNDownBeatProcessor + DBNDownBeatTrackingProcessor (beats_per_bar 2, 3, 4; fps 100); the
  meter is the bar length of the decoded beat positions.
- beatnet: BeatNet model 1, offline mode, DBN inference (its joint beat / downbeat particle-free decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def load_signal(path: str):
    """The file as a mono madmom Signal (madmom reads FLAC only through ffmpeg, which this machine lacks)."""
    import soundfile as sf
    from madmom.audio.signal import Signal

    wave, sr = sf.read(path, dtype="float32", always_2d=True)
    return Signal(wave.mean(axis=1), sample_rate=sr, num_channels=1)


def madmom_beats(path: str) -> dict:
    from madmom.features.beats import DBNBeatTrackingProcessor, RNNBeatProcessor

    signal = load_signal(path)
    act = RNNBeatProcessor()(signal)
    beats = DBNBeatTrackingProcessor(fps=100)(act)
    out = {"beats": [float(b) for b in beats], "downbeats": None, "meter": None, "key": None}
    try:
        from madmom.features.key import CNNKeyRecognitionProcessor, key_prediction_to_label

        label = key_prediction_to_label(CNNKeyRecognitionProcessor()(signal))  # e.g. "A minor", "Db major"
        out["key"] = str(label)
    except ImportError:  # a madmom without the key model
        pass
    return out


def madmom_downbeats(path: str) -> dict:
    import numpy as np
    from madmom.features.downbeats import DBNDownBeatTrackingProcessor, RNNDownBeatProcessor

    act = RNNDownBeatProcessor()(load_signal(path))
    return _bar_positions(np.asarray(DBNDownBeatTrackingProcessor(beats_per_bar=[2, 3, 4], fps=100)(act)))


def _bar_positions(res) -> dict:
    """A tracker's [n, 2] (beat time, position in the bar; 1 = downbeat) as this script's result."""
    if not len(res):
        return {"beats": [], "downbeats": [], "meter": None, "key": None}
    return {
        "beats": [float(t) for t in res[:, 0]],
        "downbeats": [float(t) for t, p in res if int(p) == 1],
        "meter": int(res[:, 1].max()),
        "key": None,
    }


_BEATNET = None


def beatnet(path: str) -> dict:
    global _BEATNET
    import numpy as np

    if _BEATNET is None:
        from BeatNet.BeatNet import BeatNet

        _BEATNET = BeatNet(1, mode="offline", inference_model="DBN", plot=[], thread=False)
    return _bar_positions(np.asarray(_BEATNET.process(path)))


SYSTEMS = {"madmom_beats": madmom_beats, "madmom_downbeats": madmom_downbeats, "beatnet": beatnet}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    args = ap.parse_args()
    with open(args.manifest) as f:
        files = json.load(f)["files"]
    results: dict = {"systems": {}, "errors": {}}
    for name in [s for s in args.systems.split(",") if s]:
        fn = SYSTEMS[name]
        per_file = {}
        t0 = time.time()
        try:
            for row in files:
                t = time.time()
                est = fn(row["path"])
                est["seconds"] = round(time.time() - t, 2)
                per_file[row["file"]] = est
        except Exception as e:  # the whole system fails (an import, a model): reported, the others still run
            results["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
            print(f"{name}: FAILED {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        results["systems"][name] = per_file
        print(f"{name}: {len(per_file)} files in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
