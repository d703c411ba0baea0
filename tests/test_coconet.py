"""Coconet: the orderless loss and its rescaling by hand, the NLL estimators against exact enumeration, samplers
that never touch given cells, the receptive-field crop, save / load, and a short training run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from models.coconet import (
    AncestralSampler,
    Coconet,
    CoconetConfig,
    CoconetError,
    GibbsSampler,
    YaoSchedule,
    classes_to_roll,
    fill,
    given_cells,
    load_coconet,
    orderless_loss,
    orderless_mask,
    predict,
    predict_frames,
    roll_to_classes,
    save_coconet,
)
from models.coconet_nll import framewise_lls, notewise_lls, piece_nll
from models.coconet_repair import RepairedSampler, repair_parallels
from models.voice_leading import parallel_motions


def tiny(n_voices=2, min_pitch=60, max_pitch=61, n_layers=4, filters=6, seed=0, dilations=(1,)) -> Coconet:
    """A random network small enough to enumerate every roll it can score (3 classes: two pitches + silence)."""
    torch.manual_seed(seed)
    model = Coconet(
        CoconetConfig(
            n_voices=n_voices,
            min_pitch=min_pitch,
            max_pitch=max_pitch,
            n_layers=n_layers,
            filters=filters,
            dilations=list(dilations),
        )
    )
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


# ----------------------------------------------------------------------------------------------------- loss
def test_orderless_loss_and_its_rescaling_by_hand():
    # one example, 1 voice x 3 frames, 2 classes; logits chosen so each cell's cross-entropy is easy to write down
    logits = torch.tensor([[[[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]]]])  # [B=1, V=1, T=3, C=2]
    target = torch.tensor([[[0, 1, 1]]])
    ce = [math.log(2), math.log(1 + math.e**2), math.log(1 + math.e**-1)]
    mask = torch.tensor([[[True, True, False]]])  # k = 2 of D = 3 cells masked
    assert orderless_loss(logits, target, mask) == pytest.approx((ce[0] + ce[1]) / 2, abs=1e-6)
    assert orderless_loss(logits, target, mask, rescale=False) == pytest.approx((ce[0] + ce[1]) / 3, abs=1e-6)
    # two examples with different k: the rescaled loss weights each example's cells by 1 / its own k
    logits2 = logits.repeat(2, 1, 1, 1)
    target2 = target.repeat(2, 1, 1)
    mask2 = torch.tensor([[[True, True, False]], [[False, False, True]]])
    expected = ((ce[0] + ce[1]) / 2 + ce[2] / 1) / 2
    assert orderless_loss(logits2, target2, mask2) == pytest.approx(expected, abs=1e-6)
    unscaled = ((ce[0] + ce[1]) / 3 + ce[2] / 3) / 2
    assert orderless_loss(logits2, target2, mask2, rescale=False) == pytest.approx(unscaled, abs=1e-6)


def test_rescaled_loss_times_D_estimates_the_orderings_nll():
    """E_k[D * rescaled loss] = the NLL of a random cell ordering, averaged over orderings: checked by exact
    averaging over every subset on a tiny model (the identity the paper's rescaling rests on)."""
    model = tiny(n_voices=1)
    roll = np.array([[60, 61, -1]])
    classes = torch.from_numpy(roll_to_classes(roll, model.cfg))[None]
    D = classes.numel()
    cells = list(range(D))
    # expected rescaled loss: k uniform on 1..D, then a uniform subset of size k
    expected = 0.0
    for k in range(1, D + 1):
        subsets = list(itertools.combinations(cells, k))
        for sub in subsets:
            mask = torch.zeros(1, 1, D, dtype=torch.bool)
            mask[0, 0, list(sub)] = True
            with torch.no_grad():
                expected += float(orderless_loss(model(classes, mask), classes, mask)) / len(subsets) / D
    # average over all orderings of the chain-rule NLL
    total, n = 0.0, 0
    for order in itertools.permutations(cells):
        nll = 0.0
        for j, cell in enumerate(order):
            mask = torch.zeros(1, 1, D, dtype=torch.bool)
            mask[0, 0, list(order[j:])] = True
            nll -= float(predict(model, classes, mask)[0, 0, cell, classes[0, 0, cell]])
        total += nll
        n += 1
    assert D * expected == pytest.approx(total / n, rel=1e-5)


def test_orderless_mask_sizes_are_uniform_and_spare_padding():
    valid = torch.ones(4000, 2, 5, dtype=torch.bool)
    valid[:, :, 4] = False  # padding frame: never masked
    mask = orderless_mask(valid, torch.Generator().manual_seed(0))
    assert not mask[:, :, 4].any()
    k = mask.sum((1, 2))
    assert int(k.min()) == 1 and int(k.max()) == 8
    counts = torch.bincount(k, minlength=9)[1:].float() / len(k)
    assert torch.allclose(counts, torch.full((8,), 1 / 8), atol=0.03)


# ----------------------------------------------------------------------------------------------------- likelihood
def _all_rolls(V: int, T: int, pitches=(60, 61, -1)):
    for values in itertools.product(pitches, repeat=V * T):
        yield np.array(values).reshape(T, V).T


def test_notewise_estimator_is_a_normalised_distribution_and_matches_the_chain_rule():
    model = tiny(n_voices=2)
    V, T = 2, 3
    seed = 5
    total = 0.0
    for roll in _all_rolls(V, T):
        classes = roll_to_classes(roll, model.cfg)
        lls = notewise_lls(model, classes, False, np.random.default_rng(seed))  # the same ordering for every roll
        total += math.exp(float(lls.sum()))
    assert total == pytest.approx(1.0, abs=1e-4)
    # one roll by hand: the same ordering, each cell predicted from the full roll (no crop)
    roll = np.array([[60, 61, -1], [61, 61, 60]])
    classes = torch.from_numpy(roll_to_classes(roll, model.cfg))[None]
    order = np.random.default_rng(seed).permutation(V * T)
    lls = notewise_lls(model, classes[0].numpy(), False, np.random.default_rng(seed))
    for j, cell in enumerate(order):
        t, v = divmod(int(cell), V)
        mask = torch.zeros(1, V, T, dtype=torch.bool)
        for later in order[j:]:
            tt, vv = divmod(int(later), V)
            mask[0, vv, tt] = True
        want = float(predict(model, classes, mask)[0, v, t, classes[0, v, t]])
        assert lls[t, v] == pytest.approx(want, abs=1e-5)


def test_framewise_estimator_with_one_voice_is_a_normalised_distribution():
    model = tiny(n_voices=1)
    total = sum(
        math.exp(float(framewise_lls(model, roll_to_classes(r, model.cfg), False, np.random.default_rng(3)).sum()))
        for r in _all_rolls(1, 4)
    )
    assert total == pytest.approx(1.0, abs=1e-4)


def test_framewise_estimator_conditions_on_its_own_guess_within_a_frame():
    """Two voices: the second voice of a frame is predicted with the first set to the model's argmax, not the truth
    (Magenta's FrameEvaluator): recomputed here from full-roll predictions."""
    model = tiny(n_voices=2)
    roll = np.array([[60, 61, 61], [61, -1, 60]])
    classes = torch.from_numpy(roll_to_classes(roll, model.cfg))[None]
    rng = np.random.default_rng(9)
    frames = rng.permutation(3)
    voice_order = np.stack([rng.permutation(2) for _ in range(3)])
    lls = framewise_lls(model, classes[0].numpy(), False, np.random.default_rng(9))
    for j, t in enumerate(frames):
        x = classes.clone()
        mask = torch.zeros(1, 2, 3, dtype=torch.bool)
        for later in frames[j:]:
            mask[0, :, later] = True
        for v in voice_order[j]:
            logp = predict(model, x, mask)[0, v, t]
            assert lls[t, v] == pytest.approx(float(logp[classes[0, v, t]]), abs=1e-5)
            x[0, v, t] = int(logp.argmax())
            mask[0, v, t] = False


def test_ensemble_averages_orderings_in_probability_space():
    model = tiny(n_voices=2)
    roll = np.array([[60, 61, 61, 60], [61, 60, 60, 61]])
    classes = roll_to_classes(roll, model.cfg)
    rng = np.random.default_rng(0)
    a = framewise_lls(model, classes, False, rng).sum(1)
    b = framewise_lls(model, classes, False, rng).sum(1)
    got = piece_nll(model, roll, "frame", ensemble=2, seed=0).unit_nll
    assert np.allclose(got, -np.log((np.exp(a) + np.exp(b)) / 2), atol=1e-5)


def test_silent_cells_add_no_loss():
    model = tiny(n_voices=2)
    roll = np.array([[60, -1, 61], [-1, -1, 60]])
    r = piece_nll(model, roll, "note", ensemble=1, seed=0)
    assert list(r.scored) == [True, False, False, False, True, True]  # [frame, voice] flattened
    assert np.all(r.unit_nll[~r.scored] == 0)


def test_receptive_field_crop_is_exact():
    for dilations in ([1], [1, 2, 4]):
        model = tiny(n_voices=4, min_pitch=50, max_pitch=70, n_layers=8, filters=8, dilations=dilations)
        T = 3 * model.cfg.receptive_field + 7
        gen = torch.Generator().manual_seed(1)
        classes = torch.randint(0, model.cfg.n_classes, (3, 4, T), generator=gen)
        mask = torch.rand(3, 4, T, generator=gen) < 0.5
        frames = torch.tensor([0, T // 2, T - 1])
        full = predict(model, classes, mask)
        crop = predict_frames(model, classes, mask, frames)
        for b, t in enumerate(frames.tolist()):
            assert torch.allclose(crop[b], full[b, :, t], atol=1e-5)
        # and a change just outside the receptive field changes nothing at the centre
        far = classes.clone()
        far[:, :, T // 2 + model.cfg.receptive_field + 1 :] = 0
        assert torch.allclose(predict(model, far, mask)[1, :, T // 2], full[1, :, T // 2], atol=1e-5)


# ----------------------------------------------------------------------------------------------------- sampling
def _start(model, T=12, seed=0):
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, cfg.n_classes, (1, cfg.n_voices, T), generator=gen)
    given = torch.rand(classes.shape, generator=gen) < 0.3
    return classes, given


def test_ancestral_draws_each_cell_from_the_model_given_those_drawn_before():
    model = tiny(n_voices=3, min_pitch=55, max_pitch=70, n_layers=4, filters=8)
    classes, given = _start(model)
    out = AncestralSampler("chronological", temperature=0.0)(model, classes, given)
    # the same walk written out: frame by frame, voices top to bottom, each the most likely class given the rest
    x, unknown = classes.clone(), ~given
    for t in range(x.shape[2]):
        for v in range(x.shape[1]):
            if unknown[0, v, t]:
                x[0, v, t] = predict(model, x, unknown)[0, v, t].argmax()
                unknown[0, v, t] = False
    assert torch.equal(out, x)


def test_gibbs_resamples_the_cells_each_step_masks_from_the_model():
    model = tiny(n_voices=3, min_pitch=55, max_pitch=70, n_layers=4, filters=8)
    classes, given = _start(model, seed=1)
    sampler = GibbsSampler(steps=6, temperature=0.0)
    out = sampler(model, classes, given, generator=torch.Generator().manual_seed(5))
    g, free = torch.Generator().manual_seed(5), ~given
    x = torch.where(free, predict(model, classes, free).argmax(-1), classes)
    for i in range(6):
        m = free & (torch.rand(free.shape, generator=g) < sampler.schedule(i, 6))
        if m.any():
            x = torch.where(m, predict(model, x, m).argmax(-1), x)
    assert torch.equal(out, x)


@pytest.mark.parametrize(
    "sampler",
    [
        GibbsSampler(steps=12),
        AncestralSampler("chronological"),
        AncestralSampler("random"),
        RepairedSampler(GibbsSampler(steps=4)),
    ],
    ids=["gibbs", "ancestral", "ancestral-random", "gibbs+repair"],
)
def test_samplers_never_touch_given_cells(sampler):
    model = tiny(n_voices=4, min_pitch=48, max_pitch=72, n_layers=4, filters=8)
    rng = np.random.default_rng(0)
    roll = rng.integers(48, 73, (4, 24))
    roll[2, 5:9] = -1  # given silence is kept too
    given = rng.random((4, 24)) < 0.4
    given[:, 5:9] = True
    out = fill(model, roll, given, sampler, seed=1)
    assert np.array_equal(out[given], roll[given])
    assert ((out[~given] >= 48) & (out[~given] <= 72) | (out[~given] == -1)).all()
    again = fill(model, roll, given, sampler, seed=1)
    assert np.array_equal(out, again)  # seeded: the same request gives the same music
    other = fill(model, roll, given, sampler, seed=2)
    assert not np.array_equal(out[~given], other[~given])  # and the free cells really are sampled


def _planing(bars=4):
    """Root-position triads moved as a block up and down by step: every move is parallel octaves and fifths."""
    chord = np.array([72, 67, 64, 48])  # C major: C5 G4 E4 C3
    steps = [0, 2, 4, 2, 0, -1, 0, 2] * bars
    return np.repeat(np.stack([chord + s for s in steps], axis=1), 2, axis=1)


def test_repair_removes_parallels_with_the_models_proposals_and_keeps_the_melody():
    model = tiny(n_voices=4, min_pitch=36, max_pitch=81, n_layers=4, filters=8)
    roll = _planing()
    classes = torch.from_numpy(roll_to_classes(roll, model.cfg))[None]
    given = torch.zeros_like(classes, dtype=torch.bool)
    given[:, 0] = True
    before = len(parallel_motions(roll))
    fixed, report = repair_parallels(model, classes, given, 1.0, torch.Generator().manual_seed(0), max_attempts=40)
    out = classes_to_roll(fixed[0].numpy(), model.cfg)
    after = len(parallel_motions(out))
    assert report["parallels_before"] == before > 40
    assert report["parallels_after"] == after < before / 2
    assert report["rewrites"] >= 1 and report["attempts"] <= 40
    assert np.array_equal(out[0], roll[0])  # the melody is given: never rewritten
    assert ((out >= 36) & (out <= 81) | (out == -1)).all()


def test_repair_leaves_a_piece_without_parallels_alone():
    model = tiny(n_voices=4, min_pitch=36, max_pitch=81, n_layers=4, filters=8)
    roll = np.array([[72] * 8 + [74] * 8, [67] * 8 + [65] * 8, [64] * 8 + [62] * 8, [48] * 8 + [53] * 8])
    assert parallel_motions(roll) == []  # contrary and oblique motion only
    classes = torch.from_numpy(roll_to_classes(roll, model.cfg))[None]
    fixed, report = repair_parallels(model, classes, torch.zeros_like(classes, dtype=torch.bool), 1.0)
    assert torch.equal(fixed, classes) and report == {
        "parallels_before": 0,
        "attempts": 0,
        "rewrites": 0,
        "parallels_after": 0,
    }


def test_yao_schedule():
    s = YaoSchedule(p_min=0.1, p_max=0.9, alpha=0.7)
    assert s(0, 100) == pytest.approx(0.9)
    assert s(35, 100) == pytest.approx(0.9 - 0.8 * 35 / 70)
    assert s(70, 100) == pytest.approx(0.1) and s(99, 100) == pytest.approx(0.1)


def test_given_cells_for_the_three_tasks():
    harmonize = given_cells(4, 8, [1, 2, 3])
    assert harmonize[0].all() and not harmonize[1:].any()
    infill = given_cells(4, 32, [1, 2], 16, 24)
    assert infill.sum() == 4 * 32 - 2 * 8 and not infill[1:3, 16:24].any()
    assert not given_cells(4, 8, range(4)).any()
    with pytest.raises(CoconetError):
        given_cells(4, 8, [4])


def test_out_of_range_pitch_is_a_one_line_error():
    cfg = CoconetConfig.preset("debug")
    with pytest.raises(CoconetError, match="outside the model's range 36..81"):
        roll_to_classes(np.array([[90], [60], [50], [40]]), cfg)


# ----------------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    model = tiny(n_voices=4, min_pitch=36, max_pitch=81, n_layers=6, filters=8, dilations=[1, 2])
    save_coconet(model, tmp_path / "m", {"metrics": {"valid_loss": 1.5}, "data_hash": "abc"})
    loaded, meta = load_coconet(tmp_path / "m", precision="fp32")
    assert meta["metrics"]["valid_loss"] == 1.5 and meta["fingerprint"] == model.fingerprint() == loaded.fingerprint()
    classes = torch.randint(0, model.cfg.n_classes, (2, 4, 20))
    mask = torch.rand(2, 4, 20) < 0.5
    # loading folds batch norm into the convolutions: the same predictions up to float rounding
    assert torch.allclose(predict(model, classes, mask), predict(loaded, classes, mask), atol=1e-4)
    assert not any(p.suffix == ".pt" or p.suffix == ".pkl" for p in (tmp_path / "m").iterdir())


def test_load_refuses_damaged_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny(n_voices=4, min_pitch=36, max_pitch=81)
    save_coconet(model, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "coconet.safetensors"))
    state["out.bias"] = torch.full_like(state["out.bias"], float("nan"))
    save_file(state, str(tmp_path / "m" / "coconet.safetensors"))
    with pytest.raises(CoconetError, match="non-finite"):
        load_coconet(tmp_path / "m")
    state["out.bias"] = torch.zeros_like(state["out.bias"])
    save_file(state, str(tmp_path / "m" / "coconet.safetensors"))
    with pytest.raises(CoconetError, match="fingerprint"):
        load_coconet(tmp_path / "m")
    (tmp_path / "m" / "coconet.json").write_text("{not json")
    with pytest.raises(CoconetError, match="not a Coconet config"):
        load_coconet(tmp_path / "m")
    with pytest.raises(CoconetError, match="no Coconet model"):
        load_coconet(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------------- training
def _jsb(split: str, n: int):
    import gzip

    from tests.test_scores import JSB

    data = json.loads(gzip.decompress(JSB.read_bytes()))
    return [np.array(p).T for p in data[split][:n]]


def test_training_lowers_the_validation_loss_and_resumes(tmp_path):
    from models.coconet_train import TrainCoconetParams, train_coconet

    train, valid = _jsb("train", 24), _jsb("valid", 4)
    params = TrainCoconetParams.parse(
        {
            "preset": "debug",
            "presets": {},  # these keys as given, not the debug preset's
            "steps": 40,
            "eval_every": 20,
            "batch_size": 8,
            "lr": 0.01,
            "warmup": 5,
            "ema_decay": 0.0,
            "precision": "fp32",
            "model": {"filters": 16},
        },
        "test",
    )
    m = train_coconet(
        train,
        valid,
        tmp_path / "m",
        params,
        checkpoint_dir=tmp_path / "ckpt",
        metrics_path=tmp_path / "metrics.json",
        plot_path=tmp_path / "loss.json",
    )
    curve = json.loads((tmp_path / "loss.json").read_text())
    assert m["steps"] == 40 and len(curve) == 2
    assert curve[-1]["valid_loss"] < math.log(47) - 0.5  # well below a uniform guess over 47 classes
    model, meta = load_coconet(tmp_path / "m", precision="fp32")
    assert meta["metrics"]["fingerprint"] == model.fingerprint()
    # a longer run resumes from the checkpoint instead of starting again
    longer = params.with_overrides({"steps": 60}, "test")
    messages = []
    m2 = train_coconet(
        train, valid, tmp_path / "m2", longer, checkpoint_dir=tmp_path / "ckpt", progress=messages.append
    )
    assert any("resumed from" in s and "step 40" in s for s in messages) and m2["steps"] == 60


def test_learning_rate_anneals_within_the_time_budget():
    from models.coconet_train import TrainCoconetParams, _make_optimizer, fit_horizon_to_time

    p = TrainCoconetParams(preset="debug", steps=1000, warmup=10, lr=0.01, max_minutes=1.0, presets={})
    model = Coconet(CoconetConfig.preset("debug"))
    opt, sched = _make_optimizer(model, p)
    for _ in range(10):
        opt.step()
        sched.step()
    said = []
    # 10 steps took 3 s: 1000 steps would take 5 min, so the schedule is fitted to what one minute holds
    state = {"step": 10, "train_seconds": 0.0, "horizon": None}
    fit_horizon_to_time(sched, state, p, 3.0, said.append)
    assert 150 < state["horizon"] < 200 and "anneals over" in said[0]
    for _ in range(state["horizon"] - 10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * p.lr)  # fully annealed at the fitted horizon
    # the first step's one-off cost (compiling) is not projected onto the others: 10 steps in 3 s, 2.1 of them the
    # first, is 0.1 s a step, and about 530 more steps fit in what is left of 0.93 minutes
    state = {"step": 10, "train_seconds": 0.0, "horizon": None}
    fit_horizon_to_time(_make_optimizer(model, p)[1], state, p, 3.0, said.append, first_step=2.1)
    assert 520 < state["horizon"] < 545
    # a run that fits keeps its schedule
    said.clear()
    state = {"step": 10, "train_seconds": 0.0, "horizon": None}
    fit_horizon_to_time(_make_optimizer(model, p)[1], state, p, 0.1, said.append)
    assert state["horizon"] is None and not said


def test_a_compiled_training_step_learns_what_the_eager_one_does(tmp_path, monkeypatch):
    from models.coconet_train import TrainCoconetParams, _identity, train_coconet

    compiled_modules = []
    real_compile = torch.compile

    def counting_compile(module, *args, **kwargs):
        compiled_modules.append(module)
        return real_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)

    train, valid = _jsb("train", 8), _jsb("valid", 2)
    eager = TrainCoconetParams.parse(
        {"preset": "debug", "presets": {}, "steps": 6, "eval_every": 6, "batch_size": 4, "warmup": 2,
         "ema_decay": 0.0, "precision": "fp32"},
        "test",
    )  # fmt: skip
    compiled = eager.with_overrides({"compile": True}, "test")
    a = train_coconet(train, valid, tmp_path / "eager", eager)
    assert not compiled_modules
    b = train_coconet(train, valid, tmp_path / "compiled", compiled)
    assert len(compiled_modules) == 1  # the training step went through torch.compile
    assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-3)
    # compiling is how a run computes, not what it trains: either can resume the other's checkpoint
    cfg = eager.config()
    assert _identity(eager, cfg, "data") == _identity(compiled, cfg, "data")
