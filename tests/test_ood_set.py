"""benchmarks/ood_set.py: labels of a tiny score with a tempo change (beats, downbeats, tempo map, key)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.ood_set import TempoMap, choose_key, split_of, step_anchor
from pipelines.corpus_scores import PieceRef, load_score


@pytest.fixture(scope="module")
def tiny_score(tmp_path_factory):
    """Four 3/4 bars after a one-beat pickup, in A minor (key signature of C major / A minor)."""
    from music21 import key, meter, note, stream

    part = stream.Part()
    pickup = stream.Measure(number=0)
    pickup.append([meter.TimeSignature("3/4"), key.KeySignature(0), note.Note("E4", quarterLength=1.0)])
    pickup.paddingLeft = 2.0
    part.append(pickup)
    tune = ["A4", "C5", "E5", "A4", "B4", "G#4", "A4", "E4", "C5", "A4", "G#4", "A4"]
    for b in range(4):
        m = stream.Measure(number=b + 1)
        for p in tune[3 * b : 3 * b + 3]:
            m.append(note.Note(p, quarterLength=1.0))
        part.append(m)
    score = stream.Score([part])
    path = tmp_path_factory.mktemp("ood") / "tiny.musicxml"
    score.write("musicxml", fp=str(path))
    return load_score(PieceRef("user", str(path)))


def test_beats_downbeats_and_tempo_change(tiny_score):
    s = tiny_score
    assert s.time_signature == "3/4" and s.beats_per_bar == 3 and s.beat_ql == 1.0
    np.testing.assert_allclose(s.beats, np.arange(13.0))  # pickup beat + 4 bars of 3
    np.testing.assert_allclose(s.downbeats, [1.0, 4.0, 7.0, 10.0])  # the pickup has no downbeat
    # 60 bpm, then 120 bpm from the downbeat of bar 3 (ql 7)
    tmap = TempoMap([(0.0, 60.0), *step_anchor(7.0, 60.0, 120.0)], s.beat_ql)
    t = tmap.seconds(s.beats)
    ibi = np.diff(t)
    np.testing.assert_allclose(ibi[:6], 1.0, atol=0.01)
    np.testing.assert_allclose(ibi[7:], 0.5, atol=0.01)
    np.testing.assert_allclose(tmap.seconds(s.downbeats), [1.0, 4.0, 7.0, 8.5], atol=0.01)
    assert abs(tmap.ql_at(8.5) - 10.0) < 0.01


def test_ritardando_slows_monotonically(tiny_score):
    tmap = TempoMap([(0.0, 100.0), (4.0, 100.0), (13.0, 60.0)], 1.0)
    ibi = np.diff(tmap.seconds(np.arange(14.0)))
    np.testing.assert_allclose(ibi[:4], 0.6, atol=1e-3)
    assert np.all(np.diff(ibi[4:]) > 0) and ibi[-1] > 0.9


def test_key_from_signature_pair(tiny_score):
    tonic, mode, source = choose_key(tiny_score, tiny_score.end)
    assert (tonic, mode) == (9, "minor")  # A minor, not the signature's C major
    assert source.startswith("signature") or source.startswith("consensus")


def test_split_is_stable_by_piece():
    assert split_of("haydn-opus1no1-movement1") == split_of("haydn-opus1no1-movement1")
    assert {split_of(f"piece-{i}") for i in range(20)} == {"dev", "heldout"}


def test_fit_set_shares_no_work_with_the_ood_set_and_every_score_exists():
    """The downbeat evidence's fit set (`--fit`) must not contain the music it is judged on: no piece of the OOD set
    and no other movement of one of its works."""
    import os

    import music21

    from benchmarks.ood_set import FIT_PIECES, PIECES

    def work(rel: str) -> str:  # a movement belongs to its work's folder; any other file is a work of its own
        return os.path.dirname(rel) if "movement" in os.path.basename(rel) else os.path.splitext(rel)[0]

    assert {work(rel) for _, rel in FIT_PIECES}.isdisjoint({work(rel) for _, rel in PIECES})
    root = os.path.join(os.path.dirname(music21.__file__), "corpus")
    assert all(os.path.exists(os.path.join(root, rel)) for _, rel in FIT_PIECES + PIECES)


def test_beat_fit_set_shares_no_work_with_the_ood_set():
    """The beat network's training pieces (benchmarks/beat_fit_set.py) exclude every work of the OOD set, under
    either reading of a work: the folder of a multi-movement work, or the movement file itself."""
    import os

    import music21

    from benchmarks.beat_fit_set import SOURCES, beat_fit_pieces, work_of
    from benchmarks.ood_set import PIECES

    root = os.path.join(os.path.dirname(music21.__file__), "corpus")
    chosen = beat_fit_pieces(root)
    assert len(chosen) >= 100 and len({rel for _, rel in chosen}) == len(chosen)
    assert {family for _, family, _ in SOURCES} <= {family for family, _ in chosen}

    def movement_work(rel: str) -> str:
        return os.path.dirname(rel) if "movement" in os.path.basename(rel) else os.path.splitext(rel)[0]

    for work in (work_of, movement_work):
        assert {work(rel) for _, rel in chosen}.isdisjoint({work(rel) for _, rel in PIECES})
    assert work_of("haydn/opus74no1/movement2.mxl") == "haydn/opus74no1"
    assert work_of("monteverdi/madrigal.4.2.mxl") == "monteverdi/madrigal.4.2"


def test_chorale_fit_pieces_avoid_the_demo_corpus_and_the_in_domain_held_out_set():
    """`beat_fit_set.py --chorales` trains on chorales that neither the demo's corpus renders nor the in-domain
    held-out benchmark (benchmarks/feature_accuracy.py, offset 100) scores."""
    import os

    import music21

    from benchmarks.beat_fit_set import CHORALE_RANGE, chorale_pieces
    from core.config import load_section
    from pipelines.corpus import CorpusParams, select_pieces

    root = os.path.join(os.path.dirname(music21.__file__), "corpus")
    chosen = {os.path.join(root, rel) for _, rel in chorale_pieces(root)}
    assert len(chosen) == CHORALE_RANGE[1] - CHORALE_RANGE[0]
    demo_params = load_section(CorpusParams, "params.yaml", "corpus")
    demo = {r.path for r in select_pieces(demo_params) if r.corpus == "bach_chorales"}
    held_out = select_pieces(
        demo_params.model_copy(update={"corpora": ["bach_chorales"], "pieces": None, "piece_offset": 100})
    )
    assert len(demo) == 30 and chosen.isdisjoint(demo)
    assert len(held_out) > 100 and chosen.isdisjoint(r.path for r in held_out)


def test_a_second_take_renders_the_piece_anew_under_its_own_piece_id(tmp_path):
    """`render_piece(take=1)` (the beat fit set's second rendering): another file, its own seeded tempo plan and
    instruments, the next SoundFont, the same piece_id (a split by piece keeps both takes on one side), and labels
    that fit its own audio."""
    import os

    import music21
    import soundfile as sf

    from benchmarks.ood_set import render_piece
    from core.synth import default_soundfont

    root = os.path.join(os.path.dirname(music21.__file__), "corpus")
    os.makedirs(tmp_path / "audio")
    fonts = {"A": default_soundfont(), "B": default_soundfont()}
    rel = "ryansMammoth/JenningsChampionClog.abc"
    first, second = (render_piece("folk", rel, root, str(tmp_path), fonts, 44100, 12.0, take) for take in (0, 1))
    assert first["piece_id"] == second["piece_id"] and first["file"] != second["file"]
    assert second["file"].endswith("~1.flac") and {first["soundfont"], second["soundfont"]} == {"A", "B"}
    assert (first["tempo_start_bpm"], first["programs"]) != (second["tempo_start_bpm"], second["programs"])
    for row in (first, second):
        duration = sf.info(row["path"]).duration
        assert 0 < row["beats_s"][-1] < duration and set(row["downbeats_s"]) <= set(row["beats_s"])
