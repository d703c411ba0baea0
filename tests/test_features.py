"""Features on synthetic signals whose answer is known (click tracks, chord sequences, cadences)."""

import mir_eval
import numpy as np
import pytest

from pipelines.chords import to_harte, to_symbol
from pipelines.features import (
    DOWNBEAT_MODEL,
    ClipAnalyzer,
    FeatureParams,
    boosted_trees_score,
    compound_beats,
    cue_matrix,
    export_boosted_trees,
    file_bar_phase,
    halve_fast_beats,
    load_downbeat_model,
    network_evidence,
    onset_envelopes,
    percussiveness,
    shift_offbeat,
    stack_trees,
    steady_beats,
)
from tests.synth import cadence, chord_sequence, click_track

SR = 44100


# The analyzer before the beat network: essentia's multifeature beats with the project's refinements, one key
# profile, the weighted downbeat cues clip by clip. The product still offers each of these paths.
ESSENTIA_ERA = dict(
    beat_tracker="essentia",
    rhythm_method="multifeature",
    key_profiles=[],
    key_file_context=0.0,
    chord_self_transition=0.5,
    downbeat_evidence="weighted",
    downbeat_network_weight=0.0,
    tempo_halve_min_contrast=0.3,
    meter_bias={2: 0.3, 3: -0.35, 4: 0.0},
    downbeat_file_context=False,
    downbeat_rephase_penalty=None,
)


def essentia_era(**changes) -> FeatureParams:
    return FeatureParams.defaults(**{**ESSENTIA_ERA, **changes})


@pytest.fixture(scope="module")
def analyzer():
    return ClipAnalyzer(essentia_era())


@pytest.mark.parametrize("bpm", [90.0, 120.0, 150.0])
def test_click_track_tempo_and_beats(analyzer, bpm):
    wave = click_track(bpm, 10.0)
    f = analyzer.analyze(wave)
    assert not f.is_silent
    assert f.tempo_bpm == pytest.approx(bpm, rel=0.02)
    truth = np.arange(0.0, 10.0, 60.0 / bpm)
    fmeasure = mir_eval.beat.f_measure(truth, np.asarray(f.beats_s))
    assert fmeasure >= 0.9
    assert f.tempo_confidence > 1.5  # essentia: > 1.5 usable


@pytest.fixture(scope="module")
def default_analyzer():
    """The analyzer as params.yaml configures it (learned downbeat evidence, key in file context, ...)."""
    from pathlib import Path

    from core.config import load_section
    from pipelines.dataset import BuildDatasetParams

    params = load_section(BuildDatasetParams, Path(__file__).resolve().parents[1] / "params.yaml", "build_dataset")
    return ClipAnalyzer(FeatureParams.from_params(params))


@pytest.mark.parametrize("which", ["analyzer", "default_analyzer"])
def test_accented_clicks_give_downbeats_and_meter(which, request):
    analyzer = request.getfixturevalue(which)
    bpm = 120.0
    wave = click_track(bpm, 10.0, accent_every=4)
    f = analyzer.analyze(wave)
    truth = np.arange(0.0, 10.0, 4 * 60.0 / bpm)
    assert f.time_signature == "4/4"
    assert mir_eval.beat.f_measure(truth, np.asarray(f.downbeats_s), f_measure_threshold=0.07) >= 0.7


@pytest.fixture(scope="module")
def network_analyzer():
    """Beats from the shipped network + tempo HMM, downbeats from the learned trees plus the network's output."""
    return ClipAnalyzer(
        essentia_era(
            beat_tracker="network",
            beat_refine=False,
            downbeat_evidence="learned",
            downbeat_network_weight=0.5,
            meter_bias={2: -0.2, 3: -0.35, 4: 0.0},
        )
    )


@pytest.mark.parametrize("bpm", [96.0, 120.0])
def test_network_tracker_follows_a_chord_sequence_without_drums(network_analyzer, bpm):
    """Triads over a bass, a chord every beat: no click, no drum. (At 75 bpm it counts eighths, 150 bpm: slow music
    is where its tempo octave errs, docs/ood.md.)"""
    prog = [
        ("C", "maj"),
        ("A", "min"),
        ("F", "maj"),
        ("G", "maj"),
        ("E", "min"),
        ("D", "min"),
        ("G", "maj"),
        ("C", "maj"),
    ]
    wave, _ = chord_sequence(prog, bpm=bpm, beats_per_chord=1, seconds=10.0, with_clicks=False)
    f = network_analyzer.analyze(wave)
    truth = np.arange(0.0, 10.0, 60.0 / bpm)
    assert mir_eval.beat.f_measure(truth, np.asarray(f.beats_s)) >= 0.9
    assert f.tempo_bpm == pytest.approx(bpm, rel=0.04)


