"""The Hugging Face MusicGen backend on tiny random models (no download): head sites on out_proj at every step,
delay-pattern alignment, equality with transformers' own generate(), steering on the chosen heads of the
conditional half only, cached == uncached, probes end to end, fingerprints, local loading."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import StoppingCriteriaList

from core.errors import UserError
from models.backends import load_backend
from models.generation_params import GeneratorParams
from models.musicgen import MusicGenError, MusicGenGenerator, debug_musicgen, load_musicgen
from models.probes import (
    ProbeSet,
    ProbesParams,
    ProbeTrainingParams,
    capture_head_outputs,
    train_probe_set,
    train_trait,
)
from models.steering import SteeringError, SteeringPlan, steer

K, CARD, H, DH = 4, 32, 4, 4


@pytest.fixture(scope="module")
def composite():
    return debug_musicgen(seed=0)


@pytest.fixture(scope="module")
def gen(composite):
    return MusicGenGenerator(composite)


@pytest.fixture(scope="module")
def decoder_only():
    return MusicGenGenerator(debug_musicgen(seed=0, decoder_only=True))


def _text(batch=2, length=5, seed=0):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _codes(batch, frames, seed=0):
    return torch.randint(0, CARD, (batch, K, frames), generator=torch.Generator().manual_seed(seed))


def _probe_set(generator, heads=((0, 1), (1, 3)), seed=0, trait="drums"):
    """A probe set for `generator` whose top heads by accuracy are `heads` (others lower), unit directions."""
    rng = np.random.default_rng(seed)
    L = generator.n_layers
    acc = np.full((L, H), 0.55, np.float32)
    for i, (layer, head) in enumerate(heads):
        acc[layer, head] = 0.95 - 0.01 * i
    direction = rng.standard_normal((L, H, DH)).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    rnd = rng.standard_normal((L, H, DH)).astype(np.float32)
    rnd /= np.linalg.norm(rnd, axis=-1, keepdims=True)
    return ProbeSet(
        trait=trait,
        generator_fingerprint=generator.fingerprint(),
        coef=rng.standard_normal((L, H, DH)).astype(np.float32),
        intercept=np.zeros((L, H), np.float32),
        direction=direction,
        sigma=rng.uniform(0.5, 2.0, (L, H)).astype(np.float32),
        accuracy=acc,
        weight=np.ones((L, H), np.float32),
        random_direction=rnd,
        random_sigma=np.ones((L, H), np.float32),
    )


# ------------------------------------------------------------------------------------------- head sites
def test_head_sites_see_out_proj_input_at_every_step(gen):
    """Adapter hooks get (B, T, H, Dh) views of out_proj's (B, T, H*Dh) input: once per decoding step (the
    prefill that transformers 5.23 runs twice and discards once is hidden), prompt + BOS first, then T == 1."""
    raw, site_calls, steps = [], [], []
    handles = [
        layer.self_attn.out_proj.register_forward_pre_hook(lambda m, a, i=i: raw.append((i, a[0].detach().clone())))
        for i, layer in enumerate(gen.layers)
    ]
    handles += [
        site.register_forward_hook(lambda m, i, z, layer=n: site_calls.append((layer, z.detach().clone())))
        for n, site in enumerate(gen.head_sites())
    ]
    try:
        B, Tp, n = 2, 3, 5
        codes = gen.generate(n, prompt=_codes(B, Tp), condition=_text(B), cfg_scale=3.0, seed=3, on_step=steps.append)
    finally:
        for h in handles:
            h.remove()
    assert codes.shape == (B, K, Tp + n)
    n_steps = n + K - 1
    assert steps == list(range(n_steps))
    assert [len([c for c in site_calls if c[0] == layer]) for layer in range(2)] == [n_steps, n_steps]
    shapes = [tuple(z.shape) for layer, z in site_calls if layer == 0]
    assert shapes == [(2 * B, Tp + 1, H, DH)] + [(2 * B, 1, H, DH)] * (n_steps - 1)  # CFG doubles the batch
    # raw pre-hooks see (2B, T, H*Dh) and one extra, discarded prefill; the adapter's views carry the same values
    raw0 = [x for layer, x in raw if layer == 0]
    assert len(raw0) == n_steps + 1 and all(x.shape[-1] == H * DH and x.dim() == 3 for x in raw0)
    assert [tuple(x.shape) for x in raw0[1:]] == [(s[0], s[1], H * DH) for s in shapes]
    for x, (_, z) in zip(raw0[1:], [c for c in site_calls if c[0] == 0]):
        torch.testing.assert_close(x.reshape(z.shape), z, rtol=0, atol=0)
    assert gen.batch_layout["cfg"] is True and gen.batch_layout["n_cond"] == B


def test_teacher_forced_forward_uses_the_models_delay_pattern(decoder_only):
    """Greedy tokens from generate() are the argmax of the teacher-forced logits at delayed positions: frame t of
    codebook k is predicted at input position t + k (so probes see the stream generation sees)."""
    g = decoder_only
    codes = g.generate(6, batch_size=2, temperature=0)
    seen = []
    h = g.head_sites()[1].register_forward_hook(lambda m, i, z: seen.append(tuple(z.shape)))
    logits = g(codes)
    h.remove()
    T = codes.shape[-1]
    assert logits.shape == (2, K, T + K - 1, CARD) and seen == [(2, T + K - 1, H, DH)]
    for k in range(K):
        assert torch.equal(logits[:, k, k : k + T].argmax(-1), codes[:, k])
    assert g.batch_layout == {"cfg": False, "n_cond": 2}


def test_decoder_only_prompt_is_seen(decoder_only):
    """transformers 5.23 drops a decoder-only prompt at a cached prefill; the wrapper runs it uncached."""
    g, T = decoder_only, []
    h = g.head_sites()[0].register_forward_hook(lambda m, i, z: T.append(z.shape[1]))
    prompt = _codes(1, 4, seed=5)
    out = g.generate(3, prompt=prompt, seed=0)
    h.remove()
    assert T[0] == 4 + 1 and T[1:] == list(range(6, 6 + len(T) - 1))
    assert torch.equal(out[:, :, :4], prompt)


# -------------------------------------------------------------------------------- equality with generate()
def test_generate_equals_transformers_generate(composite, gen, decoder_only):
    B, n, seed = 2, 6, 11
    text = _text(B)
    codes = gen.generate(n, condition=text, cfg_scale=3.0, seed=seed, top_k=8)
    last = {}

    def keep(input_ids, scores, **kw):  # the composite model returns audio: read its token stream here
        last["ids"] = input_ids
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    torch.manual_seed(seed)
    audio = composite.generate(
        input_ids=text,
        attention_mask=torch.ones_like(text),
        do_sample=True,
        guidance_scale=3.0,
        top_k=8,
        max_length=n + K,
        stopping_criteria=StoppingCriteriaList([keep]),
    )
    _, mask = composite.decoder.build_delay_pattern_mask(torch.full((B * K, 1), CARD), CARD, n + K)
    theirs = composite.decoder.apply_delay_pattern_mask(last["ids"], mask)
    assert torch.equal(codes, theirs[theirs != CARD].reshape(B, K, n))  # transformers' own un-delaying
    ours = composite.audio_encoder.decode(codes[None], [None] * B).audio_values
    torch.testing.assert_close(ours, audio, rtol=0, atol=1e-5)
    # decoder-only: transformers returns the codes themselves
    lm = decoder_only.model
    ours = decoder_only.generate(n, batch_size=B, seed=seed)
    torch.manual_seed(seed)
    theirs = lm.generate(torch.full((B * K, 1), CARD), do_sample=True, max_length=n + K, num_return_sequences=1)
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------------- steering
def test_zero_strength_steering_equals_plain_generate(gen):
    ps = _probe_set(gen)
    text = _text(2)
    plain = gen.generate(6, condition=text, cfg_scale=3.0, seed=7)
    for mode in ("iti", "smitin"):
        with steer(gen, SteeringPlan.build([ps], {"drums": 0.0}, mode=mode, top_k=2)) as session:
            steered = gen.generate(6, condition=text, cfg_scale=3.0, seed=7)
        assert torch.equal(steered, plain)
        assert len(session.report().steps) == 6 + K - 1
    with steer(gen, SteeringPlan.build([ps], {"drums": 200.0}, mode="iti", top_k=8)):
        pushed = gen.generate(6, condition=text, cfg_scale=3.0, seed=7)
    assert not torch.equal(pushed, plain)  # the hooks are live: a large push changes the music


def test_steering_lands_on_chosen_heads_and_conditional_half(gen):
    """The out_proj input after the steering hook minus before it is alpha * sigma * theta on the top-2 heads, at
    the last position of the conditional rows, and exactly zero everywhere else."""
    chosen = {(0, 1), (1, 3)}
    ps = _probe_set(gen, heads=sorted(chosen))
    alpha, B = 3.0, 2
    before, after = [], []
    pre = [
        layer.self_attn.out_proj.register_forward_pre_hook(lambda m, a, i=i: before.append((i, a[0].detach().clone())))
        for i, layer in enumerate(gen.layers)
    ]
    try:
        with steer(gen, SteeringPlan.build([ps], {"drums": alpha}, mode="iti", top_k=2)):
            post = [
                layer.self_attn.out_proj.register_forward_pre_hook(
                    lambda m, a, i=i: after.append((i, a[0].detach().clone()))
                )
                for i, layer in enumerate(gen.layers)
            ]
            gen.generate(4, prompt=_codes(B, 3), condition=_text(B), cfg_scale=3.0, seed=1)
            for h in post:
                h.remove()
    finally:
        for h in pre:
            h.remove()
    # the prefill transformers runs and discards first: steering hooks are held off there (no push)
    assert torch.equal(before[0][1], after[0][1]) and torch.equal(before[1][1], after[1][1])
    before, after = before[2:], after[2:]
    assert len(before) == len(after) == 2 * (4 + K - 1)
    expected = torch.from_numpy(alpha * ps.sigma[..., None] * ps.direction)  # [L, H, Dh]
    for (layer, x), (layer2, y) in zip(before, after):
        assert layer == layer2
        diff = (y - x).reshape(x.shape[0], x.shape[1], H, DH)
        assert diff.shape[0] == 2 * B
        for head in range(H):
            want = expected[layer, head] if (layer, head) in chosen else torch.zeros(DH)
            for row in range(B):
                torch.testing.assert_close(diff[row, -1, head], want, rtol=1e-5, atol=1e-6)
        assert not diff[B:].any()  # unconditional half untouched
        assert not diff[:, :-1].any()  # earlier (prompt) positions untouched
    assert before[0][1].shape[1] == 3 + 1  # the first step did hold the prompt positions


def test_steered_cached_and_uncached_give_the_same_tokens(gen):
    ps = _probe_set(gen)
    plan = SteeringPlan.build([ps], {"drums": 2.0}, mode="iti", top_k=3)
    out = []
    for use_cache in (True, False):
        with steer(gen, plan):
            out.append(
                gen.generate(
                    5, prompt=_codes(2, 2), condition=_text(2), cfg_scale=3.0, temperature=0, use_cache=use_cache
                )
            )
    assert torch.equal(out[0], out[1])


def test_a_prompt_relative_monitor_reads_musicgen_continuations_from_the_prompts_reading(gen):
    """MusicGen tells steering the prompt's length: after a prompt the monitor takes the prompt's part out of the
    probes' reading (step 0 is the prompt's own reading); without a prompt the reading is the monitor."""
    ps = _probe_set(gen)
    plan = SteeringPlan.build([ps], {"drums": 2.0}, mode="none", prompt_relative=True)
    with steer(gen, plan) as session:
        gen.generate(6, prompt=_codes(2, 3), condition=_text(2), cfg_scale=3.0, seed=0)
    assert gen.batch_layout["prompt_frames"] == 3
    drums = [s["traits"]["drums"] for s in session.report().steps]
    assert drums[0]["probability"] == pytest.approx(drums[0]["reading"], abs=1e-9)
    assert max(abs(a - b) for d in drums[1:] for a, b in zip(d["probability"], d["reading"])) > 1e-4
    with steer(gen, plan) as session:
        gen.generate(6, condition=_text(2), cfg_scale=3.0, seed=0)
    assert gen.batch_layout["prompt_frames"] == 0 and "reading" not in session.report().steps[0]["traits"]["drums"]


def test_probe_set_from_another_model_is_refused(gen):
    other = MusicGenGenerator(debug_musicgen(seed=1))
    assert other.fingerprint() != gen.fingerprint()
    assert MusicGenGenerator(debug_musicgen(seed=0)).fingerprint() == gen.fingerprint()  # stable, weights-only
    with pytest.raises(SteeringError, match="retrain the probes"):
        with steer(gen, SteeringPlan.build([_probe_set(other)], {"drums": 5.0})):
            pass


# ------------------------------------------------------------------------------------ probes end to end
def test_probes_train_end_to_end(tmp_path, composite, gen):
    from models.musicgen import musicgen_codec

    codec = musicgen_codec(composite)
    assert (codec.n_codebooks, codec.card, codec.frame_rate) == (K, CARD, 50.0)
    rng = np.random.default_rng(0)
    t = np.arange(800) / 800.0
    for sub, label in (("with", 1), ("without", 0)):
        (tmp_path / sub).mkdir()
        for i in range(10):
            wave = 0.3 * np.sin(2 * np.pi * (60 + 5 * i) * t)
            if label:
                wave = wave + 0.3 * rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 4 * t) > 0)
            sf.write(tmp_path / sub / f"pair{i:02d}.wav", wave.astype(np.float32), 800)
    section = ProbesParams(
        window_seconds=0.5,
        batch_size=8,
        seed=0,
        max_iter=200,
        traits={"noise": {"source": {"kind": "folders", "path": str(tmp_path), "sample_rate": 800}}},
    )
    ps = train_trait("noise", gen, codec, None, section)
    assert ps.coef.shape == (2, H, DH) and ps.generator_fingerprint == gen.fingerprint()
    assert ps.params["window_frames"] == 25 and ps.metrics["n_valid"] > 0
    assert 0.0 <= ps.accuracy.min() <= ps.accuracy.max() <= 1.0
    # a random EnCodec barely tells audio apart, so check separability on tokens: clips whose codes come from
    # disjoint halves of the vocabulary are told apart by the heads of the random decoder
    gen_ = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, CARD // 2, (K, 12), generator=gen_) + (CARD // 2) * (i % 2) for i in range(40)]
    acts = capture_head_outputs(gen, codes, "mean", batch_size=20)
    labels = np.arange(40) % 2
    splits = np.array(["train", "train", "valid", "tune"])[np.arange(40) // 2 % 4]
    sep = train_probe_set(acts, labels, splits, "high", gen.fingerprint(), ProbeTrainingParams(seed=0))
    assert sep.metrics["best_acc"] >= 0.85
    ps.save(tmp_path / "ps")
    loaded = ProbeSet.load(tmp_path / "ps")
    # capture is the teacher-forced, unconditioned last position of the model's own delay pattern
    codes = [codec.encode(np.sin(2 * np.pi * 80 * t).astype(np.float32), 800)[:, :25]]
    acts = capture_head_outputs(gen, codes)
    seen = []
    h = gen.head_sites()[1].register_forward_hook(lambda m, i, z: seen.append(z.detach().clone()))
    gen(codes[0][None])
    h.remove()
    np.testing.assert_allclose(acts[0, 1], seen[0][0, -1].numpy(), atol=1e-6)
    with steer(gen, SteeringPlan.build([loaded], {"noise": 5.0}, mode="smitin", every=2)) as session:
        gen.generate(4, condition=_text(1), cfg_scale=3.0, seed=0)
    report = session.report()
    assert len(report.steps) == 4 + K - 1 and len(report.probabilities("noise")) == 4 + K - 1


# ----------------------------------------------------------------------------------------------- loading
def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<pad>": 0,
        "</s>": 1,
        "<unk>": 2,
        **{w: i + 3 for i, w in enumerate("rock drums jazz piano slow".split())},
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def test_load_from_local_folders_offline(tmp_path, monkeypatch, composite, gen):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "musicgen"
    composite.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    loaded, codec = load_musicgen(folder)
    assert loaded.fingerprint() == gen.fingerprint() and codec.n_codebooks == K
    out = loaded.generate(3, condition=["rock drums", "slow jazz piano"], cfg_scale=3.0, seed=0)
    assert out.shape == (2, K, 3)
    # a Hugging Face hub cache folder resolves to its snapshot
    cache = tmp_path / "hub" / "models--facebook--musicgen-tiny"
    (cache / "snapshots").mkdir(parents=True)
    folder.rename(cache / "snapshots" / "abc123")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    via_params, _ = load_backend(GeneratorParams(backend="musicgen", path=str(cache), dtype="float32"))
    assert via_params.fingerprint() == gen.fingerprint() and via_params.tokenizer is not None
    # decoder-only checkpoints load as MusicgenForCausalLM, without a codec unless one is given
    debug_musicgen(decoder_only=True).save_pretrained(tmp_path / "decoder")
    lm, no_codec = load_musicgen(tmp_path / "decoder")
    assert not lm.composite and no_codec is None
    with pytest.raises(MusicGenError, match="no text encoder"):
        lm.generate(2, condition=["rock"])


def test_bad_folders_and_params_are_one_line_errors(tmp_path, gen):
    with pytest.raises(MusicGenError, match="nothing is downloaded"):
        load_musicgen(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MusicGenError, match="no config.json"):
        load_musicgen(tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MusicGenError, match="'bert'"):
        load_musicgen(tmp_path / "bert")
    with pytest.raises(MusicGenError, match="generator.path"):
        load_backend(GeneratorParams(backend="musicgen"))
    with pytest.raises(UserError, match=r"^params.yaml: generator.backend: Input should be 'builtin' or 'musicgen'$"):
        GeneratorParams.parse({"backend": "jukebox"}, "params.yaml: generator")
    with pytest.raises(MusicGenError, match="out of vocabulary"):
        gen(torch.full((1, K, 6), CARD))
    with pytest.raises(MusicGenError, match="tokenizer"):
        gen.generate(2, condition=["rock"])
