"""Training stages on a tiny synthetic clips table: codec fit, tokenize, a debug training run whose loss falls,
resume, the drum detector, the CLI, and bad input."""

import json

import numpy as np
import pytest
import torch

from core.errors import UserError
from models.carrying import EvaluateCarryingParams
from models.codec import load_codec
from models.generator import load_generator
from models.train import (
    FitCodecParams,
    TokenSet,
    TrainGeneratorParams,
    TrainingDataError,
    fit_codec,
    tokenize,
    train_generator,
)
from tests.clips_fixtures import fake_embed, write_clips_table

TINY_NETWORK = {"dim": 16, "blocks": 1, "steps": 10, "batch_size": 4, "segment_frames": 16, "clips": 4}
CODEC_PARAMS = FitCodecParams(
    n_mels=32, n_codebooks=2, card=16, kmeans_iters=5, griffin_lim_iters=4, network=TINY_NETWORK, seed=0
)
DEBUG_PRESET = {
    "steps": 40,
    "batch_size": 8,
    "window_frames": 32,
    "eval_every": 10,
    "eval_clips": 8,
    "max_minutes": 2,
    "lr": 0.01,
    "warmup": 5,
    "patience": 10,
    "model": {"max_frames": 48},
}
TRAIN_PARAMS = TrainGeneratorParams(preset="debug", seed=0, threads=1, ema_decay=0.0, presets={"debug": DEBUG_PRESET})


def _steps(n: int) -> TrainGeneratorParams:
    """TRAIN_PARAMS with the debug preset trained for `n` steps."""
    return TRAIN_PARAMS.with_overrides({"presets": {"debug": {**DEBUG_PRESET, "steps": n}}}, "test")


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    clips = write_clips_table(root / "clips")
    fit_codec(str(clips), str(root / "codec"), CODEC_PARAMS)
    counts = tokenize(str(clips), str(root / "codec"), str(root / "tokens"), embed=fake_embed)
    return root, counts


def test_tokenize_writes_codes_conditions_and_traits(stages):
    root, counts = stages
    assert counts == {"train": 8, "valid": 4, "test": 4}
    ts = TokenSet(root / "tokens", "train")
    assert len(ts) == 8 and ts.codes.shape[0] == 2 and ts.condition.shape == (8, 384)
    assert ts.clip(0).shape == (2, 81)  # 2 s at 40 frames/s, centred frames
    assert ts.meta["traits"][0] == {"drums": True} and ts.attributes[0].tolist() == [9, 1]


def test_tiny_training_loss_falls_and_resumes(stages):
    root, _ = stages
    metrics = train_generator(
        str(root / "tokens"),
        str(root / "codec"),
        str(root / "gen"),
        TRAIN_PARAMS,
        checkpoint_dir=str(root / "ckpt"),
        metrics_path=str(root / "m.json"),
        plot_path=str(root / "plot.json"),
    )
    history = json.loads((root / "plot.json").read_text())
    assert len(history) == 4
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    assert metrics["valid_loss"] < metrics["unigram_valid_loss"] + 0.5
    assert metrics["valid_loss_cb0"] > 0 and metrics["tokens_per_s"] > 0
    generator, codec = load_generator(root / "gen")
    assert generator.fingerprint() == metrics["fingerprint"] and codec.n_codebooks == 2
    # resume: more steps continue from the saved step instead of starting over
    more = _steps(50)
    said = []
    again = train_generator(
        str(root / "tokens"),
        str(root / "codec"),
        str(root / "gen2"),
        more,
        checkpoint_dir=str(root / "ckpt"),
        plot_path=str(root / "plot2.json"),
        progress=said.append,
    )
    assert again["steps"] == 50
    # the user is told that a finished 40-step run continues (not a fresh 50-step one) and how to start afresh
    assert any("planned for 40 steps continues to 50" in line and "from scratch" in line for line in said)
    assert len(json.loads((root / "plot2.json").read_text())) == 5