def test_network_downbeat_weight_adds_the_networks_log_odds_to_the_tree_evidence(network_analyzer):
    """The per-beat evidence the bar phase reads is the trees' score plus `downbeat_network_weight` x the network's
    downbeat log-odds: with the weight at 0 the same beats carry the trees' score alone."""
    from dataclasses import replace

    trees_only = ClipAnalyzer(replace(network_analyzer.params, downbeat_network_weight=0.0))
    wave = click_track(120.0, 10.0, accent_every=4)
    blended, alone = network_analyzer.analyze(wave), trees_only.analyze(wave)
    assert blended.beats_s == alone.beats_s
    _, _, activation = network_analyzer._track_alone(network_analyzer._signals(wave))
    expected = alone.beat_evidence + 0.5 * network_evidence(activation[:, 1], np.asarray(alone.beats_s))
    np.testing.assert_allclose(blended.beat_evidence, expected, atol=1e-9)
    assert np.abs(blended.beat_evidence - alone.beat_evidence).max() > 0.1


def test_a_beat_level_too_fast_to_be_the_beat_is_grouped_by_the_downbeat_evidence(network_analyzer):
    """Clicks at 200 bpm, every third one accented (eighths of a 6/8 at 67 dotted quarters a minute): the network
    follows every click; above `beat_group_above_bpm` they are grouped in threes, on the accents."""
    from dataclasses import replace

    wave = click_track(200.0, 10.0, accent_every=3)
    kept = ClipAnalyzer(replace(network_analyzer.params, beat_group_above_bpm=0.0)).analyze(wave)
    grouped = ClipAnalyzer(replace(network_analyzer.params, beat_group_above_bpm=160.0)).analyze(wave)
    assert kept.tempo_bpm == pytest.approx(200.0, rel=0.02)
    assert grouped.tempo_bpm == pytest.approx(200.0 / 3, rel=0.02)
    accents = np.arange(0.0, 10.0, 3 * 60.0 / 200.0)
    assert mir_eval.beat.f_measure(accents, np.asarray(grouped.beats_s), f_measure_threshold=0.07) >= 0.9


def test_waltz_meter(analyzer):
    wave = click_track(150.0, 10.0, accent_every=3)
    f = analyzer.analyze(wave)
    assert f.time_signature == "3/4"


def test_chord_sequence_recall(analyzer):
    prog = [("C", "maj"), ("A", "min"), ("F", "maj"), ("G", "maj")]
    wave, truth = chord_sequence(prog, bpm=120, beats_per_chord=4, seconds=10.0)
    f = analyzer.analyze(wave)
    ref_int = np.array([[a, b] for a, b, _ in truth])
    est_int = np.array([[c["start_s"], c["end_s"]] for c in f.chords])
    est_lab = [c["label"] for c in f.chords]
    est_int, est_lab = mir_eval.util.adjust_intervals(est_int, est_lab, 0.0, 10.0, "N", "N")
    ref_int2, ref_lab = mir_eval.util.adjust_intervals(ref_int, [t[2] for t in truth], 0.0, 10.0, "N", "N")
    scores = mir_eval.chord.evaluate(ref_int2, ref_lab, est_int, est_lab)
    assert scores["majmin"] >= 0.8
    assert all(c["label"] == "N" or ":" in c["label"] for c in f.chords)  # Harte syntax


@pytest.mark.parametrize("key,mode", [("D", "major"), ("A", "minor"), ("Bb", "major")])
def test_cadence_key(analyzer, key, mode):
    f = analyzer.analyze(cadence(key, mode, seconds=10.0))
    est = f"{f.key} {f.mode}"
    assert mir_eval.key.weighted_score(f"{key} {mode}", est) == 1.0


def test_silence_makes_no_claims(analyzer):
    f = analyzer.analyze(np.zeros(SR * 5, np.float32))
    assert f.is_silent
    assert f.tempo_bpm is None and f.key is None and f.chords == [] and f.beats_s == []


