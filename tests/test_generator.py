"""Generator contract: delay pattern, head_out sites, KV cache, CFG layout, fingerprint, save/load, bad input."""

import json

import numpy as np
import pytest
import torch

from core.errors import UserError
from models.codec import MelCodecConfig, MelRVQCodec
from models.generator import (
    Generator,
    GeneratorConfig,
    GeneratorError,
    HeadOutput,
    _sample,
    apply_delay,
    load_generator,
    sampling_temperature,
    save_generator,
    undo_delay,
)


def _model(**kw):
    torch.manual_seed(0)
    return Generator(GeneratorConfig.debug(**kw)).eval()


def _codes(B=2, K=4, T=10, card=32, seed=0):
    return torch.randint(0, card, (B, K, T), generator=torch.Generator().manual_seed(seed))


def test_delay_pattern_round_trip():
    codes = _codes(B=3, K=4, T=7)
    delayed = apply_delay(codes, special=32)
    assert delayed.shape == (3, 4, 10)
    assert delayed[0, 2, 2] == codes[0, 2, 0] and delayed[0, 3, 9] == codes[0, 3, 6]
    assert (delayed[:, 1, 0] == 32).all() and (delayed[:, 0, 7:] == 32).all()
    assert torch.equal(undo_delay(delayed), codes)
    logits = torch.randn(2, 4, 10, 5)
    assert undo_delay(logits).shape == (2, 4, 7, 5)


def test_forward_shapes_and_head_sites_see_every_position():
    model = _model()
    assert model.n_layers == 2 and model.n_heads == 4 and model.head_dim == 8
    sites = model.head_sites()
    assert len(sites) == 2 and all(isinstance(s, HeadOutput) for s in sites)
    assert [b.attn.head_out for b in model.blocks] == sites
    seen = []
    hooks = [s.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape))) for s in sites]
    logits = model(_codes(T=10), condition=None)
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 4, 13, 32)
    assert seen == [(2, model.n_prefix + 13, 4, 8)] * 2
    assert model.batch_layout == {"cfg": False, "n_cond": 2}


def test_kv_cache_logits_match_uncached():
    model = _model()
    codes = _codes(B=2, T=12)
    full = model.forward_tokens(
        torch.cat([torch.full((2, 4, 1), 32), apply_delay(codes, 32)[:, :, :-1]], 2), model._prefix(None, None, 2)
    )
    caches = [dict() for _ in range(model.n_layers)]
    inputs = torch.cat([torch.full((2, 4, 1), 32), apply_delay(codes, 32)[:, :, :-1]], 2)
    first = model.forward_tokens(inputs[:, :, :5], model._prefix(None, None, 2), caches, 0)
    steps = [
        model.forward_tokens(inputs[:, :, s : s + 1], None, caches, model.n_prefix + s)
        for s in range(5, inputs.shape[2])
    ]
    cached = torch.cat([first] + steps, dim=2)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_kv_cache_grows_past_its_buffer_and_still_matches_uncached():
    """The cache's buffers start at 64 positions and double: a stream of 100 steps crosses two growths, and every
    step's logits still equal the uncached model's over the whole stream."""
    model = _model()
    codes = _codes(B=2, T=100)
    inputs = torch.cat([torch.full((2, 4, 1), 32), apply_delay(codes, 32)[:, :, :-1]], 2)
    full = model.forward_tokens(inputs, model._prefix(None, None, 2))
    caches = [dict() for _ in range(model.n_layers)]
    first = model.forward_tokens(inputs[:, :, :3], model._prefix(None, None, 2), caches, 0)
    steps = [
        model.forward_tokens(inputs[:, :, s : s + 1], None, caches, model.n_prefix + s)
        for s in range(3, inputs.shape[2])
    ]
    assert caches[0]["n"] == model.n_prefix + inputs.shape[2] and caches[0]["k"].shape[2] >= caches[0]["n"]
    torch.testing.assert_close(torch.cat([first] + steps, dim=2), full, atol=1e-5, rtol=1e-4)


