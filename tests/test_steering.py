"""Steering: the update formula at the hook (exact), the self-monitor, KV cache and CFG correctness, reports,
refusal of foreign probe sets, bad requests."""

import json

import numpy as np
import pytest
import torch

from core.errors import UserError
from models.generator import Generator, GeneratorConfig
from models.probes import ProbeSet
from models.steering import (
    SteeringError,
    SteeringParams,
    SteeringPlan,
    SteeringSession,
    SustainedMonitor,
    _median_probability,
    parse_strengths,
    prompt_share,
    smitin_factor,
    steer,
)


def _model(**kw):
    torch.manual_seed(0)
    return Generator(GeneratorConfig.debug(**kw)).eval()


def _probe_set(model, trait="drums", seed=0, fingerprint=None, intercept=0.0):
    L, H, D = model.n_layers, model.n_heads, model.head_dim
    rng = np.random.default_rng(seed)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    acc = rng.uniform(0.55, 0.98, (L, H)).astype(np.float32)
    direction = unit(rng.standard_normal((L, H, D)))
    return ProbeSet(
        trait=trait,
        generator_fingerprint=fingerprint or model.fingerprint(),
        coef=(3.0 * direction).astype(np.float32),
        intercept=np.full((L, H), intercept, np.float32),
        direction=direction,
        sigma=rng.uniform(0.5, 2.0, (L, H)).astype(np.float32),
        accuracy=acc,
        weight=((acc - acc.min()) / (acc.max() - acc.min())) ** 3,
        random_direction=unit(rng.standard_normal((L, H, D))),
        random_sigma=rng.uniform(0.5, 2.0, (L, H)).astype(np.float32),
    )


def _record(model, store):
    """Hooks that append each layer's head output (a copy) to store[layer]; returns the handles."""
    return [
        site.register_forward_hook(lambda m, i, o, layer=layer: store.setdefault(layer, []).append(o.clone()))
        for layer, site in enumerate(model.head_sites())
    ]


def _steered_heads(model, plan, run, fused=False):
    """Call `run()` under `steer(model, plan)`, recording each layer's head outputs before the push (a hook registered
    before steering's) and after it; returns (the steering report, before, after)."""
    before, after = {}, {}
    handles = _record(model, before)
    with steer(model, plan, fused=fused) as session:
        handles += _record(model, after)
        run()
    for h in handles:
        h.remove()
    return session.report(), before, after