def test_loudness_follows_gain(analyzer):
    wave = click_track(120.0, 6.0)
    loud = analyzer.analyze(wave).loudness_lufs
    quiet = analyzer.analyze(wave * 0.1).loudness_lufs
    assert loud - quiet == pytest.approx(20.0, abs=0.5)


@pytest.mark.parametrize(
    "symbol,harte",
    [
        ("Am", "A:min"),
        ("F#", "F#:maj"),
        ("Bb7", "Bb:7"),
        ("C/E", "C:maj/3"),
        ("Ebm7", "Eb:min7"),
        ("N", "N"),
        ("G:maj", "G:maj"),
        ("A#:min", "Bb:min"),
        ("Ddim", "D:dim"),
    ],
)
def test_to_harte(symbol, harte):
    assert to_harte(symbol) == harte
    assert mir_eval.chord.validate([harte], [harte]) is None


def test_to_symbol_round_trip():
    for label in ("A:min", "F#:maj", "Bb:7", "N"):
        assert to_harte(to_symbol(label)) == label


def test_steady_beats_replaces_an_unsettled_start_and_extends_to_the_edges():
    grid = np.arange(0.3, 10.0, 0.6)
    tracked = np.r_[[1.0, 1.7, 2.35], grid[4:-2]]  # late, off-tempo start; stops two beats early
    out = steady_beats(tracked, 10.0)
    assert mir_eval.beat.f_measure(grid, out) == pytest.approx(1.0)


def _pulses(times, weights, seconds=10.0):
    env = np.zeros(int(seconds * 100) + 1)
    for t, w in zip(times, weights):
        env[int(round(t * 100))] = w
    return {"low": env, "high": env, "all": env}


def test_shift_offbeat_moves_beats_locked_to_the_and():
    on = np.arange(0.5, 9.6, 0.5)  # the true beats carry the bass onsets
    env = _pulses(np.r_[on, on[:-1] + 0.25], np.r_[np.ones(len(on)), 0.2 * np.ones(len(on) - 1)])
    chroma, times = np.ones((200, 12)), np.arange(200) * 0.05
    tracked = on[:-1] + 0.25
    out = shift_offbeat(tracked, chroma, times, env, 10.0, margin=0.5)
    assert mir_eval.beat.f_measure(on, out) >= 0.95
    assert np.allclose(shift_offbeat(on, chroma, times, env, 10.0, margin=0.5), on)  # in phase: kept


def test_compound_beats_takes_dotted_quarters_in_six_eight():
    eighth = 0.25
    eighths = np.arange(0.0, 9.9, eighth)
    strong = np.arange(len(eighths)) % 3 == 0  # 6/8: accents every third eighth
    env = _pulses(eighths, np.where(strong, 1.0, 0.2))
    chroma, times = np.ones((200, 12)), np.arange(200) * 0.05
    quarters = eighths[::2]  # the tracker's two-eighth beat
    out = compound_beats(quarters, chroma, times, env, margin=0.8)
    assert mir_eval.beat.f_measure(eighths[strong], out) >= 0.95
    # simple metre (accents every second eighth): quarters kept
    env2 = _pulses(eighths, np.where(np.arange(len(eighths)) % 2 == 0, 1.0, 0.2))
    assert np.allclose(compound_beats(quarters, chroma, times, env2, margin=0.8), quarters)


def test_onset_envelopes_peak_at_clicks():
    wave = click_track(120.0, 4.0)
    env = onset_envelopes(wave, SR)
    peaks = np.nonzero(env["all"] > 0.5 * env["all"].max())[0] / 100.0
    assert np.all(np.min(np.abs(peaks[:, None] - np.arange(0.0, 4.0, 0.5)[None, :]), axis=1) <= 0.02)


@pytest.mark.parametrize("key,mode", [("D", "major"), ("A", "minor"), ("Bb", "major")])
def test_cadence_key_by_profile_vote(key, mode):
    analyzer = ClipAnalyzer(
        essentia_era(key_profiles=["bgate", "braw", "edma", "krumhansl", "shaath", "temperley", "tonictriad"])
    )
    f = analyzer.analyze(cadence(key, mode, seconds=10.0))
    assert mir_eval.key.weighted_score(f"{key} {mode}", f"{f.key} {f.mode}") == 1.0
    assert 0.0 < f.key_strength <= 1.0