def test_generate_cached_equals_uncached_and_is_seeded():
    model = _model()
    prompt = _codes(B=2, T=6)
    cond = torch.randn(2, 384)
    kw = dict(n_frames=8, prompt=prompt, condition=cond, cfg_scale=3.0, temperature=1.0, top_k=10, seed=7)
    a = model.generate(use_cache=True, **kw)
    b = model.generate(use_cache=False, **kw)
    c = model.generate(use_cache=True, **kw)
    assert a.shape == (2, 4, 14)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a[:, :, :6], prompt)
    assert not torch.equal(a, model.generate(use_cache=True, **{**kw, "seed": 8}))


def test_cfg_batch_layout_and_hooks_at_every_step():
    model = _model()
    shapes, layouts, steps = [], [], []

    def hook(module, inputs, output):
        shapes.append(tuple(output.shape))
        layouts.append(dict(model.batch_layout))

    h = model.head_sites()[0].register_forward_hook(hook)
    model.generate(
        n_frames=5, prompt=_codes(B=3, T=4), condition=torch.randn(3, 384), cfg_scale=2.5, seed=0, on_step=steps.append
    )
    h.remove()
    n_steps = 5 + 4 - 1
    assert steps == list(range(n_steps))
    assert len(shapes) == n_steps
    assert shapes[0] == (6, model.n_prefix + 4 + 1, 4, 8)  # prompt pass: [3 cond; 3 uncond] rows
    assert all(s == (6, 1, 4, 8) for s in shapes[1:])  # cached steps see T == 1
    assert all(lay == {"cfg": True, "n_cond": 3, "prompt_frames": 4} for lay in layouts)
    model.generate(n_frames=3, batch_size=2, seed=0)
    assert model.batch_layout == {"cfg": False, "n_cond": 2, "prompt_frames": 0}


def test_cfg_rows_are_conditional_first():
    model = _model()
    rows = []
    cond = torch.randn(2, 384) * 5
    h = model.head_sites()[1].register_forward_hook(lambda m, i, o: rows.append(o[:, -1].clone()))
    model.generate(n_frames=2, condition=cond, cfg_scale=3.0, seed=0)
    h.remove()
    first = rows[0]
    # the unconditional half equals a run with no condition at all
    rows2 = []
    h = model.head_sites()[1].register_forward_hook(lambda m, i, o: rows2.append(o[:, -1].clone()))
    model.generate(n_frames=2, batch_size=2, seed=0)
    h.remove()
    torch.testing.assert_close(first[2:], rows2[0])
    assert not torch.allclose(first[:2], rows2[0])


def test_head_out_edit_changes_output():
    model = _model()
    codes = _codes(B=1, T=8)
    base = model(codes)

    def push(module, inputs, output):
        out = output.clone()
        out[:, :, 1] += 3.0  # head 1 of layer 0
        return out

    h = model.head_sites()[0].register_forward_hook(push)
    pushed = model(codes)
    gen_pushed = model.generate(n_frames=6, prompt=codes[:, :, :4], seed=3, temperature=0.0)
    h.remove()
    assert not torch.allclose(base, pushed)
    assert not torch.equal(gen_pushed, model.generate(n_frames=6, prompt=codes[:, :, :4], seed=3, temperature=0.0))


def test_prompt_guidance_cached_equals_uncached_and_one_is_off():
    model = _model()
    prompt = _codes(B=2, T=6)
    # a strong scale: the tiny random model's logits are nearly flat, small changes keep the same samples
    a = model.generate(n_frames=5, prompt=prompt, seed=1, prompt_guidance=30.0)
    b = model.generate(n_frames=5, prompt=prompt, seed=1, prompt_guidance=30.0, use_cache=False)
    assert torch.equal(a, b) and torch.equal(a[:, :, :6], prompt)
    plain = model.generate(n_frames=5, prompt=prompt, seed=1)
    assert torch.equal(model.generate(n_frames=5, prompt=prompt, seed=1, prompt_guidance=1.0), plain)
    assert not torch.equal(a, plain)
    # with text CFG as well: still cache-consistent
    cond = torch.randn(2, model.cfg.cond_dim)
    c1 = model.generate(n_frames=4, prompt=prompt, condition=cond, cfg_scale=3.0, seed=2, prompt_guidance=2.0)
    c2 = model.generate(
        n_frames=4, prompt=prompt, condition=cond, cfg_scale=3.0, seed=2, prompt_guidance=2.0, use_cache=False
    )
    assert torch.equal(c1, c2)


