"""benchmarks/steering_push_terms.py: the generator's own trait-bearing takes it places beside a steered row (the
ceiling of a push that adds the trait)."""

from __future__ import annotations

from itertools import combinations
from types import SimpleNamespace

import numpy as np
import pytest

import benchmarks.steering_push_terms as spt
import models.evaluate_steering as es


def test_own_takes_keep_only_what_the_judges_call_trait_bearing_and_compare_at_the_rows_size(monkeypatch):
    rng = np.random.default_rng(1)
    dims, prompts_per_class, takes = 3, 4, 2
    ref = rng.normal(size=(8, dims))
    space = SimpleNamespace(reference=ref, project=lambda e: e)
    picked = {True: list(range(prompts_per_class)), False: list(range(prompts_per_class))}
    params = es.EvaluateSteeringParams(takes_per_prompt=takes, prompts_per_class=prompts_per_class)
    detector = SimpleNamespace(threshold=0.5)
    run = es._Run(params, None, None, "", False, None, detector, prompt_n=0, new_n=0, sampling={})
    # the stage's unsteered rows: drum-free takes weak (0), drum-bearing ones strong (1), on every descriptor
    weak, strong = np.zeros((6, 3)), np.ones((6, 3))
    stage_rows = [
        {"trait": "drums", "task": "text", "mode": "none", "direction": "add",
         "clips": {"descriptors": weak.tolist(), "detector_p": [0.1] * 6}},
        {"trait": "drums", "task": "text", "mode": "none", "direction": "remove",
         "clips": {"descriptors": strong.tolist(), "detector_p": [0.9] * 6}},
    ]  # fmt: skip
    # the own takes: 24; detected and strong (kept), detected but weak (dropped), not detected (dropped)
    n_own = prompts_per_class * 6
    emb = rng.normal(size=(n_own, dims))
    detector_p = np.array([0.9] * 12 + [0.9] * 6 + [0.2] * 6)
    descriptors = np.concatenate([np.ones((12, 3)), np.full((6, 3), 0.2), np.ones((6, 3))])
    seen = {}

    def fake_run_cell(own_run, trait, task, direction, prompts, mode):
        seen.update(takes=own_run.params.takes_per_prompt, direction=direction, mode=mode.name)
        clips = {"detector_p": detector_p.tolist(), "descriptors": descriptors.tolist()}
        return {"clips": clips}, emb, None

    monkeypatch.setattr(es, "_run_cell", fake_run_cell)
    prompts = SimpleNamespace(space=space, picked=picked)
    contexts = {("drums", "text"): (run, prompts, None)}
    out = spt.own_trait_takes(contexts, stage_rows, takes=6, subsets=5)
    fd, lo, hi, sp, kept, total, z = out[("drums", "text")]
    assert seen == {"takes": 6, "direction": "remove", "mode": "none"}  # unsteered, from the trait-bearing prompts
    assert (kept, total) == (12, n_own)
    np.testing.assert_array_equal(z, emb[:12])
    # compared at the steered row's size (4 prompts x 2 takes = 8 of the 12 kept), so the distance is one of a subset
    subsets = [es.frechet_distance(emb[:12][list(c)], ref) for c in combinations(range(12), 8)]
    assert min(subsets) - 1e-9 <= lo <= fd <= hi <= max(subsets) + 1e-9
    assert sp == pytest.approx(es.takes_spread(emb[:12], ref))
    # a K at which too few takes pass: nan, said, not a crash
    detector_p[:] = 0.2
    fd, lo, hi, sp, kept, total, z = spt.own_trait_takes(contexts, stage_rows, takes=6, subsets=5)[("drums", "text")]
    assert (kept, total) == (0, n_own) and np.isnan([fd, lo, hi, sp]).all()
