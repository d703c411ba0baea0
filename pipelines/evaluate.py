"""`smitin dataset eval`: measured clip features vs the rendered corpus' ground truth, with mir_eval.

Join: a clip's `source_path` file name is a labels row's `file` (the corpus' audio folder is flat and names are
unique), so the join survives moving the folder. Each file's ground truth is cut to the clip's
[start_s, start_s + duration_s) window, times relative to the clip.

Metrics (overall and split by drums / no drums):
- key: mir_eval weighted score (fifth above 0.5, relative 0.3, parallel 0.2) and exact accuracy, against the
  local key of the clip (the `key_segments` entry covering most of the clip window: chorales modulate, and a
  10 s clip can only be asked for the key it sounds in); `key_weighted_global` / `key_exact_global` score
  against the global key of the whole rendered span, as the first version of this table did;
  `file_key_weighted` scores the table's `file_key` (the whole file's key) against that global key.
- tempo: Acc1 (within 4 %) and Acc2 (also at x2, x3, x1/2, x1/3), by hand (not in mir_eval).
- beats and downbeats: mir_eval F-measure (70 ms), min_beat_time = 0 (10 s clips).
- chords: duration-weighted recall over all clips (MIREX WCSR), `majmin` and `root`.
"""

from __future__ import annotations

import json
import os

import mir_eval
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import clips_table as schema
from pipelines.errors import PipelineUserError

CLIP_COLUMNS = [
    "clip_id",
    "source_path",
    "start_s",
    "duration_s",
    "is_silent",
    "tempo_bpm",
    "beats_s",
    "downbeats_s",
    "key",
    "mode",
    "file_key",
    "file_mode",
    "chords",
    "traits",
]


def tempo_accuracy(est: float | None, ref: float, tol: float = 0.04) -> tuple[float, float]:
    """(Acc1, Acc2) for one clip."""
    if not est or not ref:
        return 0.0, 0.0
    acc1 = float(abs(est - ref) <= tol * ref)
    acc2 = float(any(abs(est - f * ref) <= tol * f * ref for f in (1.0, 2.0, 3.0, 0.5, 1.0 / 3.0)))
    return acc1, acc2


def cut_times(times, start: float, end: float) -> np.ndarray:
    t = np.asarray(times, float)
    return t[(t >= start) & (t < end)] - start


def cut_segments(segments: list[dict], start: float, end: float, key: str = "label") -> list[tuple]:
    out = []
    for s in segments:
        a, b = max(s["start_s"], start), min(s["end_s"], end)
        if b > a + 1e-6:
            out.append((a - start, b - start, s[key]) if key == "label" else (a - start, b - start, s))
    return out


def clip_key(segments: list[dict], start: float, end: float) -> str | None:
    """The local key covering most of the window, as 'C# major'."""
    best, dur = None, 0.0
    for a, b, s in cut_segments(segments, start, end, key="seg"):
        if b - a > dur:
            best, dur = f"{s['key']} {s['mode']}", b - a
    return best


def chord_comparisons(ref: list[tuple], est: list[dict], duration: float) -> tuple[float, float, float, float]:
    """(majmin hits, majmin weight, root hits, root weight) in seconds for one clip: reference time whose label
    the comparison cannot score (`X`, `dim` for majmin) carries no weight, as in mir_eval."""
    if not ref:
        return 0.0, 0.0, 0.0, 0.0
    ref_iv = np.array([[a, b] for a, b, _ in ref])
    ref_lab = [lab for _, _, lab in ref]
    if est:
        est_iv = np.array([[c["start_s"], c["end_s"]] for c in est])
        est_lab = [c["label"] for c in est]
    else:
        est_iv, est_lab = np.array([[0.0, duration]]), ["N"]
    t_min, t_max = 0.0, float(ref_iv[:, 1].max())
    est_iv, est_lab = mir_eval.util.adjust_intervals(est_iv, est_lab, t_min, t_max, "N", "N")
    ref_iv, ref_lab = mir_eval.util.adjust_intervals(ref_iv, ref_lab, t_min, t_max, "N", "N")
    iv, r, e = mir_eval.util.merge_labeled_intervals(ref_iv, ref_lab, est_iv, est_lab)
    dur = mir_eval.util.intervals_to_durations(iv)
    majmin = mir_eval.chord.majmin(r, e)
    root = mir_eval.chord.root(r, e)
    w_mm = np.where(majmin >= 0, dur, 0.0)
    w_rt = np.where(root >= 0, dur, 0.0)
    return (
        float(np.sum(np.clip(majmin, 0, None) * w_mm)),
        float(w_mm.sum()),
        float(np.sum(np.clip(root, 0, None) * w_rt)),
        float(w_rt.sum()),
    )