def test_hidden_prompt_positions_do_not_reach_the_prompt_free_rows():
    model = _model()
    B, S = 2, 12
    inputs = _codes(B=B, T=S)
    prefix = model._prefix(None, None, B)
    visible = torch.ones(B, model.n_prefix + S, dtype=torch.bool)
    visible[1, model.n_prefix : model.n_prefix + 5] = False  # row 1 does not see stream positions 0..4
    base = model.forward_tokens(inputs, prefix, visible=visible)
    changed = inputs.clone()
    changed[:, :, :5] = (changed[:, :, :5] + 1) % model.cfg.card
    out = model.forward_tokens(changed, prefix, visible=visible)
    assert torch.allclose(out[1, :, 5:], base[1, :, 5:], atol=1e-5)  # hidden: no influence
    assert not torch.allclose(out[0, :, 5:], base[0, :, 5:], atol=1e-5)  # row 0 sees them


def test_prompt_guidance_rows_layout_and_bad_values():
    model = _model()
    prompt = _codes(B=2, T=6)
    seen, layouts = [], []

    def record(module, inputs, output):
        seen.append(output.shape[0])
        layouts.append(dict(model.batch_layout))

    h = model.head_sites()[0].register_forward_hook(record)
    model.generate(
        n_frames=3,
        prompt=prompt,
        condition=torch.randn(2, model.cfg.cond_dim),
        cfg_scale=2.0,
        prompt_guidance=2.0,
        seed=0,
    )
    h.remove()
    assert set(seen) == {6} and layouts[0] == {"cfg": True, "n_cond": 2, "prompt_frames": 6}  # cond; uncond; free
    for bad in (0.5, float("inf"), "x", None, [3.0, 1.0], "3,1,1,0.5"):
        with pytest.raises(GeneratorError, match="prompt_guidance"):
            model.generate(n_frames=2, prompt=prompt, prompt_guidance=bad)
    # one scale per codebook: 1 on every codebook is plain sampling; on the coarse one only, another sample
    plain = model.generate(n_frames=4, prompt=prompt, seed=5)
    assert torch.equal(model.generate(n_frames=4, prompt=prompt, seed=5, prompt_guidance="1,1,1,1"), plain)
    coarse = model.generate(n_frames=4, prompt=prompt, seed=5, prompt_guidance=[30.0, 1.0, 1.0, 1.0])
    assert not torch.equal(coarse, plain)
    # without a prompt there is nothing to guide towards: plain generation
    assert model.generate(n_frames=3, batch_size=2, seed=4, prompt_guidance=3.0).shape == (2, 4, 3)