def _prompt(B=1, T=6, seed=0):
    return torch.randint(0, 32, (B, 4, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- update formula
@pytest.mark.parametrize("mode", ["iti", "smitin"])
def test_update_formula_at_the_hook_is_exact(mode):
    model = _model()
    drums, piano = _probe_set(model, "drums", 0), _probe_set(model, "piano", 1)
    plan = SteeringPlan.build([drums, piano], "drums=+4, piano=-2.5", mode=mode, top_k=3, every=1, tau=1.0)
    report, before, after = _steered_heads(model, plan, lambda: model.generate(3, prompt=_prompt(), seed=0))
    factors = [s["traits"] for s in report.steps]
    for step in range(len(before[0])):
        for layer in range(model.n_layers):
            pre, post = before[layer][step], after[layer][step]
            expected = pre.clone()
            for trait, ps, alpha in (("drums", drums, 4.0), ("piano", piano, -2.5)):
                f = factors[step][trait]["push"][0]
                if mode == "iti":
                    w = np.zeros_like(ps.accuracy)
                    for lh in ps.top_heads(3):
                        w[lh] = 1.0
                else:
                    w = ps.weight
                delta = (alpha * w * ps.sigma)[..., None] * ps.direction  # alpha * w * sigma * theta
                expected[0, -1] += torch.from_numpy(f * delta[layer]).float()
            # only the last position of the row is edited; the combination of traits is the plan's einsum, so
            # compare with a float tolerance of one rounding, and the untouched positions exactly
            assert torch.equal(post[:, :-1], pre[:, :-1])
            torch.testing.assert_close(post, expected, rtol=0, atol=1e-6)
    # iti pushes every step from the prompt's last position on; smitin observes step 0, then pushes (tau = 1)
    pushes = [f["drums"]["push"][0] for f in factors]
    assert pushes[0] == (1.0 if mode == "iti" else 0.0) and all(p > 0 for p in pushes[1:])


@pytest.mark.parametrize("rows", [1, 2])  # one row: the scalar path; several: the matmul path
def test_single_trait_push_is_bitwise_alpha_w_sigma_theta(rows):
    model = _model()
    ps = _probe_set(model)
    plan = SteeringPlan.build([ps], {"drums": 7.0}, mode="iti", top_k=4)
    # a teacher-forced forward counts as step 0 of a generation
    _, before, after = _steered_heads(model, plan, lambda: model(_prompt(B=rows), condition=None))
    w = np.zeros_like(ps.accuracy)
    for lh in ps.top_heads(4):
        w[lh] = 1.0
    delta = torch.from_numpy((np.float32(7.0) * w * ps.sigma)[..., None] * ps.direction)
    for layer in range(model.n_layers):
        expected = before[layer][0].clone()
        expected[:, -1] += delta[layer]
        assert torch.equal(after[layer][0], expected)


# ----------------------------------------------------------------------------------------- monitor
def test_smitin_factor_decays_and_stops_at_tau():
    tau = [0.8, 0.8]
    removed = [False, True]
    monitor = [[0.0, 1.0], [0.4, 0.6], [0.79, 0.21], [0.8, 0.2], [0.95, 0.05]]
    f = np.array(smitin_factor(monitor, removed, tau, decay=1.0))
    np.testing.assert_allclose(f[:, 0], [1.0, 0.5, 1 - 0.79 / 0.8, 0.0, 0.0], atol=1e-6)
    # a removed trait watches 1 - C: the same numbers mirrored
    np.testing.assert_allclose(f[:, 1], f[:, 0], atol=1e-6)
    f0 = np.array(smitin_factor(monitor, removed, tau, decay=0.0))
    assert np.all(f0[:3] == 1.0) and np.all(f0[3:] == 0.0)  # full push until tau, none from tau on


class _ScriptedMonitor(SteeringSession):
    """The real session with the monitored probability replaced by a script (probability rising over steps)."""

    script = [0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.75, 0.9, 0.95, 0.97, 0.4, 0.4, 0.4, 0.4]

    def _observe(self, step, prob, factor):
        super()._observe(step, [[self.script[min(step, len(self.script) - 1)]] * len(r) for r in prob], factor)


def test_monitor_switches_the_push_off_once_the_probability_passes_tau():
    model = _model()
    ps = _probe_set(model)
    plan = SteeringPlan.build([ps], "drums=+3", mode="smitin", every=2, tau=0.8, decay=1.0)
    session = _ScriptedMonitor(model, plan)
    before, after = {}, {}
    handles = _record(model, before)
    handles += [site.register_forward_hook(session.hook(layer)) for layer, site in enumerate(model.head_sites())]
    handles += _record(model, after)
    model.generate(len(_ScriptedMonitor.script) - 3, prompt=_prompt(), seed=0)
    for h in handles:
        h.remove()
    report = session.report()
    pushes = report.pushes("drums")
    script = _ScriptedMonitor.script
    for step, push in enumerate(pushes):
        pushed_at_hook = not torch.equal(before[0][step], after[0][step])
        assert pushed_at_hook == (push > 0)
        if step >= 1 and (step - 1) % 2 == 0 and script[step - 1] < 0.8:
            assert push == pytest.approx(1 - script[step - 1] / 0.8, abs=1e-6)  # decays as C rises
        else:
            assert push == 0.0  # off-steps, and every step after C passed tau
    assert pushes[1] > pushes[3] > pushes[5] > 0 and pushes[9] == 0.0  # C = 0.95 at step 8: off
    assert pushes[11] > 0  # C fell below tau again: the closed loop pushes again
    assert report.probabilities("drums")[:3] == pytest.approx([0.1, 0.2, 0.3])


@pytest.mark.parametrize("fused", [True, False])
def test_an_added_trait_is_pushed_at_its_own_interval_while_a_removed_one_is_pushed_every_step(fused):
    """`add_every`: drums (added) get a push only on steps 1, 5, 9, ...; piano (removed) on every step from 1 on
    (tau 1: the monitor never stops either). With one added trait alone the monitor reads only before its pushes."""
    model = _model()
    drums, piano = _probe_set(model, "drums", 0), _probe_set(model, "piano", 1)
    plan = SteeringPlan.build([drums, piano], "drums=+4, piano=-2.5", mode="smitin", every=1, add_every=4, tau=1.0)
    with steer(model, plan, fused=fused) as session:
        model.generate(12, prompt=_prompt(), seed=0)
    report = session.report()
    drum_push, piano_push = report.pushes("drums"), report.pushes("piano")
    assert len(drum_push) >= 10 and [s for s, f in enumerate(drum_push) if f > 0] == list(range(1, len(drum_push), 4))
    assert piano_push[0] == 0.0 and all(f > 0 for f in piano_push[1:])
    alone = SteeringPlan.build([drums], "drums=+4", mode="smitin", every=1, add_every=4, tau=1.0)
    with steer(model, alone, fused=fused) as session:
        model.generate(12, prompt=_prompt(), seed=0)
    pushes = session.report().pushes("drums")
    assert [s for s, f in enumerate(pushes) if f > 0] == list(range(1, len(pushes), 4))
    with pytest.raises(SteeringError, match="add_every"):
        SteeringParams(add_every=0)


@pytest.mark.parametrize("fused", [True, False])
def test_an_added_trait_is_pushed_add_gain_times_its_strength_and_a_removed_one_is_not(fused):
    """`add_gain`: the push of an added trait moves the heads by add_gain * strength * w * sigma * theta (the
    report's push factor is add_gain at full push); a removed trait in the same plan is pushed at its strength."""
    model = _model()
    drums = _probe_set(model, "drums", 0, intercept=-20.0)  # reads absent: adding pushes fully (decay 0)
    piano = _probe_set(model, "piano", 1, intercept=20.0)  # reads present: removing pushes fully
    plan = SteeringPlan.build([drums, piano], "drums=+3, piano=-2", mode="smitin", every=1, decay=0.0, add_gain=2.5)
    report, before, after = _steered_heads(model, plan, lambda: model.generate(4, prompt=_prompt(), seed=0), fused)
    drum_push, piano_push = report.pushes("drums"), report.pushes("piano")
    assert len(drum_push) > 3 and drum_push[1:] == [2.5] * (len(drum_push) - 1)
    assert piano_push[1:] == [1.0] * (len(piano_push) - 1)
    if not fused:  # the fused path never materialises the pushed heads; its outputs equal the hooks' (tested above)
        moved = (after[0][1] - before[0][1])[0, -1]
        expected = sum(
            torch.from_numpy((np.float32(a) * ps.weight * ps.sigma)[..., None] * ps.direction)[0]
            for a, ps in ((3.0 * 2.5, drums), (-2.0, piano))
        )
        torch.testing.assert_close(moved, expected, rtol=0, atol=1e-5)
    with pytest.raises(SteeringError, match="add_gain"):
        SteeringParams(add_gain=0)


def test_sustained_monitor_smooths_holds_and_keeps_a_floor_until_presence_holds():
    params = SteeringParams(smooth_steps=2, hold_steps=2, hold_floor=0.4, decay=1.0)
    assert params.sustained and not SteeringParams().sustained  # the defaults are the paper's monitor
    adding, removing = SustainedMonitor(params, [False], [0.8]), SustainedMonitor(params, [True], [0.8])
    # by hand: the average moves half way to each reading; the raw factor is 1 - C / tau below tau, 0 from it on;
    # until the goal has held at tau for 2 readings the factor is at least 0.4
    expected = [
        (0.2, 0.2, 0.75),  # 1 - 0.2 / 0.8
        (1.0, 0.6, 0.4),  # raw 0.25, floored
        (1.0, 0.8, 0.4),  # at tau: raw 0, held once, still floored
        (1.0, 0.9, 0.0),  # held twice: the push stops
        (0.0, 0.45, 0.4375),  # presence lost: the push is back (above the floor)
    ]
    for reading, smoothed, factor in expected:
        assert adding.observe([[reading]]) == [[pytest.approx(smoothed)]]
        assert adding.factor() == [[pytest.approx(factor)]]
        removing.observe([[1.0 - reading]])  # a removed trait watches 1 - C: the same numbers mirrored
        assert removing.factor() == [[pytest.approx(factor)]]


def test_a_removed_trait_holds_at_its_own_floor():
    """`remove_floor` is the floor of a trait being removed; an added trait in the same plan keeps `hold_floor`."""
    params = SteeringParams(hold_steps=3, hold_floor=0.4, remove_floor=0.1, decay=1.0)
    assert (params.floor(removing=False), params.floor(removing=True)) == (0.4, 0.1)
    assert SteeringParams(hold_floor=0.4).floor(removing=True) == 0.4  # unset: removal holds at hold_floor too
    both = SustainedMonitor(params, [False, True], [0.8, 0.8])
    both.observe([[0.78, 0.02]])  # each goal nearly met (C 0.78 adding, 1 - C 0.98 removing): raw factors ~0, 0
    assert both.factor() == [[pytest.approx(0.4), pytest.approx(0.1)]]
    with pytest.raises(SteeringError, match="remove_floor must be in"):
        SteeringParams(remove_floor=1.5)


def test_sustained_monitor_keeps_pushing_where_the_papers_stops():
    """With the scripted probability crossing tau = 0.8 at step 7, the paper's monitor stops pushing at step 8;
    with hold_steps 2 the push goes on at the floor until two readings in a row are at tau."""
    model = _model()
    ps = _probe_set(model)
    n = len(_ScriptedMonitor.script) - 3
    pushes = {}
    for name, extra in (("paper", {}), ("sustained", dict(hold_steps=2, hold_floor=0.5))):
        plan = SteeringPlan.build([ps], "drums=+3", mode="smitin", every=1, tau=0.8, decay=1.0, **extra)
        session = _ScriptedMonitor(model, plan)
        handles = [site.register_forward_hook(session.hook(layer)) for layer, site in enumerate(model.head_sites())]
        model.generate(n, prompt=_prompt(), seed=0)
        for h in handles:
            h.remove()
        pushes[name] = session.report().pushes("drums")
    script = _ScriptedMonitor.script  # [.1 .2 .3 .5 .6 .7 .75 .9 .95 .97 .4 ...]: at tau from step 7 to 9
    assert pushes["paper"][1:8] == pytest.approx([1 - c / 0.8 for c in script[:7]])
    assert pushes["paper"][8:11] == [0.0, 0.0, 0.0]
    assert pushes["sustained"][1:8] == pytest.approx([max(1 - c / 0.8, 0.5) for c in script[:7]])
    assert pushes["sustained"][8] == 0.5  # one reading at tau is not presence yet
    assert pushes["sustained"][9:11] == [0.0, 0.0]  # two in a row: the push stops
    assert pushes["sustained"][11] == pytest.approx(0.5) and pushes["paper"][11] == pytest.approx(0.5)


class _ScriptedAbsence(_ScriptedMonitor):
    """The same script mirrored: a trait being removed reads absent (1 - C) as the script rises."""

    script = [1.0 - c for c in _ScriptedMonitor.script]


def test_a_removal_push_holds_at_remove_floor_in_generation():
    """Removing with hold_floor 0.5 and remove_floor 0.2: the session's pushes keep to 0.2, not 0.5, until absence
    has held for two readings."""
    model = _model()
    ps = _probe_set(model)
    plan = SteeringPlan.build(
        [ps], "drums=-3", mode="smitin", every=1, tau=0.8, decay=1.0, hold_steps=2, hold_floor=0.5, remove_floor=0.2
    )
    session = _ScriptedAbsence(model, plan)
    handles = [site.register_forward_hook(session.hook(layer)) for layer, site in enumerate(model.head_sites())]
    model.generate(len(_ScriptedMonitor.script) - 3, prompt=_prompt(), seed=0)
    for h in handles:
        h.remove()
    pushes = session.report().pushes("drums")
    goal = _ScriptedMonitor.script  # 1 - C of the mirrored readings
    assert pushes[1:8] == pytest.approx([max(1 - g / 0.8, 0.2) for g in goal[:7]])
    assert pushes[8] == pytest.approx(0.2)  # one reading of absence at tau: still held, at the removal floor
    assert pushes[9:11] == [0.0, 0.0]


def test_negative_strength_pushes_the_other_way_and_watches_absence():
    model = _model()
    ps = _probe_set(model, intercept=-20.0)  # the probes see no trait at all: nothing to remove
    plan = SteeringPlan.build([ps], "drums=-3", mode="smitin", every=1)
    with steer(model, plan) as session:
        model.generate(4, prompt=_prompt(), seed=0)
    assert all(p == 0.0 for p in session.report().pushes("drums"))
    ps_on = _probe_set(model, intercept=20.0)  # the trait looks present: removal pushes, against the direction
    plan = SteeringPlan.build([ps_on], "drums=-3", mode="smitin", every=1, decay=0.0)
    report, before, after = _steered_heads(model, plan, lambda: model.generate(4, prompt=_prompt(), seed=0))
    assert report.pushes("drums")[1:] == [1.0] * 6
    moved = (after[0][1] - before[0][1])[0, -1]
    expected = torch.from_numpy((np.float32(-3.0) * ps_on.weight * ps_on.sigma)[..., None] * ps_on.direction)[0]
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-6)


def _logit(p):
    p = np.asarray(p, dtype=float)
    return np.log(p / (1 - p))


@pytest.mark.parametrize("fused", [False, True])
def test_a_prompt_relative_monitor_reads_the_generated_audios_share_after_a_prompt(fused):
    """After a prompt of Tp frames the monitored probability at step t is sigmoid((logit p - s logit p0) / (1 - s)),
    p the probes' reading, p0 the reading at step 0, s = min(0.5, Tp / (Tp + t)); the report keeps p as "reading"."""
    model = _model()
    ps = _probe_set(model)
    Tp, n = 6, 14
    runs = {}
    for relative in (False, True):
        plan = SteeringPlan.build([ps], "drums=+4", mode="none", prompt_relative=relative)
        with steer(model, plan, fused=fused) as session:
            tokens = model.generate(n, prompt=_prompt(B=2, T=Tp), seed=1, top_k=8)
        runs[relative] = tokens, session.report()
    (tokens_plain, plain), (tokens_rel, rel) = runs[False], runs[True]
    assert torch.equal(tokens_plain, tokens_rel)  # no push: only the reading differs
    raw = np.array([s["traits"]["drums"]["probability"] for s in plain.steps])  # [steps, rows]
    assert "reading" not in plain.steps[0]["traits"]["drums"]
    np.testing.assert_allclose([s["traits"]["drums"]["reading"] for s in rel.steps], raw, atol=1e-6)
    monitored = np.array([s["traits"]["drums"]["probability"] for s in rel.steps])
    t = np.arange(len(raw))[:, None]
    share = np.minimum(0.5, Tp / (Tp + t))
    expected = 1 / (1 + np.exp(-(_logit(raw) - share * _logit(raw[0])) / (1 - share)))
    np.testing.assert_allclose(monitored, expected, atol=1e-5)
    np.testing.assert_allclose(monitored[0], raw[0], atol=1e-6)  # step 0 is the prompt's own reading
    assert np.abs(monitored - raw).max() > 0.01  # the readings moved away from the prompt's, and the monitor says so
    assert prompt_share(0, 0) == 0.0 and prompt_share(100, 6) == pytest.approx(6 / 106)


def test_a_prompt_relative_monitor_changes_nothing_without_a_prompt_and_pushes_by_its_own_reading():
    model = _model()
    ps = _probe_set(model)
    reports = []
    for relative in (False, True):
        plan = SteeringPlan.build([ps], "drums=+2", mode="smitin", every=1, decay=1.0, prompt_relative=relative)
        with steer(model, plan) as session:
            model.generate(8, batch_size=1, seed=2, top_k=8)
        reports.append(session.report())
    assert reports[0].steps == reports[1].steps  # no prompt: the probes' reading is the monitor
    # after a prompt the push follows the prompt-relative reading: f(t + 1) = 1 - C(t) / tau below tau, else 0
    plan = SteeringPlan.build([ps], "drums=+2", mode="smitin", every=1, decay=1.0, prompt_relative=True)
    with steer(model, plan) as session:
        model.generate(8, prompt=_prompt(), seed=2, top_k=8)
    report, tau = session.report(), plan.taus()[0]
    prob, push = report.probabilities("drums"), report.pushes("drums")
    assert "reading" in report.steps[0]["traits"]["drums"]
    for c, f in zip(prob[:-1], push[1:]):
        assert f == pytest.approx(max(0.0, 1 - c / tau), abs=1e-6)


# ----------------------------------------------------------------------------------------- KV cache, CFG
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["iti", "smitin"])
def test_cached_and_uncached_steering_give_the_same_tokens(mode, fused):
    model = _model()
    ps = _probe_set(model)
    plan = SteeringPlan.build([ps], "drums=+12", mode=mode, every=2, tau=0.99, top_k=6)
    runs = {}
    for use_cache in (True, False):
        with steer(model, plan, fused=fused) as session:
            tokens = model.generate(10, prompt=_prompt(B=2), seed=5, top_k=8, use_cache=use_cache)
        runs[use_cache] = (tokens, session.report())
    plain = model.generate(10, prompt=_prompt(B=2), seed=5, top_k=8)
    assert torch.equal(runs[True][0], runs[False][0])
    assert not torch.equal(runs[True][0], plain)  # the push changed the music, so the equality means something
    for a, b in zip(runs[True][1].steps, runs[False][1].steps):
        assert a["traits"]["drums"]["push"] == pytest.approx(b["traits"]["drums"]["push"], abs=1e-5)
        assert a["traits"]["drums"]["probability"] == pytest.approx(b["traits"]["drums"]["probability"], abs=1e-4)
    assert sum(p > 0 for p in runs[True][1].pushes("drums")) >= 2


