"""Probes: capture shapes, training on separable synthetic activations, save/load layout, trait data sources,
the safe predicate parser, bad input."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from core.errors import UserError
from models.generator import Generator, GeneratorConfig
from models.probes import (
    ARRAY_NAMES,
    PROBE_ARRAYS,
    PROBE_SET_JSON,
    FoldersSource,
    PredicateSource,
    ProbeError,
    ProbeSet,
    ProbesParams,
    ProbeTrainingParams,
    SplitFractions,
    StemsSource,
    capture_head_outputs,
    load_trait_clips,
    parse_predicate,
    probe_params,
    soft_weights,
    train_probe_set,
    train_trait,
    write_probe_plots,
)

FRACTIONS = SplitFractions(train=0.6, valid=0.2, tune=0.2)


def _model():
    torch.manual_seed(0)
    return Generator(GeneratorConfig.debug()).eval()


def _separable(n=300, L=2, H=4, D=8, signal_head=(1, 2), seed=0):
    """Activations where one head carries the label along a fixed direction mu; all other heads are noise."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    acts = rng.standard_normal((n, L, H, D)).astype(np.float32)
    mu = rng.standard_normal(D)
    mu /= np.linalg.norm(mu)
    acts[:, signal_head[0], signal_head[1]] += (4.0 * (2 * y - 1))[:, None] * mu[None, :]
    splits = np.array(["train", "valid", "tune"])[np.arange(n) // 2 % 5 % 3]
    return acts, y, splits, mu


# ------------------------------------------------------------------------------------------------ capture
def test_capture_shapes_last_and_mean_match_manual_hooks():
    model = _model()
    codes = [torch.randint(0, 32, (4, t), generator=torch.Generator().manual_seed(t)) for t in (10, 10, 7)]
    acts = capture_head_outputs(model, codes, "last", batch_size=2)
    assert acts.shape == (3, 2, 4, 8) and acts.dtype == np.float32
    mean = capture_head_outputs(model, codes, "mean")
    assert mean.shape == (3, 2, 4, 8)
    seen = []
    hook = model.head_sites()[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    model(codes[2][None], condition=None)
    hook.remove()
    np.testing.assert_allclose(acts[2, 1], seen[0][0, -1].numpy(), atol=1e-5)
    np.testing.assert_allclose(mean[2, 1], seen[0][0].mean(0).numpy(), atol=1e-5)
    assert not any(s._forward_hooks for s in model.head_sites())  # hooks removed


def test_capture_rejects_unknown_position():
    with pytest.raises(ProbeError, match="position"):
        capture_head_outputs(_model(), [torch.zeros(4, 5, dtype=torch.long)], "first")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("direction", ["mass_mean", "probe"])
def test_training_on_separable_activations(direction):
    acts, y, splits, mu = _separable()
    ps = train_probe_set(acts, y, splits, "drums", "fp", ProbeTrainingParams(direction=direction, seed=0))
    assert ps.accuracy[1, 2] >= 0.99
    others = np.delete(ps.accuracy.reshape(-1), 1 * 4 + 2)
    assert others.max() < 0.75  # noise heads stay near chance
    assert ps.top_heads(1) == [(1, 2)]
    np.testing.assert_allclose(np.linalg.norm(ps.direction, axis=-1), 1.0, atol=1e-5)
    # points from "without" to "with" (the regularised probe weight a little less exactly than the mass mean)
    assert float(ps.direction[1, 2] @ mu) > (0.97 if direction == "mass_mean" else 0.9)
    # the stored probe acts on raw activations: predictions agree with the labels on the signal head
    p = ps.probability(acts)[:, 1, 2]
    assert ((p > 0.5) == y).mean() > 0.98
    # sigma is the spread along the direction on the tune split
    tune = splits == "tune"
    np.testing.assert_allclose(ps.sigma[1, 2], np.std(acts[tune, 1, 2] @ ps.direction[1, 2]), rtol=1e-5)
    np.testing.assert_allclose(ps.random_sigma[1, 2], np.std(acts[tune, 1, 2] @ ps.random_direction[1, 2]), rtol=1e-5)
    assert ps.weight[1, 2] == pytest.approx(1.0) and ps.weight.min() == pytest.approx(0.0)
    assert (
        ps.metrics["best_acc"] >= 0.99 and ps.metrics["n_train"] + ps.metrics["n_valid"] + ps.metrics["n_tune"] == 300
    )
    assert ps.metrics["tau"] == pytest.approx(ps.tau(), abs=1e-6)


def test_soft_weights_power_and_flat_case():
    acc = np.array([[0.5, 0.75], [1.0, 0.5]], np.float32)
    np.testing.assert_allclose(soft_weights(acc, 3.0), [[0, 0.125], [1, 0]])
    np.testing.assert_array_equal(soft_weights(np.full((2, 2), 0.7, np.float32), 3.0), np.ones((2, 2)))


def test_one_class_or_empty_data_is_refused():
    acts, y, splits, _ = _separable(n=30)
    with pytest.raises(ProbeError, match="only clips with the trait"):
        train_probe_set(acts, np.ones_like(y), splits, "drums", "fp", ProbeTrainingParams())
    with pytest.raises(ProbeError, match="valid split"):
        train_probe_set(acts, y, np.where(splits == "valid", "tune", splits), "drums", "fp", ProbeTrainingParams())
    with pytest.raises(ProbeError, match="disagree"):
        train_probe_set(acts[:5], y, splits, "drums", "fp", ProbeTrainingParams())
    assert issubclass(ProbeError, UserError)


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_and_layout(tmp_path):
    acts, y, splits, _ = _separable(n=60)
    ps = train_probe_set(acts, y, splits, "drums", "abc123", ProbeTrainingParams(seed=3), "hash")
    ps.save(tmp_path / "drums")
    meta = json.loads((tmp_path / "drums" / PROBE_SET_JSON).read_text())
    for key in (
        "trait",
        "generator_fingerprint",
        "data_hash",
        "params",
        "n_layers",
        "n_heads",
        "head_dim",
        "metrics",
        "created_at",
    ):
        assert key in meta
    assert {"best_acc", "mean_acc", "top16_acc"} <= set(meta["metrics"])
    from safetensors.numpy import load_file

    arrays = load_file(str(tmp_path / "drums" / PROBE_ARRAYS))
    assert set(ARRAY_NAMES) <= set(arrays) and all(a.dtype == np.float32 for a in arrays.values())
    assert arrays["coef"].shape == (2, 4, 8) and arrays["sigma"].shape == (2, 4)
    back = ProbeSet.load(tmp_path / "drums")
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(getattr(back, name), getattr(ps, name))
    assert (back.trait, back.generator_fingerprint, back.data_hash) == ("drums", "abc123", "hash")
    assert back.params == ps.params and back.metrics == ps.metrics
    with pytest.raises(ProbeError, match="not a probe set"):
        ProbeSet.load(tmp_path)
    paths = write_probe_plots(ps, tmp_path / "plots")
    assert paths["heatmap"].stat().st_size > 1000
    assert paths["heads"].read_text().count("\n") == 1 + 8


# ------------------------------------------------------------------------------------------------ data sources
def test_predicate_parser_is_safe_and_correct():
    p = parse_predicate('mode == "minor" and tempo_bpm > 140')
    assert p({"mode": "minor", "tempo_bpm": 150.0}) is True
    assert p({"mode": "major", "tempo_bpm": 150.0}) is False
    assert p({"mode": "minor", "tempo_bpm": None}) is None  # missing value: the row is left out
    assert parse_predicate("key in ['C', 'G'] or not drums")({"key": "D", "drums": False}) is True
    assert parse_predicate("-5 < loudness_lufs <= -1")({"loudness_lufs": -3.0}) is True
    for bad in (
        "__import__('os').system('true')",
        "mode.upper() == 'X'",
        "x[0] == 1",
        "lambda: 1",
        "",
        "a ==",
        "(tempo_bpm := 3)",
    ):
        with pytest.raises(ProbeError):
            parse_predicate(bad)
    with pytest.raises(ProbeError, match="unknown name 'colour'"):
        parse_predicate("colour == 'red'")({"mode": "minor"})


def _wave(seed, drums, sr=16000, seconds=1.0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * (200 + 20 * seed) * t)
    if drums:
        x[:: sr // 4] += 0.9
        x = x + 0.2 * rng.standard_normal(len(t)) * (np.arange(len(t)) % (sr // 4) < 400)
    return (x / np.abs(x).max() * 0.8).astype(np.float32)


def _clips_table(path, n_mix=12, extra=None):
    from core.audio import encode_flac
    from core.clips_table import CLIPS_SCHEMA, shard_name

    rows = []
    for m in range(n_mix):
        for drums in (True, False):
            sha = f"{m:02d}{int(drums)}" * 8
            rows.append(
                {
                    "clip_id": f"{sha[:8]}-0",
                    "source_sha256": sha,
                    "clip_index": 0,
                    "mix_id": f"mix{m}",
                    "split": "train",
                    "sample_rate": 16000,
                    "duration_s": 1.0,
                    "is_silent": False,
                    "audio": {"bytes": encode_flac(_wave(m, drums), 16000), "path": None},
                    "traits": [{"name": "drums", "present": drums}],
                    "mode": "minor" if m % 2 else "major",
                    "tempo_bpm": 90.0 + 10 * m,
                }
            )
    rows += extra or []
    full = [{name: r.get(name) for name in CLIPS_SCHEMA.names} for r in rows]
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=CLIPS_SCHEMA), path / shard_name(0, 1))
    return str(path)


def test_stem_pairs_predicate_and_folder_sources(tmp_path):
    table = _clips_table(tmp_path / "clips", extra=[])
    clips = load_trait_clips("drums", StemsSource(), table, FRACTIONS, seed=0)
    assert len(clips) == 24 and sum(c.label for c in clips) == 12
    by_group = {}
    for c in clips:
        by_group.setdefault(c.group, set()).add(c.split)
    assert all(len(s) == 1 for s in by_group.values())  # the two renderings of a mixture share a split
    limited = load_trait_clips("drums", StemsSource(), table, FRACTIONS, seed=0, max_train_pairs=2)
    assert len({c.key for c in limited if c.split == "train"}) == 2
    assert {c.key for c in limited if c.split != "train"} == {c.key for c in clips if c.split != "train"}

    minor = load_trait_clips("minor", PredicateSource(kind="predicate", expr='mode == "minor"'), table, FRACTIONS, 0)
    assert sum(c.label for c in minor) == 12 and len(minor) == 24
    fast_source = PredicateSource(kind="predicate", expr="tempo_bpm > 140 and drums")
    fast = load_trait_clips("fast", fast_source, table, FRACTIONS, 0)
    assert sum(c.label for c in fast) == 6

    with pytest.raises(ProbeError, match="unknown trait 'piano'.*drums"):
        load_trait_clips("piano", StemsSource(), table, FRACTIONS, 0)
    with pytest.raises(ProbeError, match="only clips without"):
        load_trait_clips("huge", PredicateSource(kind="predicate", expr="tempo_bpm > 1000"), table, FRACTIONS, 0)

    for sub, drums in (("with", True), ("without", False)):
        (tmp_path / "user" / sub).mkdir(parents=True)
        for i in range(3):
            sf.write(str(tmp_path / "user" / sub / f"take{i}.wav"), _wave(i, drums), 16000)
    user = FoldersSource(kind="folders", path=str(tmp_path / "user"), sample_rate=16000)
    folder = load_trait_clips("drums", user, None, FRACTIONS, 0)
    assert len(folder) == 6 and sum(c.label for c in folder) == 3
    with pytest.raises(ProbeError, match="without"):
        load_trait_clips("x", FoldersSource(kind="folders", path=str(tmp_path / "user" / "with")), None, FRACTIONS, 0)


def test_probe_params_unknown_trait_and_overrides():
    section = ProbesParams.parse({"C": 0.5, "traits": {"drums": {"source": "stems", "direction": "probe"}}}, "probes")
    params, source = probe_params(section, "drums")
    assert source == StemsSource() and params.direction == "probe" and params.C == 0.5
    with pytest.raises(ProbeError, match="unknown trait 'piano'"):
        probe_params(section, "piano")
    # a trait without a source kind is a stems trait; without an entry, the section's defaults
    loose = ProbesParams.parse({"traits": {"a": {"source": {"pairs_only": False}}, "b": None}}, "probes")
    assert probe_params(loose, "a")[1] == StemsSource(pairs_only=False) and probe_params(loose, "b")[1] == StemsSource()


def test_probes_params_unknown_key_or_wrong_type_is_one_line():
    for bad, key in (
        ({"windw_seconds": 2.0}, "probes.windw_seconds"),
        ({"batch_size": "many"}, "probes.batch_size"),
        ({"traits": {"drums": {"source": {"kind": "s3"}}}}, "probes.traits.drums.source"),
        ({"traits": {"drums": {"source": "stems", "C": -1}}}, "probes.traits.drums.C"),
        ({"traits": {"drums": {"source": {"kind": "stems", "expr": "x"}}}}, "probes.traits.drums.source.stems.expr"),
    ):
        with pytest.raises(UserError) as e:
            ProbesParams.parse(bad, "probes")
        assert str(e.value).startswith(f"{key}:") and "\n" not in str(e.value)


class _ToyCodec:
    """Frames of 1/50 s: a codebook per band energy quantile, enough for the debug generator's 32 codes."""

    frame_rate = 50.0

    def encode(self, wave, sr):
        hop = int(sr / self.frame_rate)
        frames = wave[: len(wave) // hop * hop].reshape(-1, hop)
        feats = np.stack(
            [np.abs(frames).mean(1), frames.std(1), np.abs(np.diff(frames, axis=1)).mean(1), frames.max(1)]
        )
        return torch.from_numpy(np.clip((feats * 40).astype(int), 0, 31)).long()


def test_train_trait_end_to_end(tmp_path):
    table = _clips_table(tmp_path / "clips", n_mix=16)
    model = _model()
    section = ProbesParams(seed=0, window_seconds=0.5, traits={"drums": {"source": {"kind": "stems"}}})
    ps = train_trait("drums", model, _ToyCodec(), table, section)
    assert ps.coef.shape == (2, 4, 8) and ps.generator_fingerprint == model.fingerprint()
    assert ps.params["window_frames"] == 25 and ps.params["source"] == {"kind": "stems", "pairs_only": True}
    assert ps.params["window_seconds"] == 0.5 and ps.params["seed"] == 0 and "traits" not in ps.params
    assert ps.metrics["n_positive"] == 16 and len(ps.data_hash) == 64
    assert ps.metrics["best_acc"] >= 0.75  # drum clicks are easy to see even for a random tiny model
