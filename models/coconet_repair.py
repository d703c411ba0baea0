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
   the pseudo-likelihood of the span), and only if it has fewer than the piece had; else leave that place alone.

Each attempt is a handful of model calls on a batch of `candidates`; `max_attempts` bounds the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.coconet import Coconet, Progress, classes_to_roll, predict, sample_categorical
from models.voice_leading import parallel_motions


def _span_end(roll: np.ndarray, start: int) -> int:
    """First frame after the sonority that starts at `start` (where any voice changes)."""
    frames = roll.T
    t = start + 1
    while t < len(frames) and np.array_equal(frames[t], frames[start]):
        t += 1
    return t


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
    left_alone: set[tuple] = set()
    while motions and report["attempts"] < max_attempts:
        todo = [m for m in motions if m[:4] not in left_alone]
        if not todo:
            break
        a, b, t0, t1, _ = todo[0]
        span = torch.zeros_like(free)
        span[..., t0 : _span_end(roll, t1)] = True
        span &= free
        if not span.any():
            left_alone.add(todo[0][:4])
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
            left_alone.add(todo[0][:4])
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
        )
