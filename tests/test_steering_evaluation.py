"""Evaluation helpers: the Frechet distance, the embedding space, the table."""

import numpy as np
import pytest

from core.config import load_section
from core.errors import UserError
from models.evaluate_steering import (
    EmbeddingSpace,
    EvaluateSteeringParams,
    audio_embedding,
    format_table,
    frechet_distance,
    monitor_verdict,
    takes_spread,
)


def test_frechet_distance_zero_for_same_distribution_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
    shifted = frechet_distance(a + np.array([2.0, 0, 0, 0]), a)
    assert shifted == pytest.approx(4.0, rel=0.05)  # ||mu_a - mu_b||^2 with equal covariances
    assert frechet_distance(2.0 * a, a) == pytest.approx(4 * (2 - 1) ** 2, rel=0.15)  # Tr(Ca + Cb - 2 sqrt(Ca Cb))


def test_embedding_space_projects_reference_and_audio_embedding_shape():
    sr = 16000
    t = np.arange(sr) / sr
    waves = [np.sin(2 * np.pi * f * t).astype(np.float32) for f in (220, 330, 440, 550, 660, 770)]
    emb = np.stack([audio_embedding(w, sr) for w in waves])
    assert emb.shape == (6, 128)
    space = EmbeddingSpace(emb, dims=16)
    assert space.reference.shape == (6, 5)  # at most n - 1 dims from n clips
    assert space.frechet(emb) == pytest.approx(0.0, abs=1e-3)


def test_frechet_bootstrap_spread_shrinks_with_more_clips():
    rng = np.random.default_rng(0)
    space = EmbeddingSpace(rng.standard_normal((400, 8)), dims=8)
    few, many = rng.standard_normal((16, 8)), rng.standard_normal((128, 8))
    sd_few, sd_many = space.frechet_sd(few, seed=1), space.frechet_sd(many, seed=1)
    assert 0 < sd_many < sd_few
    assert space.frechet_sd(few, seed=1) == sd_few  # seeded
    assert np.isnan(space.frechet_sd(few[:2]))  # too few clips for a covariance


def test_spread_is_the_total_variance_over_the_references():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 4)) * [3.0, 2.0, 1.0, 0.5]
    assert takes_spread(ref, ref) == pytest.approx(1.0)
    assert takes_spread(2.0 * ref + 5.0, ref) == pytest.approx(4.0)  # a shift is the mean term's business
    assert takes_spread(np.tile(ref[:1], (10, 1)), ref) == pytest.approx(0.0)  # every take alike
    space = EmbeddingSpace(rng.standard_normal((200, 8)) * np.linspace(3, 0.5, 8), dims=8)
    clips = rng.standard_normal((50, 8)) * np.linspace(3, 0.5, 8)
    assert space.spread(clips) == pytest.approx(1.0, abs=0.3)  # another draw of the reference's distribution
    assert space.spread(0.5 * clips) == pytest.approx(0.25 * space.spread(clips))  # half as varied: a quarter


def test_table_has_every_row():
    rows = [
        {
            "trait": "drums",
            "task": "text",
            "direction": "add",
            "mode": m,
            "strength": s,
            "n": 4,
            "success": 0.5,
            "judged_present": 0.5,
            "frechet": 1.0,
            "frechet_rise": 0.1,
            "mean_probe_p": 0.3,
            "push_steps": 2.0,
        }
        for m, s in (("none", 0.0), ("smitin", 5.0))
    ]
    table = format_table(rows)
    assert table.count("\n") == 4 and "| smitin | +5 |" in table
    rows[1]["frechet_sd"] = 0.25
    assert "| 1.00 ± 0.2 |" in format_table(rows) and "| 1.00 |" in format_table(rows)  # sd where measured
    rows[1].update(frechet_rise_lo=-0.05, frechet_rise_hi=0.3)
    table = format_table(rows)
    assert "| +10% (-5% to +30%) |" in table and table.count("| +10% |") == 1  # the unsteered row has none
    rows[1]["spread"] = 0.414
    assert "| +10% (-5% to +30%) | 0.41 |" in format_table(rows)  # the spread beside the rise


