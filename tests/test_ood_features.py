"""benchmarks/ood_features.py: the product-minus-peer table pairs windows and resamples whole files."""

from __future__ import annotations

import numpy as np

from benchmarks.ood_features import METRICS, peer_gaps


def _row(system: str, file: str, start: float, beat_f: float) -> dict:
    return {
        "system": system,
        "split": "heldout",
        "file": file,
        "start_s": start,
        **dict.fromkeys(METRICS, np.nan),
        "beat_f": beat_f,
    }


def test_peer_gaps_pair_windows_and_resample_files():
    rows = []
    # file a: the product leads by 0.4 on both windows; file b: behind by 0.2 on one window
    for start in (0.0, 10.0):
        rows += [_row("product", "a", start, 0.9), _row("peer", "a", start, 0.5)]
    rows += [_row("product", "b", 0.0, 0.6), _row("peer", "b", 0.0, 0.8)]
    rows += [_row("peer", "c", 0.0, 0.1)]  # a window the product did not score: left out, not counted as 0
    rows += [_row("product", "a", 0.0, 0.0) | {"split": "dev"}]  # another split: ignored
    table = peer_gaps(rows, "heldout", resamples=500)
    line = next(line for line in table.splitlines() if line.startswith("| peer |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    beat = cells[METRICS.index("beat_f")]
    point, interval = beat.split(" ", 1)
    assert float(point) == np.round((0.4 + 0.4 - 0.2) / 3, 3)  # window-weighted mean of the paired differences
    lo, hi = (float(x) for x in interval.strip("()").split(","))
    assert lo == -0.2 and hi == 0.4  # resampled files: all-b and all-a draws bound it
    assert cells[METRICS.index("key_w")] == "-"  # no window where both name a key