def test_ema_weights_are_judged_exported_and_checkpointed(stages, tmp_path):
    from safetensors.torch import load_file

    root, _ = stages
    metrics = train_generator(
        str(root / "tokens"),
        str(root / "codec"),
        str(tmp_path / "gen"),
        TRAIN_PARAMS.with_overrides({"ema_decay": 0.9}, "test"),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    ckpt = tmp_path / "ckpt"
    best, live, ema = (
        load_file(str(ckpt / name)) for name in ("best.safetensors", "model.safetensors", "ema.safetensors")
    )
    exported = load_generator(tmp_path / "gen")[0].state_dict()
    assert all(torch.equal(exported[k], best[k]) for k in best)  # the best of the averaged weights is exported
    assert not all(torch.equal(ema[k], live[k]) for k in live)  # the average trails the live weights
    assert metrics["valid_loss"] < metrics["unigram_valid_loss"] + 0.5
    with pytest.raises(UserError, match=r"train_generator.ema_decay: Input should be less than 1"):
        TRAIN_PARAMS.with_overrides({"ema_decay": 1.0}, "train_generator")


def test_training_stops_on_a_plateau_and_exports_the_lowest_loss(stages, tmp_path, monkeypatch):
    """Patience counts evaluations since the loss last fell by min_delta; the weights exported are still those of
    the lowest loss, even where it fell by less than min_delta."""
    import models.train as train_module

    root, _ = stages
    losses = [5.0, 4.0, 3.998, 3.999, 3.0, 2.9]  # the third is the lowest so far, but not progress at 0.005
    scripted = iter(losses)
    seen = []

    def fake_evaluate(model, *args, **kwargs):
        seen.append({k: t.detach().clone() for k, t in model.state_dict().items()})
        return torch.full((2,), next(scripted))

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    params = TRAIN_PARAMS.with_overrides({"presets": {"debug": {**DEBUG_PRESET, "patience": 2, "steps": 60}}}, "t")
    metrics = train_generator(str(root / "tokens"), str(root / "codec"), str(tmp_path / "gen"), params)
    assert metrics["stop_reason"] == "early_stopping" and metrics["steps"] == 40 and len(seen) == 4
    assert metrics["best_step"] == 30 and metrics["valid_loss"] == pytest.approx(3.998)
    exported = load_generator(tmp_path / "gen")[0].state_dict()
    assert all(torch.equal(exported[k], seen[2][k]) for k in seen[2])
    assert not all(torch.equal(seen[2][k], seen[3][k]) for k in seen[2])  # training moved on after it
    # with no min_delta the small gain is progress: the run goes on to its last step
    scripted = iter(losses)
    plain = params.with_overrides({"min_delta": 0.0}, "test")
    assert train_generator(str(root / "tokens"), str(root / "codec"), str(tmp_path / "g2"), plain)["steps"] == 60


def test_a_checkpoint_from_before_min_delta_resumes(stages, tmp_path):
    """A checkpoint whose state has no `progress_valid` (written before the plateau rule) continues, its patience
    measured from its best loss."""
    root, _ = stages
    ckpt = tmp_path / "ckpt"
    train_generator(
        str(root / "tokens"), str(root / "codec"), str(tmp_path / "a"), _steps(20), checkpoint_dir=str(ckpt)
    )
    state = json.loads((ckpt / "state.json").read_text())
    del state["progress_valid"]
    (ckpt / "state.json").write_text(json.dumps(state))
    said = []
    again = train_generator(
        str(root / "tokens"), str(root / "codec"), str(tmp_path / "b"), _steps(30), str(ckpt), progress=said.append
    )
    assert again["steps"] == 30 and any("continues to 30" in line for line in said)
    assert json.loads((ckpt / "state.json").read_text())["progress_valid"] <= state["best_valid"]


def test_checkpoint_of_other_tokens_is_not_resumed(stages, tmp_path):
    """After a data refresh (new codec / tokens) the stage must train afresh, not continue the old model."""
    import shutil

    root, _ = stages
    short = _steps(20)
    train_generator(
        str(root / "tokens"), str(root / "codec"), str(tmp_path / "gen"), short, checkpoint_dir=str(tmp_path / "ckpt")
    )
    other = tmp_path / "tokens"
    shutil.copytree(root / "tokens", other)
    ts = TokenSet(other, "train")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(other / "train.safetensors"))
    tensors["codes"] = tensors["codes"].flip(-1).contiguous()  # other token data, same shapes and codec
    save_file(tensors, str(other / "train.safetensors"))
    assert len(ts) == 8
    said = []
    again = train_generator(
        str(other),
        str(root / "codec"),
        str(tmp_path / "gen2"),
        short,
        checkpoint_dir=str(tmp_path / "ckpt"),
        progress=said.append,
    )
    assert any("from another run" in line for line in said) and not any("resumed" in line for line in said)
    assert again["steps"] == 20
    # the same tokens again: resumed (20 -> 30 steps continues from 20)
    longer = _steps(30)
    said = []
    train_generator(
        str(other),
        str(root / "codec"),
        str(tmp_path / "gen3"),
        longer,
        checkpoint_dir=str(tmp_path / "ckpt"),
        progress=said.append,
    )
    assert any("resumed" in line and "step 20" in line for line in said)


