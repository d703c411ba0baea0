"""Probes read as taggers of held-out clips (models/probe_tagging.py): the readings and metrics match a reference
computed here, a separating probe scores AUC 1 and a blind one 0.5, unusable clips are counted out, a missing class
leaves its AUC out, foreign probe sets and impossible windows are refused."""

import json
import logging
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score

from models.codec import MelCodecConfig, MelRVQCodec
from models.detectors import FEATURES, DrumDetector, drum_descriptors
from models.generator import Generator, GeneratorConfig
from models.probe_tagging import probe_tagging
from models.probes import ProbeError, ProbeSet, capture_head_outputs
from models.train import TokenSet

WINDOW = 24
HEADS = 3


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return Generator(GeneratorConfig.debug()).eval()


@pytest.fixture(scope="module")
def codec():
    rng = np.random.default_rng(0)
    return MelRVQCodec.fit(
        [(rng.standard_normal(16000).astype(np.float32) * 0.1, 16000) for _ in range(3)], MelCodecConfig.debug()
    )


def _probe_set(generator, seed=0, blind=False, fingerprint=None):
    L, H, D = generator.n_layers, generator.n_heads, generator.head_dim
    rng = np.random.default_rng(seed)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    direction = unit(rng.standard_normal((L, H, D)))
    acc = rng.permutation(np.linspace(0.55, 0.95, L * H)).reshape(L, H).astype(np.float32)  # no ties
    return ProbeSet(
        trait="drums",
        generator_fingerprint=fingerprint or generator.fingerprint(),
        coef=np.zeros((L, H, D), np.float32) if blind else (3.0 * direction).astype(np.float32),
        intercept=np.zeros((L, H), np.float32),
        direction=direction,
        sigma=np.ones((L, H), np.float32),
        accuracy=acc,
        weight=np.ones((L, H), np.float32),
        random_direction=unit(rng.standard_normal((L, H, D))),
        random_sigma=np.ones((L, H), np.float32),
        params={"position": "last"},
    )