def evaluate_clip(clip: dict, truth: dict) -> dict:
    start = float(clip["start_s"])
    end = start + float(clip["duration_s"])
    ref_beats = cut_times(truth["beats_s"], start, end)
    ref_down = cut_times(truth["downbeats_s"], start, end)
    est_beats = np.asarray(clip["beats_s"] or [], float)
    est_down = np.asarray(clip["downbeats_s"] or [], float)
    ref_key = f"{truth['key']} {truth['mode']}"
    est_key = f"{clip['key']} {clip['mode']}" if clip.get("key") else None
    local = clip_key(truth.get("key_segments") or [], start, end) or ref_key
    kw_local = float(mir_eval.key.weighted_score(local, est_key)) if est_key else 0.0
    kw_global = float(mir_eval.key.weighted_score(ref_key, est_key)) if est_key else 0.0
    est_file_key = f"{clip['file_key']} {clip['file_mode']}" if clip.get("file_key") else None
    kw_file = float(mir_eval.key.weighted_score(ref_key, est_file_key)) if est_file_key else 0.0
    acc1, acc2 = tempo_accuracy(clip.get("tempo_bpm"), float(truth["tempo_bpm"]))
    ref_chords = cut_segments(truth["chords"], start, end)
    mm, w_mm, rt, w_rt = chord_comparisons(ref_chords, clip.get("chords") or [], end - start)
    traits = {t["name"]: bool(t["present"]) for t in (truth.get("traits") or [])}
    return {
        "clip_id": clip["clip_id"],
        "file": truth["file"],
        "piece_id": truth["piece_id"],
        "corpus": truth["corpus"],
        "start_s": start,
        "drums": traits.get("drums", False),
        "bass": traits.get("bass", False),
        "piano": traits.get("piano", False),
        "ref_key": local,
        "ref_key_global": ref_key,
        "est_key": est_key,
        "key_weighted": kw_local,
        "key_exact": float(kw_local == 1.0),  # enharmonic spellings (D# / Eb) count as exact
        "key_weighted_global": kw_global,
        "key_exact_global": float(kw_global == 1.0),
        "est_file_key": est_file_key,
        "file_key_weighted": kw_file,
        "ref_tempo": float(truth["tempo_bpm"]),
        "est_tempo": clip.get("tempo_bpm"),
        "tempo_acc1": acc1,
        "tempo_acc2": acc2,
        "beat_f": float(mir_eval.beat.f_measure(ref_beats, est_beats)) if len(ref_beats) else np.nan,
        "downbeat_f": float(mir_eval.beat.f_measure(ref_down, est_down)) if len(ref_down) else np.nan,
        "chord_majmin_hits": mm,
        "chord_root_hits": rt,
        "chord_majmin_weight": w_mm,
        "chord_root_weight": w_rt,
        "ref_time_signature": truth["time_signature"],
    }