def test_cfg_steers_and_monitors_only_the_conditional_rows():
    model = _model()
    ps = _probe_set(model)
    plan = SteeringPlan.build([ps], "drums=+6", mode="iti", top_k=8)
    condition = torch.randn(2, 384, generator=torch.Generator().manual_seed(0))
    report, before, after = _steered_heads(
        model, plan, lambda: model.generate(5, prompt=_prompt(B=2), condition=condition, cfg_scale=3.0, seed=0)
    )
    assert before[0][0].shape[0] == 4  # [2 conditional rows; 2 unconditional rows]
    for layer in range(model.n_layers):
        for pre, post in zip(before[layer], after[layer]):
            assert torch.equal(post[2:], pre[2:])  # unconditional half untouched
            assert not torch.equal(post[:2, -1], pre[:2, -1])  # conditional half pushed
    assert all(len(s["traits"]["drums"]["probability"]) == 2 for s in report.steps)  # one monitor per cond row


@pytest.mark.parametrize("fused", [False, True])
def test_cfg_pushes_the_reference_rows_alike_when_asked(fused):
    """push_reference_rows: each unconditional row takes its conditional row's push, so the guided logits
    u + g (c - u) carry the push once instead of g times."""
    model = _model()
    ps = _probe_set(model)
    condition = torch.randn(2, 384, generator=torch.Generator().manual_seed(0))
    moved = {}
    for both in (False, True):
        plan = SteeringPlan.build([ps], "drums=+6", mode="iti", top_k=8, push_reference_rows=both)
        outputs = []
        handles = _attention_outputs(model, outputs)
        with steer(model, plan, fused=fused):
            model.generate(5, prompt=_prompt(B=2), condition=condition, cfg_scale=3.0, seed=0)
        for h in handles:
            h.remove()
        plain = []
        handles = _attention_outputs(model, plain)
        model.generate(5, prompt=_prompt(B=2), condition=condition, cfg_scale=3.0, seed=0)
        for h in handles:
            h.remove()
        moved[both] = outputs[0][:, -1] - plain[0][:, -1]  # layer 0 of the prompt's forward: its last position
    cond, ref = moved[True][:2], moved[True][2:]
    assert cond.abs().max() > 1e-3
    torch.testing.assert_close(ref, cond, rtol=0, atol=1e-5)  # the same push on the reference rows
    torch.testing.assert_close(moved[False][:2], cond, rtol=0, atol=1e-5)  # the generation rows as before
    assert moved[False][2:].abs().max() == 0  # by default the reference rows stay the plain model