def test_paired_frechet_rise_interval():
    """The FD rise of steered clips over their unsteered twins gets a paired (leave-one-prompt-out) interval: zero
    for the same clips, above zero for a real shift, around zero for another draw of the same distribution."""
    rng = np.random.default_rng(0)
    space = EmbeddingSpace(rng.standard_normal((64, 16)), dims=16)
    base = rng.standard_normal((32, 16)) * 1.3 + 0.5  # unsteered clips, already off the reference like real ones
    assert space.frechet_rise_interval(base, base) == pytest.approx((0.0, 0.0), abs=1e-6)
    lo, hi = space.frechet_rise_interval(base + 0.7, base)  # every steered clip moved further away
    assert 0 < lo < space.frechet(base + 0.7) / space.frechet(base) - 1 < hi
    covered = 0
    for _ in range(20):  # another draw of the unsteered distribution: the 90% interval holds zero most times
        a, b = (rng.standard_normal((32, 16)) * 1.3 + 0.5 for _ in range(2))
        lo, hi = space.frechet_rise_interval(a, b)
        covered += lo <= 0 <= hi
    assert covered >= 15
    assert all(np.isnan(space.frechet_rise_interval(base[:2], base[:2])))
    with pytest.raises(ValueError, match="as many steered as unsteered"):
        space.frechet_rise_interval(base[:5], base)


def test_frechet_rise_interval_leaves_a_prompts_takes_out_together():
    """Three takes of a prompt are nearly alike; with the prompts given, the jackknife leaves each prompt's takes out
    together and its 90% interval holds a true zero rise about as often as with one take a prompt. Leaving out one
    take at a time treats them as independent: the interval narrows and misses zero far more often."""
    rng = np.random.default_rng(1)
    space = EmbeddingSpace(rng.standard_normal((64, 16)), dims=16)

    def takes(prompts: np.ndarray) -> np.ndarray:  # row i from prompt i mod 32, the stage's order
        return np.tile(prompts, (3, 1)) + 0.2 * rng.standard_normal((96, 16))

    covered = {"by prompt": 0, "by take": 0}
    widths = {"by prompt": [], "by take": []}
    for _ in range(60):  # steered and unsteered prompts from one distribution: the true rise is zero
        a, b = (takes(rng.standard_normal((32, 16)) * 1.3 + 0.5) for _ in range(2))
        for name, prompts in (("by prompt", 32), ("by take", None)):
            lo, hi = space.frechet_rise_interval(a, b, prompts=prompts)
            covered[name] += lo <= 0 <= hi
            widths[name].append(hi - lo)
    assert covered["by prompt"] >= 48  # 90% nominal
    assert covered["by take"] <= covered["by prompt"] - 8
    assert np.median(widths["by take"]) < 0.75 * np.median(widths["by prompt"])
    # one take a prompt: the same interval either way
    a, b = (rng.standard_normal((32, 16)) for _ in range(2))
    assert space.frechet_rise_interval(a, b, prompts=32) == pytest.approx(space.frechet_rise_interval(a, b))
    assert all(np.isnan(space.frechet_rise_interval(a[:6], b[:6], prompts=2)))  # two prompts: no interval


def test_params_section_defaults_and_one_line_errors(tmp_path):
    assert EvaluateSteeringParams().alpha == 15.0  # the defaults are params.yaml's values
    path = tmp_path / "params.yaml"
    for body, key in (("alpah: 3", "alpah"), ("every: often", "every"), ("tasks: [txt]", "tasks.0")):
        path.write_text(f"seed: 7\nevaluate_steering:\n  {body}\n")
        with pytest.raises(UserError) as e:
            load_section(EvaluateSteeringParams, path, "evaluate_steering")
        assert str(e.value).startswith(f"{path}: evaluate_steering.{key}:") and "\n" not in str(e.value)
    path.write_text("seed: 7\nevaluate_steering:\n  every: 5\n")
    params = load_section(EvaluateSteeringParams, path, "evaluate_steering")
    assert (params.every, params.seed, params.prompts_per_class) == (5, 7, 32)


def _takes(strengths, detector_p, monitor, rng):
    """Clips of one row: descriptors at the given strengths between the anchors below (with a little spread)."""
    lo, hi = np.array([0.02, 2.0, 0.2]), np.array([0.12, 4.0, 0.5])
    X = np.array([lo + s * (hi - lo) for s in strengths]) + rng.normal(0, 1e-4, (len(strengths), 3))
    return {"descriptors": X.tolist(), "detector_p": list(detector_p), "monitor_end": list(monitor)}