def test_per_frame_direct_calls_match_essentias_checked_calls():
    """The per-frame chroma and key HPCP skip essentia.standard's argument checks: same numbers as through them."""
    from pipelines.features import _HPCP_HOP, _per_frame, _spectra

    analyzer = ClipAnalyzer(essentia_era(key_profiles=["bgate", "krumhansl"]))
    wave, _ = chord_sequence([("C", "maj"), ("A", "min"), ("F", "maj"), ("G", "maj")], 100.0, 4, 6.0)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    for spec in _spectra(wave, analyzer._bh_window, _HPCP_HOP, centred=False)[::7]:
        freqs, mags = analyzer._peaks(spec)
        direct_freqs, direct_mags = _per_frame(analyzer._peaks)(spec)
        np.testing.assert_array_equal(freqs, direct_freqs)
        np.testing.assert_array_equal(
            analyzer._hpcp(freqs, mags), _per_frame(analyzer._hpcp)(direct_freqs, direct_mags)
        )
    for spec in _spectra(wave, analyzer._hann_window, 4096, centred=True):
        freqs, mags = analyzer._kpeaks(spec)
        white = analyzer._kwhite(spec, freqs, mags)
        np.testing.assert_array_equal(white, _per_frame(analyzer._kwhite)(spec, freqs, mags))
        np.testing.assert_array_equal(analyzer._khpcp(freqs, white), _per_frame(analyzer._khpcp)(freqs, white))


def _a_based(weights_by_pc: dict[int, float]) -> np.ndarray:
    """A 12-bin profile in essentia's A-based bin order from {pitch class (C = 0): weight}."""
    out = np.zeros(12)
    for pc, w in weights_by_pc.items():
        out[(pc - 9) % 12] = w
    return out


def test_key_in_file_context_outvotes_a_clip_that_sits_on_the_dominant():
    analyzer = ClipAnalyzer(
        essentia_era(
            key_profiles=["bgate", "braw", "edma", "krumhansl", "shaath", "temperley", "tonictriad"],
            key_file_context=1.0,
        )
    )
    # a clip on the dominant: G strongest, F absent (votes G major alone); the rest of the file in C major
    dominant = _a_based({7: 1.0, 11: 0.7, 2: 0.8, 0: 0.6, 4: 0.4, 9: 0.4})
    tonic = _a_based({0: 1.0, 4: 0.7, 7: 0.6, 5: 0.6, 2: 0.4, 9: 0.4, 11: 0.2})
    alone = analyzer._vote(dominant)
    assert alone[:2] == ("G", "major")
    assert analyzer.key_in_context(dominant, [tonic, dominant, tonic, tonic])[:2] == ("C", "major")
    # a file that is all on G keeps G
    assert analyzer.key_in_context(dominant, [dominant, dominant])[:2] == ("G", "major")


def test_cue_matrix_shifts_neighbours_in_and_pads_the_edges_with_zero():
    cues = {"a": np.array([0.0, 1.0, 2.0, 3.0]), "b": np.array([1.0, 1.0, 1.0, 5.0])}
    m = cue_matrix(cues, ["a", "b"], [-1, 0, 1])
    z = (cues["a"] - cues["a"].mean()) / cues["a"].std()
    assert m.shape == (4, 6)
    np.testing.assert_allclose(m[:, 1], z)
    np.testing.assert_allclose(m[:, 0], [0.0, z[0], z[1], z[2]])  # beat i - 1
    np.testing.assert_allclose(m[:, 2], [z[1], z[2], z[3], 0.0])  # beat i + 1
    assert np.all(np.abs(m) <= 2.5)


