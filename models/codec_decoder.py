"""A learned decoder for the mel-RVQ codec: dequantised log-mel frames -> waveform, in one forward pass.

Vocos-style (Siuzdak 2023): a ConvNeXt backbone at the codec's frame rate predicts, for every frame, the STFT
log-magnitude and phase of the output; an inverse STFT at the codec's hop turns them into samples. Nothing is
upsampled inside the network, so decoding costs a few small matrix products a frame and runs hundreds of times
faster than real time on a CPU, where Griffin-Lim needs dozens of STFT round trips.

Training (`fit_decoder`) reconstructs training clips from their *quantised* features, so the network also learns
to undo what the codebooks lost. The loss is a multi-resolution STFT loss (spectral convergence + log-magnitude
L1 at FFT sizes 512 / 1024 / 2048, Yamamoto et al. 2020) plus a log-mel L1; no adversary, so it fits in minutes on
two cores. Phase is learned only through the STFT losses at resolutions other than the decoder's own, which is
what makes their frames line up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from pydantic import Field
from torch import nn

from core.config import Section
from models.precision import bf16_is_fast

log = logging.getLogger(__name__)

LOSS_FFT_SIZES = (512, 1024, 2048)


@dataclass
class DecoderConfig:
    """The network's shape (saved beside its weights; the defaults live in `DecoderParams`)."""

    dim: int
    n_blocks: int
    kernel: int
    mlp_ratio: int

    @classmethod
    def from_dict(cls, d: dict) -> DecoderConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class DecoderParams(Section):
    """params.yaml `fit_codec.network` (every default is here): the decoder's shape and training budget."""

    dim: int = Field(192, ge=8)
    blocks: int = Field(6, ge=1)  # ConvNeXt blocks
    kernel: int = Field(7, ge=1)
    mlp_ratio: int = Field(3, ge=1)
    steps: int = Field(1000, ge=1)  # a step budget, so that a run is reproducible
    batch_size: int = Field(16, ge=1)
    segment_frames: int = Field(48, ge=4)  # 1.2 s at 40 frames/s; convolutions see whole segments (the context)
    lr: float = Field(2e-3, gt=0)
    max_minutes: float = Field(10.0, gt=0)  # guards against a slow machine only
    clips: int = Field(300, ge=1)  # train clips whose quantised features train it (about 50 min of audio)
    bf16: bool = True  # bfloat16 autocast of the network where the CPU has AMX (it trains on the CPU)

    def config(self) -> DecoderConfig:
        return DecoderConfig(dim=self.dim, n_blocks=self.blocks, kernel=self.kernel, mlp_ratio=self.mlp_ratio)


class _ConvNeXtBlock(nn.Module):
    """Depthwise temporal convolution, LayerNorm, pointwise MLP, scaled residual (ConvNeXt, 1-D)."""

    def __init__(self, dim: int, kernel: int, hidden: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, dim, T]
        y = self.dwconv(x).transpose(1, 2)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.transpose(1, 2)


class MelDecoder(nn.Module):
    """[B, T, n_mels] standardised log-mel -> [B, hop * (T - 1)] samples (inverse STFT, centred frames)."""

    def __init__(self, n_mels: int, n_fft: int, hop: int, cfg: DecoderConfig):
        super().__init__()
        self.cfg, self.n_fft, self.hop = cfg, n_fft, hop
        self.embed = nn.Conv1d(n_mels, cfg.dim, cfg.kernel, padding=cfg.kernel // 2)
        self.norm = nn.LayerNorm(cfg.dim)
        self.blocks = nn.ModuleList(
            _ConvNeXtBlock(cfg.dim, cfg.kernel, cfg.dim * cfg.mlp_ratio, 1.0 / cfg.n_blocks)
            for _ in range(cfg.n_blocks)
        )
        self.final_norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, n_fft + 2)  # log-magnitude and phase of n_fft // 2 + 1 bins
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def spectrum(self, feats: torch.Tensor) -> torch.Tensor:
        """Complex STFT [B, n_freq, T] predicted from features [B, T, n_mels]."""
        x = self.embed(feats.transpose(1, 2))
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.final_norm(x.transpose(1, 2))).float()  # [B, T, n_fft + 2]
        logmag, phase = out.transpose(1, 2).chunk(2, dim=1)
        # clamp before exp: an untrained head must not overflow (e^7 ~ 1100 is far above any real bin)
        mag = torch.exp(logmag.clamp(max=7.0))
        return torch.polar(mag, phase)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        spec = self.spectrum(feats)
        length = self.hop * (feats.shape[1] - 1)
        return torch.istft(spec, self.n_fft, self.hop, window=self.window, length=length)


