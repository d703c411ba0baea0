"""The music generator: a decoder-only transformer over K parallel codec codebooks (MusicGen-style), in one file.

Reading order: `GeneratorConfig` (sizes and the `debug` preset) -> delay-pattern helpers -> `CausalSelfAttention`
(with `head_out`, the SMITIN probe/steer site) -> `Block` -> `Generator` (forward, training loss, generate,
fingerprint) -> `save_generator` / `load_generator`.

Sequence layout seen by every layer (and by hooks on `head_out`):

    [ prefix positions (n_prefix) | BOS frame | delayed frame 0 | delayed frame 1 | ... ]

The prefix is the caption embedding projected to one token (a learned "null" token when unconditioned, which is
what classifier-free guidance contrasts with), followed by optional structured-attribute tokens (tempo bucket,
key). Codec frames enter in MusicGen's delay pattern: codebook k is shifted right by k frames, so the model
predicts codebook k of frame t after it has seen codebooks < k of the same frame. The K codebook embeddings of one
position are summed; K linear heads read the last hidden state. Positions are rotary (RoPE), so a KV-cached step
only needs its absolute position and continuing past the training window degrades gracefully instead of indexing
an untrained embedding.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UserError


class GeneratorError(UserError):
    """Bad input to the generator (tokens out of vocabulary, prompt too long, mismatched checkpoints)."""


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class GeneratorConfig:
    n_codebooks: int = 4  # K: must equal the codec's
    card: int = 256  # codebook size: must equal the codec's; index `card` is the special (BOS / delay pad) token
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    mlp_ratio: int = 4
    max_frames: int = 512  # context length in delayed frames (positions are rotary; this bounds prompts and caches)
    dropout: float = 0.1
    cond_dim: int = 384  # caption embedding size (all-MiniLM-L6-v2)
    cond_dropout: float = 0.3  # fraction of training rows whose condition is replaced by the null token (for CFG)
    use_attributes: bool = True  # tempo-bucket and key tokens after the caption token
    rope_base: float = 10000.0

    @classmethod
    def debug(cls, **overrides) -> GeneratorConfig:
        """Tiny model for tests and CI-sized pipeline runs (trains and generates in seconds on a CPU)."""
        base = dict(n_codebooks=4, card=32, dim=32, n_layers=2, n_heads=4, max_frames=128, dropout=0.0, cond_dim=384)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_dict(cls, d: dict) -> GeneratorConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# Structured attributes: tempo in 10-bpm buckets from 40 to 240 bpm, key as 12 tonics x {major, minor}.
# Index 0 of each table means "unknown" (missing attribute, or dropped for guidance).
TEMPO_BUCKETS = 21
KEY_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
_KEY_ALIASES = {"Db": "C#", "Eb": "D#", "Gb": "F#", "Ab": "G#", "Bb": "A#", "Cb": "B", "Fb": "E", "E#": "F", "B#": "C"}


def attribute_ids(tempo_bpm: float | None, key: str | None, mode: str | None) -> list[int]:
    """[tempo id, key id] for the attribute tokens (0 = unknown)."""
    tempo = 0
    if tempo_bpm is not None and tempo_bpm == tempo_bpm and tempo_bpm > 0:
        tempo = 1 + int(min(max((tempo_bpm - 40.0) / 10.0, 0), TEMPO_BUCKETS - 1))
    key_id = 0
    if key:
        name = _KEY_ALIASES.get(key, key)
        if name in KEY_NAMES:
            key_id = 1 + KEY_NAMES.index(name) + (12 if mode == "minor" else 0)
    return [tempo, key_id]


# ----------------------------------------------------------------------------------------------- delay pattern
def apply_delay(codes: torch.Tensor, special: int) -> torch.Tensor:
    """[B, K, T] codec codes -> [B, K, T + K - 1] delayed stream: out[:, k, t] = codes[:, k, t - k], else `special`."""
    B, K, T = codes.shape
    out = codes.new_full((B, K, T + K - 1), special)
    for k in range(K):
        out[:, k, k : k + T] = codes[:, k]
    return out


def undo_delay(delayed: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_delay`: [B, K, S] -> [B, K, S - K + 1] (works on logits [B, K, S, V] too)."""
    K, S = delayed.shape[1], delayed.shape[2]
    T = S - K + 1
    return torch.stack([delayed[:, k, k : k + T] for k in range(K)], dim=1)