def test_file_bar_phase_stitches_clips_onto_one_bar_grid():
    period = 0.5
    rng = np.random.default_rng(0)
    # a 4/4 file, downbeats on global beats 2, 6, 10, ...; clip 2 starts at 10 s, one period after clip 1's last
    # beat, so its beats are global beats 20, 21, ... and its downbeats its 3rd, 7th, ... beats
    clip1 = np.arange(0.0, 10.0, period)
    clip2 = np.arange(0.0, 9.8, period)
    g1, g2 = np.arange(len(clip1)), 20 + np.arange(len(clip2))
    ev1 = np.where((g1 - 2) % 4 == 0, 1.0, 0.0) + 0.3 * rng.standard_normal(len(g1))
    ev2 = np.where((g2 - 2) % 4 == 0, 1.0, 0.0) + 0.3 * rng.standard_normal(len(g2))
    downbeats, meter = file_bar_phase([(0.0, clip1, ev1), (10.0, clip2, ev2)], meter_bias={2: 0.0, 3: 0.0, 4: 0.0})
    assert meter == 4
    np.testing.assert_allclose(downbeats[0], clip1[2::4])
    np.testing.assert_allclose(downbeats[1], clip2[2::4])  # global beat 22 = clip 2's third beat
    # evidence that lives only in clip 2 still sets the phase of clip 1 (one grid for the file)
    flat = 0.01 * rng.standard_normal(len(g1))
    downbeats, _ = file_bar_phase([(0.0, clip1, flat), (10.0, clip2, 3 * ev2)], meter_bias={2: 0.0, 3: 0.0, 4: 0.0})
    np.testing.assert_allclose(downbeats[0], clip1[2::4])


def test_file_bar_phase_with_overlapping_clips():
    # 120 bpm 4/4, downbeats at 0.25 + 2k s; 10 s clips every 5 s (hop < clip): clips at 0, 5 and 10 s
    period, rng = 0.5, np.random.default_rng(1)
    clips = []
    for start in (0.0, 5.0, 10.0):
        beats = np.arange(0.25, 10.0, period)
        absolute = start + beats
        bar_pos = np.round((absolute - 0.25) / period).astype(int) % 4
        clips.append((start, beats, np.where(bar_pos == 0, 1.0, 0.0) + 0.2 * rng.standard_normal(len(beats))))
    downbeats, meter = file_bar_phase(clips, meter_bias={2: 0.0, 3: 0.0, 4: 0.0})
    assert meter == 4
    for (start, _, _), d in zip(clips, downbeats):
        absolute = start + d
        np.testing.assert_allclose((absolute - 0.25) % 2.0, 0.0, atol=1e-9)
        assert len(d) == 5


def test_file_bar_phase_lets_a_clip_whose_count_slipped_take_its_own_phase():
    """A 3/4 file at 120 bpm in three 10 s clips. The middle clip's tracker starts cold: a false beat at 10.2 s,
    then the real beats from 11 s (10.5 s missed), so the stitched count slips one beat there and the clips before
    and after the slip disagree. On one phase for the file, one side's downbeats all miss the bar lines; with the
    re-phase penalty each clip follows its own evidence and every clip's downbeats are bar lines."""
    period, rng = 0.5, np.random.default_rng(2)
    clips, truth = [], []
    for k, start in enumerate((0.0, 10.0, 20.0)):
        beats = np.concatenate([[0.2], np.arange(1.0, 10.0, period)]) if k == 1 else np.arange(0.0, 10.0, period)
        number = (start + beats) / period
        on_bar = (np.abs(number - np.round(number)) < 1e-9) & (np.round(number) % 3 == 0)
        clips.append((start, beats, on_bar + 0.2 * rng.standard_normal(len(beats))))
        truth.append(beats[on_bar])
    bias = {2: 0.0, 3: 0.0, 4: 0.0}
    stitched, _ = file_bar_phase(clips, meter_bias=bias)
    assert any(not np.intersect1d(d, t).size for d, t in zip(stitched, truth))  # a whole clip off the bar lines
    downbeats, meter = file_bar_phase(clips, meter_bias=bias, rephase_penalty=1.0)
    assert meter == 3
    for k, (d, t) in enumerate(zip(downbeats, truth)):
        np.testing.assert_allclose(d[d >= 0.5] if k == 1 else d, t)  # (the false beat holds a count slot of its own)
    # evidence too weak to beat the penalty keeps the file's phase: no clip re-phases on noise
    quiet = [(s, b, e if k != 1 else 0.05 * rng.standard_normal(len(b))) for k, (s, b, e) in enumerate(clips)]
    downbeats, meter = file_bar_phase(quiet, meter_bias=bias, rephase_penalty=1.0)
    assert meter == 3
    np.testing.assert_allclose(downbeats[0], truth[0])
    np.testing.assert_allclose(downbeats[2], truth[2])