def _clips(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clips = [torch.randint(0, 32, (4, n), generator=gen) for n in lengths]
    for i, c in enumerate(clips):
        c[0, 0] = i  # the first token names the clip (what _TableDetector keys on)
    return clips


def _token_set(root, clips, traits) -> TokenSet:
    """A real test-split token folder holding `clips` with `traits`, read back by TokenSet."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(clips)
    save_file(
        {
            "codes": torch.cat(clips, 1).to(torch.int32).contiguous(),
            "offsets": torch.tensor(np.cumsum([0, *[c.shape[1] for c in clips]]), dtype=torch.long),
            "condition": torch.zeros(n, 384),
            "attributes": torch.zeros(n, 2, dtype=torch.long),
        },
        str(root / "test.safetensors"),
    )
    (root / "test.json").write_text(json.dumps({"clip_id": [f"clip{i}" for i in range(n)], "traits": traits}))
    return TokenSet(root, "test")


class _EchoCodec:
    """'Decodes' a window to its first codebook's tokens, so the detector below knows which clip it hears."""

    sample_rate = 8000

    def decode(self, codes):
        return codes[0].numpy().astype(np.float32)


class _TableDetector:
    def __init__(self, p_by_clip, threshold=0.5):
        self.p, self.threshold = p_by_clip, threshold

    def probability(self, wave, sr):
        return self.p[int(wave[0])]


def _reference(generator, probe_set, clips):
    """(median, mean, best) per clip: the probes on the last position of each window, the top heads picked here."""
    probs = probe_set.probability(capture_head_outputs(generator, [c[:, :WINDOW] for c in clips], "last"))
    order = np.argsort(-probe_set.accuracy.reshape(-1))[:HEADS]
    top = probs.reshape(len(clips), -1)[:, order].astype(np.float64)
    return np.median(top, axis=1), top.mean(axis=1), top[:, 0]


def test_readings_and_metrics_match_a_reference(generator, codec, tmp_path):
    clips = _clips([30] * 12)
    truth = np.array([i % 2 for i in range(12)])
    tokens = _token_set(tmp_path, clips, [{"drums": bool(t)} for t in truth])
    ps = _probe_set(generator)
    # a real detector on the real decoded windows, its spread set so that both verdicts occur
    X = np.stack([drum_descriptors(codec.decode(c[:, :WINDOW]), codec.sample_rate) for c in clips])
    rng = np.random.default_rng(1)
    detector = DrumDetector(X.mean(0), X.std(0) + 1e-9, 0.5 * rng.standard_normal(len(FEATURES)), 0.0)
    det_p = detector.probability_of(X)
    detector.threshold = float(np.median(det_p))

    per_clip = []
    out = probe_tagging(
        generator, codec, ps, tokens, detector, WINDOW, monitor_heads=HEADS, batch_size=5, per_clip=per_clip
    )

    median, mean, best = _reference(generator, ps, clips)
    assert [e["index"] for e in per_clip] == list(range(12))
    assert [e["clip_id"] for e in per_clip] == [f"clip{i}" for i in range(12)]
    assert [e["label"] for e in per_clip] == truth.tolist()
    np.testing.assert_allclose([e["median"] for e in per_clip], median, rtol=1e-5)
    np.testing.assert_allclose([e["mean"] for e in per_clip], mean, rtol=1e-5)
    np.testing.assert_allclose([e["best"] for e in per_clip], best, rtol=1e-5)
    np.testing.assert_allclose([e["detector_p"] for e in per_clip], det_p, rtol=1e-6)

    verdict = det_p >= detector.threshold
    flagged = median >= ps.tau()
    assert out["n"] == 12 and out["n_with"] == 6 and out["n_detector_with"] == int(verdict.sum())
    assert out["auc_truth_median"] == pytest.approx(roc_auc_score(truth, median))
    assert out["auc_truth_mean"] == pytest.approx(roc_auc_score(truth, mean))
    assert out["auc_truth_best_head"] == pytest.approx(roc_auc_score(truth, best))
    assert out["auc_truth_detector"] == pytest.approx(roc_auc_score(truth, det_p))
    assert out["auc_detector_median"] == pytest.approx(roc_auc_score(verdict, median))
    assert out["pearson_detector_median"] == pytest.approx(pearsonr(median, det_p).statistic, abs=1e-6)
    assert out["spearman_detector_median"] == pytest.approx(spearmanr(median, det_p).statistic)
    assert out["accuracy_truth_median_at_tau"] == pytest.approx(np.mean(flagged == truth))
    assert out["agreement_detector_median_at_tau"] == pytest.approx(np.mean(flagged == verdict))
    # loggable as MLflow metrics as they are
    for key, value in out.items():
        assert re.fullmatch(r"[A-Za-z0-9_]+", key) and type(value) in (int, float), (key, value)
        assert np.isfinite(value)


def test_a_separating_probe_scores_one_and_a_blind_probe_one_half(generator, tmp_path):
    clips = _clips([30] * 10)
    ps = _probe_set(generator)
    median, _, best = _reference(generator, ps, clips)
    # the truth is what the monitor reads: the upper half of the median readings has the trait
    truth = median > np.median(median)
    detector = _TableDetector({i: 0.9 if t else 0.1 for i, t in enumerate(truth)})  # agrees with the truth
    tokens = _token_set(tmp_path / "a", clips, [{"drums": bool(t)} for t in truth])
    out = probe_tagging(generator, _EchoCodec(), ps, tokens, detector, WINDOW, monitor_heads=HEADS)
    assert out["auc_truth_median"] == 1.0
    assert out["auc_truth_detector"] == 1.0 and out["accuracy_truth_detector"] == 1.0
    assert out["auc_detector_median"] == 1.0
    assert out["auc_truth_best_head"] == pytest.approx(roc_auc_score(truth, best))

    inverted = _token_set(tmp_path / "b", clips, [{"drums": not t} for t in truth])
    out = probe_tagging(generator, _EchoCodec(), ps, inverted, detector, WINDOW, monitor_heads=HEADS)
    assert out["auc_truth_median"] == 0.0 and out["auc_truth_detector"] == 0.0

    per_clip = []
    blind = _probe_set(generator, blind=True)
    out = probe_tagging(
        generator, _EchoCodec(), blind, tokens, detector, WINDOW, monitor_heads=HEADS, per_clip=per_clip
    )
    assert {e["median"] for e in per_clip} == {0.5}
    assert out["auc_truth_median"] == out["auc_truth_mean"] == out["auc_truth_best_head"] == 0.5
    assert out["auc_detector_median"] == 0.5
    assert "pearson_detector_median" not in out and "spearman_detector_median" not in out  # a constant monitor


def test_unlabelled_and_short_clips_are_counted_out(generator, tmp_path):
    lengths = [30, 30, 30, 30, 30, 10, 30, WINDOW, 30]
    traits = [
        {"drums": True},
        {"drums": False},
        {},  # no label for this trait
        {"bass": True},
        {"drums": None},
        {"drums": True},  # shorter than the window
        {"drums": False},
        {"drums": True},  # exactly the window: kept
        {"drums": False},
    ]
    tokens = _token_set(tmp_path, _clips(lengths), traits)
    detector = _TableDetector({i: 0.2 + 0.05 * i for i in range(9)})
    ps, per_clip = _probe_set(generator), []
    out = probe_tagging(generator, _EchoCodec(), ps, tokens, detector, WINDOW, per_clip=per_clip)
    assert [e["index"] for e in per_clip] == [0, 1, 6, 7, 8]
    assert out["n"] == 5 and out["n_with"] == 2 and out["n_without"] == 3
    assert out["n_skipped_unlabelled"] == 3 and out["n_skipped_short"] == 1

    # a seeded subset: the same seed gives the same clips, at most max_clips of them
    picks = []
    for seed in (0, 0, 1, 2, 3):
        per_clip = []
        out = probe_tagging(
            generator, _EchoCodec(), ps, tokens, detector, WINDOW, max_clips=3, seed=seed, per_clip=per_clip
        )
        assert out["n"] == 3
        picks.append([e["index"] for e in per_clip])
    assert picks[0] == picks[1] and all(set(p) <= {0, 1, 6, 7, 8} for p in picks)
    assert len({tuple(p) for p in picks}) > 1


def test_one_class_missing_leaves_its_auc_out(generator, tmp_path, caplog):
    tokens = _token_set(tmp_path, _clips([30] * 6), [{"drums": True}] * 6)
    detector = _TableDetector({i: 0.9 for i in range(6)})
    with caplog.at_level(logging.INFO, logger="models.probe_tagging"):
        out = probe_tagging(generator, _EchoCodec(), _probe_set(generator), tokens, detector, WINDOW)
    assert out["n"] == 6 and out["n_with"] == 6
    assert not [k for k in out if k.startswith(("auc_", "balanced_"))]
    assert "mean_median_without" not in out and "mean_median_with" in out
    assert all(np.isfinite(v) for v in out.values())
    assert "no AUC against the truth" in caplog.text and "no AUC against it" in caplog.text


def test_refusals(generator, tmp_path):
    tokens = _token_set(tmp_path, _clips([30, 30]), [{"drums": True}, {"drums": False}])
    detector = _TableDetector({0: 0.9, 1: 0.1})
    ps = _probe_set(generator)
    with pytest.raises(ProbeError, match="trained on generator"):
        probe_tagging(generator, _EchoCodec(), _probe_set(generator, fingerprint="f" * 64), tokens, detector, WINDOW)
    with pytest.raises(ProbeError, match="context"):
        probe_tagging(generator, _EchoCodec(), ps, tokens, detector, generator.context_frames + 1)
    with pytest.raises(ProbeError, match="no clip"):
        probe_tagging(generator, _EchoCodec(), ps, tokens, detector, 31)