def summarise(rows: list[dict]) -> dict:
    if not rows:
        return {"clips": 0}

    def mean(k):
        v = np.array([r[k] for r in rows], float)
        v = v[~np.isnan(v)]
        return round(float(v.mean()), 4) if len(v) else None

    def wcsr(k):
        w = sum(r[f"chord_{k}_weight"] for r in rows)
        return round(sum(r[f"chord_{k}_hits"] for r in rows) / w, 4) if w > 0 else None

    return {
        "clips": len(rows),
        "pieces": len({r["piece_id"] for r in rows}),
        "key_weighted": mean("key_weighted"),
        "key_exact": mean("key_exact"),
        "key_weighted_global": mean("key_weighted_global"),
        "key_exact_global": mean("key_exact_global"),
        "file_key_weighted": mean("file_key_weighted"),
        "tempo_acc1": mean("tempo_acc1"),
        "tempo_acc2": mean("tempo_acc2"),
        "beat_f": mean("beat_f"),
        "downbeat_f": mean("downbeat_f"),
        "chord_majmin": wcsr("majmin"),
        "chord_root": wcsr("root"),
    }


def evaluate_features(clips_dir: str, labels_path: str) -> tuple[dict, list[dict]]:
    """(metrics, per-clip rows). Clips whose source file has no labels row are counted, not scored."""
    if not os.path.exists(labels_path):
        raise PipelineUserError(f"labels table not found: {labels_path} (run `smitin corpus render` first)")
    try:
        clips = schema.read_clips_table(clips_dir, columns=CLIP_COLUMNS).to_pylist()
    except schema.ClipsTableError as e:
        raise PipelineUserError(str(e)) from None
    labels = {r["file"]: r for r in pq.read_table(labels_path).to_pylist()}
    rows, unmatched, silent = [], 0, 0
    for clip in clips:
        truth = labels.get(os.path.basename(clip["source_path"]))
        if truth is None:
            unmatched += 1
            continue
        if clip["is_silent"]:
            silent += 1
            continue
        rows.append(evaluate_clip(clip, truth))
    if not rows:
        raise PipelineUserError(f"no clip of {clips_dir} matches a file of {labels_path}")
    metrics = {
        "overall": summarise(rows),
        "drums": summarise([r for r in rows if r["drums"]]),
        "no_drums": summarise([r for r in rows if not r["drums"]]),
        "by_corpus": {c: summarise([r for r in rows if r["corpus"] == c]) for c in sorted({r["corpus"] for r in rows})},
        "clips_unmatched": unmatched,
        "clips_silent": silent,
    }
    return metrics, rows


def per_piece(rows: list[dict]) -> list[dict]:
    out = []
    for pid in sorted({r["piece_id"] for r in rows}):
        for drums in (True, False):
            sel = [r for r in rows if r["piece_id"] == pid and r["drums"] == drums]
            if sel:
                out.append({"piece_id": pid, "corpus": sel[0]["corpus"], "drums": drums, **summarise(sel)})
    return out


def write_outputs(metrics: dict, rows: list[dict], out: str, table: str | None = None) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
        f.write("\n")
    table = table or os.path.splitext(out)[0] + "_per_piece.csv"
    import csv

    pieces = per_piece(rows)
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(pieces[0].keys()))
        w.writeheader()
        w.writerows(pieces)
    pq.write_table(
        pa.Table.from_pylist(rows), os.path.splitext(table)[0].replace("_per_piece", "_per_clip") + ".parquet"
    )
    return table


METRIC_ORDER = [
    "key_weighted",
    "key_exact",
    "tempo_acc1",
    "tempo_acc2",
    "beat_f",
    "downbeat_f",
    "chord_majmin",
    "chord_root",
]


def format_table(metrics: dict) -> str:
    cols = [("overall", metrics["overall"]), ("drums", metrics["drums"]), ("no_drums", metrics["no_drums"])]
    lines = [f"{'metric':<16}" + "".join(f"{name:>11}" for name, _ in cols)]
    for k in ["clips"] + METRIC_ORDER + ["key_weighted_global", "key_exact_global", "file_key_weighted"]:
        lines.append(
            f"{k:<16}"
            + "".join(
                f"{(m.get(k) if m.get(k) is not None else float('nan')):>11.3f}"
                if k != "clips"
                else f"{m.get(k, 0):>11d}"
                for _, m in cols
            )
        )
    return "\n".join(lines)
