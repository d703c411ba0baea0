"""Part-writing statistics against counts made by hand."""

from __future__ import annotations

import numpy as np

from models.voice_leading import is_tertian, parallel_motions, parallels, voice_leading_stats


def _roll(*voices):
    return np.array(voices)


def test_parallel_octaves_and_fifths_are_found_where_they_are():
    # frames 0-1: C major (C5 G4 E4 C3); frames 2-3: D minor moved as a block; frames 4-5: contrary motion
    roll = _roll([72, 72, 74, 74, 72, 72], [67, 67, 69, 69, 67, 67], [64, 64, 65, 65, 64, 64], [48, 48, 50, 50, 53, 53])
    found = parallel_motions(roll)
    # S-B octave, S-A fourth (not counted), A-B fifth, S-T/A-T/T-B are sixths and thirds; both at the move to frame 2
    assert found == [(0, 3, 0, 2, "octave"), (1, 3, 0, 2, "fifth")]
    assert parallels(roll) == {"fifths": 1, "octaves": 1}


def test_held_chords_oblique_and_contrary_motion_are_not_parallels():
    held = _roll([72] * 8, [67] * 8, [64] * 8, [48] * 8)
    oblique = _roll([72, 72, 74, 74], [67, 67, 67, 67], [64, 64, 64, 64], [48, 48, 48, 48])
    contrary = _roll([72, 72, 74, 74], [67, 67, 65, 65], [64, 64, 62, 62], [48, 48, 43, 43])
    for roll in (held, oblique, contrary):
        assert parallel_motions(roll) == []
    # a fifth to a fifth through a rest is no motion between sounding notes
    rest = _roll([72, -1, 74], [65, 65, 67], [60, 60, 60], [48, 48, 48])
    assert parallel_motions(rest) == []


def test_compound_intervals_and_repeats_collapse():
    # soprano and bass two octaves and a fifth apart, moving up a step together: a compound parallel fifth;
    # the repeated first chord (frames 0-2) is one sonority, so the motion is reported from frame 0 to frame 3
    roll = _roll([67, 67, 67, 69], [64, 64, 64, 64], [60, 60, 60, 60], [36, 36, 36, 38])
    assert parallel_motions(roll) == [(0, 3, 0, 3, "fifth")]


def test_stats_of_a_cadence_by_hand():
    # 2 beats: G7 (G3 B3 F4 D5... voiced S D5, A F4, T B3, B G2) then C major (C5 E4 C4 C3)
    roll = np.repeat(_roll([74, 72], [65, 64], [59, 60], [43, 48]), 4, axis=1)
    s = voice_leading_stats(roll)
    assert s["beats"] == 2 and s["notes"] == 8
    assert s["parallel_fifths"] == s["parallel_octaves"] == 0
    assert s["tertian_beats"] == 2 and s["crossing_beats"] == 0
    assert s["out_of_range_notes"] == 0
    assert is_tertian({7, 11, 5}) and not is_tertian({0, 7})
