"""models/ngram.py: the per-voice n-gram baseline of evaluate_coconet."""

import numpy as np

from models.ngram import NgramModel, VoiceNgram, fit_ngram


def _rolls(n, T, seed):
    rng = np.random.default_rng(seed)
    # a voice that mostly holds its class, as 16th-note rolls do, with an occasional step
    out = []
    for _ in range(n):
        steps = rng.random((2, T)) < 0.3
        out.append((np.cumsum(steps, axis=1) % 4).astype(np.int64))
    return out


def test_each_context_is_a_distribution():
    m = VoiceNgram(3, 5.0, 5).fit(_rolls(4, 40, 0)[0])
    for history in [(), (1,), (2, 2), (0, 3), (4, 4)]:  # seen, unseen and never-seen contexts
        assert abs(sum(m.prob(history, x) for x in range(5)) - 1.0) < 1e-12


def test_the_grid_search_shares_counts_without_changing_any_model():
    train, valid = _rolls(6, 60, 1), _rolls(3, 60, 2)
    model, choice = fit_ngram(train, valid, n_classes=5, silent_class=4, orders=(1, 2, 4), strengths=(1.0, 10.0))
    fresh = NgramModel([VoiceNgram(choice["order"], choice["k"], 5).fit([r[v] for r in train]) for v in range(2)])
    for r in valid:
        assert np.allclose(model.frame_nll(r, 4), fresh.frame_nll(r, 4))
    by_grid = {(g["order"], g["k"]): g["valid_frame_nll"] for g in choice["grid"]}
    assert choice["valid_frame_nll"] == min(by_grid.values()) and len(by_grid) == 6
    # a held-note roll is predictable: a longer context beats the unigram
    assert by_grid[(2, 1.0)] < by_grid[(1, 1.0)]