def test_strength_judge_success_strength_left_and_monitor_agreement_by_hand():
    """Success of an added trait needs the detector's verdict and half the strength of the generator's own
    trait-bearing takes; removal reports the strength left against the unsteered takes; the monitor is right on a
    take when its verdict (>= tau) is the judges'."""
    from types import SimpleNamespace

    from models.evaluate_steering import _judge_strength

    rng = np.random.default_rng(0)
    row = lambda direction, mode, clips: {  # noqa: E731
        "trait": "drums",
        "task": "text",
        "direction": direction,
        "mode": mode,
        "tau": 0.7,
        "clips": clips,
    }
    rows = [
        # unsteered, prompts without drums: 4 drum-free takes (0) and one the detector calls drum-bearing (left out
        # of the anchor)
        row("add", "none", _takes([0, 0, 0, 0, 1], [0.1, 0.1, 0.2, 0.1, 0.9], [0.2, 0.3, 0.8, 0.2, 0.9], rng)),
        # steered: strong and detected / weak but detected / strong but not detected / detected, just at half
        row("add", "smitin", _takes([1.2, 0.2, 1.0, 0.55], [0.9, 0.9, 0.3, 0.8], [0.9, 0.9, 0.9, 0.6], rng)),
        # unsteered, prompts with drums: three detected takes at 1, one undetected one at 0
        row("remove", "none", _takes([1, 1, 1, 0], [0.9, 0.8, 0.9, 0.2], [0.9, 0.9, 0.9, 0.9], rng)),
        row("remove", "smitin", _takes([0.25, 0.0, 0.5, 0.0], [0.1, 0.1, 0.6, 0.1], [0.1, 0.2, 0.8, 0.1], rng)),
    ]
    real = {False: np.tile([0.02, 2.0, 0.2], (3, 1)) + rng.normal(0, 1e-3, (3, 3)), True: None}
    real[True] = real[False] + np.array([0.2, 4.0, 0.6])  # real drums: twice as strong as the generator's
    metrics = {}
    params = EvaluateSteeringParams()
    _judge_strength(rows, "drums", SimpleNamespace(real_descriptors=real), 0.5, params, metrics)
    add, remove = rows[1], rows[3]
    assert add["present_strong"] == pytest.approx(0.5)  # takes 1 and 4 (0.55 >= 0.5); 2 is weak, 3 undetected
    np.testing.assert_allclose(add["clips"]["strength_own"], [1.2, 0.2, 1.0, 0.55], atol=0.01)
    np.testing.assert_allclose(add["clips"]["strength_real"], [0.6, 0.1, 0.5, 0.275], atol=0.01)
    # unsteered takes with drums average 0.75 on the generator's scale, the removal row 0.1875: a quarter left
    assert remove["strength_left"] == pytest.approx(0.1875 / 0.75, abs=0.01)
    # the monitor's verdict (>= 0.7) against the judges' (detected and at least 0.5 strong)
    assert add["monitor_agreement"] == pytest.approx(0.25)  # right on take 1 only (2: weak, 3: undetected, 4: low)
    assert remove["monitor_agreement"] == pytest.approx(1.0)  # takes 1, 2, 4 absent and read absent; 3 both present
    assert rows[0]["monitor_agreement"] == pytest.approx(0.8)  # wrong on take 3 (reads 0.8, nothing there)
    pooled = metrics["drums"]["monitor_agreement"]  # a monitor's rows pooled with the unsteered ones
    assert pooled["none"] == pytest.approx((4 + 3) / 9)  # row 2: wrong on the undetected 4th take
    assert pooled["smitin"] == pytest.approx((4 + 3 + 1 + 4) / 17)
    assert metrics["drums"]["text"]["strength_scale_own"]["used"] == {
        "share": 1.0,
        "onset_rate": 1.0,
        "regularity": 1.0,
    }


