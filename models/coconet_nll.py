"""Negative log-likelihood of whole pieces under Coconet, estimated as the paper does (Magenta's evaluators).

An orderless NADE defines one likelihood per ordering of the cells; the paper scores a piece along random
orderings and averages their probabilities (an ensemble):

- framewise: frames in a random (or chronological) order; a frame is predicted from the frames before it in the
  ordering, its four voices one after another in a random order, each conditioned on the model's own most likely
  value for the voices of that frame already predicted (not on the truth). Unit: the frame (sum over its voices).
- notewise: every (voice, frame) cell in one random order, each predicted from the true values of the cells
  before it. Unit: the cell.

The orderings' per-unit likelihoods are averaged in probability space (log-mean-exp over the ensemble), as
Magenta's EnsemblingEvaluator does. Silent cells add nothing to the loss, as in the paper's data encoding (a
silent voice has an all-zero pitch vector there); our model can still predict silence, so that mass is lost to it.

Every prediction needs only the model's output at one frame, so it is computed on a crop of the model's receptive
field around that frame (`models.coconet.predict_frames`): exact, and a piece of any length costs a window per
prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.coconet import Coconet, predict_frames, roll_to_classes

BATCH = 256  # predictions per model call


@dataclass
class PieceNLL:
    unit_nll: np.ndarray  # [units] nats per unit (frame or cell), ensemble-averaged
    scored: np.ndarray  # [units] bool: the unit holds at least one sounding cell


def _orderings(T: int, V: int, chronological: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    frames = np.arange(T) if chronological else rng.permutation(T)
    voices = np.stack([rng.permutation(V) for _ in range(T)])  # voice order within each frame
    return frames, voices


def framewise_lls(model: Coconet, classes: np.ndarray, chronological: bool, rng: np.random.Generator) -> np.ndarray:
    """Log-likelihood [T, V] of each cell along one frame ordering (silent cells included; the caller drops them)."""
    V, T = classes.shape
    frames, voice_order = _orderings(T, V, chronological, rng)
    x = torch.from_numpy(classes)[None].expand(T, V, T).clone()  # one copy of the piece per step
    mask = torch.zeros(T, V, T, dtype=torch.bool)
    position = np.empty(T, np.int64)
    position[frames] = np.arange(T)
    # step j hides frame frames[j] and every frame after it in the ordering
    mask[:] = torch.from_numpy(position[None, :] >= np.arange(T)[:, None])[:, None, :]
    lls = np.zeros((T, V), np.float32)
    steps = torch.arange(T)
    target_frames = torch.from_numpy(frames)
    truth = torch.from_numpy(classes)
    for d in range(V):
        voices = torch.from_numpy(voice_order[:, d])  # the voice each step predicts now
        logp = _predict(model, x, mask, target_frames)  # [T, V, C]
        step_logp = logp[steps, voices]  # [T, C]
        lls[frames, voice_order[:, d]] = step_logp.gather(1, truth[voices, target_frames][:, None])[:, 0].numpy()
        x[steps, voices, target_frames] = step_logp.argmax(-1)  # its own guess, not the truth
        mask[steps, voices, target_frames] = False
    return lls


def notewise_lls(model: Coconet, classes: np.ndarray, chronological: bool, rng: np.random.Generator) -> np.ndarray:
    """Log-likelihood [T, V] of each cell along one cell ordering, each given the true cells before it."""
    V, T = classes.shape
    n = V * T
    order = np.arange(n) if chronological else rng.permutation(n)  # cell id = frame * V + voice
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    pos = torch.from_numpy(position.reshape(T, V).T)  # [V, T]
    truth = torch.from_numpy(classes)
    lls = np.zeros((T, V), np.float32)
    for s in range(0, n, BATCH):
        steps = torch.arange(s, min(n, s + BATCH))
        cells = torch.from_numpy(order[s : s + len(steps)])
        t, v = cells // V, cells % V
        mask = pos[None] >= steps[:, None, None]  # [b, V, T]
        logp = _predict(model, truth[None].expand(len(steps), V, T), mask, t)
        lls[t.numpy(), v.numpy()] = logp[torch.arange(len(steps)), v].gather(1, truth[v, t][:, None])[:, 0].numpy()
    return lls


def _predict(model: Coconet, x: torch.Tensor, mask: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    out = [
        predict_frames(model, x[i : i + BATCH], mask[i : i + BATCH], frames[i : i + BATCH])
        for i in range(0, len(frames), BATCH)
    ]
    return torch.cat(out)


def piece_nll(
    model: Coconet, roll: np.ndarray, unit: str = "frame", ensemble: int = 5, chronological: bool = False, seed: int = 0
) -> PieceNLL:
    """NLL per unit of one roll [V, T] (MIDI pitches, -1 silent), ensembled over `ensemble` orderings."""
    classes = roll_to_classes(roll, model.cfg)
    sounding = np.asarray(roll).T >= 0  # [T, V]
    rng = np.random.default_rng(seed)
    fn = framewise_lls if unit == "frame" else notewise_lls
    runs = []
    for _ in range(ensemble):
        lls = fn(model, classes, chronological, rng) * sounding  # silent cells: no loss, as the paper
        runs.append(lls.sum(1) if unit == "frame" else lls.reshape(-1))
    stacked = np.stack(runs).astype(np.float64)
    mean_ll = np.logaddexp.reduce(stacked, axis=0) - np.log(len(runs))
    scored = sounding.any(1) if unit == "frame" else sounding.reshape(-1)
    return PieceNLL(-mean_ll, scored)


def dataset_nll(
    model: Coconet,
    rolls: list[np.ndarray],
    unit: str = "frame",
    ensemble: int = 5,
    chronological: bool = False,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Mean NLL over every unit of every piece (the paper's figure), the mean of per-piece means, and the standard
    error of the unit mean."""
    units, pieces = [], []
    for i, roll in enumerate(rolls):
        r = piece_nll(model, roll, unit, ensemble, chronological, seed=seed + i)
        units.append(r.unit_nll[r.scored])
        pieces.append(float(r.unit_nll[r.scored].mean()))
        if progress:
            progress(i + 1, len(rolls))
    flat = np.concatenate(units)
    return {
        "unit": unit,
        "ensemble": ensemble,
        "chronological": chronological,
        "pieces": len(rolls),
        "units": int(flat.size),
        "nll": float(flat.mean()),
        "sem": float(flat.std() / np.sqrt(flat.size)),
        "piece_mean_nll": float(np.mean(pieces)),
    }
