"""pipelines/beat_network.py: the numpy forward pass equals the PyTorch network it was exported from, and the shipped
network + tempo HMM find the beats and downbeats of music it never heard."""

from __future__ import annotations

import mir_eval
import numpy as np
import pytest

from benchmarks.fit_beats import build_model, targets
from pipelines.beat_hmm import BeatHMM
from pipelines.beat_network import FPS, N_MELS, BeatNetwork, spectral_frames
from pipelines.features import network_evidence
from tests.synth import chord_sequence, click_track


def test_numpy_forward_matches_torch(tmp_path):
    import torch

    dilations = [1, 2, 4, 8]
    model = build_model(channels=8, kernel=5, dilations=dilations, dropout=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the initialisation, so a transposed kernel would show
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 2 * N_MELS)).astype(np.float32)
    mean, std = feats.mean(axis=0), feats.std(axis=0)
    path = tmp_path / "net.npz"
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    np.savez(path, **arrays, dilations=np.asarray(dilations), mean=mean, std=std)
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(((feats - mean) / std).T[None].copy())))[0].numpy().T
    got = BeatNetwork.load(str(path)).activations(feats)
    assert got.shape == (300, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_spectral_frames_are_centred_on_onsets():
    sr = 44100
    wave = np.zeros(2 * sr, np.float32)
    wave[sr : sr + 400] = np.random.default_rng(1).normal(size=400)  # a burst at exactly 1.0 s
    feats = spectral_frames(wave, sr)
    assert feats.shape == (2 * sr // 441 + 1, 2 * N_MELS)
    onset = feats[:, N_MELS:].sum(axis=1)
    assert abs(int(np.argmax(onset)) - 100) <= 2  # frame 100 = 1.0 s (the FFT window reaches it 10 ms early)
    with pytest.raises(ValueError, match="multiple"):
        spectral_frames(wave, 44000 + 7)


def test_spectral_frames_equal_librosas_stft_through_the_band_bases():
    """The frames are librosa's centred STFT (same Hann window, hop 441) through the mel and semitone bases: only the
    FFT bins up to the bases' top band are taken, which must not change a value."""
    import librosa

    from pipelines.beat_network import FMAX, FMIN, N_FFT, PITCH_FFT, _semitone_basis

    sr = 44100
    wave, _ = chord_sequence([("C", "maj"), ("F", "maj")], bpm=100.0, beats_per_chord=2, seconds=3.0)
    feats = spectral_frames(wave, sr, "pitch")
    mel_basis = librosa.filters.mel(sr=sr, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
    for n_fft, basis, columns in (
        (N_FFT, mel_basis, slice(0, N_MELS)),
        (PITCH_FFT, _semitone_basis(sr), slice(2 * N_MELS, None)),
    ):
        stft = librosa.stft(
            wave.astype(np.float64), n_fft=n_fft, hop_length=441, window=np.hanning(n_fft), pad_mode="constant"
        )
        reference = np.log1p(basis.astype(np.float64) @ np.abs(stft)).T
        assert feats[:, columns].shape == reference.shape
        np.testing.assert_allclose(feats[:, columns], reference, atol=1e-4)


def test_targets_mark_the_frame_and_its_neighbours():
    y = targets([0.5, 1.0], 200)
    assert y[50] == 1.0 and y[49] == y[51] == 0.5 and y[100] == 1.0 and y.sum() == 4.0


@pytest.fixture(scope="module")
def shipped():
    return BeatNetwork.load("builtin")


def test_shipped_network_tracks_a_chord_sequence(shipped):
    """Piano-like triads with a bass, one chord a beat, no drums: nothing like the training set's instruments."""
    sr = 44100
    chords = [("C", "maj"), ("A", "min"), ("F", "maj"), ("G", "maj")]
    wave, _ = chord_sequence(chords, bpm=96, beats_per_chord=1, seconds=10.0, sr=sr, with_clicks=False)
    act = shipped.activations(spectral_frames(wave, sr, shipped.features))
    beats = BeatHMM(fps=FPS).decode(act[:, 0])
    truth = np.arange(0.0, 10.0, 60 / 96)
    f = mir_eval.beat.f_measure(truth[truth >= 0.5], beats[beats >= 0.5])  # the first beat has no context before it
    assert f >= 0.9, (f, beats)


def test_shipped_network_hears_the_accented_downbeat(shipped):
    sr = 44100
    wave = click_track(120, 10.0, sr, accent_every=3)
    act = shipped.activations(spectral_frames(wave, sr, shipped.features))
    beats = BeatHMM(fps=FPS).decode(act[:, 0])
    evidence = network_evidence(act[:, 1], beats)
    truth = np.arange(0.0, 10.0, 0.5)
    assert mir_eval.beat.f_measure(truth[2:], beats[beats >= 1.0]) >= 0.95
    accented = np.isclose(np.mod(np.round(beats / 0.5), 3), 0)
    assert evidence[accented].mean() > evidence[~accented].mean() + 1.0
