"""Feature evaluation: the metrics by hand, and a tiny render -> build -> eval run with assertions on numbers."""

import json

import numpy as np
import pytest

from core.config import load_section
from pipelines.corpus import CorpusParams, render_corpus
from pipelines.dataset import BuildDatasetParams, build_dataset
from pipelines.evaluate import chord_comparisons, evaluate_clip, evaluate_features, tempo_accuracy, write_outputs


def test_tempo_accuracy():
    assert tempo_accuracy(103.0, 100.0) == (1.0, 1.0)
    assert tempo_accuracy(200.0, 100.0) == (0.0, 1.0)
    assert tempo_accuracy(33.0, 100.0) == (0.0, 1.0)
    assert tempo_accuracy(150.0, 100.0) == (0.0, 0.0)
    assert tempo_accuracy(None, 100.0) == (0.0, 0.0)


def test_chord_comparisons_weight_by_duration_and_skip_unscorable():
    ref = [(0.0, 2.0, "C:maj"), (2.0, 3.0, "B:dim"), (3.0, 4.0, "G:7")]
    est = [{"start_s": 0.0, "end_s": 1.0, "label": "C:maj"}, {"start_s": 1.0, "end_s": 4.0, "label": "G:maj"}]
    mm, w_mm, rt, w_rt = chord_comparisons(ref, est, 4.0)
    assert w_mm == pytest.approx(3.0)  # B:dim is outside the majmin vocabulary
    assert mm == pytest.approx(2.0)  # C 0-1 and G:7 ~ G:maj 3-4
    assert w_rt == pytest.approx(4.0) and rt == pytest.approx(2.0)


def test_evaluate_clip_cuts_truth_to_the_window():
    truth = {
        "file": "x.flac",
        "piece_id": "p",
        "corpus": "user",
        "tempo_bpm": 120.0,
        "time_signature": "4/4",
        "beats_s": list(np.arange(0, 20, 0.5)),
        "downbeats_s": list(np.arange(0, 20, 2.0)),
        "key": "A",
        "mode": "minor",
        "key_segments": [],
        "traits": [{"name": "drums", "present": True}],
        "chords": [
            {"start_s": 0.0, "end_s": 12.0, "label": "A:min"},
            {"start_s": 12.0, "end_s": 20.0, "label": "E:maj"},
        ],
    }
    clip = {
        "clip_id": "c",
        "start_s": 10.0,
        "duration_s": 10.0,
        "tempo_bpm": 121.0,
        "beats_s": list(np.arange(0, 10, 0.5)),
        "downbeats_s": list(np.arange(0, 10, 2.0)),
        "key": "A",
        "mode": "minor",
        "chords": [{"start_s": 0.0, "end_s": 2.0, "label": "A:min"}, {"start_s": 2.0, "end_s": 10.0, "label": "E:maj"}],
    }
    r = evaluate_clip(clip, truth)
    assert r["beat_f"] == 1.0 and r["downbeat_f"] == 1.0 and r["tempo_acc1"] == 1.0 and r["key_weighted"] == 1.0
    assert r["chord_majmin_hits"] == pytest.approx(10.0) and r["drums"] is True
    clip["key"], clip["downbeats_s"] = "E", list(np.arange(1.0, 10, 2.0))
    r = evaluate_clip(clip, truth)
    assert r["key_weighted"] == 0.5 and r["key_exact"] == 0.0  # a fifth above
    assert r["downbeat_f"] == 0.0
    assert r["file_key_weighted"] == 0.0  # a table without the file's key scores nothing on it
    clip["file_key"], clip["file_mode"] = "C", "major"  # the relative major: the file's key, scored against the global
    assert evaluate_clip(clip, truth)["file_key_weighted"] == pytest.approx(0.3)


@pytest.mark.filterwarnings("ignore")
def test_render_build_eval_end_to_end(tmp_path):
    corpus = {
        "corpora": ["nottingham", "bach_chorales"],
        "pieces": {"nottingham": 2, "bach_chorales": 2},
        "seed": 3,
        "variants": 1,
        "piece_seconds": 12.0,
        "sample_rate": 44100,
        "workers": 1,
        "tempo_bpm": [96, 120],
        "voice_programs": [48],
        "melody_programs": [48],
        "pad_programs": [48],
        "bass_programs": [32, 33, 34],
        "piano_programs": [0, 1],
        "stem_gain_db": {"drums": [-4.0, 0.0], "bass": [-4.0, 0.0], "piano": [3.0, 3.0]},
    }
    render_corpus(str(tmp_path / "corpus"), CorpusParams.parse(corpus, "corpus"), workers=1)
    params = load_section(BuildDatasetParams, "params.yaml", "build_dataset")
    params = params.with_overrides({"workers": 1, "num_shards": 1}, "build_dataset")
    built = build_dataset(str(tmp_path / "corpus" / "audio"), str(tmp_path / "clips"), params, workers=1)
    assert built.stats["files_failed"] == 0
    metrics, rows = evaluate_features(str(tmp_path / "clips"), str(tmp_path / "corpus" / "labels.parquet"))
    overall = metrics["overall"]
    assert overall["pieces"] == 4 and overall["clips"] == len(rows) >= 16
    assert metrics["drums"]["clips"] + metrics["no_drums"]["clips"] == overall["clips"]
    # rendered audio at a steady tempo: the extractor must get most of it right
    assert overall["tempo_acc2"] >= 0.8
    assert overall["beat_f"] >= 0.75
    assert overall["chord_root"] >= 0.5
    assert overall["key_weighted"] >= 0.5
    assert 0.0 <= overall["downbeat_f"] <= 1.0
    table = write_outputs(metrics, rows, str(tmp_path / "m" / "features.json"))
    assert json.loads((tmp_path / "m" / "features.json").read_text())["overall"]["clips"] == overall["clips"]
    assert open(table).readline().startswith("piece_id,corpus,drums")