# ------------------------------------------------------------------------------------------------------ layers
def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding on x [B, H, T, Dh] at absolute `positions` [T] (pairs of channels rotate)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # [T, half]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class HeadOutput(nn.Module):
    """Identity marking the per-head attention output `(B, T, H, Dh)` before the output projection.

    This is the SMITIN probe/steer site: a forward hook on it reads the tensor, and a hook that returns a tensor
    replaces it. Every attention call (teacher-forced, uncached generation, KV-cached steps with T == 1) passes
    through it.
    """

    def forward(self, heads: torch.Tensor) -> torch.Tensor:
        return heads


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0, "dim must be a multiple of n_heads"
        self.n_heads, self.head_dim, self.rope_base = cfg.n_heads, cfg.head_dim, cfg.rope_base
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.head_out = HeadOutput()
        self.out_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        # While a fused steering session runs (models.steering), a callable that takes the per-head output
        # (B, T, H, Dh) and returns the projected output (B, T, dim) in place of `out_proj`: it folds the push into
        # the projection. None: plain `out_proj`.
        self.steering = None

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: dict | None = None, visible: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`visible` [B, >= keys] (bool, by absolute position): keys a row may attend to, on top of causality;
        None: all (training, plain generation)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each [B,H,T,Dh]
        q, k = _rope(q, positions, self.rope_base), _rope(k, positions, self.rope_base)
        if cache is not None:  # KV cache: keys/values of all earlier positions
            k, v = _cache_append(cache, k, v)
        # Causal mask aligned to the end: query i (absolute past + i) sees keys 0 .. past + i.
        past = k.shape[2] - T
        mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
        if visible is not None:
            mask = mask[None, None] & visible[:, None, None, : k.shape[2]]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        heads = self.head_out(y.transpose(1, 2))  # (B, T, H, Dh): the per-head output, hookable
        if self.steering is not None:
            return self.steering(heads)
        return self.out_proj(heads.reshape(B, T, self.n_heads * self.head_dim))


def _cache_append(cache: dict, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append this call's keys and values [B, H, T, Dh] to a layer's cache; returns views of all positions so far.
    The buffers grow by doubling, so a generation step copies only its own position: concatenating the whole cache
    on every step made the copies quadratic in the length (a quarter of a batched generation's time)."""
    n, new = cache.get("n", 0), k.shape[2]
    if "k" not in cache or n + new > cache["k"].shape[2]:
        capacity = max(2 * (n + new), 64)
        for name, t in (("k", k), ("v", v)):
            grown = t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3])
            if n:
                grown[:, :, :n] = cache[name][:, :, :n]
            cache[name] = grown
    cache["k"][:, :, n : n + new] = k
    cache["v"][:, :, n : n + new] = v
    cache["n"] = n + new
    return cache["k"][:, :, : n + new], cache["v"][:, :, : n + new]


class MLP(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.up = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, positions, cache=None, visible=None):
        x = x + self.drop(self.attn(self.ln1(x), positions, cache, visible))
        return x + self.mlp(self.ln2(x))