# ----------------------------------------------------------------------------------------- fused path
def _attention_outputs(model, store):
    return [block.attn.register_forward_hook(lambda m, i, o: store.append(o.clone())) for block in model.blocks]


@pytest.mark.parametrize(
    "spec, mode, rows, cfg, cache",
    [
        ("drums=+4", "smitin", 1, False, True),  # a plain generate: the push factor is the product's beta
        ("drums=+4", "iti", 1, True, True),
        ("drums=+4,piano=-2", "smitin", 2, True, True),  # several traits and rows: the push rows are rewritten
        ("drums=-3", "smitin", 2, False, True),
        ("drums=+4", "smitin", 1, True, False),  # uncached: every forward takes the hooks' arithmetic
        ("drums=+4", "smitin", 1, "both", True),  # the reference rows pushed too (the unit push in every row)
        ("drums=+4,piano=-2", "smitin", 2, "both", True),
        ("drums=+4", "smitin", 1, "gain", True),  # an added trait at add_gain times its strength: the unit push's beta
        ("drums=+4,piano=-2", "smitin", 2, "gain", True),  # the rewritten push rows
        ("drums=+4,piano=-2", "smitin", 2, "relative", True),  # a prompt-relative monitor
    ],
)
def test_fused_path_gives_the_hooks_tokens_outputs_and_report(spec, mode, rows, cfg, cache):
    model = _model()
    plan = SteeringPlan.build(
        [_probe_set(model), _probe_set(model, "piano", 1)],
        spec,
        mode=mode,
        every=1,
        tau=0.99,
        top_k=5,
        push_reference_rows=cfg == "both",
        add_gain=2.5 if cfg == "gain" else 1.0,
        prompt_relative=cfg == "relative",
    )
    condition = torch.randn(rows, 384, generator=torch.Generator().manual_seed(0)) if cfg else None
    runs = {}
    for fused in (False, True):
        outputs = []
        handles = _attention_outputs(model, outputs)
        with steer(model, plan, fused=fused) as session:
            tokens = model.generate(
                12,
                prompt=_prompt(B=rows),
                condition=condition,
                cfg_scale=3.0 if cfg else 1.0,
                seed=3,
                top_k=8,
                use_cache=cache,
            )
        for h in handles:
            h.remove()
        runs[fused] = tokens, session.report(), outputs
    (tokens_h, report_h, out_h), (tokens_f, report_f, out_f) = runs[False], runs[True]
    assert torch.equal(tokens_f, tokens_h)
    assert not torch.equal(
        tokens_f,
        model.generate(
            12,
            prompt=_prompt(B=rows),
            condition=condition,
            seed=3,
            top_k=8,
            cfg_scale=3.0 if cfg else 1.0,
            use_cache=cache,
        ),
    )
    assert len(out_f) == len(out_h)
    for a, b in zip(out_f, out_h):  # W (z + f delta) computed as W z + f W delta: equal up to rounding
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert len(report_f.steps) == len(report_h.steps) == 12 + 3
    for a, b in zip(report_f.steps, report_h.steps):
        assert a["step"] == b["step"]
        for trait in plan.traits:
            assert a["traits"][trait]["push"] == pytest.approx(b["traits"][trait]["push"], abs=1e-6)
            assert a["traits"][trait]["probability"] == pytest.approx(b["traits"][trait]["probability"], abs=1e-6)
    assert sum(p > 0 for p in report_f.pushes(plan.traits[0])) >= 10


