"""Codec: round-trip shapes, persistence, bad input, the EnCodec backend on a tiny random config."""

import numpy as np
import pytest
import torch

from core.errors import UserError
from models.codec import CodecError, EncodecCodec, MelCodecConfig, MelRVQCodec, load_codec
from tests.clips_fixtures import tonal


@pytest.fixture(scope="module")
def codec():
    waves = [(tonal(2.0, s, drums=s % 2 == 0), 32000) for s in range(6)]
    return MelRVQCodec.fit(waves, MelCodecConfig.debug(), seed=0)


def test_round_trip_shapes(codec):
    wave = tonal(1.5, 99, drums=True)
    codes = codec.encode(wave, 32000)
    expected_frames = int(1.5 * codec.sample_rate) // codec.cfg.hop + 1
    assert codes.shape == (codec.n_codebooks, expected_frames) and codes.dtype == torch.long
    assert int(codes.max()) < codec.card and int(codes.min()) >= 0
    out = codec.decode(codes)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 1.5 * codec.sample_rate) <= codec.cfg.hop
    assert codec.frame_rate == codec.sample_rate / codec.cfg.hop
    assert np.isfinite(out).all() and np.abs(out).max() > 1e-3


def test_residual_codebooks_reduce_error(codec):
    feats = codec.features(tonal(2.0, 5, drums=True), 32000)
    codes = codec.quantize(feats)
    errs = [
        float(((feats - sum(codec.codebooks[j][codes[j]] for j in range(k))) ** 2).mean())
        for k in range(1, codec.n_codebooks + 1)
    ]
    assert all(b < a for a, b in zip(errs, errs[1:]))


def test_save_load_and_fingerprint(codec, tmp_path):
    codec.save(tmp_path)
    again = load_codec(tmp_path)
    assert again.fingerprint() == codec.fingerprint()
    wave = tonal(1.0, 3, drums=False)
    assert torch.equal(again.encode(wave, 32000), codec.encode(wave, 32000))
    with pytest.raises(UserError, match="no codec"):
        load_codec(tmp_path / "nothing")


def test_bad_input(codec):
    with pytest.raises(CodecError, match="mono"):
        codec.encode(np.zeros((2, 100), np.float32), 32000)
    with pytest.raises(CodecError, match="out of range"):
        codec.decode(torch.full((codec.n_codebooks, 5), codec.card))
    with pytest.raises(CodecError, match="codes must be"):
        codec.decode(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(CodecError, match="no audio"):
        MelRVQCodec.fit([], MelCodecConfig.debug())


def test_encodec_tiny_random_config(tmp_path):
    from transformers import EncodecConfig, EncodecModel

    cfg = EncodecConfig(
        sampling_rate=8000,
        num_filters=4,
        hidden_size=16,
        codebook_size=16,
        codebook_dim=16,
        upsampling_ratios=[4, 2],
        num_lstm_layers=1,
        target_bandwidths=[4.0, 8.0],
    )
    torch.manual_seed(0)
    EncodecModel(cfg).save_pretrained(str(tmp_path / "weights"))
    codec = EncodecCodec.from_pretrained(tmp_path / "weights", bandwidth=8.0)
    assert codec.frame_rate == 1000 and codec.sample_rate == 8000 and codec.card == 16
    codes = codec.encode(tonal(0.5, 1, drums=True), 32000)
    assert codec.n_codebooks == 2 and codes.shape == (2, 500)
    wave = codec.decode(codes)
    assert wave.shape == (4000,)
    codec.save(tmp_path / "ckpt")
    again = load_codec(tmp_path / "ckpt")
    assert again.fingerprint() == codec.fingerprint() and again.n_codebooks == codec.n_codebooks
    with pytest.raises(CodecError, match="no EnCodec weights"):
        EncodecCodec.from_pretrained(tmp_path / "missing")