# ---------------------------------------------------------------------------------------------------- generator
class Generator(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.n_layers, self.n_heads, self.head_dim = cfg.n_layers, cfg.n_heads, cfg.head_dim
        self.special = cfg.card  # BOS and delay-pad token of every codebook
        self.embeds = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_codebooks))
        self.cond_proj = nn.Linear(cfg.cond_dim, cfg.dim)
        self.null_cond = nn.Parameter(torch.zeros(cfg.dim))
        if cfg.use_attributes:
            self.tempo_embed = nn.Embedding(TEMPO_BUCKETS + 1, cfg.dim)
            self.key_embed = nn.Embedding(25, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.card, bias=False) for _ in range(cfg.n_codebooks))
        self.apply(self._init_weights)
        # Which rows of the current batch are conditional (read by steering hooks); see `generate`.
        self.batch_layout: dict = {"cfg": False, "n_cond": 0}

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # -- introspection used by probes / steering / registry
    def head_sites(self) -> list[HeadOutput]:
        """The `head_out` module of every layer, in layer order."""
        return [block.attn.head_out for block in self.blocks]

    def output_projections(self) -> list[torch.Tensor]:
        """The weight [dim, H * Dh] of every layer's output projection (what follows `head_out`), in layer order."""
        return [block.attn.out_proj.weight for block in self.blocks]

    def attach_steering(self, projections: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None) -> None:
        """Replace every layer's output projection by projections[layer] (see `CausalSelfAttention.steering`);
        None restores the plain projections. Used by models.steering's fused path."""
        if projections is not None and len(projections) != self.n_layers:
            raise GeneratorError(f"need one steering projection per layer ({self.n_layers}), got {len(projections)}")
        for i, block in enumerate(self.blocks):
            block.attn.steering = projections[i] if projections is not None else None

    @property
    def n_prefix(self) -> int:
        """Positions before the BOS frame (caption token, attribute tokens)."""
        return 1 + (2 if self.cfg.use_attributes else 0)

    @property
    def context_frames(self) -> int:
        """Frames one `generate` call may hold, prompt included: the delay pattern takes K - 1 of the positions."""
        return self.cfg.max_frames - (self.cfg.n_codebooks - 1)

    def fingerprint(self) -> str:
        """sha256 over the architecture config and every weight (names, shapes, dtypes, bytes)."""
        h = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:32]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- building blocks of forward
    def _prefix(
        self, condition: torch.Tensor | None, attributes: torch.Tensor | None, B: int, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, n_prefix, dim]: caption token (null when `condition` is None or dropped) + attribute tokens."""
        null = self.null_cond.expand(B, -1)
        if condition is None:
            cond = null
        else:
            if condition.shape != (B, self.cfg.cond_dim):
                raise GeneratorError(
                    f"condition must be [{B}, {self.cfg.cond_dim}] caption embeddings, got {list(condition.shape)}"
                )
            cond = self.cond_proj(condition.to(null.dtype))
            if drop is not None:
                cond = torch.where(drop[:, None], null, cond)
        tokens = [cond[:, None]]
        if self.cfg.use_attributes:
            if attributes is None or condition is None:
                attributes = torch.zeros(B, 2, dtype=torch.long, device=null.device)
            elif drop is not None:
                attributes = attributes.masked_fill(drop[:, None], 0)
            tokens += [self.tempo_embed(attributes[:, 0])[:, None], self.key_embed(attributes[:, 1])[:, None]]
        return torch.cat(tokens, dim=1)

    def _check_tokens(self, tokens: torch.Tensor, allow_special: bool) -> None:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise GeneratorError(f"codes must be integer tokens, got {tokens.dtype}")
        if tokens.dim() != 3 or tokens.shape[1] != self.cfg.n_codebooks:
            raise GeneratorError(f"codes must be [B, {self.cfg.n_codebooks}, T], got {list(tokens.shape)}")
        top = self.cfg.card + (1 if allow_special else 0)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= top):
            raise GeneratorError(
                f"codes out of vocabulary: values must be in [0, {self.cfg.card}), "
                f"got [{int(tokens.min())}, {int(tokens.max())}]"
            )

    def forward_tokens(
        self,
        inputs: torch.Tensor,
        prefix: torch.Tensor | None,
        caches: list[dict] | None = None,
        start: int = 0,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the transformer on delayed-stream input tokens [B, K, S] (preceded by `prefix` [B, P, dim] when it is
        given, i.e. on the first call) at absolute positions `start`...; returns logits [B, K, S, card] for the
        token positions (prefix positions produce no logits). `visible`: see CausalSelfAttention.forward."""
        x = sum(emb(inputs[:, k]) for k, emb in enumerate(self.embeds))  # [B, S, dim]
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, caches[i] if caches is not None else None, visible)
        x = self.ln_f(x[:, x.shape[1] - inputs.shape[2] :])
        return torch.stack([head(x) for head in self.heads], dim=1)

    def forward(
        self,
        codes: torch.Tensor,
        condition: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
        cond_drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced pass over un-delayed codec codes [B, K, T] (what probes capture, unconditioned when
        `condition` is None). The delay pattern is applied inside: the input is [BOS, delayed[:-1]], so the
        returned logits [B, K, T + K - 1, card] at delayed position s predict `apply_delay(codes)[:, :, s]`
        (`undo_delay(logits)` aligns them with frames). Hooks on `head_out` see all n_prefix + T + K - 1
        positions; the last one is the last delayed frame's input."""
        self._check_tokens(codes, allow_special=False)
        B, K, T = codes.shape
        if T + K - 1 > self.cfg.max_frames:
            raise GeneratorError(f"{T} frames exceed the context of {self.cfg.max_frames - K + 1} frames")
        self.batch_layout = {"cfg": False, "n_cond": B}
        delayed = apply_delay(codes, self.special)
        bos = codes.new_full((B, K, 1), self.special)
        inputs = torch.cat([bos, delayed[:, :, :-1]], dim=2)
        return self.forward_tokens(inputs, self._prefix(condition, attributes, B, cond_drop))

    def loss(
        self, codes: torch.Tensor, condition: torch.Tensor | None = None, attributes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the delayed targets (delay pads ignored), with condition dropout when training.
        Returns (mean loss, per-codebook losses [K])."""
        B = codes.shape[0]
        drop = None
        if self.training and condition is not None and self.cfg.cond_dropout > 0:
            drop = torch.rand(B, device=codes.device) < self.cfg.cond_dropout
        logits = self(codes, condition, attributes, drop)
        targets = apply_delay(codes, -100)  # -100: ignored by cross_entropy
        per_cb = torch.stack(
            [
                F.cross_entropy(logits[:, k].reshape(-1, self.cfg.card), targets[:, k].reshape(-1))
                for k in range(self.cfg.n_codebooks)
            ]
        )
        return per_cb.mean(), per_cb.detach()

    # -- generation
    @torch.no_grad()
    def generate(
        self,
        n_frames: int,
        prompt: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        attributes: torch.Tensor | None = None,
        batch_size: int = 1,
        temperature: float | Sequence[float] = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        cfg_scale: float = 1.0,
        seed: int | None = None,
        use_cache: bool = True,
        on_step: Callable[[int], None] | None = None,
        prompt_guidance: float | Sequence[float] | str = 1.0,
        plausibility: float = 0.0,
    ) -> torch.Tensor:
        """Sample `n_frames` codec frames after an optional `prompt` [B, K, Tp]; returns [B, K, Tp + n_frames]
        un-delayed codes (prompt included).

        condition: [B, cond_dim] caption embeddings (None: unconditional). cfg_scale > 1 with a condition turns on
        classifier-free guidance: the batch becomes [B conditional rows; B unconditional rows] (conditional first)
        and `self.batch_layout == {"cfg": True, "n_cond": B, "prompt_frames": Tp}` while generating; otherwise
        `{"cfg": False, ...}` and all rows are conditional (`prompt_frames`: the prompt's length, read by steering's
        prompt-relative monitor).
        on_step(step): called after each decoding step with `step` = 0 .. n_frames + K - 2, the index of the
        delayed-stream frame just sampled counted from the end of the prompt (the delay pattern needs K - 1 extra
        steps to finish the last frame's upper codebooks). Hooks on `head_out` run during the step itself; the
        first step sees the whole prompt (T = n_prefix + Tp + 1 positions), later cached steps T == 1.
        use_cache=False recomputes the whole sequence each step (same tokens, slower; for checking the cache).
        temperature: one value, or one per codebook (coarse first; 0 = greedy for that codebook).
        prompt_guidance > 1 with a prompt (context-aware decoding, Shi et al. 2023): B more rows see the same
        continuation and condition but not the prompt (its positions hidden, its last input replaced by BOS), and
        logits = free + prompt_guidance * (with_prompt - free), which amplifies what the prompt implies beyond what
        the continuation so far does. One scale, or one per codebook: the coarse codebook carries the instruments;
        guiding the near-unpredictable fine ones too made frame-to-frame glitches that read as drums. This small
        model predicts each frame mostly from the last few, so sampled continuations of drum prompts dropped the
        drums half the time; guidance keeps them. Rows: [B conditional; B text-unconditional if cfg; B prompt-free],
        `batch_layout["cfg"]` is True and only the first `n_cond` rows are the generation (steering pushes and
        monitors those). Costs one more set of rows per step.
        plausibility (with prompt guidance; 0 = off): tokens to which the prompted model (before the guidance
        extrapolation) gives less than `plausibility` times its most likely token's probability are never sampled,
        on every codebook: the adaptive plausibility constraint of contrastive decoding (Li et al. 2023). Guidance
        pushes the logits away from the prompt-free rows, which also lifts tokens neither model finds likely; on
        the default generator those glitches read as drums, and the constraint lets a stronger guidance keep a
        prompt's drums without them (validation prompts, judged drum-bearing for drum / drum-free prompts:
        guidance 3 alone 0.76 / 0.21; guidance 6 with plausibility 0.003: 0.81 / 0.19).
        """
        K = self.cfg.n_codebooks
        temperature = sampling_temperature(temperature, K)
        B, Tp = self._generation_size(n_frames, prompt, condition, batch_size)
        scales = guidance_scales(prompt_guidance, K)
        scales = scales if isinstance(scales, tuple) else (scales,) * K
        cut = plausibility_cut(plausibility)
        S = Tp + n_frames + K - 1  # length of the delayed stream
        if S > self.cfg.max_frames:
            raise GeneratorError(
                f"prompt ({Tp} frames) + {n_frames} new frames + {K - 1} delay steps exceed the "
                f"context of {self.cfg.max_frames} positions"
            )
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else torch.seed())

        stream, known = self._start_stream(prompt, B, Tp, n_frames)
        device = stream.device
        guide = _Guidance(
            n=B,
            prompt_frames=Tp,
            special=self.special,
            cfg_scale=cfg_scale if condition is not None and cfg_scale != 1.0 else None,
            prompt_scales=(
                torch.tensor(scales, device=device)[None, :, None] if Tp > 0 and any(g != 1.0 for g in scales) else None
            ),
            log_cut=math.log(cut) if cut > 0 else None,
        )
        prefix, visible = self._guided_prefix(condition, attributes, guide, S)
        self.batch_layout = {"cfg": guide.groups > 1, "n_cond": B, "prompt_frames": Tp}
        caches = [dict() for _ in range(self.cfg.n_layers)] if use_cache else None
        for step, s in enumerate(range(Tp, S)):
            if caches is None or step == 0:  # the whole stream so far, after the prefix
                logits = self.forward_tokens(guide.rows(stream[:, :, : s + 1], True), prefix, caches, 0, visible)
            else:  # the newest position against the cache
                logits = self.forward_tokens(
                    guide.rows(stream[:, :, s : s + 1], False), None, caches, self.n_prefix + s, visible
                )
            logits = guide.combine(logits[:, :, -1].float())  # [B, K, card]
            frame = _sample(logits, temperature, top_k, top_p, gen)  # [B, K]
            frame = torch.where(known[:, s][None, :], stream[:, :, s + 1], frame)
            stream[:, :, s + 1] = frame
            if on_step is not None:
                on_step(step)
        return undo_delay(stream[:, :, 1:])

    def _generation_size(
        self, n_frames: int, prompt: torch.Tensor | None, condition: torch.Tensor | None, batch_size: int
    ) -> tuple[int, int]:
        """(rows B, prompt frames Tp) of a generation; refuses a bad prompt and fewer than one new frame."""
        if prompt is not None:
            self._check_tokens(prompt, allow_special=False)
            B, Tp = prompt.shape[0], prompt.shape[2]
        else:
            B = condition.shape[0] if condition is not None else batch_size
            Tp = 0
        if n_frames < 1:
            raise GeneratorError("n_frames must be at least 1")
        return B, Tp

    def _start_stream(
        self, prompt: torch.Tensor | None, B: int, Tp: int, n_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream, known): the decoding inputs [B, K, 1 + S] (BOS, then the delayed prompt with room for the new
        frames; stream[:, :, s] is the input at delayed position s) and known [K, S]: the positions that are delay
        pads or prompt tokens, never sampled."""
        K, device = self.cfg.n_codebooks, self.null_cond.device
        codes = torch.zeros(B, K, Tp + n_frames, dtype=torch.long, device=device)
        if prompt is not None:
            codes[:, :, :Tp] = prompt.to(device)
        delayed = apply_delay(codes, self.special)
        S = delayed.shape[2]
        s_idx = torch.arange(S, device=device)[None, :] - torch.arange(K, device=device)[:, None]
        known = (s_idx < Tp) | (s_idx >= Tp + n_frames)
        bos = torch.full((B, K, 1), self.special, dtype=torch.long, device=device)
        return torch.cat([bos, delayed], dim=2), known

    def _guided_prefix(
        self, condition: torch.Tensor | None, attributes: torch.Tensor | None, guide: _Guidance, S: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prefix of every row group, `visible` mask or None) for `guide`'s rows."""
        B, Tp = guide.n, guide.prompt_frames
        cond_prefix = self._prefix(condition, attributes, B)
        prefix = cond_prefix
        if guide.cfg_scale is not None:
            prefix = torch.cat([cond_prefix, self._prefix(None, None, B)], dim=0)
        if guide.prompt_scales is None:
            return prefix, None
        prefix = torch.cat([prefix, cond_prefix], dim=0)
        # the prompt-free rows see the prefix and the continuation only: BOS and prompt inputs hidden
        visible = torch.ones(prefix.shape[0], self.n_prefix + S + 1, dtype=torch.bool, device=prefix.device)
        visible[-B:, self.n_prefix : self.n_prefix + Tp] = False
        return prefix, visible


@dataclass(frozen=True)
class _Guidance:
    """The row groups of one guided decoding step and how their logits combine (see `Generator.generate`):
    [n conditional rows; n text-unconditional rows with classifier-free guidance; n prompt-free rows with prompt
    guidance]. Only the first group is the generation."""

    n: int  # rows of the generation (B)
    prompt_frames: int  # Tp
    special: int  # the BOS / delay-pad token
    cfg_scale: float | None  # classifier-free guidance; None: off
    prompt_scales: torch.Tensor | None  # [1, K, 1] prompt guidance per codebook; None: off
    log_cut: float | None  # plausibility: masks tokens below the prompted max log-probability + log_cut

    @property
    def groups(self) -> int:
        return 1 + (self.cfg_scale is not None) + (self.prompt_scales is not None)

    def rows(self, inputs: torch.Tensor, first: bool) -> torch.Tensor:
        """One step's inputs [B, K, T] repeated for every row group."""
        groups = self.groups
        if groups == 1:  # plain generation: no copy per step
            return inputs
        x = torch.cat([inputs] * groups, dim=0)
        if self.prompt_scales is not None and first:  # the prompt-free rows start from BOS at the prompt's last input
            x = x.clone()
            x[-self.n :, :, self.prompt_frames] = self.special
        return x

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """The last position's logits of every row [rows, K, card] -> the guided logits [B, K, card] to sample."""
        B = self.n
        if self.cfg_scale is not None:
            cond, uncond = logits[:B], logits[B : 2 * B]
            guided = uncond + self.cfg_scale * (cond - uncond)
        else:
            guided = logits[:B]
        if self.prompt_scales is None:
            return guided
        free = logits[-B:]
        prompted = guided
        guided = free + self.prompt_scales * (prompted - free)
        if self.log_cut is not None:
            lp = prompted.log_softmax(-1)
            implausible = lp < lp.amax(-1, keepdim=True) + self.log_cut
            guided = guided.masked_fill(implausible, float("-inf"))
        return guided


def _per_codebook(value, what: str, n_codebooks: int | None, low: float) -> float | tuple[float, ...]:
    """A number, a list of numbers or a string "1.0" / "1.0,0.7,0.7,0.7" (one per codebook, coarse first), each
    finite and >= `low`. Raises GeneratorError on anything else."""

    def number(v) -> bool:
        return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))

    if isinstance(value, str):
        try:
            value = [float(p) for p in value.replace(" ", "").split(",") if p]
        except ValueError:
            raise GeneratorError(
                f"{what} must be a number or a comma-separated list of numbers, got {value!r}"
            ) from None
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]  # [0.7] from YAML is one value, as "0.7" is
    if number(value):
        out = float(value)
    elif isinstance(value, (list, tuple)) and value and all(number(v) for v in value):
        out = tuple(float(v) for v in value)
        if n_codebooks is not None and len(out) != n_codebooks:
            raise GeneratorError(f"{what} has {len(out)} values, the generator has {n_codebooks} codebooks")
    else:
        raise GeneratorError(f"{what} must be a number or one number per codebook, got {value!r}")
    if any(not low <= t < float("inf") for t in (out if isinstance(out, tuple) else (out,))):
        raise GeneratorError(f"{what} must be >= {low:g} and finite, got {value!r}")
    return out