def test_percussiveness_separates_a_drum_kit_from_a_chord_pad():
    drums = click_track(120.0, 6.0, accent_every=4)
    pad, _ = chord_sequence([("C", "maj"), ("G", "maj")], 100.0, 4, 6.0)
    assert percussiveness(onset_envelopes(drums, SR)) > percussiveness(onset_envelopes(np.asarray(pad, np.float32), SR))


def test_downbeat_model_ships_and_a_malformed_one_is_refused(tmp_path):
    import json

    model = load_downbeat_model("builtin")
    n = len(model["cues"]) * len(model["shifts"])
    for kind in ("percussive", "tonal"):
        trees = model["models"][kind]["trees"]
        assert len(trees) == 100 and all(f < n for t in trees for f in t["feature"])
    with open(DOWNBEAT_MODEL) as f:
        bad = json.load(f)
    bad["models"]["tonal"]["trees"][0]["feature"][0] = 999
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="splits on feature 999 of 30"):
        load_downbeat_model(str(path))
    # a model may read up to 4 beats either side (`fit_downbeats.py --shifts`); further than a short clip holds, no
    with open(DOWNBEAT_MODEL) as f:
        wide = json.load(f)
    wide["shifts"] = [-4, -3, -2, -1, 0, 1, 2, 3, 4]
    path.write_text(json.dumps(wide))
    assert load_downbeat_model(str(path))["shifts"] == wide["shifts"]
    wide["shifts"] = [-5, 0, 5]
    path.write_text(json.dumps(wide))
    with pytest.raises(ValueError, match="shifts beyond"):
        load_downbeat_model(str(path))


def test_shipped_downbeat_model_finds_bar_lines_of_a_chord_sequence(default_analyzer):
    # chords change every 4 beats at 100 bpm (tonal path of the model: no drums); the clip starts on the bar's
    # second beat, so "the first beat is a downbeat" (what a model without evidence falls back to) is wrong
    wave, _ = chord_sequence([("C", "maj"), ("A", "min"), ("F", "maj"), ("G", "maj")], 100.0, 4, 11.0)
    wave = np.asarray(wave, np.float32)[int(0.6 * SR) :]
    f = default_analyzer.analyze(wave)
    truth = np.arange(4 * 0.6 - 0.6, 10.0, 4 * 0.6)
    assert f.beat_evidence is not None and len(f.beat_evidence) == len(f.beats_s)
    assert mir_eval.beat.f_measure(truth, np.asarray(f.downbeats_s)) >= 0.8, f.downbeats_s


def test_exported_boosted_trees_score_like_sklearn():
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6))
    y = ((x[:, 0] * x[:, 1] > 0) ^ (x[:, 2] > 0.5)).astype(int)  # needs interactions: a linear model cannot
    clf = HistGradientBoostingClassifier(max_iter=30, max_depth=3, random_state=0).fit(x, y)
    exported = export_boosted_trees(clf)
    model = {**exported, "_arrays": stack_trees(exported["trees"])}
    test = rng.normal(size=(200, 6))
    np.testing.assert_allclose(boosted_trees_score(test, model), clf.decision_function(test), atol=1e-9)


def _fast_pulse(even_bass: float):
    """A 180 bpm pulse over one held chord: the even beats' bass level is 1 + `even_bass`, the odd beats' swings
    between 2 and 0 (so the odd beats are no weaker on average). Returns halve_fast_beats' inputs."""
    times = np.arange(0.0, 10.0, 0.01)
    beats = np.arange(0.105, 10.0, 60.0 / 180.0)
    chroma = np.ones((len(times), 12))
    level = np.where(
        np.arange(len(beats)) % 2 == 0, 1.0 + even_bass, np.where(np.arange(len(beats)) % 4 == 1, 2.0, 0.0)
    )
    low = np.zeros(len(times))
    low[np.searchsorted(times, beats)] = np.expm1(level)
    return beats, chroma, times, low, 10.0