def test_drum_detector_separates_synthetic_drums(stages):
    from models.detectors import fit_drum_detector

    root, _ = stages
    det = fit_drum_detector(str(root / "tokens"), load_codec(root / "codec"), seconds=1.5, per_clip=2)
    assert det.info["train_accuracy_decoded"] >= 0.9 and det.info["test_accuracy_decoded"] >= 0.75
    # also fitted and judged on segments with randomised tokens (generated audio has such glitches)
    assert det.info["token_noise"] == 0.06 and det.info["test_noisy_accuracy_decoded"] >= 0.75
    assert det.info["test_noisy_n"] == det.info["test_n"]
    # without the noisy test report: the same detector, fitted at less cost
    quick = fit_drum_detector(
        str(root / "tokens"), load_codec(root / "codec"), seconds=1.5, per_clip=2, noisy_test=False
    )
    assert np.array_equal(quick.coef, det.coef) and quick.intercept == det.intercept
    assert "test_noisy_n" not in quick.info and quick.info["test_accuracy_decoded"] == det.info["test_accuracy_decoded"]


def test_token_noise_replaces_the_asked_share_with_codebook_tokens():
    import torch

    from models.detectors import add_token_noise, token_frequencies

    codes = torch.stack([torch.zeros(4000, dtype=torch.long), torch.full((4000,), 7)])
    freq = token_frequencies([torch.tensor([[1, 2, 2], [3, 3, 3]])], card=8)
    assert freq.shape == (2, 8) and freq[0, 2] == 3 and freq[1, 3] == 4  # counts + 1
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(add_token_noise(codes, 0.0, freq, gen), codes)
    noisy = add_token_noise(codes, 0.1, freq, gen)
    changed = (noisy != codes).float().mean(1)
    # a replaced token may redraw the same value (freq smoothing): changed share is a bit under the rate
    assert ((changed > 0.07) & (changed < 0.11)).all()
    assert noisy.shape == codes.shape and int(noisy.max()) < 8 and torch.equal(codes[0], torch.zeros(4000).long())


def test_drum_detector_refuses_bad_token_noise(stages):
    from core.errors import UserError
    from models.codec import load_codec
    from models.detectors import fit_drum_detector

    root, _ = stages
    with pytest.raises(UserError, match="token_noise"):
        fit_drum_detector(str(root / "tokens"), load_codec(root / "codec"), seconds=1.5, token_noise=1.5)