def sampling_temperature(value, n_codebooks: int | None = None) -> float | tuple[float, ...]:
    """A temperature as given by a user: one number, or one per codebook (coarse first); 0 = greedy."""
    return _per_codebook(value, "temperature", n_codebooks, 0.0)


def guidance_scales(value, n_codebooks: int | None = None) -> float | tuple[float, ...]:
    """A prompt-guidance scale as given by a user: one number (>= 1; 1 = off), or one per codebook."""
    return _per_codebook(value, "prompt_guidance", n_codebooks, 1.0)


def plausibility_cut(value) -> float:
    """A plausibility constraint as given by a user (a number, or a string from the command line) in [0, 1);
    0 = off. Raises GeneratorError on anything else."""
    try:
        cut = (
            float(value) if isinstance(value, (int, float, str, np.floating)) and not isinstance(value, bool) else None
        )
    except ValueError:
        cut = None
    if cut is None or not 0.0 <= cut < 1.0:
        raise GeneratorError(f"plausibility must be a number in [0, 1), got {value!r}")
    return cut


def _sample(logits: torch.Tensor, temperature, top_k: int, top_p: float, gen: torch.Generator):
    """Sample one token per (row, codebook) from logits [B, K, V]. temperature: a float or one per codebook;
    0 means greedy (for that codebook)."""
    if isinstance(temperature, tuple):
        t = torch.tensor(temperature, dtype=logits.dtype, device=logits.device)
        greedy = t <= 0
        if bool(greedy.all()):
            return logits.argmax(-1)
        sampled = _sample(logits / torch.where(greedy, 1.0, t)[None, :, None], 1.0, top_k, top_p, gen)
        return torch.where(greedy[None, :], logits.argmax(-1), sampled)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p and 0 < top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        # drop tokens once the mass before them already reaches top_p (the first token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    flat = probs.reshape(-1, probs.shape[-1]).cpu()
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1]).to(logits.device)


