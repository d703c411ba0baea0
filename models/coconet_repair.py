"""Voice-leading repair: after a sampler has written a piece, rewrite the places where two voices move in parallel
fifths or octaves, with the model's own proposals.

A small Coconet (the `cpu` preset, 30 minutes of CPU) often moves whole chords as blocks, which a harmony teacher
marks at once; the paper's model, trained for days, does so far less. The repair keeps the model as the only
writer and uses the rule only to choose among what it proposes:

1. find the parallels (`models.voice_leading.parallel_motions`), the earliest first;
2. blank every free cell of the two sonorities involved (given cells stay: a melody is never touched);
3. let the model propose `candidates` rewrites of that span (one independent draw per cell from one prediction,
   then `refine_steps` blocked-Gibbs steps over the span, at the sampler's temperature);
4. keep the proposal with the fewest parallels in the whole piece (ties: the one the model finds most likely, by
   the pseudo-likelihood of the span), and only if it has fewer than the piece had; else try that place again
   with the span widened by a sonority on each side (`widen` times), then leave it alone.

Each attempt is a handful of model calls on a batch of `candidates`; `max_attempts` bounds the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.coconet import Coconet, Progress, classes_to_roll, predict, sample_categorical
from models.voice_leading import parallel_motions


def _span(roll: np.ndarray, t0: int, t1: int, widen: int) -> tuple[int, int]:
    """Frames [start, end) of the sonority starting at `t0` through the one starting at `t1`, plus `widen`
    sonorities on each side."""
    frames = roll.T
    starts = np.flatnonzero(np.r_[True, np.any(frames[1:] != frames[:-1], axis=1)])
    k0, k1 = int(np.searchsorted(starts, t0)), int(np.searchsorted(starts, t1))
    start = int(starts[max(0, k0 - widen)])
    end = int(starts[k1 + 1 + widen]) if k1 + 1 + widen < len(starts) else len(frames)
    return start, end


@torch.no_grad()
def repair_parallels(
    model: Coconet,
    classes: torch.Tensor,
    given: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
    candidates: int = 8,
    refine_steps: int = 2,
    max_attempts: int = 24,
    widen: int = 1,
) -> tuple[torch.Tensor, dict]:
    """`classes` [1, V, T] with parallels rewritten where the model offers a better span; (classes, report)."""
    if classes.shape[0] != 1:
        raise ValueError("repair_parallels takes one piece at a time")
    cfg = model.cfg
    free = ~given
    current = classes.clone()
    roll = classes_to_roll(current[0].numpy(), cfg)
    motions = parallel_motions(roll)
    report = {"parallels_before": len(motions), "attempts": 0, "rewrites": 0}
    tries: dict[tuple, int] = {}  # failed attempts per place: each retry widens the span by a sonority a side
    while motions and report["attempts"] < max_attempts:
        todo = [m for m in motions if tries.get(m[:4], 0) <= widen]
        if not todo:
            break
        key = todo[0][:4]
        start, end = _span(roll, key[2], key[3], tries.get(key, 0))
        span = torch.zeros_like(free)
        span[..., start:end] = True
        span &= free
        if not span.any():
            tries[key] = widen + 1
            continue
        report["attempts"] += 1
        proposals, span_k = current.repeat(candidates, 1, 1), span.repeat(candidates, 1, 1)
        logp = predict(model, current, span).expand(candidates, -1, -1, -1)
        proposals = torch.where(span_k, sample_categorical(logp, temperature, generator), proposals)
        for _ in range(refine_steps):
            mask = span_k & (torch.rand(span_k.shape, generator=generator) < 0.5)
            if mask.any():
                drawn = sample_categorical(predict(model, proposals, mask), temperature, generator)
                proposals = torch.where(mask, drawn, proposals)
        score = predict(model, proposals, span_k).gather(-1, proposals[..., None])[..., 0]
        score = (score * span_k).sum((1, 2))
        rolls = [classes_to_roll(p.numpy(), cfg) for p in proposals]
        counts = [len(parallel_motions(r)) for r in rolls]
        best = min(range(candidates), key=lambda i: (counts[i], -float(score[i])))
        if counts[best] < len(motions):
            current, roll = proposals[best : best + 1].clone(), rolls[best]
            motions = parallel_motions(roll)
            report["rewrites"] += 1
        else:
            tries[key] = tries.get(key, 0) + 1
    report["parallels_after"] = len(motions)
    return current, report


@dataclass
class RepairedSampler:
    """A sampler (Gibbs or ancestral) followed by `repair_parallels`: what `smitin harmonize / infill / compose`
    run by default. Same call as the samplers; given cells are never written by either part."""

    base: object
    candidates: int = 8
    refine_steps: int = 2
    max_attempts: int = 24
    widen: int = 1

    @property
    def name(self) -> str:
        return f"{self.base.name}+repair"

    @property
    def temperature(self) -> float:
        return self.base.temperature

    @property
    def steps(self):
        return getattr(self.base, "steps", None)

    def __call__(
        self,
        model: Coconet,
        classes: torch.Tensor,
        given: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        out = self.base(model, classes, given, generator=generator, progress=progress)
        self.reports = []
        for i in range(out.shape[0]):
            fixed, report = self.repair(model, out[i : i + 1], given[i : i + 1], generator)
            out[i : i + 1] = fixed
            self.reports.append(report)
        return out

    def repair(self, model: Coconet, classes: torch.Tensor, given: torch.Tensor, generator=None):
        # at temperature 0 every proposal would be the same; the repair needs a spread to choose from
        return repair_parallels(
            model,
            classes,
            given,
            temperature=self.temperature or 0.5,
            generator=generator,
            candidates=self.candidates,
            refine_steps=self.refine_steps,
            max_attempts=self.max_attempts,
            widen=self.widen,
        )
