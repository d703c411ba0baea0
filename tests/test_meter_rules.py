"""benchmarks/meter_rules.py: its decision rules find the meter of evidence with a known bar, across clips."""

import numpy as np
import pytest

from benchmarks.meter_rules import _autocorrelation_meter, _stitched, _with_meter, rules


def _clips(meter: int, phase: int, n_clips: int = 3, beats_per_clip: int = 20, period: float = 0.5, seed: int = 0):
    """Back-to-back 10 s clips whose per-beat evidence peaks every `meter` beats from beat `phase` (plus noise)."""
    rng = np.random.default_rng(seed)
    clips = []
    for c in range(n_clips):
        beats = np.arange(beats_per_clip) * period
        numbers = c * beats_per_clip + np.arange(beats_per_clip)
        evidence = np.where((numbers - phase) % meter == 0, 1.0, 0.0) + 0.3 * rng.standard_normal(beats_per_clip)
        clips.append((c * beats_per_clip * period, beats, evidence))
    return clips


def test_stitching_numbers_back_to_back_clips_as_one_count():
    index, idx, ev = _stitched(_clips(3, 0))
    assert [list(i[:2]) for i in index] == [[0, 1], [20, 21], [40, 41]]
    assert len(idx) == len(ev) == 60


@pytest.mark.parametrize("meter, phase", [(3, 1), (4, 2)])
def test_rules_find_the_meter_and_downbeats(meter, phase):
    clips = _clips(meter, phase)
    index, idx, ev = _stitched(clips)
    assert _autocorrelation_meter(idx, ev) == meter
    downbeats, m = _with_meter(clips, _autocorrelation_meter)
    assert m == meter
    expected = clips[0][1][(np.arange(20) - phase) % meter == 0]
    assert np.allclose(downbeats[0], expected)
    for name, rule in rules({2: 0.0, 3: 0.0, 4: 0.0}).items():
        assert rule(clips)[1] == meter, name


def test_a_strict_alternation_is_2_for_the_product_rule_and_ambiguous_for_autocorrelation():
    clips = _clips(2, 0)
    assert rules({2: 0.0, 3: 0.0, 4: 0.0})["product"](clips)[1] == 2
    # every second beat strong fits 2/4 and a 4/4 whose third beat is as strong as its first equally well:
    # lag correlations cannot tell them apart, only that the meter is not 3
    _, idx, ev = _stitched(clips)
    assert _autocorrelation_meter(idx, ev) in (2, 4)


def test_extract_reads_the_evidence_of_the_model_it_is_given(tmp_path):
    """`--downbeat-model` must change the evidence, not fall back to the builtin model silently: a model whose
    trees all score the opposite way flips the trees' part of the evidence; the network's part (the same beats,
    the same audio) stays, so the two evidences sum to twice the network's weighted log-odds."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    from benchmarks.meter_rules import SR, extract
    from core.config import load_section
    from pipelines.dataset import BuildDatasetParams
    from pipelines.features import DOWNBEAT_MODEL, ClipAnalyzer, FeatureParams, network_evidence
    from tests.synth import click_track

    (tmp_path / "audio").mkdir()
    wave = click_track(120, 8.0)
    sf.write(tmp_path / "audio" / "clicks.flac", wave, SR)
    pq.write_table(pa.Table.from_pylist([{"file": "clicks.flac", "piece_id": "clicks"}]), tmp_path / "labels.parquet")
    model = json.loads(open(DOWNBEAT_MODEL).read())
    for gate in model["models"].values():
        gate["baseline"] = -gate["baseline"]
        for tree in gate["trees"]:
            tree["value"] = [-v for v in tree["value"]]
    flipped = tmp_path / "flipped.json"
    flipped.write_text(json.dumps(model))

    (builtin,) = extract(str(tmp_path), None)
    (other,) = extract(str(tmp_path), None, str(flipped))
    assert len(builtin["clips"]) == len(other["clips"]) == 1
    (_, beats, ev), (_, beats_flipped, ev_flipped) = builtin["clips"][0], other["clips"][0]
    np.testing.assert_allclose(beats, beats_flipped)
    assert len(ev) >= 8 and np.std(ev) > 0
    build = load_section(BuildDatasetParams, "params.yaml", "build_dataset")
    analyzer = ClipAnalyzer(FeatureParams.from_params(build))
    decoded = sf.read(tmp_path / "audio" / "clicks.flac", dtype="float32")[0]
    _, _, activation = analyzer._track_alone(analyzer._signals(decoded))
    network = build.downbeat_network_weight * network_evidence(activation[:, 1], beats)
    np.testing.assert_allclose(ev + ev_flipped, 2 * network, atol=1e-6)
    assert np.abs(ev - ev_flipped).max() > 0.1  # the trees' part did flip


def test_bar_pointer_follows_a_slip_of_the_beat_count_inside_a_clip_only_when_slips_are_cheap():
    """One 40-beat clip in 4/4 whose count slips a beat halfway (the tracker dropped one): from beat 20 the bars
    start a beat earlier. A cheap slip follows the music's bar lines on both sides; an unaffordable one keeps one
    phase and misses the second half's."""
    from benchmarks.meter_rules import _bar_pointer

    numbers = np.arange(40)
    phase = np.where(numbers < 20, 0, 3)
    evidence = np.where((numbers - phase) % 4 == 0, 1.0, 0.0)
    beats = numbers * 0.5
    clips = [(0.0, beats, evidence)]
    truth = beats[evidence > 0]
    cheap, m = _bar_pointer(clips, {}, 0.05)
    assert m == 4 and np.allclose(cheap[0], truth)
    never, m = _bar_pointer(clips, {}, 1e9)
    assert m == 4 and any(np.array_equal(never[0], beats[(numbers - p) % 4 == 0]) for p in range(4))
    assert not np.array_equal(never[0], truth)