def test_fused_projection_is_w_times_the_pushed_heads():
    model = _model()
    ps = _probe_set(model)
    plan = SteeringPlan.build([ps], "drums=+5", mode="smitin", every=1, tau=0.99, decay=1.0)
    heads, outputs = {}, []
    handles = _record(model, heads) + _attention_outputs(model, outputs)  # head_out: z before the push
    with steer(model, plan) as session:
        model.generate(4, prompt=_prompt(), seed=0)
    for h in handles:
        h.remove()
    pushes = session.report().pushes("drums")
    assert pushes[0] == 0.0 and all(0 < p < 1 for p in pushes[1:])  # decaying, not full
    delta = torch.from_numpy((np.float32(5.0) * ps.weight * ps.sigma)[..., None] * ps.direction)
    L = model.n_layers
    for step in range(1, len(pushes)):  # the cached steps
        for layer in range(L):
            z = heads[layer][step]  # [1, 1, H, Dh]
            expected = model.blocks[layer].attn.out_proj((z + pushes[step] * delta[layer]).flatten(2))
            torch.testing.assert_close(outputs[step * L + layer], expected, rtol=0, atol=1e-6)


def test_fused_monitor_reads_each_monitored_probe_on_every_device():
    model = _model()
    sets = [_probe_set(model, intercept=0.25), _probe_set(model, "piano", 1, intercept=-0.5)]
    plan = SteeringPlan.build(sets, "drums=+2,piano=-1", mode="smitin", monitor_heads=5)
    heads = {}
    handles = _record(model, heads)
    with steer(model, plan) as session:
        model.generate(3, prompt=_prompt(B=2), condition=torch.randn(2, 384), cfg_scale=3.0, seed=0)
    for h in handles:
        h.remove()
    buffers = session._fused
    assert buffers.rows == 4 and buffers._memory is not None  # CPU: read through a memoryview
    logits = buffers.logits(2)  # the last step's, [conditional rows, traits, monitored heads]
    expected = np.array(
        [
            [
                [
                    float(heads[layer][-1][r, 0, head] @ torch.from_numpy(ps.coef[layer, head]))
                    + ps.intercept[layer, head]
                    for layer, head in ps.top_heads(5)
                ]
                for ps in sets
            ]
            for r in range(2)
        ]
    )
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    medians = [[_median_probability(list(t)) for t in row] for row in expected]
    np.testing.assert_allclose(buffers.probabilities(2), medians, rtol=0, atol=1e-6)
    assert session.report().steps[-1]["traits"]["piano"]["probability"] == pytest.approx(
        [row[1] for row in medians], abs=1e-6
    )
    buffers._flat = buffers._memory = None  # what an accelerator's buffer takes: a gather and a copy
    np.testing.assert_allclose(buffers.logits(2), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(buffers.probabilities(2), medians, rtol=0, atol=1e-6)


def test_fused_steering_is_refused_without_the_fused_path_or_nested_and_always_detached():
    model = _model()
    plan = SteeringPlan.build([_probe_set(model)], "drums=+1", mode="iti")

    class HooksOnly:  # a generator that offers only head_out hooks (as MusicGen does)
        n_layers, n_heads, head_dim = model.n_layers, model.n_heads, model.head_dim
        fingerprint = model.fingerprint
        parameters, head_sites = model.parameters, model.head_sites

    with pytest.raises(SteeringError, match="no fused steering path"):
        with steer(HooksOnly(), plan, fused=True):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, plan):
            assert all(block.attn.steering is not None for block in model.blocks)
            with pytest.raises(SteeringError, match="already being steered"):  # nesting would drop the outer plan
                with steer(model, SteeringPlan.build([_probe_set(model, "piano", 1)], "piano=-1", mode="iti")):
                    pass
            raise RuntimeError("boom")
    assert all(block.attn.steering is None for block in model.blocks)


