"""Ground-truth corpus: label conversion, metric grid with pickups, chord analysis, and a real render."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipelines.chords import to_harte
from pipelines.corpus import LABELS_FILE, CorpusParams, render_corpus
from pipelines.corpus_arrange import describe, mixes_of
from pipelines.corpus_scores import (
    Score,
    ScoreNote,
    analyse_chords,
    harmonise_melody,
    key_correlations,
    metric_grid,
    score_key,
    symbol_chords,
    transpose_label,
)


@pytest.mark.parametrize(
    "symbol, harte",
    [
        ("Am", "A:min"),
        ("E7", "E:7"),
        ("Am/c", "A:min/b3"),
        ("G7/b", "G:7/3"),
        ("D/f+", "D:maj/3"),
        ("Bb", "Bb:maj"),
        ("F#m", "F#:min"),
        ("N.C.", "N"),
    ],
)
def test_nottingham_symbols_to_harte(symbol, harte):
    assert to_harte(symbol) == harte


def test_transpose_label_keeps_quality_and_bass():
    assert transpose_label("A:min/b3", 3) == "C:min/b3"
    assert transpose_label("N", 5) == "N"


def test_metric_grid_pickup_and_section_pickup():
    # 4/4: a 1-beat pickup, a full bar, a 3-beat bar closing a section, a 1-beat pickup, a full bar
    bar = (4, 4, 4.0)
    measures = [
        (0.0, 1.0, 3.0, *bar),
        (1.0, 4.0, 0.0, *bar),
        (5.0, 3.0, 0.0, *bar),
        (8.0, 1.0, 0.0, *bar),
        (9.0, 4.0, 0.0, *bar),
    ]
    beats, downbeats = metric_grid(measures)
    assert downbeats.tolist() == [1.0, 5.0, 9.0]  # no downbeat in either pickup
    assert beats.tolist() == list(np.arange(0.0, 13.0))


def test_metric_grid_compound_metre():
    beats, downbeats = metric_grid([(0.0, 3.0, 0.0, 6, 8, 3.0), (3.0, 3.0, 0.0, 6, 8, 3.0)])
    assert beats.tolist() == [0.0, 1.5, 3.0, 4.5] and downbeats.tolist() == [0.0, 3.0]


def _score(voices, chord_symbols=()):
    beats = np.arange(0.0, 8.0)
    return Score("t", "user", "t", voices, beats, np.array([0.0, 4.0]), 1.0, "4/4", 4, 8.0, list(chord_symbols))


def test_analyse_chords_finds_triads_with_passing_tones():
    # C major for a bar (with a passing D), then G major in root position with a 7th (F) -> G:7
    v1 = [ScoreNote(0, 4, 48), ScoreNote(4, 8, 43)]
    v2 = [ScoreNote(0, 4, 64), ScoreNote(4, 8, 59)]
    v3 = [ScoreNote(0, 3.5, 67), ScoreNote(3.5, 4, 62), ScoreNote(4, 8, 62)]
    v4 = [ScoreNote(0, 4, 72), ScoreNote(4, 8, 65)]
    labels = [lab for _, _, lab in analyse_chords(_score([v1, v2, v3, v4]), 8.0)]
    assert labels == ["C:maj", "G:7"]


def test_harmonise_melody_and_symbols():
    melody = [[ScoreNote(0, 1, 64), ScoreNote(1, 2, 67), ScoreNote(2, 4, 72), ScoreNote(4, 6, 71), ScoreNote(6, 8, 72)]]
    segs = harmonise_melody(_score(melody), 8.0, 0, "major")
    assert segs[0][2] == "C:maj" and segs[-1][2] == "C:maj"
    sym = symbol_chords(_score(melody, [(0.0, "C"), (4.0, "G7/b")]), 8.0)
    assert sym == [(0.0, 4.0, "C:maj"), (4.0, 8.0, "G:7/3")]


def _tune(pitches, signature):
    melody = [[ScoreNote(i, i + 1, p) for i, p in enumerate(pitches)]]
    score = _score(melody)
    score.final_pitch, score.signature_key = pitches[-1], signature
    return score


def test_folk_key_from_final_note_unless_it_is_the_third_or_fifth_of_the_signature_key():
    g_major = [67, 71, 74, 72, 71, 69, 66, 67]  # G B D C B A F# G
    assert score_key(_tune(g_major, (7, "major"))) == (7, "major")
    # the same tune ending on its fifth (D) or third (B) is still in G major (K: G), not in D major / B minor
    assert score_key(_tune(g_major[:-1] + [62], (7, "major"))) == (7, "major")
    assert score_key(_tune(g_major[:-1] + [71], (7, "major"))) == (7, "major")
    # ending on the sixth (E) with G's signature: the final decides (E, and its third G makes it minor)
    assert score_key(_tune([64, 67, 71, 69, 67, 66, 64], (7, "major"))) == (4, "minor")
    # no signature: the final note
    assert score_key(_tune(g_major[:-1] + [62], None))[0] == 2


def test_reference_key_is_the_profiles_consensus_not_krumhansl_kessler_alone():
    # pitch-class durations of BWV 136.6's rendered opening (transposed to C minor): Eb and Ab, no F#, B naturals
    hist = np.array([0.42, 0.0, 0.53, 0.55, 0.0, 0.46, 0.0, 1.0, 0.17, 0.04, 0.48, 0.28])
    from music21.analysis.discrete import KrumhanslKessler

    kk = KrumhanslKessler()
    major, minor = np.array(kk.getWeights("major")), np.array(kk.getWeights("minor"))
    kk_only = [np.corrcoef(hist, np.roll(major, t))[0, 1] for t in range(12)] + [
        np.corrcoef(hist, np.roll(minor, t))[0, 1] for t in range(12)
    ]
    assert int(np.argmax(kk_only)) == 12 + 7  # Krumhansl-Kessler alone: G minor, the dominant
    assert int(np.argmax(key_correlations(hist))) == 12 + 0  # the four profiles: C minor
    # a plain diatonic C major histogram is C major for all of them
    c_major = np.array([5, 0, 2, 0, 3, 2, 0, 4, 0, 2, 0, 1], float)
    assert int(np.argmax(key_correlations(c_major))) == 0
    assert np.all(key_correlations(np.zeros(12)) == 0)


def test_describe():
    assert (
        describe("bach_chorales", ["strings", "organ", "strings"], ["drums"])
        == "A chorale for strings and organ with drums."
    )
    assert describe("essen", ["flute"], []) == "A folk song for flute."


TINY = {
    "corpora": ["nottingham", "bach_chorales"],
    "pieces": {"nottingham": 2, "bach_chorales": 1},
    "seed": 7,
    "variants": 1,
    "piece_seconds": 6.0,
    "sample_rate": 22050,
    "workers": 1,
    "voice_programs": [40, 42, 19],
    "melody_programs": [73],
    "pad_programs": [48],
    "bass_programs": [32, 33, 34],
    "piano_programs": [0, 1],
    "stem_gain_db": {"drums": [-4.0, 0.0], "bass": [-4.0, 0.0], "piano": [3.0, 3.0]},
}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    result = render_corpus(str(out), CorpusParams.parse(TINY, "corpus"), workers=1)
    return out, result


def test_render_writes_stems_mixes_sidecars_and_labels(tiny_corpus):
    out, result = tiny_corpus
    assert result.stats["pieces_rendered"] == 3 and result.stats["pieces_failed"] == 0
    labels = pq.read_table(out / LABELS_FILE).to_pylist()
    assert len(labels) == 3 * 4  # base mix + one neighbour per trait
    for row in labels:
        side = json.loads((out / "audio" / row["file"].replace(".flac", ".json")).read_text())
        assert set(side["traits"]) == {"drums", "bass", "piano"}
        assert side["split_group"] == row["piece_id"] and side["mix_id"] == row["mix_id"]
        assert side["description"].startswith("A ") and side["description"].endswith(".")
        assert (
            "with drums" in side["description"] or ", drums" in side["description"] or " drums" in side["description"]
        ) == side["traits"]["drums"]
        assert all(":" in c["label"] or c["label"] in ("N", "X") for c in row["chords"])
        assert row["beats_s"] == sorted(row["beats_s"]) and set(row["downbeats_s"]) <= set(row["beats_s"])
        assert row["duration_s"] <= 6.0 + 0.6
        for stem in ["score", "drums", "bass", "piano"]:
            assert (out / "stems" / row["mix_id"] / f"{stem}.flac").exists()
    # Nottingham's chord symbols arrive as Harte labels; the pickup bar is chordless and has no downbeat
    cuckoo = next(r for r in labels if r["piece_id"] == "nottingham-reelsa-c-80")
    assert cuckoo["chords"][0]["label"] == "N" and cuckoo["downbeats_s"][0] > 0
    assert cuckoo["chord_source"] == "symbols" and cuckoo["mode"] == "major"


def test_trait_pairs_differ_exactly_by_the_stem(tiny_corpus):
    out, _ = tiny_corpus
    labels = pq.read_table(out / LABELS_FILE).to_pylist()
    by_mix = {}
    for r in labels:
        by_mix.setdefault(r["mix_id"], []).append(r)
    checked = 0
    for mix_id, rows in by_mix.items():
        stems = {r["file"]: frozenset(s for s in r["stems"] if s != "score") for r in rows}
        for a, sa in stems.items():
            for b, sb in stems.items():
                if len(sa - sb) == 1 and not (sb - sa):
                    (trait,) = sa - sb
                    xa, _ = sf.read(out / "audio" / a, dtype="int16")
                    xb, _ = sf.read(out / "audio" / b, dtype="int16")
                    stem, _ = sf.read(out / "stems" / mix_id / f"{trait}.flac", dtype="int16")
                    assert np.array_equal(xa.astype(np.int32) - xb, stem.astype(np.int32))
                    assert np.abs(stem).max() > 100  # the stem is audible
                    checked += 1
    assert checked == 3 * 3  # every trait of every variant has its pair


def test_render_is_deterministic(tiny_corpus, tmp_path):
    out, _ = tiny_corpus
    params = CorpusParams.parse(dict(TINY, corpora=["nottingham"], pieces={"nottingham": 1}), "corpus")
    render_corpus(str(tmp_path), params, workers=1)
    for f in os.listdir(tmp_path / "audio"):
        assert (tmp_path / "audio" / f).read_bytes() == (out / "audio" / f).read_bytes()


def test_mixes_of_is_base_and_neighbours():
    class A:
        stems = {"score": 0, "drums": 0, "bass": 0, "piano": 0}
        base_traits = frozenset({"bass"})

    assert mixes_of(A) == [frozenset({"bass"}), frozenset({"bass", "drums"}), frozenset(), frozenset({"bass", "piano"})]


def test_mixing_is_identical_across_processes():
    """String hashing differs per process; the mixes (and so clip ids downstream) must not."""
    import subprocess
    import sys

    script = (
        "import hashlib, numpy as np\n"
        "from pipelines.corpus import mix_stems\n"
        "rng = np.random.default_rng(0)\n"
        "stems = {k: (0.3 * rng.standard_normal(44100)).astype(np.float32)\n"
        "         for k in ('score', 'drums', 'bass', 'piano')}\n"
        "mixes = [frozenset(m) for m in (('drums', 'bass'), ('bass',), ('drums',), ('drums', 'bass', 'piano'))]\n"
        "q, out = mix_stems(stems, {'score': 0.0, 'drums': -1.3, 'bass': 0.7, 'piano': 3.1}, mixes)\n"
        "print(hashlib.sha256(b''.join(out[m].tobytes() for m in mixes)).hexdigest())\n"
    )
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        digests.add(run.stdout.strip())
    assert len(digests) == 1


def _clarinet_score(path):
    """A one-bar score for a B-flat clarinet written a tone above its sound: written D5 sounds C5 (MIDI 72)."""
    from music21 import instrument, key, meter, note, stream

    part = stream.Part([instrument.Clarinet(), key.Key("D"), meter.TimeSignature("4/4")])
    part.append([note.Note("D5", quarterLength=1.0) for _ in range(4)])
    part.atSoundingPitch = False
    score = stream.Score([part])
    score.write("musicxml", fp=str(path))
    return path


def test_a_transposing_instrument_is_read_at_sounding_pitch(tmp_path):
    from core.score_io import parse_scores, score_voices
    from pipelines.corpus_scores import PieceRef, load_score

    path = _clarinet_score(tmp_path / "clarinet.musicxml")
    rendered = load_score(PieceRef("user", str(path)))
    assert {n.pitch for n in rendered.voices[0]} == {72}
    assert rendered.signature_key == (0, "major")  # D major written: C major sounding
    voices = score_voices(parse_scores(str(path))[0])
    assert set(voices.parts[0][voices.parts[0] >= 0].tolist()) == {72}