def test_the_papers_monitor_pools_the_unsteered_takes_as_the_probes_read_them_not_prompt_relative():
    """With a prompt-relative monitor the unsteered rows keep both verdicts: the smitin monitor's agreement pools
    their prompt-relative one, the paper's monitor (which reads the probes as they are) their own reading."""
    from types import SimpleNamespace

    from models.evaluate_steering import _judge_strength

    rng = np.random.default_rng(1)

    def row(mode, strengths, detected, end, reading=None, relative=None, direction="add"):
        clips = _takes(strengths, detected, end, rng)
        if reading is not None:
            clips["reading_end"] = reading
        r = {"trait": "drums", "task": "continuation", "direction": direction, "mode": mode, "tau": 0.7}
        r["clips"] = clips
        return r if relative is None else {**r, "prompt_relative": relative}

    rows = [
        # unsteered: takes 1-2 drum-free, 3-4 drum-bearing; read prompt-relatively the monitor is right on all four,
        # by the probes' own reading (held down by the drum-free prompt) only on the first two
        row("none", [0, 0, 1, 1], [0.1, 0.1, 0.9, 0.9], [0.2, 0.3, 0.8, 0.9], reading=[0.2, 0.3, 0.5, 0.6]),
        row("smitin", [1, 1], [0.9, 0.9], [0.8, 0.9], relative=1.0),
        row("smitin_paper", [1, 1], [0.9, 0.9], [0.6, 0.9], relative=0.0),
        # unsteered drum prompts: drum-bearing takes, read present either way
        row("none", [1, 1], [0.9, 0.9], [0.9, 0.9], reading=[0.9, 0.8], direction="remove"),
    ]
    real = {False: np.tile([0.02, 2.0, 0.2], (3, 1)) + rng.normal(0, 1e-3, (3, 3))}
    real[True] = real[False] + np.array([0.1, 2.0, 0.3])
    metrics = {}
    _judge_strength(rows, "drums", SimpleNamespace(real_descriptors=real), 0.5, EvaluateSteeringParams(), metrics)
    pooled = metrics["drums"]["monitor_agreement"]
    assert pooled["none"] == pytest.approx(1.0)  # the product's (prompt-relative) monitor watching
    assert pooled["smitin"] == pytest.approx(8 / 8)
    assert pooled["smitin_paper"] == pytest.approx((2 + 2 + 1) / 8)  # its own take 1 reads 0.6; unsteered 3-4 missed


def test_modes_run_the_sustained_monitor_beside_the_papers_and_a_subset_on_request():
    from models.evaluate_steering import _modes
    from models.steering import SteeringParams

    modes = {m.name: m for m in _modes(EvaluateSteeringParams(), "text", main=None, ablation={})}
    assert list(modes) == ["none", "iti", "smitin", "smitin_paper", "smitin_x2", "random_control"]
    assert modes["smitin"].settings["hold_steps"] == 60 and "hold_steps" not in modes["smitin_paper"].settings
    # the unsteered rows watch with the smitin rows' monitor; the paper's reads the probes as they are
    assert modes["none"].settings["prompt_relative"] and modes["smitin"].settings["prompt_relative"]
    assert not SteeringParams(**modes["smitin_paper"].settings).prompt_relative
    sustained, paper = (SteeringParams(**modes[m].settings) for m in ("smitin", "smitin_paper"))
    assert (sustained.floor(removing=False), sustained.floor(removing=True)) == (0.25, 0.125)
    assert (paper.floor(removing=False), paper.floor(removing=True)) == (0.0, 0.0)  # the paper's monitor has none
    paper_only = EvaluateSteeringParams(hold_steps=0, hold_floor=0.0)  # no separate paper row when it is the monitor
    assert "smitin_paper" not in [m.name for m in _modes(paper_only, "text", main=None, ablation={})]
    picked = _modes(EvaluateSteeringParams(modes=["smitin"]), "text", main=None, ablation={})
    assert [m.name for m in picked] == ["none", "smitin"]  # the unsteered row always runs
    with pytest.raises(UserError, match=r"unknown \['smitin_typo'\]"):
        _modes(EvaluateSteeringParams(modes=["smitin_typo"]), "text", main=None, ablation={})


def test_monitor_verdict_reads_the_last_window_of_steps_per_take():
    """The verdict on a take is its mean reading over the last `window` steps: a take whose early readings (the
    prompt's context) say present but whose last half says absent is read absent, per take, and the default window
    is the second half of a 3 s take at 40 frames a second."""
    early, late = [0.9, 0.1], [0.2, 0.8]  # take 0: present early only; take 1: present late only
    steps = [{"traits": {"drums": {"probability": early}}}] * 60 + [{"traits": {"drums": {"probability": late}}}] * 60
    np.testing.assert_allclose(monitor_verdict(steps, "drums", 60), late)
    np.testing.assert_allclose(monitor_verdict(steps, "drums", 120), [0.55, 0.45])
    np.testing.assert_allclose(monitor_verdict(steps, "drums", 500), [0.55, 0.45])  # fewer steps than the window
    assert EvaluateSteeringParams().monitor_window == 60