def test_new_generation_restarts_the_report_and_hooks_are_removed():
    model = _model()
    plan = SteeringPlan.build([_probe_set(model)], "drums=+1", mode="none")
    with steer(model, plan) as session:
        model.generate(3, prompt=_prompt(), seed=0)
        first = len(session.report().steps)
        model.generate(5, prompt=_prompt(T=4), seed=0)
        assert len(session.report().steps) == 5 + 3 and first == 3 + 3  # n_frames + K - 1 steps each
        assert len(session.generations) == 1
    assert all(p == 0 for p in session.report().pushes("drums"))
    assert not any(site._forward_hooks for site in model.head_sites())
    assert all(block.attn.steering is None for block in model.blocks)  # the fused projections are detached


def test_a_new_batch_layout_starts_a_new_generation_even_with_t_equal_1():
    model = _model()
    plan = SteeringPlan.build([_probe_set(model)], "drums=+1", mode="iti")
    with steer(model, plan, fused=False) as session:  # calls head_out directly: the hook path
        model.generate(2, prompt=_prompt(), seed=0)
        model.batch_layout = {"cfg": False, "n_cond": 1}  # what a prompt-less generate() of a BOS-only model does
        for site in model.head_sites():
            site(torch.zeros(1, 1, model.n_heads, model.head_dim))
        assert len(session.generations) == 1 and len(session.report().steps) == 1
        assert session.report().steps[0]["step"] == 0