def test_plausibility_masks_exactly_the_tokens_the_prompted_model_finds_unlikely(monkeypatch):
    """With prompt guidance, every token whose prompted probability is below plausibility x the top one's gets -inf
    before sampling (and only those); nothing is masked without guidance; cached and uncached still agree."""
    import math

    import models.generator as G

    model = _model()
    prompt = _codes(B=2, T=6)
    forwarded, masked = [], []
    cut = {"at": None}  # the plausibility the next generate call constrains with (None: nothing masked)
    forward_tokens, sample = G.Generator.forward_tokens, G._sample

    def record_forward(self, *a, **k):
        out = forward_tokens(self, *a, **k)
        forwarded.append(out[:, :, -1].float())
        return out

    def check_sample(logits, *a):
        lp = forwarded[-1][: logits.shape[0]].log_softmax(-1)  # no text CFG: the first B rows see the prompt
        expected = (
            lp < lp.amax(-1, keepdim=True) + math.log(cut["at"])
            if cut["at"]
            else torch.zeros_like(lp, dtype=torch.bool)
        )
        assert torch.equal(torch.isinf(logits), expected)
        frame = sample(logits, *a)
        assert torch.isfinite(logits.gather(-1, frame[..., None])).all()  # never a masked token
        masked.append(int(expected.sum()))
        return frame

    monkeypatch.setattr(G.Generator, "forward_tokens", record_forward)
    monkeypatch.setattr(G, "_sample", check_sample)
    cut["at"] = 0.9  # the tiny random model's distributions are flat: a high cut to mask some tokens
    a = model.generate(n_frames=5, prompt=prompt, seed=1, prompt_guidance=30.0, plausibility=0.9)
    assert len(masked) == 5 + 3 and min(masked) > 0  # 5 frames + 3 delay steps, each with masked tokens
    b = model.generate(n_frames=5, prompt=prompt, seed=1, prompt_guidance=30.0, plausibility=0.9, use_cache=False)
    assert torch.equal(a, b)
    cut["at"] = None
    assert not torch.equal(a, model.generate(n_frames=5, prompt=prompt, seed=1, prompt_guidance=30.0))
    plain = model.generate(n_frames=5, prompt=prompt, seed=1)  # no guidance: nothing to constrain
    assert torch.equal(model.generate(n_frames=5, prompt=prompt, seed=1, plausibility=0.9), plain)
    for bad in (-0.1, 1.0, float("nan"), "high", None, True):
        with pytest.raises(GeneratorError, match="plausibility must be a number in"):
            model.generate(n_frames=2, prompt=prompt, prompt_guidance=3.0, plausibility=bad)


def test_sampling_options():
    model = _model()
    for kw in ({"temperature": 0.0}, {"top_k": 1}, {"top_p": 0.5}, {"top_p": 0.9, "top_k": 5, "temperature": 0.7}):
        out = model.generate(n_frames=4, batch_size=2, seed=1, **kw)
        assert out.shape == (2, 4, 4) and out.max() < 32 and out.min() >= 0
    greedy = model.generate(n_frames=4, batch_size=1, seed=1, temperature=0.0)
    assert torch.equal(greedy, model.generate(n_frames=4, batch_size=1, seed=2, top_k=1))


def test_per_codebook_temperature():
    assert sampling_temperature(0.7) == 0.7 and sampling_temperature("0.7") == 0.7
    assert sampling_temperature("1, 0.7,0.7,0.7", 4) == (1.0, 0.7, 0.7, 0.7)
    assert sampling_temperature([1, 0.5], 2) == (1.0, 0.5)
    assert sampling_temperature([0.7], 4) == 0.7 and sampling_temperature(np.float32(0.5)) == 0.5
    for bad, match in (
        ("1,0.7", "2 values, the generator has 4"),
        ("hot", "number"),
        (-1.0, ">= 0"),
        ("inf", "finite"),
        ([True, 0.5, 1, 1], "number"),
        ([], "number"),
        ("1,x", "number"),
    ):
        with pytest.raises(GeneratorError, match=match):
            sampling_temperature(bad, 4)
    logits = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))
    # one value per codebook, all equal: the very tokens of the scalar temperature (same draws)
    same = _sample(logits, (0.7,) * 4, 0, 0.0, torch.Generator().manual_seed(5))
    assert torch.equal(same, _sample(logits, 0.7, 0, 0.0, torch.Generator().manual_seed(5)))
    # 0 is greedy for that codebook only
    mixed = _sample(logits, (1.0, 0.0, 1.0, 0.0), 0, 0.0, torch.Generator().manual_seed(5))
    assert torch.equal(mixed[:, [1, 3]], logits.argmax(-1)[:, [1, 3]])
    assert torch.equal(_sample(logits, (0.0,) * 4, 0, 0.0, torch.Generator()), logits.argmax(-1))
    # low temperature on the fine codebooks makes them (near) deterministic, the coarse one still varies
    model = _model()
    runs = [model.generate(n_frames=6, batch_size=1, seed=s, temperature=(1.0, 0.0, 0.0, 0.0)) for s in (1, 2, 3)]
    assert all(r.shape == (1, 4, 6) for r in runs)
    assert torch.equal(runs[0], model.generate(n_frames=6, batch_size=1, seed=1, temperature="1,0,0,0"))
    with pytest.raises(GeneratorError, match="3 values"):
        model.generate(n_frames=2, temperature=(1.0, 1.0, 1.0))