def test_halve_fast_beats_keeps_the_stronger_phase_only_past_the_minimum_contrast():
    """The contrast of the even beats over the odd ones is about 0.21 z units here: the default minimum (0.15) halves
    the pulse onto the even beats, a stricter one (0.3) keeps every beat, and a pulse at 100 bpm is never halved."""
    beats, chroma, times, low, duration = _fast_pulse(0.22)
    halved = halve_fast_beats(beats, chroma, times, low, duration, max_bpm=150.0, min_contrast=0.15)
    np.testing.assert_allclose(halved, beats[0::2])
    kept = halve_fast_beats(beats, chroma, times, low, duration, max_bpm=150.0, min_contrast=0.3)
    np.testing.assert_allclose(kept, beats)
    assert len(halve_fast_beats(beats, chroma, times, low, duration, max_bpm=200.0, min_contrast=0.0)) == len(beats)
    alike = halve_fast_beats(*_fast_pulse(0.0), max_bpm=150.0, min_contrast=0.15)
    assert len(alike) == len(beats)  # no phase stands out: not a subdivision


def _clip_profiles(analyzer: ClipAnalyzer, wave: np.ndarray, clip_s: float = 10.0, sr: int = 44100) -> list:
    n = int(clip_s * sr)
    return [analyzer._key_pcp(wave[i : i + n]) for i in range(0, len(wave) - n // 2, n)]


def test_file_key_is_the_piece_key_where_one_clip_sits_in_another():
    analyzer = ClipAnalyzer(essentia_era(key_profiles=["bgate", "temperley"]))
    # 10 s in C major (the relative), then 20 s of A minor cadences: the first clip is in C, the file in A minor
    wave = np.concatenate([cadence("C", "major", 10.0), cadence("A", "minor", 10.0), cadence("A", "minor", 10.0)])
    pcps = _clip_profiles(analyzer, wave)
    assert analyzer._vote(pcps[0])[:2] == ("C", "major")
    assert analyzer.file_key(pcps) == ("A", "minor")
    assert analyzer.file_key([None, None]) == (None, None)  # silent clips have no profile


@pytest.mark.parametrize("key,mode", [("Eb", "major"), ("F#", "minor")])
def test_file_key_with_an_essentia_profile_is_key_extractor_on_the_whole_file(key, mode):
    """file_key_profile "bgate" sums the clips' profiles into the file's: essentia's KeyExtractor (its default
    profile) on the whole file names the same key."""
    import essentia.standard as es

    wave = np.concatenate([cadence(key, mode, 10.0), 0.5 * cadence(key, mode, 14.0)]).astype(np.float32)
    analyzer = ClipAnalyzer(essentia_era(key_profiles=["bgate"], file_key_profile="bgate"))
    reference = es.KeyExtractor(sampleRate=44100)(wave)[:2]
    assert reference == (key, mode)
    assert analyzer.file_key(_clip_profiles(analyzer, wave)) == reference


@pytest.mark.parametrize("profiles", [[], ["bgate"]])
def test_key_profile_alone_is_key_extractor_and_a_clip_without_pitch_names_no_key(profiles):
    """`key_profiles: []` votes `key_profile` alone on the same HPCP: KeyExtractor's key and strength. A clip that
    is not silent but has no pitch in KeyExtractor's 25-3500 Hz (a 6 kHz whistle) gets no key, where KeyExtractor
    names one (A minor, strength 0)."""
    import essentia.standard as es

    analyzer = ClipAnalyzer(essentia_era(key_profiles=profiles))
    wave = cadence("E", "minor", 10.0).astype(np.float32)
    f = analyzer.analyze(wave)
    key, mode, strength = es.KeyExtractor(sampleRate=44100)(wave)
    assert (f.key, f.mode) == (key, mode) == ("E", "minor")
    assert f.key_strength == pytest.approx(strength, abs=1e-6)
    whistle = (0.1 * np.sin(2 * np.pi * 6000.0 * np.arange(10 * SR) / SR)).astype(np.float32)
    assert es.KeyExtractor(sampleRate=44100)(whistle)[:2] == ("A", "minor")
    high = analyzer.analyze(whistle)
    assert not high.is_silent and high.key is None and high.mode is None and high.key_strength is None


_PROG = [("C", "maj"), ("A", "min"), ("F", "maj"), ("G", "maj"), ("E", "min"), ("D", "min"), ("G", "maj"), ("C", "maj")]


def _cut(wave: np.ndarray, clip_s: float, hop_s: float) -> list[tuple[int, float, np.ndarray]]:
    clip, hop = int(clip_s * SR), int(hop_s * SR)
    return [(i, i * hop_s, wave[s : s + clip]) for i, s in enumerate(range(0, len(wave) - clip + 1, hop))]


def test_clip_edges_borrowed_from_the_neighbours_give_the_whole_files_network_frames(network_analyzer):
    """The network frames of back-to-back clips, each computed with its neighbours' edge audio, are the frames of
    the uncut file: no dip of half-empty FFT windows (and no onset after it) at every clip boundary."""
    from pipelines.beat_network import spectral_frames
    from pipelines.features import _EDGE_FRAMES, _with_edges

    wave, _ = chord_sequence(_PROG, bpm=100.0, beats_per_chord=1, seconds=30.0, with_clicks=False)
    wave = wave.astype(np.float32)
    a = network_analyzer
    whole = spectral_frames(wave, SR, a._beat_network.features)
    edges = list(_with_edges(_cut(wave, 10.0, 10.0), SR, _EDGE_FRAMES * a._hop))
    joined = np.concatenate([a._network_frames(w, lead, tail)[:1000] for _, _, w, lead, tail in edges])
    np.testing.assert_array_equal(joined, whole[:3000])
    alone = np.concatenate([spectral_frames(w, SR, a._beat_network.features)[:1000] for _, _, w in _cut(wave, 10, 10)])
    assert np.abs(alone - whole[:3000]).max() > 0.1  # what cutting does without the edges
    # overlapping clips (hop < clip) borrow nothing: they are not back to back; nor does a clip shorter than the edge
    assert all(lead is None and tail is None for *_, lead, tail in _with_edges(_cut(wave, 10.0, 5.0), SR, 2205))
    short = [(0, 0.0, wave[:SR]), (1, 1.0, wave[SR : SR + 1000])]
    assert [(lead, tail) for *_, lead, tail in _with_edges(short, SR, 2205)] == [(None, None), (None, None)]


def test_clips_tracked_in_context_keep_one_beat_grid_across_their_boundaries(monkeypatch):
    """A file cut into 10 s clips at 100 bpm (a boundary every 16.7 beats, mid-beat): tracked with their
    neighbours (`beat_context_seconds`), the clips' beats continue one grid over each boundary and match the
    truth; with context 0 each clip is analysed exactly as `analyze` does alone."""
    bpm = 100.0
    wave, _ = chord_sequence(_PROG, bpm=bpm, beats_per_chord=1, seconds=40.0, with_clicks=False)
    wave = wave.astype(np.float32)
    clips = _cut(wave, 10.0, 10.0)
    in_context = ClipAnalyzer(FeatureParams.defaults(beat_context_seconds=2.5))
    tracked = list(in_context.analyze_clips(iter(clips)))
    assert [(i, s) for i, s, _ in tracked] == [(i, s) for i, s, _ in clips]
    beats = np.concatenate([s + np.asarray(f.beats_s) for _, s, f in tracked])
    period = 60.0 / bpm
    assert np.abs(np.diff(beats) / period - 1).max() < 0.05  # no beat lost or doubled at a boundary
    truth = np.arange(0.0, 40.0, period)
    assert mir_eval.beat.f_measure(truth, beats) >= 0.95

    # the network runs over runs of clips with one clip of context either side: cutting the file into runs of two
    # (so runs meet after clips 2 and 4) gives the same beats, to a frame
    import pipelines.features as features

    monkeypatch.setattr(features, "_CONTEXT_RUN", 2)
    for (_, _, f), (_, _, g) in zip(in_context.analyze_clips(iter(clips)), tracked):
        assert len(f.beats_s) == len(g.beats_s)
        np.testing.assert_allclose(f.beats_s, g.beats_s, atol=0.011)

    def same(f, g):
        for name in ("beats_s", "downbeats_s", "time_signature", "tempo_bpm", "key", "mode", "chords"):
            assert getattr(f, name) == getattr(g, name)
        np.testing.assert_array_equal(f.beat_evidence, g.beat_evidence)

    # with context 0, and for clips that overlap (hop < clip: no neighbour to borrow), each clip is analysed
    # exactly as `analyze` does alone
    alone = ClipAnalyzer(FeatureParams.defaults(beat_context_seconds=0.0))
    for (_, _, f), (_, _, w) in zip(alone.analyze_clips(iter(clips)), clips):
        same(f, alone.analyze(w))
    overlapping = _cut(wave[: 20 * SR], 10.0, 5.0)
    for (_, _, f), (_, _, w) in zip(in_context.analyze_clips(iter(overlapping)), overlapping):
        same(f, in_context.analyze(w))