# ------------------------------------------------------------------------------------------------ save / load
GENERATOR_WEIGHTS = "generator.safetensors"
GENERATOR_CONFIG = "generator.json"


def save_generator(generator: Generator, codec, directory: str | Path) -> Path:
    """Write generator.safetensors + generator.json (config, fingerprint, codec identity) and the codec's files."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    check_compatible(generator.cfg, codec)
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    save_file(state, str(directory / GENERATOR_WEIGHTS))
    codec.save(directory)
    meta = {"config": asdict(generator.cfg), "fingerprint": generator.fingerprint(), "codec": codec.identity()}
    (directory / GENERATOR_CONFIG).write_text(json.dumps(meta, indent=2))
    return directory


def check_compatible(cfg: GeneratorConfig, codec) -> None:
    if codec.n_codebooks != cfg.n_codebooks or codec.card != cfg.card:
        raise GeneratorError(
            f"codec ({codec.n_codebooks} codebooks x {codec.card}) does not match the generator "
            f"({cfg.n_codebooks} x {cfg.card})"
        )


def load_generator(directory: str | Path, map_location: str = "cpu") -> tuple[Generator, object]:
    """(generator in eval mode, codec) from a folder written by `save_generator`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.codec import load_codec

    directory = Path(directory)
    meta_path = directory / GENERATOR_CONFIG
    if not meta_path.exists():
        raise GeneratorError(f"no generator checkpoint in {directory} (missing {GENERATOR_CONFIG})")
    meta = json.loads(meta_path.read_text())
    cfg = GeneratorConfig.from_dict(meta["config"])
    generator = Generator(cfg)
    try:
        state = load_file(str(directory / GENERATOR_WEIGHTS), device=map_location)
        generator.load_state_dict(state)
    except (SafetensorError, RuntimeError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GeneratorError(f"generator weights in {directory} do not match its config: {first}") from None
    generator.eval()
    codec = load_codec(directory)
    check_compatible(cfg, codec)
    recorded = meta.get("codec", {}).get("fingerprint")
    if recorded and recorded != codec.fingerprint():
        raise GeneratorError(
            f"the codec in {directory} is not the one this generator was trained with "
            f"(fingerprint {codec.fingerprint()[:12]} != {recorded[:12]})"
        )
    if meta.get("fingerprint") and meta["fingerprint"] != generator.fingerprint():
        raise GeneratorError(f"generator weights in {directory} do not match the recorded fingerprint")
    return generator, codec


__all__ = [
    "GeneratorConfig",
    "Generator",
    "CausalSelfAttention",
    "HeadOutput",
    "apply_delay",
    "undo_delay",
    "attribute_ids",
    "save_generator",
    "load_generator",
    "GeneratorError",
]