# ----------------------------------------------------------------------------------------------------- loss
def _stft_mag(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    win = torch.hann_window(n_fft, device=x.device)
    return torch.stft(x, n_fft, n_fft // 4, window=win, return_complex=True).abs()


def mrstft_distance(ref: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT distance of [B, L] waves: spectral convergence + mean |log-magnitude difference| at
    FFT sizes 512 / 1024 / 2048 (hop a quarter), averaged over the sizes and the batch. The training loss's STFT
    part, and what `benchmarks/codec.py` reports."""
    total = est.new_zeros(())
    for n_fft in LOSS_FFT_SIZES:
        r, e = _stft_mag(ref, n_fft), _stft_mag(est, n_fft)
        sc = torch.linalg.norm(r - e, dim=(1, 2)) / (torch.linalg.norm(r, dim=(1, 2)) + 1e-7)
        total = total + sc.mean() + (torch.log(r + 1e-5) - torch.log(e + 1e-5)).abs().mean()
    return total / len(LOSS_FFT_SIZES)


def reconstruction_loss(ref: torch.Tensor, est: torch.Tensor, mel_fb: torch.Tensor) -> torch.Tensor:
    """`mrstft_distance` plus the log-mel L1 at the codec's own FFT size (the filterbank's); [B, L] waves."""
    distance = mrstft_distance(ref, est)
    n_fft = 2 * (mel_fb.shape[1] - 1)
    r, e = _stft_mag(ref, n_fft), _stft_mag(est, n_fft)
    mel = (torch.log(mel_fb @ r.pow(2) + 1e-6) - torch.log(mel_fb @ e.pow(2) + 1e-6)).abs().mean()
    return distance + mel


# -------------------------------------------------------------------------------------------------- training
def fit_decoder(
    feats: list[torch.Tensor],
    waves: list[torch.Tensor],
    n_mels: int,
    n_fft: int,
    hop: int,
    mel_fb: torch.Tensor,
    train: DecoderParams,
    seed: int = 0,
) -> tuple[MelDecoder, dict]:
    """Train a `MelDecoder` on (features [T, n_mels], wave [hop * (T - 1)]) pairs of training clips.

    Segments of `segment_frames` frames are drawn uniformly over the clips; the wave target is the matching
    stretch of samples. Returns the decoder (eval mode) and a summary (steps, seconds, last losses)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [(f, w) for f, w in zip(feats, waves) if f.shape[0] > train.segment_frames]
    if not pairs:
        raise ValueError(f"no clip is longer than {train.segment_frames} frames to train the decoder on")
    lengths = torch.tensor([f.shape[0] - train.segment_frames for f, _ in pairs], dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's random stream left alone
        torch.manual_seed(seed)
        model = MelDecoder(n_mels, n_fft, hop, train.config())
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(0.8, 0.99), weight_decay=0.01)
    warmup = max(1, train.steps // 20)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, 1e-2, 1.0, warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, train.steps - warmup), eta_min=train.lr * 0.02),
        ],
        [warmup],
    )
    use_bf16 = train.bf16 and bf16_is_fast()
    seg, n_samples = train.segment_frames, hop * (train.segment_frames - 1)
    t0, losses, step = time.time(), [], 0
    model.train()
    for step in range(1, train.steps + 1):
        which = torch.multinomial(lengths, train.batch_size, replacement=True, generator=gen)
        xs, ys = [], []
        for i in which.tolist():
            f, w = pairs[i]
            start = int(torch.randint(f.shape[0] - seg + 1, (1,), generator=gen))
            xs.append(f[start : start + seg])
            ys.append(w[start * hop : start * hop + n_samples])
        x, y = torch.stack(xs), torch.stack(ys)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            est = model(x)
        loss = reconstruction_loss(y, est.float(), mel_fb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0:
            recent = np.mean(losses[-100:])
            log.info("decoder step %d/%d loss %.3f (%.0fs)", step, train.steps, recent, time.time() - t0)
        if time.time() - t0 > train.max_minutes * 60:
            log.warning("decoder training stopped at step %d: max_minutes %.1f reached", step, train.max_minutes)
            break
    model.eval()
    summary = {
        "steps": step,
        "seconds": round(time.time() - t0, 1),
        "loss_last_100": float(np.mean(losses[-100:])),
        "params": sum(p.numel() for p in model.parameters()),
        "bf16": use_bf16,
        "config": asdict(model.cfg),
    }
    return model, summary


@torch.no_grad()
def decode_features(model: MelDecoder, feats: torch.Tensor) -> np.ndarray:
    """[T, n_mels] -> float32 samples; peak-limited to 0.9 like the Griffin-Lim path."""
    wave = model(feats[None].float())[0].numpy()
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    return (wave / peak * 0.9 if peak > 1.0 else wave).astype(np.float32)