def test_report_json_and_png(tmp_path):
    model = _model()
    plan = SteeringPlan.build(
        [_probe_set(model), _probe_set(model, "piano", 1)], "drums=+2,piano=-1", mode="smitin", every=1
    )
    with steer(model, plan) as session:
        model.generate(4, prompt=_prompt(B=2), seed=0)
    report = session.report()
    report.save(tmp_path / "r.json", tmp_path / "r.png")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["plan"]["strengths"] == {"drums": 2.0, "piano": -1.0} and data["plan"]["mode"] == "smitin"
    step = data["steps"][1]["traits"]["piano"]
    assert set(step) == {"probability", "push", "on"} and len(step["on"]) == 2
    assert set(data["summary"]) == {"drums", "piano"}
    assert (tmp_path / "r.png").stat().st_size > 2000


def test_random_direction_control_uses_the_random_arrays():
    model = _model()
    ps = _probe_set(model)
    plan = SteeringPlan.build([ps], "drums=+2", mode="smitin", direction="random")
    expected = (2.0 * ps.weight * ps.random_sigma)[..., None] * ps.random_direction
    np.testing.assert_allclose(plan.head_deltas()[0], expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------- bad input
def test_probe_set_from_another_generator_is_refused_naming_both():
    model = _model()
    ps = _probe_set(model, fingerprint="f" * 32)
    plan = SteeringPlan.build([ps], "drums=+5")
    with pytest.raises(SteeringError) as e:
        with steer(model, plan):
            pass
    assert "f" * 32 in str(e.value) and model.fingerprint() in str(e.value)
    assert not any(site._forward_hooks for site in model.head_sites())


@pytest.mark.parametrize(
    "spec, message",
    [
        ("drums=loud", "strength of 'drums' is not a number: 'loud'"),
        ("drums=nan", "not a finite number"),
        ("drums", "not TRAIT=STRENGTH"),
        ("drums=+5,drums=-3", "conflicting strengths for trait 'drums'"),
        ("drums=+5,drums=2", "given twice"),
        ("", "no traits"),
        ("=3", "empty trait name"),
    ],
)
def test_bad_strengths_give_one_clear_line(spec, message):
    with pytest.raises(SteeringError, match=message) as e:
        parse_strengths(spec)
    assert "\n" not in str(e.value) and isinstance(e.value, UserError)


def test_parse_strengths_accepts_signs_and_mappings():
    assert parse_strengths("drums=+5, piano=-3") == {"drums": 5.0, "piano": -3.0}
    assert parse_strengths({"bass": 2}) == {"bass": 2.0}
    with pytest.raises(SteeringError, match="not a number"):
        parse_strengths({"bass": True})


def test_unknown_trait_and_bad_params():
    model = _model()
    ps = _probe_set(model)
    with pytest.raises(SteeringError, match="unknown trait 'piano': probe sets are available for drums"):
        SteeringPlan.build([ps], "piano=+3")
    with pytest.raises(SteeringError, match="unknown steering mode"):
        SteeringPlan.build([ps], "drums=1", mode="loud")
    with pytest.raises(SteeringError, match="every"):
        SteeringPlan.build([ps], "drums=1", every=0)
    with pytest.raises(SteeringError, match="tau"):
        SteeringPlan.build([ps], "drums=1", tau="high")
    with pytest.raises(SteeringError, match="hold_floor must be in"):
        SteeringPlan.build([ps], "drums=1", hold_floor=1.5)
    with pytest.raises(SteeringError, match="hold_steps must be an integer"):
        SteeringPlan.build([ps], "drums=1", hold_steps=-1)
    with pytest.raises(SteeringError, match="smooth_steps must be a positive integer"):
        SteeringPlan.build([ps], "drums=1", smooth_steps=0)
