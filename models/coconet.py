"""Coconet (Huang, Cooijmans, Roberts, Courville, Eck: "Counterpoint by Convolution", ISMIR 2017), in one file.

A deep convolutional network that fills in any masked part of a four-voice score. Reading order: `CoconetConfig`
(sizes and presets) -> roll encoding -> `Coconet` (forward) -> masks and the orderless loss -> sampling
(`YaoSchedule`, `GibbsSampler`, `AncestralSampler`) -> `save_coconet` / `load_coconet`.

The score is a roll of shape [voices, frames]: the MIDI pitch of each voice (soprano, alto, tenor, bass) on a
16th-note grid, -1 where a voice is silent. The network sees it as an image over (time, pitch) with one channel
per voice holding its one-hot pitch, blanked where the cell is unknown, plus one channel per voice holding the 0/1
mask itself, so that "unknown" is told apart from "silent". Silence is one more class on the pitch axis (above the
highest pitch) so the model can write rests; it is 0.4% of the JSB cells. The output is a softmax over that axis
for every (voice, frame).

Training is orderless NADE: mask a uniformly sized random subset of (voice, frame) cells, predict them all from
the rest. Sampling is blocked Gibbs with an annealed masking probability (Yao et al. 2014) or ancestral, one cell
at a time; cells the caller gives are never changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UserError
from models.precision import bf16_is_fast

SILENT = -1
VOICES = ("soprano", "alto", "tenor", "bass")
COCONET_CONFIG = "coconet.json"
COCONET_WEIGHTS = "coconet.safetensors"


class CoconetError(UserError):
    """Bad input to Coconet (a roll outside the pitch range, a malformed checkpoint, an impossible request)."""


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class CoconetConfig:
    n_voices: int = 4
    min_pitch: int = 36  # JSB Chorales span MIDI 36..81 (the paper's range)
    max_pitch: int = 81
    n_layers: int = 32  # convolutions: input + 2 per residual block + output
    filters: int = 64
    kernel: int = 3
    # Time dilation of each residual block's convolutions, cycled over the blocks (the paper's dilated variant);
    # [1] is the plain "straight" network.
    dilations: list[int] = field(default_factory=lambda: [1])

    PRESETS = {
        # the paper's released model
        "gpu": dict(n_layers=64, filters=128),
        # what trains in <= 30 minutes on 2 cores (bf16 convolutions where the CPU has AMX)
        "cpu": dict(n_layers=32, filters=64),
        # the main job's budget (`make demo`): a couple of minutes
        "demo": dict(n_layers=16, filters=48),
        # tests
        "debug": dict(n_layers=4, filters=8),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> CoconetConfig:
        if name not in cls.PRESETS:
            raise CoconetError(f"unknown Coconet preset {name!r} (known: {', '.join(cls.PRESETS)})")
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> CoconetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CoconetError(f"unknown Coconet config keys: {', '.join(unknown)}")
        return cls(**d)

    def __post_init__(self):
        if self.n_layers < 2 or self.n_layers % 2:
            raise CoconetError(f"n_layers must be even and >= 2 (input, residual pairs, output), got {self.n_layers}")
        if self.kernel % 2 == 0 or self.kernel < 1:
            raise CoconetError(f"kernel must be odd, got {self.kernel}")
        if not self.dilations or any(int(d) < 1 for d in self.dilations):
            raise CoconetError(f"dilations must be positive integers, got {self.dilations}")
        if self.max_pitch <= self.min_pitch:
            raise CoconetError("max_pitch must be above min_pitch")
        self.dilations = [int(d) for d in self.dilations]

    @property
    def n_pitches(self) -> int:
        return self.max_pitch - self.min_pitch + 1

    @property
    def n_classes(self) -> int:
        return self.n_pitches + 1  # + silence

    @property
    def silent_class(self) -> int:
        return self.n_pitches

    @property
    def n_blocks(self) -> int:
        return (self.n_layers - 2) // 2

    def block_dilation(self, i: int) -> int:
        return self.dilations[i % len(self.dilations)]

    @property
    def receptive_field(self) -> int:
        """Frames on each side of a frame that can change its output (exact: convolutions only, no pooling)."""
        half = self.kernel // 2
        return half * (2 + 2 * sum(self.block_dilation(i) for i in range(self.n_blocks)))


# ----------------------------------------------------------------------------------------------------- rolls
def roll_to_classes(roll: np.ndarray, cfg: CoconetConfig) -> np.ndarray:
    """[voices, frames] MIDI pitches (-1 silent) -> class indices (silence = `cfg.silent_class`)."""
    roll = np.asarray(roll)
    if roll.ndim != 2 or roll.shape[0] != cfg.n_voices:
        raise CoconetError(f"a roll must be [{cfg.n_voices} voices, frames], got shape {list(roll.shape)}")
    sounding = roll != SILENT
    bad = sounding & ((roll < cfg.min_pitch) | (roll > cfg.max_pitch))
    if bad.any():
        v, t = np.argwhere(bad)[0]
        raise CoconetError(
            f"pitch {int(roll[v, t])} ({VOICES[v] if v < len(VOICES) else v}, frame {t}) is outside "
            f"the model's range {cfg.min_pitch}..{cfg.max_pitch}"
        )
    return np.where(sounding, roll - cfg.min_pitch, cfg.silent_class).astype(np.int64)


def classes_to_roll(classes: np.ndarray, cfg: CoconetConfig) -> np.ndarray:
    classes = np.asarray(classes)
    return np.where(classes == cfg.silent_class, SILENT, classes + cfg.min_pitch).astype(np.int64)


# ----------------------------------------------------------------------------------------------------- network
class ResidualPair(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input, then ReLU: two of the network's layers."""

    def __init__(self, filters: int, kernel: int, dilation: int):
        super().__init__()
        pad = (dilation * (kernel // 2), kernel // 2)
        self.conv1 = nn.Conv2d(filters, filters, kernel, padding=pad, dilation=(dilation, 1), bias=False)
        self.bn1 = nn.BatchNorm2d(filters)
        self.conv2 = nn.Conv2d(filters, filters, kernel, padding=pad, dilation=(dilation, 1), bias=False)
        self.bn2 = nn.BatchNorm2d(filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class Coconet(nn.Module):
    """forward(classes [B, V, T], mask [B, V, T] True = unknown) -> logits [B, V, T, n_classes]."""

    def __init__(self, cfg: CoconetConfig):
        super().__init__()
        self.cfg = cfg
        k = cfg.kernel
        self.inp = nn.Conv2d(2 * cfg.n_voices, cfg.filters, k, padding=k // 2, bias=False)
        self.inp_bn = nn.BatchNorm2d(cfg.filters)
        self.blocks = nn.ModuleList(ResidualPair(cfg.filters, k, cfg.block_dilation(i)) for i in range(cfg.n_blocks))
        self.out = nn.Conv2d(cfg.filters, cfg.n_voices, k, padding=k // 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        for b in self.blocks:  # each residual branch starts near zero: a deep stack trains from the first step
            nn.init.constant_(b.bn2.weight, 0.1)
        # bfloat16 convolutions (autocast) where the CPU has AMX or on a GPU; set by `use_precision`
        self.autocast_dtype: torch.dtype | None = None
        self._folded_from: str | None = None

    def use_precision(self, precision: str) -> Coconet:
        """'fp32', 'bf16', or 'auto' (bf16 where the hardware does it natively: a GPU, or a CPU with AMX)."""
        if precision == "auto":
            precision = "bf16" if bf16_is_fast(next(self.parameters()).device) else "fp32"
        if precision not in ("fp32", "bf16"):
            raise CoconetError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        if precision == "bf16":
            self.to(memory_format=torch.channels_last)  # oneDNN's fast bf16 convolutions want NHWC
            if self._folded_from:
                # an inference model keeps its weights in bfloat16 (training keeps float32 masters under autocast):
                # no cast of every weight on every call
                self.to(torch.bfloat16)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def fold_batchnorm(self) -> Coconet:
        """For inference: fold each batch norm's running statistics and affine into the convolution before it
        (one convolution with a bias instead of a convolution plus a normalisation pass). Same outputs up to
        rounding; training afterwards is not meaningful. Call after loading and fingerprinting."""
        self._folded_from = self.fingerprint()
        pairs = (
            [(self.inp, "inp_bn", self)]
            + [(b.conv1, "bn1", b) for b in self.blocks]
            + [(b.conv2, "bn2", b) for b in self.blocks]
        )
        for conv, bn_name, owner in pairs:
            bn = getattr(owner, bn_name)
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale[:, None, None, None])
            bias = bn.bias - bn.running_mean * scale
            conv.bias = nn.Parameter(bias if conv.bias is None else conv.bias * scale + bias)
            setattr(owner, bn_name, nn.Identity())
        self.eval()
        return self

    def network_input(self, classes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, 2V, T, n_classes]: per voice its one-hot roll with unknown cells blanked, then per voice the mask."""
        onehot = F.one_hot(classes, self.cfg.n_classes).to(torch.float32)  # [B, V, T, C]
        m = mask.to(torch.float32)[..., None]  # [B, V, T, 1]
        return torch.cat([onehot * (1.0 - m), m.expand_as(onehot)], dim=1)

    def forward(self, classes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.network_input(classes, mask)
        if self._folded_from:
            return self._inference_forward(x)
        device_type = x.device.type
        with torch.autocast(
            device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            if self.autocast_dtype is not None:
                x = x.contiguous(memory_format=torch.channels_last)
            h = F.relu(self.inp_bn(self.inp(x)))
            for block in self.blocks:
                h = block(h)
            logits = self.out(h)
        return logits.float().contiguous()  # [B, V, T, C]

    @torch.no_grad()
    def _inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of a folded (inference) model: batch norm is in the convolutions, weights are in their
        inference dtype, and activations are updated in place."""
        dtype = self.inp.weight.dtype
        x = x.to(dtype)
        if dtype == torch.bfloat16:
            x = x.contiguous(memory_format=torch.channels_last)
        h = F.relu_(self.inp(x))
        for block in self.blocks:
            t = block.conv2(F.relu_(block.conv1(h)))
            h = F.relu_(t.add_(h))
        return self.out(h).float().contiguous()

    def center_logits(self, classes: torch.Tensor, mask: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """Logits [B, V, C] at the centre frame of windows of width 2 * receptive_field + 1 (`classes`, `mask`
        [B, V, W]; `inside` [B, W] False where a window reaches past the piece's ends). The convolutions run
        unpadded in time, so each layer computes only the frames the centre still depends on (a cone, about half
        the work of the full window); frames outside the piece are zeroed after every layer, as the full roll's
        zero padding would make them. Equal to `forward` on the whole roll at that frame."""
        k = self.cfg.kernel // 2
        dtype = self.autocast_dtype or torch.float32
        x = self.network_input(classes, mask)
        edge = not bool(inside.all())  # windows near a piece's ends need their outside frames zeroed
        keep = inside.to(dtype)[:, None, :, None]  # [B, 1, W, 1]
        if edge:
            x = x * keep.to(x.dtype)

        def shrink(m: torch.Tensor, by: int) -> torch.Tensor:
            return m[:, :, by : m.shape[2] - by]

        def layer(conv: nn.Conv2d, bn: nn.Module, h: torch.Tensor, skip: torch.Tensor | None, keep: torch.Tensor):
            h = bn(
                F.conv2d(
                    h,
                    conv.weight.to(dtype),
                    None if conv.bias is None else conv.bias.to(dtype),
                    padding=(0, k),
                    dilation=conv.dilation,
                )
            )
            if skip is not None:
                h = h + skip
            h = F.relu_(h)
            return h.mul_(keep) if edge else h

        with torch.autocast(x.device.type, dtype=dtype, enabled=self.autocast_dtype is not None):
            x = x.to(dtype)
            if self.autocast_dtype is not None:
                x = x.contiguous(memory_format=torch.channels_last)
            keep = shrink(keep, k)
            h = layer(self.inp, self.inp_bn, x, None, keep)
            for block in self.blocks:
                d = block.conv1.dilation[0] * k
                keep1 = shrink(keep, d)
                inner = layer(block.conv1, block.bn1, h, None, keep1)
                keep = shrink(keep1, d)
                h = layer(block.conv2, block.bn2, inner, shrink(h, 2 * d), keep)
            logits = F.conv2d(h, self.out.weight.to(dtype), self.out.bias.to(dtype), padding=(0, k))
        return logits.float()[:, :, 0]

    def fingerprint(self) -> str:
        """sha256 over the config and every weight and buffer (names, shapes, dtypes, bytes); a model with folded
        batch norm keeps the fingerprint of the weights it was folded from."""
        if getattr(self, "_folded_from", None):
            return self._folded_from
        h = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------- masks + loss
def orderless_mask(valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Orderless NADE training mask: per example, k ~ Uniform{1..D} of its D valid (voice, frame) cells, chosen
    uniformly without replacement. `valid` [B, V, T] bool (False on padding, which is never masked)."""
    B = valid.shape[0]
    flat = valid.reshape(B, -1)
    d = flat.sum(1)
    k = (torch.rand(B, generator=generator) * d).floor().long() + 1
    scores = torch.rand(flat.shape, generator=generator).masked_fill(~flat, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return (rank < k[:, None]).reshape(valid.shape) & valid


def orderless_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    rescale: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the masked cells, averaged over examples.

    With `rescale` (the paper's), each example's masked-cell losses are divided by its number of masked cells k:
    k is drawn uniformly, so D times this loss is an unbiased estimate of the expected negative log-likelihood over
    random orderings of the D cells (every ordering weighted alike). Without it, each example's sum is divided by
    D, which over-weights examples with many masked cells."""
    ce = F.cross_entropy(logits.permute(0, 3, 1, 2), target, reduction="none")  # [B, V, T]
    m = mask.to(ce.dtype)
    total = (ce * m).sum((1, 2))
    if rescale:
        per_example = total / m.sum((1, 2)).clamp(min=1.0)
    else:
        d = valid.to(ce.dtype).sum((1, 2)) if valid is not None else torch.full_like(total, float(mask[0].numel()))
        per_example = total / d
    return per_example.mean()


# ----------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def predict(model: Coconet, classes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log-probabilities [B, V, T, C] in eval mode."""
    return F.log_softmax(model(classes, mask), dim=-1)


@torch.no_grad()
def predict_frames(model: Coconet, classes: torch.Tensor, mask: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """log-probabilities [B, V, C] at one frame per example (`frames` [B]), computed on the receptive field around
    it only (`Coconet.center_logits`): exact, and a long piece costs a window per prediction, not its length."""
    B, V, T = classes.shape
    r = model.cfg.receptive_field
    pos = frames[:, None] + torch.arange(-r, r + 1)[None, :]  # [B, 2r + 1]
    inside = (pos >= 0) & (pos < T)
    gather = pos.clamp(0, T - 1)[:, None, :].expand(B, V, 2 * r + 1)
    crop_c, crop_m = classes.gather(2, gather), mask.gather(2, gather)
    edge = ~inside.all(1)
    if edge.any() and not edge.all():
        # windows inside the piece skip the per-layer zeroing of frames past its ends: run them apart
        logits = torch.empty(B, V, model.cfg.n_classes)
        for rows in (edge, ~edge):
            logits[rows] = model.center_logits(crop_c[rows], crop_m[rows], inside[rows])
    else:
        logits = model.center_logits(crop_c, crop_m, inside)
    return F.log_softmax(logits, dim=-1)


def sample_categorical(logp: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of log-probabilities [..., C] at a temperature (0: the most likely class)."""
    if temperature <= 0:
        return logp.argmax(-1)
    probs = F.softmax(logp / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


@dataclass(frozen=True)
class YaoSchedule:
    """Masking probability of Gibbs step i of n (Yao et al. 2014): p_i = max(p_min, p_max - (p_max - p_min) * i /
    (alpha * n)). Starts by resampling most cells, ends by touching up a few."""

    p_min: float = 0.1
    p_max: float = 0.9
    alpha: float = 0.7

    def __call__(self, i: int, n: int) -> float:
        return max(self.p_min, self.p_max - (self.p_max - self.p_min) * i / (self.alpha * n))


Progress = Callable[[int, int], None]


@dataclass
class GibbsSampler:
    """Blocked Gibbs: fill every free cell independently from the model once, then for each of `steps` steps mask
    each free cell with the schedule's probability and resample the masked cells independently. Given cells
    (`given` True) are inputs only, never written."""

    steps: int = 96
    schedule: YaoSchedule = field(default_factory=YaoSchedule)
    temperature: float = 0.99
    name: str = "gibbs"

    @torch.no_grad()
    def __call__(
        self,
        model: Coconet,
        classes: torch.Tensor,
        given: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        classes, free = classes.clone(), ~given
        if not free.any():
            return classes
        logp = predict(model, classes, free)
        classes = torch.where(free, sample_categorical(logp, self.temperature, generator), classes)
        for i in range(self.steps):
            p = self.schedule(i, self.steps)
            mask = free & (torch.rand(free.shape, generator=generator) < p)
            if not mask.any():
                continue
            logp = predict(model, classes, mask)
            classes = torch.where(mask, sample_categorical(logp, self.temperature, generator), classes)
            if progress:
                progress(i + 1, self.steps)
        return classes


@dataclass
class AncestralSampler:
    """One free cell at a time, each drawn from the model given the given cells and those drawn so far: in
    chronological order (frame by frame, voices top to bottom) or in a random order. As many model calls as free
    cells; each is computed on the receptive field around the cell only."""

    order: str = "chronological"
    temperature: float = 0.99
    name: str = "ancestral"

    @torch.no_grad()
    def __call__(
        self,
        model: Coconet,
        classes: torch.Tensor,
        given: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        if self.order not in ("chronological", "random"):
            raise CoconetError(f"ancestral order must be chronological or random, got {self.order!r}")
        classes, unknown = classes.clone(), (~given).clone()
        B, V, T = classes.shape
        for b in range(B):
            cells = unknown[b].T.nonzero()  # (frame, voice), frame-major: chronological
            if self.order == "random":
                cells = cells[torch.randperm(len(cells), generator=generator)]
            for j, (t, v) in enumerate(cells.tolist()):
                logp = predict_frames(model, classes[b : b + 1], unknown[b : b + 1], torch.tensor([t]))[0, v]
                classes[b, v, t] = sample_categorical(logp, self.temperature, generator)
                unknown[b, v, t] = False
                if progress:
                    progress(j + 1, len(cells))
        return classes


# ----------------------------------------------------------------------------------------------------- tasks
def given_cells(n_voices: int, n_frames: int, write_voices, start: int = 0, end: int | None = None) -> np.ndarray:
    """[voices, frames] True where a cell is given (kept), False where the model writes it: `write_voices` over
    frames [start, end). Harmonizing a melody writes three voices over every frame; infilling bars writes some
    voices over a span; composing writes everything. One masker, one sampler, three tasks."""
    given = np.ones((n_voices, n_frames), bool)
    for v in write_voices:
        if not 0 <= int(v) < n_voices:
            raise CoconetError(f"voice {v} does not exist (0..{n_voices - 1})")
        given[int(v), start : n_frames if end is None else end] = False
    return given


def fill(
    model: Coconet, roll: np.ndarray, given: np.ndarray, sampler, seed: int = 0, progress: Progress | None = None
) -> np.ndarray:
    """The roll with its non-given cells written by `sampler` (GibbsSampler or AncestralSampler). Given cells are
    only ever read: checked after sampling, so a sampler that broke the rule would fail loudly, not quietly."""
    cfg = model.cfg
    roll = np.asarray(roll)
    given = np.asarray(given, bool)
    if given.shape != roll.shape:
        raise CoconetError(f"mask shape {list(given.shape)} does not match the roll's {list(roll.shape)}")
    # the content of the cells to write does not matter (they are blanked in the input); keep it in range
    start = np.where(given, roll, SILENT)
    classes = torch.from_numpy(roll_to_classes(start, cfg))[None]
    generator = torch.Generator().manual_seed(int(seed))
    out = sampler(model, classes, torch.from_numpy(given)[None], generator=generator, progress=progress)
    written = classes_to_roll(out[0].numpy(), cfg)
    if not np.array_equal(written[given], roll[given]):
        raise AssertionError("a sampler changed a given cell")
    return written


# ----------------------------------------------------------------------------------------------------- save / load
def save_coconet(model: Coconet, directory: str | Path, meta: dict | None = None) -> Path:
    """coconet.safetensors + coconet.json (config, fingerprint, and whatever `meta` records: metrics, data hash)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / COCONET_WEIGHTS))
    doc = {**(meta or {}), "config": asdict(model.cfg), "fingerprint": model.fingerprint()}
    (directory / COCONET_CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return directory


def load_coconet(directory: str | Path, precision: str = "auto") -> tuple[Coconet, dict]:
    """(model in eval mode, its JSON document). Every weight is checked finite and the fingerprint recomputed, so a
    damaged or hand-edited checkpoint is refused with one line instead of sampling nonsense."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / COCONET_CONFIG
    if not meta_path.is_file():
        raise CoconetError(f"no Coconet model in {directory} (missing {COCONET_CONFIG})")
    try:
        meta = json.loads(meta_path.read_text())
        cfg = CoconetConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CoconetError(f"{meta_path} is not a Coconet config ({e})") from None
    model = Coconet(cfg)
    try:
        state = load_file(str(directory / COCONET_WEIGHTS))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, FileNotFoundError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CoconetError(f"Coconet weights in {directory} do not match its config: {first}") from None
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CoconetError(f"Coconet weights in {directory} hold non-finite values ({name})")
    if meta.get("fingerprint") != model.fingerprint():
        raise CoconetError(f"Coconet weights in {directory} do not match the recorded fingerprint")
    model.eval()
    model.fold_batchnorm()
    model.use_precision(precision)
    return model, meta