def test_attributes_condition_the_model():
    model = _model()
    codes = _codes(B=1, T=5)
    cond = torch.randn(1, 384)
    a = model(codes, cond, torch.tensor([[5, 3]]))
    b = model(codes, cond, torch.tensor([[9, 20]]))
    assert not torch.allclose(a, b)


def test_fingerprint_tracks_weights_and_config():
    a, b = _model(), _model()
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.heads[0].weight[0, 0] += 1e-3
    assert a.fingerprint() != b.fingerprint()
    assert _model(n_layers=3).fingerprint() != a.fingerprint()


def _codec(card=32, n_codebooks=4):
    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(16000).astype(np.float32) * 0.1, 16000) for _ in range(3)]
    return MelRVQCodec.fit(waves, MelCodecConfig.debug(card=card, n_codebooks=n_codebooks))


def test_save_load_round_trip(tmp_path):
    model, codec = _model(), _codec()
    save_generator(model, codec, tmp_path)
    meta = json.loads((tmp_path / "generator.json").read_text())
    assert meta["fingerprint"] == model.fingerprint() and meta["config"]["n_layers"] == 2
    assert (tmp_path / "generator.safetensors").exists() and (tmp_path / "codec.json").exists()
    loaded, codec2 = load_generator(tmp_path)
    assert loaded.fingerprint() == model.fingerprint()
    assert codec2.fingerprint() == codec.fingerprint()
    codes = _codes(B=1, T=5)
    torch.testing.assert_close(loaded(codes), model(codes))


def test_mismatched_checkpoints_are_one_line_user_errors(tmp_path):
    model = _model()
    with pytest.raises(UserError, match="does not match"):
        save_generator(model, _codec(card=16), tmp_path / "bad")
    save_generator(model, _codec(), tmp_path / "a")
    other = _codec(card=16)
    other.save(tmp_path / "a")  # someone copied another codec beside the generator
    with pytest.raises(GeneratorError) as e:
        load_generator(tmp_path / "a")
    assert "\n" not in str(e.value)
    save_generator(model, _codec(), tmp_path / "b")
    save_generator(_model(n_layers=3), _codec(), tmp_path / "c")
    (tmp_path / "b" / "generator.safetensors").write_bytes((tmp_path / "c" / "generator.safetensors").read_bytes())
    with pytest.raises(GeneratorError) as e:
        load_generator(tmp_path / "b")
    assert "\n" not in str(e.value)
    with pytest.raises(GeneratorError, match="no generator checkpoint"):
        load_generator(tmp_path / "missing")


def test_bad_tokens_and_long_prompts():
    model = _model()
    with pytest.raises(GeneratorError, match="out of vocabulary"):
        model(torch.full((1, 4, 5), 32))
    with pytest.raises(GeneratorError, match="out of vocabulary"):
        model.generate(n_frames=2, prompt=torch.full((1, 4, 5), -1))
    with pytest.raises(GeneratorError, match=r"\[B, 4, T\]"):
        model(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(GeneratorError, match="exceed the context"):
        model.generate(n_frames=10, prompt=_codes(B=1, T=125))
    with pytest.raises(GeneratorError, match="exceed the context"):
        model(_codes(B=1, T=200))
    with pytest.raises(GeneratorError, match="condition must be"):
        model(_codes(B=1, T=5), condition=torch.randn(1, 10))