def test_detector_descriptors_same_in_threads(stages, monkeypatch):
    """The detector decodes and describes segments in parallel threads; the values must not depend on it."""
    import models.detectors as detectors
    from models.codec import load_codec
    from models.train import TokenSet

    root, _ = stages
    codec = load_codec(root / "codec")
    tokens = TokenSet(root / "tokens", "train")
    segments = [tokens.clip(i)[:, :40] for i in range(min(len(tokens), 20))]
    monkeypatch.setattr(detectors, "_PARALLEL_MIN_SEGMENTS", 10**9)
    one_by_one = detectors._descriptors_of_decoded(codec, segments)
    monkeypatch.setattr(detectors, "_PARALLEL_MIN_SEGMENTS", 1)
    threaded = detectors._descriptors_of_decoded(codec, segments)
    assert threaded.shape == (len(segments), len(detectors.FEATURES))
    assert np.array_equal(threaded, one_by_one)


def test_fit_codec_trains_its_decoder_network_unless_told_not_to(tmp_path, stages):
    root, _ = stages
    codec = load_codec(root / "codec")
    assert codec.decoder == "network" and codec.network is not None
    meta = json.loads((root / "codec" / "codec.json").read_text())
    assert meta["network_training"]["steps"] == TINY_NETWORK["steps"]
    plain = fit_codec(
        str(root / "clips"), str(tmp_path / "gl"), CODEC_PARAMS.with_overrides({"decoder": "griffin_lim"}, "t")
    )
    assert plain.network is None and load_codec(tmp_path / "gl").decoder == "griffin_lim"
    # the same codebooks either way: the tokens do not depend on the decoder
    assert torch.equal(plain.codebooks, codec.codebooks) and plain.fingerprint() != codec.fingerprint()


def test_bad_clips_tables(tmp_path, stages):
    root, _ = stages
    with pytest.raises(UserError, match="no clips table"):
        fit_codec(str(tmp_path / "none"), str(tmp_path / "codec"), CODEC_PARAMS)
    write_clips_table(tmp_path / "nocap", drop=("caption",))
    with pytest.raises(UserError, match="lacks column"):
        tokenize(str(tmp_path / "nocap"), str(root / "codec"), str(tmp_path / "tok"), embed=fake_embed)
    write_clips_table(tmp_path / "novalid", n_per_split=(4, 0, 2))
    with pytest.raises(TrainingDataError, match="split 'valid' .* is empty"):
        tokenize(str(tmp_path / "novalid"), str(root / "codec"), str(tmp_path / "tok2"), embed=fake_embed)
    with pytest.raises(TrainingDataError, match="run `smitin tokenize`"):
        train_generator(str(tmp_path / "notokens"), str(root / "codec"), str(tmp_path / "g"), TRAIN_PARAMS)


