"""A per-voice n-gram model of four-part rolls: the simple baseline Coconet's likelihood is compared with.

Each voice is a sequence of classes on the 16th-note grid (pitch, or silence), modelled chronologically and
independently of the other voices: p(x_t | x_{t-n+1..t-1}), smoothed by interpolating each order with the one
below (Dirichlet prior with strength `k` around the lower order; add-one at the unigram). Order and strength are
chosen on the validation split by `fit_ngram`.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class VoiceNgram:
    order: int
    k: float
    n_classes: int
    counts: list[dict] = field(default_factory=list)  # per context length: {context: Counter(next)}

    def fit(self, sequences: list[np.ndarray]) -> VoiceNgram:
        self.counts = [defaultdict(Counter) for _ in range(self.order)]
        for seq in sequences:
            seq = [int(s) for s in seq]
            for t, x in enumerate(seq):
                for n in range(self.order):
                    if t - n < 0:
                        break
                    self.counts[n][tuple(seq[t - n : t])][x] += 1
        return self

    def prob(self, history: tuple[int, ...], x: int) -> float:
        p = 1.0 / self.n_classes
        for n in range(min(self.order, len(history) + 1)):
            ctx = history[len(history) - n :] if n else ()
            c = self.counts[n].get(ctx)
            if c is None:
                break
            total = sum(c.values())
            strength = 1.0 if n == 0 else self.k
            p = (c.get(x, 0) + strength * p) / (total + strength)
        return p

    def log_likelihoods(self, seq: np.ndarray) -> np.ndarray:
        seq = [int(s) for s in seq]
        return np.array([np.log(self.prob(tuple(seq[max(0, t - self.order + 1) : t]), x)) for t, x in enumerate(seq)])


@dataclass
class NgramModel:
    """One `VoiceNgram` per voice; classes as in models.coconet (silence = n_classes - 1)."""

    voices: list[VoiceNgram]

    def frame_nll(self, classes: np.ndarray, silent_class: int) -> np.ndarray:
        """NLL per frame [T]: the sum over sounding voices (silent cells add nothing, as in the paper's units)."""
        lls = np.stack([m.log_likelihoods(classes[v]) for v, m in enumerate(self.voices)])  # [V, T]
        return -(lls * (classes != silent_class)).sum(0)


def fit_ngram(
    train: list[np.ndarray],
    valid: list[np.ndarray],
    n_classes: int,
    silent_class: int,
    orders=(2, 4, 8, 16, 32),
    strengths=(10.0, 30.0, 100.0, 300.0),
) -> tuple[NgramModel, dict]:
    """Fit on `train` class rolls [V, T]; pick the (order, strength) with the lowest validation NLL per frame. The
    counts are made once, for the longest order; shorter orders read the first of them."""
    V = train[0].shape[0]
    full = [VoiceNgram(max(orders), 1.0, n_classes).fit([r[v] for r in train]) for v in range(V)]
    best, table = None, []
    for order, k in itertools.product(orders, strengths):
        model = NgramModel([VoiceNgram(order, k, n_classes, f.counts[:order]) for f in full])
        nll = float(np.concatenate([model.frame_nll(r, silent_class) for r in valid]).mean())
        table.append({"order": order, "k": k, "valid_frame_nll": nll})
        if best is None or nll < best[1]:
            best = (model, nll, order, k)
    model, nll, order, k = best
    return model, {"order": order, "k": k, "valid_frame_nll": nll, "grid": table}
