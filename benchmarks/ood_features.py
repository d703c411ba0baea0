"""The product's feature extractors against peers on the out-of-domain set (benchmarks/ood_set.py).

    python benchmarks/ood_set.py --out data/ood                     # once (~3 min)
    bash benchmarks/ood_peers_setup.sh                               # once: madmom + BeatNet in their own venv
    python benchmarks/ood_features.py [--set data/ood] [--out metrics/ood] [--systems product,essentia,...]

Systems, all on the same files:
- `product`: `smitin dataset build` itself (`build_dataset` with params.yaml's `build_dataset` section: 10 s clips,
  file-level key and bar-phase context), its clips table read back.
- `essentia`: essentia's defaults on the whole file: RhythmExtractor2013(method="multifeature") beats,
  KeyExtractor() (default profile) key. No downbeats, no meter.
- `librosa`: librosa.beat.beat_track on the whole file (22.05 kHz) and a Krumhansl-Kessler template matched to
  the mean CQT chroma (the naive script of benchmarks/features.py). No downbeats, no meter.
- `madmom_beats`, `madmom_downbeats`, `beatnet`: the peers' venv (benchmarks/ood_peers_run.py, see there);
  left out with a message when that venv is missing or a peer fails.

Scoring (mir_eval, through `pipelines.evaluate.evaluate_clip`): every system is scored in the product's clip
windows (10 s, the same cut `core.audio.iter_clips` makes), whole-file estimates cut to each window, so the numbers
read like the in-domain table of `smitin dataset eval`:
- key: mir_eval weighted score against the excerpt's global key (`key_w`, the primary number: the peers name one
  key per file; the product's `file_key`, its whole-file key) and against the local key segment covering most of
  the window (`key_w_local`: the product's clip `key`; the peers' one key).
- tempo Acc1 / Acc2 (4 %; Acc2 also at x2, x3, x1/2, x1/3): estimate = 60 / median inter-beat interval of the
  system's beats inside the window (the product computes its clip tempo so), reference = the same on the
  labelled beats of the window (the local tempo: a third of the files slow down or change tempo).
- beat F and downbeat F: mir_eval F-measure (70 ms) in the window.
- meter: accuracy of the beats-per-bar count (the reference counts beats in the labels' beat unit: 3/4 -> 3,
  4/4 and 2/2 -> 4, 2/4 -> 2, 6/8 -> 2, 3/8 -> 3, 9/8 -> 3), for the systems that estimate one.
Means over windows, per split (`dev` for choices, `heldout` for reported numbers). Writes `table.md`,
`summary.json`, `per_window.csv` and the raw estimates to the output folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.config import load_section  # noqa: E402
from pipelines.evaluate import evaluate_clip, tempo_accuracy  # noqa: E402
from pipelines.features import tempo_from_beats  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_SYSTEMS = ("madmom_beats", "madmom_downbeats", "beatnet")
ALL_SYSTEMS = ("product", "essentia", "librosa", *PEER_SYSTEMS)
METRICS = ("key_w", "key_w_local", "tempo_acc1", "tempo_acc2", "beat_f", "downbeat_f", "meter_acc")


# ----------------------------------------------------------------------------------------------------------
# Systems (whole-file estimates: beats, downbeats, meter, key; times from the file's start)


def run_product(audio_dir: str, work: str, workers: int, overrides: dict | None = None, name: str = "product") -> dict:
    """`smitin dataset build` on the folder (params.yaml's section, plus `overrides`); per file, its clips:
    (start_s, duration_s, clip estimates)."""
    from core import clips_table as schema
    from pipelines.dataset import BuildDatasetParams, build_dataset

    params = load_section(BuildDatasetParams, os.path.join(ROOT, "params.yaml"), "build_dataset")
    if overrides:
        params = params.with_overrides(overrides, f"--variant {name}")
    clips_dir = os.path.join(work, f"{name}-clips")
    shutil.rmtree(clips_dir, ignore_errors=True)
    build_dataset(audio_dir, clips_dir, params, workers=workers)
    cols = ["source_path", "start_s", "duration_s", "is_silent", "tempo_bpm", "beats_s", "downbeats_s"]
    cols += ["time_signature", "key", "mode", "file_key", "file_mode"]
    out: dict = {}
    for r in schema.read_clips_table(clips_dir, columns=cols).to_pylist():
        meter = int(r["time_signature"].split("/")[0]) if r["time_signature"] else None
        out.setdefault(os.path.basename(r["source_path"]), []).append(
            {
                "start_s": r["start_s"],
                "duration_s": r["duration_s"],
                "is_silent": r["is_silent"],
                "tempo_bpm": r["tempo_bpm"],
                "beats": r["beats_s"] or [],
                "downbeats": r["downbeats_s"] or [],
                "meter": meter,
                "key": f"{r['key']} {r['mode']}" if r["key"] else None,
                "file_key": f"{r['file_key']} {r['file_mode']}" if r["file_key"] else None,
            }
        )
    return out


def run_essentia(path: str) -> dict:
    import essentia

    essentia.log.infoActive = False
    essentia.log.warningActive = False
    import essentia.standard as es

    audio = es.MonoLoader(filename=path, sampleRate=44100)()
    _, beats, _, _, _ = es.RhythmExtractor2013(method="multifeature")(audio)
    key, scale, _ = es.KeyExtractor()(audio)
    return {"beats": [float(b) for b in beats], "downbeats": None, "meter": None, "key": f"{key} {scale}"}


def run_librosa(path: str) -> dict:
    import librosa

    from benchmarks.features import MAJOR, MINOR

    y, sr = librosa.load(path, sr=22050, mono=True)
    _, frames = librosa.beat.beat_track(y=y, sr=sr)
    beats = librosa.frames_to_time(frames, sr=sr)
    profile = librosa.feature.chroma_cqt(y=y, sr=sr).mean(axis=1)
    scores = [np.corrcoef(np.roll(t, k), profile)[0, 1] for t in (MAJOR, MINOR) for k in range(12)]
    best = int(np.argmax(scores))
    names = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
    key = f"{names[best % 12]} {'major' if best < 12 else 'minor'}"
    return {"beats": [float(b) for b in beats], "downbeats": None, "meter": None, "key": key}


def run_peers(manifest: str, out_json: str, systems: list[str], venv: str) -> dict:
    """The madmom / BeatNet estimates from the peers' venv ({} and a message where it is missing)."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"peers venv {venv} missing (bash benchmarks/ood_peers_setup.sh): {', '.join(systems)} left out")
        return {"systems": {}, "errors": {s: "peers venv missing" for s in systems}}
    script = os.path.join(ROOT, "benchmarks", "ood_peers_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [python, script, "--manifest", manifest, "--out", out_json, "--systems", ",".join(systems)]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not os.path.exists(out_json):
        return {"systems": {}, "errors": {s: f"ood_peers_run.py exited {proc.returncode}" for s in systems}}
    with open(out_json) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------
# Scoring


def windows_of(path: str, params) -> list[tuple[float, float]]:
    """The product's clip windows of a file (start_s, duration_s), cut exactly as the build cuts them."""
    from core.audio import iter_clips

    sr = params.analysis_sample_rate
    _, clips = iter_clips(
        path, sr, params.clip_seconds, params.hop_seconds, params.min_clip_seconds, params.max_file_seconds
    )
    return [(start, len(wave) / sr) for _, start, wave in clips]


def window_estimate(est: dict, start: float, dur: float) -> dict:
    """A whole-file estimate cut to one window (times relative to the window, as a clip row holds them)."""

    def cut(times):
        t = np.asarray(times or [], float)
        return [float(x) for x in t[(t >= start) & (t < start + dur)] - start]

    beats = cut(est["beats"])
    key = est.get("key")
    return {
        "beats_s": beats,
        "downbeats_s": cut(est["downbeats"]) if est.get("downbeats") is not None else [],
        "tempo_bpm": tempo_from_beats(np.asarray(beats)),
        "meter": est.get("meter"),
        "key": key.split()[0] if key else None,
        "mode": key.split()[1] if key else None,
        "has_downbeats": est.get("downbeats") is not None,
    }


def score_window(system: str, row: dict, start: float, dur: float, clip: dict) -> dict:
    """One window of one file for one system: the metrics of `evaluate_clip`, with the local reference tempo."""
    ref_beats = np.asarray(row["beats_s"], float)
    inside = ref_beats[(ref_beats >= start) & (ref_beats < start + dur)]
    local_tempo = tempo_from_beats(inside) or row["tempo_bpm"]
    truth = {**row, "tempo_bpm": local_tempo}
    ev = evaluate_clip({"clip_id": f"{row['file']}@{start:g}", "start_s": start, "duration_s": dur, **clip}, truth)
    if not clip.get("key"):  # a system that names no key (madmom's downbeat tracker, BeatNet) is not scored on it
        ev["key_weighted_global"] = ev["key_weighted"] = np.nan
    acc1, acc2 = tempo_accuracy(clip.get("tempo_bpm"), local_tempo)
    meter = clip.get("meter")
    return {
        "system": system,
        "split": row["split"],
        "file": row["file"],
        "family": row["family"],
        "time_signature": row["time_signature"],
        "tempo_mode": row["tempo_mode"],
        "start_s": start,
        "ref_key": ev["ref_key_global"],
        "est_key": ev["est_file_key"] or ev["est_key"],
        # the excerpt's key: a system's whole-file key where it names one apart from its local keys (the product's
        # `file_key`), else the one key it names
        "key_w": ev["file_key_weighted"] if clip.get("file_key") else ev["key_weighted_global"],
        "key_w_local": ev["key_weighted"],
        "ref_tempo": local_tempo,
        "est_tempo": clip.get("tempo_bpm"),
        "tempo_acc1": acc1,
        "tempo_acc2": acc2,
        "beat_f": ev["beat_f"],
        "downbeat_f": ev["downbeat_f"] if clip.get("has_downbeats", True) else np.nan,
        "ref_meter": row["beats_per_bar"],
        "est_meter": meter,
        "meter_acc": float(meter == row["beats_per_bar"]) if meter else np.nan,
    }


def summarise(rows: list[dict]) -> dict:
    out = {"windows": len(rows), "files": len({r["file"] for r in rows})}
    for k in METRICS:
        v = np.array([r[k] for r in rows], float)
        v = v[~np.isnan(v)]
        out[k] = round(float(v.mean()), 3) if len(v) else None
    return out


def peer_gaps(rows: list[dict], split: str, resamples: int = 2000, seed: int = 0) -> str:
    """The product minus each other system per metric, on the windows both score, with a 90% interval from
    resampling files: a file's windows move together (its key or meter is one decision), so the files, not the
    windows, are the independent draws."""
    rng = np.random.default_rng(seed)
    by: dict[str, dict] = {}
    for r in rows:
        if r["split"] == split:
            by.setdefault(r["system"], {})[(r["file"], round(r["start_s"], 2))] = r
    product = by.get("product", {})
    lines = ["| product minus | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
    for other in [s for s in by if s != "product" and not s.startswith("product-")]:
        cells = []
        for k in METRICS:
            per_file: dict[str, list[float]] = {}
            for window, r in product.items():
                q = by[other].get(window)
                a, b = (np.nan if x is None else float(x) for x in (r[k], q[k] if q else None))
                if np.isfinite(a) and np.isfinite(b):
                    per_file.setdefault(window[0], []).append(a - b)
            if not per_file:
                cells.append("-")
                continue
            sums = np.array([sum(v) for v in per_file.values()])
            counts = np.array([len(v) for v in per_file.values()])
            draw = rng.integers(0, len(sums), (resamples, len(sums)))
            lo, hi = np.percentile(sums[draw].sum(1) / counts[draw].sum(1), [5, 95])
            cells.append(f"{sums.sum() / counts.sum():+.3f} ({lo:+.3f}, {hi:+.3f})")
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(summary: dict, split: str) -> str:
    head = "| system | windows | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for system, parts in summary.items():
        s = parts.get(split)
        if not s or not s["windows"]:
            continue
        cells = ["-" if s[k] is None else f"{s[k]:.3f}" for k in METRICS]
        lines.append(f"| {system} | {s['windows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="data/ood", help="the folder benchmarks/ood_set.py wrote")
    ap.add_argument("--out", default="metrics/ood", help="output folder (table.md, summary.json, per_window.csv)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    ap.add_argument("--peers-venv", default=os.path.join(ROOT, "benchmarks", ".venv-peers"))
    ap.add_argument("--workers", type=int, default=1, help="worker processes of the product's build")
    ap.add_argument("--rescore", action="store_true", help="score the estimates.json of --out again, run nothing")
    ap.add_argument(
        "--reuse",
        default="",
        metavar="SYSTEMS",
        help="comma-separated systems whose estimates (and timings) come from --out's last run, not run again "
        "(e.g. the peers, when only the product changed: same files, same scoring)",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="also run the product with these build_dataset overrides, as system product-NAME (same files, same run)",
    )
    args = ap.parse_args()

    from pipelines.dataset import BuildDatasetParams

    params = load_section(BuildDatasetParams, os.path.join(ROOT, "params.yaml"), "build_dataset")
    manifest = os.path.join(args.set, "manifest.json")
    with open(manifest) as f:
        files = json.load(f)["files"]
    os.makedirs(args.out, exist_ok=True)
    systems = [s for s in args.systems.split(",") if s]
    variants = {}
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        pairs = (kv.split("=", 1) for kv in re.split(r",(?=\s*\w+=)", sets))  # a comma inside a YAML value stays
        variants[f"product-{name}"] = {k.strip(): yaml.safe_load(v) for k, v in pairs}
    systems += [v for v in variants if v not in systems]
    estimates: dict[str, dict] = {}
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}

    if args.rescore:
        with open(os.path.join(args.out, "estimates.json")) as f:
            estimates = {k: v for k, v in json.load(f).items() if k in systems}
        with open(os.path.join(args.out, "summary.json")) as f:
            previous = json.load(f)
        timings, errors = previous.get("timings_s", {}), previous.get("errors", {})
        systems = [s for s in systems if s in estimates]
    reused = [s for s in args.reuse.split(",") if s]
    if reused and not args.rescore:
        with open(os.path.join(args.out, "estimates.json")) as f:
            last = json.load(f)
        with open(os.path.join(args.out, "summary.json")) as f:
            last_timings = json.load(f).get("timings_s", {})
        missing = [s for s in reused if s not in last]
        if missing:
            raise SystemExit(f"--reuse: {', '.join(missing)} not in {args.out}/estimates.json")
        estimates.update({s: last[s] for s in reused})
        timings.update({f"{s} (reused)": last_timings[s] for s in reused if s in last_timings})
        systems += [s for s in reused if s not in systems]
    if "product" in systems and not args.rescore and "product" not in reused:
        t = time.time()
        estimates["product"] = run_product(os.path.join(args.set, "audio"), args.out, args.workers)
        timings["product"] = round(time.time() - t, 1)
    for name, overrides in variants.items():
        if not args.rescore:
            t = time.time()
            estimates[name] = run_product(os.path.join(args.set, "audio"), args.out, args.workers, overrides, name)
            timings[name] = round(time.time() - t, 1)
    for name, fn in (("essentia", run_essentia), ("librosa", run_librosa)):
        if name in systems and not args.rescore and name not in reused:
            t = time.time()
            estimates[name] = {r["file"]: fn(r["path"]) for r in files}
            timings[name] = round(time.time() - t, 1)
    peers = [s for s in systems if s in PEER_SYSTEMS and s not in reused]
    if peers and not args.rescore:
        t = time.time()
        got = run_peers(manifest, os.path.join(args.out, "peers.json"), peers, args.peers_venv)
        timings["peers (subprocess)"] = round(time.time() - t, 1)
        for name, per_file in got["systems"].items():
            estimates[name] = per_file
            timings[name] = round(sum(v.get("seconds", 0.0) for v in per_file.values()), 1)
        errors.update(got.get("errors", {}))
        for name, msg in got.get("errors", {}).items():
            print(f"{name} left out: {msg.splitlines()[0]}")

    rows = []
    for row in files:
        windows = windows_of(row["path"], params)
        for system in [s for s in systems if s in estimates]:
            est = estimates[system].get(row["file"])
            if est is None:
                continue
            if system == "product" or system in variants:  # the product's own clips (their windows are `windows`)
                for c in est:
                    if c["is_silent"]:
                        continue
                    clip = {
                        "beats_s": c["beats"],
                        "downbeats_s": c["downbeats"],
                        "tempo_bpm": c["tempo_bpm"],
                        "meter": c["meter"],
                        "key": c["key"].split()[0] if c["key"] else None,
                        "mode": c["key"].split()[1] if c["key"] else None,
                        "file_key": c["file_key"].split()[0] if c.get("file_key") else None,
                        "file_mode": c["file_key"].split()[1] if c.get("file_key") else None,
                    }
                    rows.append(score_window(system, row, c["start_s"], c["duration_s"], clip))
            else:
                for start, dur in windows:
                    rows.append(score_window(system, row, start, dur, window_estimate(est, start, dur)))

    summary = {
        s: {sp: summarise([r for r in rows if r["system"] == s and r["split"] == sp]) for sp in ("dev", "heldout")}
        for s in systems
        if s in estimates
    }
    for s in summary:
        summary[s]["all"] = summarise([r for r in rows if r["system"] == s])
    audio_min = sum(r["duration_s"] for r in files) / 60
    table = "\n\n".join(
        [
            f"OOD set `{args.set}`: {len(files)} files, {audio_min:.1f} min of audio; "
            "means over 10 s windows (see benchmarks/ood_features.py).",
            "### dev (for choices)\n\n" + markdown(summary, "dev"),
            "### heldout (reported)\n\n" + markdown(summary, "heldout"),
            "### heldout: the product minus each peer, on the same windows (90% interval, files resampled)\n\n"
            + peer_gaps(rows, "heldout"),
            "wall seconds per system: " + ", ".join(f"{k} {v}" for k, v in timings.items()),
        ]
    )
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"summary": summary, "timings_s": timings, "errors": errors}, f, indent=1)
    with open(os.path.join(args.out, "estimates.json"), "w") as f:
        json.dump(estimates, f)
    with open(os.path.join(args.out, "per_window.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