def test_cli_prints_one_line_errors(tmp_path, capsys):
    from generation.cli import main

    assert (
        main(
            [
                "tokenize",
                "--clips",
                str(tmp_path / "none"),
                "--codec",
                str(tmp_path / "c"),
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("smitin: error:") and "\n" not in err
    with pytest.raises(SystemExit):
        main(["train", "--help"])


@pytest.mark.parametrize(
    "argv, section, said",
    [
        (["train"], "train_generator:\n  lrr: 0.1\n", "train_generator.lrr: Extra inputs are not permitted"),
        (["train"], "train_generator:\n  model: {dim: wide}\n", "train_generator.model.dim: Input should be a valid"),
        (
            ["train", "--preset", "gpu"],
            "train_generator:\n  presets: {gpu: {steps: many}}\n",
            "train_generator.presets.gpu.steps: Input should be a valid integer",
        ),
        (["codec", "fit"], "fit_codec:\n  inversion: magic\n", "fit_codec.inversion: Input should be 'learned' or"),
        (
            ["codec", "fit"],
            "fit_codec:\n  network: {steps: 0}\n",
            "fit_codec.network.steps: Input should be greater than or equal to 1",
        ),
        (
            ["evaluate-carrying"],
            "evaluate_carrying:\n  prompts_per_class: lots\n",
            "evaluate_carrying.prompts_per_class: Input should be a valid integer",
        ),
    ],
)
def test_params_typos_and_wrong_types_are_one_line_naming_the_key(tmp_path, capsys, argv, section, said):
    from generation.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n" + section)
    assert main([*argv, "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smitin: error:") and "\n" not in err and said in err


class _Tokens:
    """The TokenSet interface prompt_swap_nats uses: meta and clip(i)."""

    def __init__(self, clips, meta):
        self.clips, self.meta = clips, meta

    def clip(self, i):
        return self.clips[i]


def test_twin_pairs_and_prompt_swap():
    import torch

    from models.detectors import prompt_swap_nats, twin_pairs
    from models.generator import Generator, GeneratorConfig

    meta = {
        "mix_id": ["a", "a", "a", "a", "b", "b"],
        "clip_id": ["x-000000000", "y-000000000", "z-000000000", "x-000010000", "u-000000000", "v-000000000"],
        "traits": [
            {"drums": True, "bass": True},
            {"drums": False, "bass": True},
            {"drums": False, "bass": False},
            {"drums": True, "bass": True},
            {"drums": True, "bass": False},
            {"drums": True, "bass": True},
        ],
    }
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randint(0, 32, (4, 30), generator=gen) for _ in meta["mix_id"]]
    tokens = _Tokens(clips, meta)
    # same mix and clip position, only drums differ: clip 0 / 1 (clip 2 also lacks bass, 3 is another position,
    # mix b has no drum-free clip)
    assert twin_pairs(tokens) == [(0, 1)]
    torch.manual_seed(0)
    model = Generator(GeneratorConfig.debug()).eval()
    out = prompt_swap_nats(model, tokens, prompt_n=10, window_n=8)
    assert out["pairs"] == 1 and out["window_frames"] == 8
    assert np.isfinite(out["swap_nats"]) and np.isfinite(out["swap_nats_cb0"])
    # identical twins: swapping the prompt changes nothing
    tokens.clips[1] = tokens.clips[0]
    assert abs(prompt_swap_nats(model, tokens, prompt_n=10, window_n=8)["swap_nats"]) < 1e-6
    assert prompt_swap_nats(model, tokens, prompt_n=25, window_n=8) == {"pairs": 0}  # clips too short


def test_trait_carrying_report_guided_and_unguided(stages, tmp_path):
    """Every prompt gets samples_per_prompt continuations per mode; the _unguided mode is the same without prompt
    guidance (other samples, same real continuations); bad modes and guidance fail before the detector is fitted."""
    from models.detectors import evaluate_trait_carrying

    root, _ = stages
    train_generator(str(root / "tokens"), str(root / "codec"), str(tmp_path / "gen"), _steps(10))
    params = EvaluateCarryingParams(
        seed=0,
        prompt_seconds=0.5,
        continuation_seconds=0.5,
        prompts_per_class=2,
        samples_per_prompt=2,
        modes=["unconditional", "unconditional_unguided"],
        prompt_guidance=[30.0, 1.0],
        prompt_plausibility=0.01,
        samples_per_class=1,
        detector_max_segments=40,
    )
    report = evaluate_trait_carrying(
        str(tmp_path / "gen"),
        str(root / "tokens"),
        None,
        params,
        out_path=str(tmp_path / "carry.json"),
        samples_dir=str(tmp_path / "wav"),
    )
    assert report["prompt_guidance"] == (30.0, 1.0) and report["prompt_plausibility"] == 0.01
    guided, plain = (report["results"][m]["rows"] for m in ("unconditional", "unconditional_unguided"))
    assert len(guided) == len(plain) == 2 * 2 * 2  # 2 classes x 2 prompts x 2 samples
    assert {r["sample"] for r in guided} == {0, 1}
    for mode in ("unconditional", "unconditional_unguided"):
        summary = report["summary"][mode]
        assert summary["drum_prompts"]["n"] == summary["drumfree_prompts"]["n"] == 4
    assert [r["p_real"] for r in guided] == [r["p_real"] for r in plain]  # same prompts, same real audio
    assert [r["p_generated"] for r in guided] != [r["p_generated"] for r in plain]
    assert report["summary"]["prompt_swap"] == {"pairs": 0}  # the fixture has no drum / drum-free twins
    assert json.loads((tmp_path / "carry.json").read_text())["summary"]["detector"]["token_noise"] == 0.06
    assert sorted(p.name for p in (tmp_path / "wav").iterdir()) == [
        f"{m}_{c}_0.wav" for m in ("unconditional", "unconditional_unguided") for c in ("drums", "nodrums")
    ]
    with pytest.raises(UserError, match="prompt_guidance has 3 values"):  # the generator has 2 codebooks
        bad = params.with_overrides({"prompt_guidance": [3.0, 1.0, 1.0]}, "evaluate_carrying")
        evaluate_trait_carrying(str(tmp_path / "gen"), str(root / "tokens"), None, bad)
    for bad, match in (
        ({"modes": ["sideways"]}, r"evaluate_carrying.modes.0: Input should be 'unconditional'"),
        ({"samples_per_prompt": 0}, "evaluate_carrying.samples_per_prompt: Input should be greater than or equal"),
        ({"prompt_guidance": [3.0, 0.5]}, r"evaluate_carrying.prompt_guidance"),
        ({"prompt_plausibility": 1.5}, "evaluate_carrying.prompt_plausibility: Input should be less than 1"),
        ({"prompt_plausibility": "high"}, "evaluate_carrying.prompt_plausibility: Input should be a valid number"),
    ):
        with pytest.raises(UserError, match=match):
            params.with_overrides(bad, "evaluate_carrying")


class _LevelCodec:
    """A codec whose dequantized frames are -3 (quiet) for codebook-0 token 0 and 0 for every other token."""

    def dequantize(self, codes):
        return torch.where(codes[0] == 0, -3.0, 0.0)[:, None].repeat(1, 4)


def test_training_windows_keep_off_quiet_clip_edges(stages):
    root, _ = stages
    ts = TokenSet(root / "tokens", "train")
    ts.codes[0] = torch.where(ts.codes[0] == 0, 1, ts.codes[0])  # no quiet frame anywhere
    a, b = int(ts.offsets[0]), int(ts.offsets[1])
    ts.codes[0, a : a + 3] = 0  # clip 0: three quiet frames lead, two trail, one rest inside stays
    ts.codes[0, b - 2 : b] = 0
    ts.codes[0, a + 10] = 0
    c, d = int(ts.offsets[1]), int(ts.offsets[2])
    ts.codes[0, c:d] = 0  # clip 1: quiet all through, kept whole
    assert ts.keep_off_quiet_edges(_LevelCodec(), -1.5) == 5
    n = b - a
    assert ts.spans[0].tolist() == [3, n - 2] and ts.spans[1].tolist() == [0, d - c]
    codes, _, _ = ts.batch([0], n - 5, None, start=0)
    assert torch.equal(codes[0], ts.clip(0)[:, 3 : n - 2])  # the window is the clip between its quiet edges
    assert ts.clip(0).shape[1] == n  # whole clips for everything else (prompts, reference continuations)
    params = TrainGeneratorParams.parse({"quiet_edge_level": -1.5}, "test")
    assert params.quiet_edge_level == -1.5 and TrainGeneratorParams().quiet_edge_level is None


def test_train_generator_applies_quiet_edge_level(stages, tmp_path):
    from models.train import frame_levels

    root, _ = stages
    codec = load_codec(root / "codec")
    train = TokenSet(root / "tokens", "train")
    levels = frame_levels(codec, train.codes)
    level = float(levels[train.offsets[:-1]].min()) + 1e-3  # the quietest first frame of a clip falls below it
    expected = train.keep_off_quiet_edges(codec, level)
    assert expected > 0
    said = []
    params = _steps(2).with_overrides({"quiet_edge_level": level}, "test")
    metrics = train_generator(
        str(root / "tokens"), str(root / "codec"), str(tmp_path / "gen"), params, progress=said.append
    )
    assert metrics["steps"] == 2
    assert any(line.startswith(f"train: windows keep off {expected} quiet edge frames") for line in said)
