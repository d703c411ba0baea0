"""Hugging Face MusicGen as a SMITIN generator backend: probes and steering on local MusicGen weights.

`MusicGenGenerator` wraps a `transformers` `MusicgenForConditionalGeneration` (T5 text encoder + EnCodec + decoder)
or a decoder-only `MusicgenForCausalLM` and offers the contract that `models.probes` and `models.steering` use with
the built-in `Generator`:

- `head_sites()`: one `OutProjHeads` per decoder layer. Its `register_forward_hook(hook)` installs a forward
  *pre*-hook on that layer's `self_attn.out_proj` (no bias in MusicGen, so a pre-hook is the only place to edit),
  reshapes the projection's input `(B, T, H*Dh)` to `(B, T, H, Dh)` and calls `hook(site, (heads,), heads)`; a tensor
  returned by the hook replaces the input. So probe capture and steering hooks run unchanged on MusicGen.
- `n_layers`, `n_heads`, `head_dim`, `fingerprint()` (config + every weight, cached: the weights are frozen),
  `batch_layout` ({"cfg", "n_cond"}), `max_positions`, `context_frames` (for `models.long_generation`).
- `forward(codes)`: teacher-forced pass over un-delayed codes `[B, K, T]` in the model's own delay pattern
  (`build_delay_pattern_mask`, BOS = pad = the special token `card`) with the model's own unconditional inputs
  (`get_unconditional_inputs`: a zeroed, fully masked text encoding); returns logits `[B, K, T + K - 1, card]`.
- `generate(n_frames, prompt, condition, ...)`: `transformers`' own `generate()` with the KV cache; codes come back
  `[B, K, Tp + n_frames]`. Under classifier-free guidance `transformers` doubles the batch as [conditional rows;
  unconditional rows] (decoder inputs `repeat((2, 1))`, text encoding concatenated with zeros), so
  `batch_layout` has `"cfg": True, "n_cond": B` (and the prompt's length, `prompt_frames`) while generating, exactly
  like the built-in generator.

Two things `transformers` 5.23 does that the wrapper corrects for (both tested):
- `MusicgenForConditionalGeneration.generate` runs the prefill forward twice (once in `generate`, once in
  `_sample`) and throws the first away. The wrapper counts forwards once on a one-token greedy generation and hides
  the discarded ones from head-site hooks, so every hook sees each decoding step exactly once.
- `MusicgenForCausalLM.generate` with a KV cache feeds only the last prompt position at the prefill (the prompt is
  silently dropped), and needs `num_return_sequences` set. With a prompt the wrapper therefore runs the decoder-only
  model without the cache (same tokens, slower); the composite model keeps the cache.

New generations: each `generate()` / `forward()` sets a fresh `batch_layout` object (with a generation counter), and
`models.steering.SteeringSession` starts a new generation on a new object, so a prompt-less generation whose first
forward is the BOS column alone (T == 1) is not mistaken for a continuation of the previous one.

`load_musicgen(path)` reads a `save_pretrained` folder or a Hugging Face hub cache folder with `local_files_only`;
nothing is downloaded. It loads in float32 and fingerprints the checkpoint before casting to `dtype` / moving to
`device`, so a probe set trained on a GPU in float16 fits the same weights loaded on a CPU in float32.
`describe()` is what a probe set records about its generator (backend, local folder, fingerprint, shape) and what the
registry tags a MusicGen probe set with; the weights themselves are referenced by path, not registered. The codec
is the model's own EnCodec (`models.codec.EncodecCodec` at the bandwidth that gives the decoder's codebook count);
the text condition goes through the model's own T5 encoder (captions need the tokenizer files in the folder, or pass
token ids). `debug_musicgen()` builds a tiny random model for tests.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from core.errors import UserError


class MusicGenError(UserError):
    """Bad MusicGen folder, unsupported checkpoint, or bad input to the MusicGen backend."""


# config keys that describe the runtime or the file, not the network: left out of the fingerprint
# (save_pretrained fills in "architectures", which would change a fingerprint by saving)
_RUNTIME_KEYS = {
    "transformers_version",
    "architectures",
    "_name_or_path",
    "_commit_hash",
    "dtype",
    "torch_dtype",
    "use_cache",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


def _strip_runtime(d):
    if isinstance(d, dict):
        return {k: _strip_runtime(v) for k, v in d.items() if k not in _RUNTIME_KEYS}
    if isinstance(d, (list, tuple)):
        return [_strip_runtime(v) for v in d]
    return d


class OutProjHeads:
    """The SMITIN site of one MusicGen decoder layer: the input of `self_attn.out_proj`, seen per head.

    Quacks like the built-in `HeadOutput` module for hook registration: `register_forward_hook(hook)` calls
    `hook(site, (heads,), heads)` with `heads` `(B, T, H, Dh)` (a view of the projection's input) on every forward
    the owner lets through (see `MusicGenGenerator`); a tensor returned by the hook replaces the input.
    Returns the handle of the underlying forward pre-hook (`.remove()` removes it)."""

    def __init__(self, owner: MusicGenGenerator, layer: int, out_proj: nn.Linear):
        self.owner, self.layer, self.out_proj = owner, layer, out_proj

    def register_forward_hook(self, hook: Callable):
        H, Dh = self.owner.n_heads, self.owner.head_dim

        def pre_hook(_module, args):
            if not self.owner._hooks_live:
                return None
            x = args[0]
            B, T, C = x.shape
            if C != H * Dh:
                raise MusicGenError(f"out_proj input has {C} channels, expected {H} heads x {Dh}")
            heads = x.view(B, T, H, Dh) if x.is_contiguous() else x.reshape(B, T, H, Dh)
            out = hook(self, (heads,), heads)
            if out is None:
                return None
            return (out.reshape(B, T, H * Dh), *args[1:])

        return self.out_proj.register_forward_pre_hook(pre_hook)

    def __repr__(self) -> str:
        return f"OutProjHeads(layer={self.layer})"


class _StepRecorder:
    """A stopping criterion that never stops: it calls `on_step` after every decoding step and keeps the delayed
    stream so far (MusicgenForConditionalGeneration.generate returns audio only, the codes are read here)."""

    def __init__(self, on_step: Callable[[int], None] | None):
        self.on_step, self.step, self.ids = on_step, 0, None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.ids = input_ids
        if self.on_step is not None:
            self.on_step(self.step)
        self.step += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class MusicGenGenerator(nn.Module):
    """A MusicGen model behind the generator contract of `models.generator.Generator` (see the module docstring)."""

    def __init__(
        self, model: nn.Module, tokenizer=None, fingerprint: str | None = None, source: str | Path | None = None
    ):
        """`fingerprint`: the checkpoint's, when computed before a dtype cast (see `load_musicgen`); `source`: the
        local folder the weights came from (recorded in probe sets, never read again by the backend)."""
        super().__init__()
        from transformers import MusicgenForCausalLM, MusicgenForConditionalGeneration

        if isinstance(model, MusicgenForConditionalGeneration):
            self.composite, lm = True, model.decoder
        elif isinstance(model, MusicgenForCausalLM):
            self.composite, lm = False, model
        else:
            raise MusicGenError(
                f"expected a MusicgenForConditionalGeneration or MusicgenForCausalLM, got {type(model).__name__}"
            )
        dcfg = lm.config
        if getattr(dcfg, "audio_channels", 1) != 1:
            raise MusicGenError(
                "stereo MusicGen checkpoints (audio_channels 2, interleaved codebooks) are not "
                "supported; use a mono checkpoint"
            )
        self.model, self.lm, self.tokenizer = model.eval(), lm, tokenizer
        self.layers = lm.model.decoder.layers
        self.n_layers = len(self.layers)
        self.n_heads = int(dcfg.num_attention_heads)
        self.head_dim = int(dcfg.hidden_size) // self.n_heads
        self.n_codebooks = int(dcfg.num_codebooks)
        self.card = int(dcfg.vocab_size)
        gen_cfg = model.generation_config
        start = getattr(gen_cfg, "decoder_start_token_id", None)
        self.special = int(start if start is not None else dcfg.bos_token_id)  # BOS and delay pad (= card)
        self._sites = [OutProjHeads(self, i, layer.self_attn.out_proj) for i, layer in enumerate(self.layers)]
        self.batch_layout: dict = {"cfg": False, "n_cond": 0}
        self._generations = 0
        self._fingerprint: str | None = fingerprint
        self.source = str(Path(source).resolve()) if source is not None else None
        self._hooks_live = True
        self._skip_forwards = 0  # decoder forwards still to hide from head-site hooks (discarded prefills)
        self._discarded_prefills: int | None = None  # measured on first generate
        self.decoder_forwards: list[int] = []  # T of each decoder forward of the latest generate (hooks live)
        lm.model.decoder.register_forward_pre_hook(self._on_decoder_forward, with_kwargs=True)
        self.eval()
        self._count_discarded_prefills()  # now, so hooks registered later never see the measuring run

    def train(self, mode: bool = True) -> MusicGenGenerator:
        """The backend never trains: always eval mode (dropout off; EnCodec's quantizer would otherwise update its
        codebooks while encoding, changing the weights and the fingerprint)."""
        return super().train(False)

    # -- contract used by probes / steering / registry
    def head_sites(self) -> list[OutProjHeads]:
        return list(self._sites)

    @property
    def max_positions(self) -> int:
        """Frames a teacher-forced window may hold (the delay pattern adds K - 1 positions)."""
        return int(self.lm.config.max_position_embeddings) - self.n_codebooks + 1

    @property
    def context_frames(self) -> int:
        """Frames one `generate` call may hold, prompt included (the same bound as `max_positions`)."""
        return self.max_positions

    def fingerprint(self) -> str:
        """sha256 over the architecture config (runtime keys left out) and every weight (names, shapes, values as
        float32), computed once: the backend never trains, so the weights are frozen. `load_musicgen` computes it
        on the float32 weights before any cast, so it names the checkpoint, not the runtime dtype or device."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def describe(self) -> dict:
        """What a probe set records about the generator it was trained on (JSON-able, small)."""
        cfg = self.lm.config
        return {
            "backend": "musicgen",
            "path": self.source,
            "fingerprint": self.fingerprint(),
            "model_type": "musicgen" if self.composite else "musicgen_decoder",
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "head_dim": self.head_dim,
            "n_codebooks": self.n_codebooks,
            "card": self.card,
            "hidden_size": int(cfg.hidden_size),
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _on_decoder_forward(self, _module, args, kwargs):
        if self._skip_forwards > 0:
            self._skip_forwards -= 1
            self._hooks_live = False
            return None
        self._hooks_live = True
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.decoder_forwards.append(int(ids.shape[-1]))
        return None

    # -- inputs
    def _delayed_stream(self, ids: torch.Tensor, max_length: int) -> torch.Tensor:
        """[B*K, L] BOS + frames -> the model's own delay pattern [B*K, max_length] (-1 where still to predict)."""
        _, pattern = self.lm.build_delay_pattern_mask(ids, pad_token_id=self.special, max_length=max_length)
        return pattern

    def _check_codes(self, codes: torch.Tensor, what: str) -> torch.Tensor:
        if not torch.is_tensor(codes) or codes.dtype not in (torch.int64, torch.int32):
            raise MusicGenError(f"{what} must be an integer tensor [B, {self.n_codebooks}, T]")
        if codes.dim() != 3 or codes.shape[1] != self.n_codebooks:
            raise MusicGenError(f"{what} must be [B, {self.n_codebooks}, T], got {list(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.card):
            raise MusicGenError(
                f"{what} out of vocabulary: values must be in [0, {self.card}), "
                f"got [{int(codes.min())}, {int(codes.max())}]"
            )
        return codes.long().to(self.device)

    def text_inputs(self, condition, batch: int | None = None) -> dict:
        """Text-encoder inputs from captions (list of str; needs the tokenizer), token ids [B, L], or a mapping with
        `input_ids` (+ `attention_mask`)."""
        if not self.composite:
            raise MusicGenError(
                "a decoder-only MusicGen (MusicgenForCausalLM) has no text encoder: condition must be None"
            )
        if isinstance(condition, str):
            condition = [condition]
        if isinstance(condition, (list, tuple)) and all(isinstance(c, str) for c in condition):
            if self.tokenizer is None:
                raise MusicGenError(
                    "captions need the T5 tokenizer files next to the MusicGen weights "
                    "(tokenizer.json or spiece.model); pass token ids instead"
                )
            enc = self.tokenizer(list(condition), padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        elif isinstance(condition, Mapping):
            ids = condition["input_ids"]
            mask = condition.get("attention_mask")
        elif torch.is_tensor(condition):
            ids, mask = condition, None
        else:
            raise MusicGenError(
                f"condition must be captions, token ids or tokenizer output, got {type(condition).__name__}"
            )
        if ids.dim() != 2:
            raise MusicGenError(f"condition token ids must be [B, L], got {list(ids.shape)}")
        if batch is not None and ids.shape[0] != batch:
            raise MusicGenError(f"{ids.shape[0]} conditions for a batch of {batch}")
        mask = torch.ones_like(ids) if mask is None else mask
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _null_inputs(self, batch: int) -> dict:
        """The model's own unconditional text input (`get_unconditional_inputs`): a zeroed, fully masked encoding."""
        null = self.model.get_unconditional_inputs(batch)
        return {"encoder_outputs": null.encoder_outputs, "attention_mask": null.attention_mask}

    # -- teacher-forced pass (what probes capture)
    def forward(self, codes: torch.Tensor, condition=None) -> torch.Tensor:
        """Teacher-forced pass over un-delayed codes [B, K, T], unconditioned when `condition` is None (the model's
        own null text input). Input is the delayed stream [BOS-and-pads | frames | pads] without its last position,
        so hooks see T + K - 1 positions and the last one is the input of the last frame's top codebook. Returns
        logits [B, K, T + K - 1, card]."""
        codes = self._check_codes(codes, "codes")
        B, K, T = codes.shape
        if T < K:
            raise MusicGenError(f"a teacher-forced window needs at least {K} frames, got {T}")
        if T > self.max_positions:
            raise MusicGenError(f"{T} frames exceed the model's {self.max_positions}-frame context")
        self.batch_layout = {"cfg": False, "n_cond": B}
        bos = codes.new_full((B, K, 1), self.special)
        stream = self._delayed_stream(torch.cat([bos, codes], dim=2).reshape(B * K, T + 1), T + K)
        if bool((stream == -1).any()):
            raise MusicGenError("delay pattern left positions unfilled")  # cannot happen with max_length = T + K
        dec_ids = stream[:, :-1]
        self._skip_forwards, self._hooks_live = 0, True
        if self.composite:
            if condition is None:
                kwargs = self._null_inputs(B)
            else:
                kwargs = self.text_inputs(condition, B)
            out = self.model(decoder_input_ids=dec_ids, use_cache=False, **kwargs)
        else:
            if condition is not None:
                raise MusicGenError("a decoder-only MusicGen has no text encoder: condition must be None")
            out = self.model(input_ids=dec_ids, use_cache=False)
        return out.logits.reshape(B, K, dec_ids.shape[-1], -1)

    # -- generation
    def _count_discarded_prefills(self) -> int:
        """Decoder forwards that `generate()` runs and throws away before the first real step (1 for
        MusicgenForConditionalGeneration in transformers 5.23, 0 when fixed): measured once, at construction, on a
        one-token greedy run with head-site hooks held off."""
        if self._discarded_prefills is None:
            counted = []
            handle = self.lm.model.decoder.register_forward_pre_hook(lambda *a: counted.append(1))
            self._skip_forwards = 10**9  # hooks off
            try:
                bos = torch.full((self.n_codebooks, 1), self.special, dtype=torch.long, device=self.device)
                if self.composite:
                    self.model.generate(
                        **self._null_inputs(1),
                        decoder_input_ids=bos,
                        do_sample=False,
                        max_length=2,
                        guidance_scale=None,
                    )
                else:
                    self.model.generate(bos, do_sample=False, max_length=2, num_return_sequences=1, guidance_scale=None)
            finally:
                handle.remove()
                self._skip_forwards, self._hooks_live = 0, True
            self._discarded_prefills = max(0, len(counted) - 1)
        return self._discarded_prefills

    @torch.no_grad()
    def generate(
        self,
        n_frames: int,
        prompt: torch.Tensor | None = None,
        condition=None,
        batch_size: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        cfg_scale: float = 1.0,
        seed: int | None = None,
        use_cache: bool = True,
        on_step: Callable[[int], None] | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Sample `n_frames` frames after an optional `prompt` [B, K, Tp] with `transformers`' own `generate()`;
        returns [B, K, Tp + n_frames] un-delayed codes (prompt included), like `Generator.generate`.

        condition: captions / token ids (composite model only; None = the model's null text input). cfg_scale > 1
        with a condition turns on guidance: rows [B conditional; B unconditional], `batch_layout` says so.
        on_step(step): after each decoding step, step = 0 .. n_frames + K - 2 (the delay pattern needs K - 1 extra
        steps). Head-site hooks see each step's forward once: the first with the BOS column and the prompt
        (T = Tp + 1), later ones T == 1 with the KV cache (or the whole stream again with use_cache=False).
        seed: sampling seeds torch's global generator inside a forked RNG state (the caller's state is kept), so
        `torch.manual_seed(seed); model.generate(...)` gives the same tokens. Extra keyword arguments go to
        `generate()` (e.g. repetition settings)."""
        if n_frames < 1:
            raise MusicGenError("n_frames must be at least 1")
        K = self.n_codebooks
        if prompt is not None:
            prompt = self._check_codes(prompt, "prompt")
            B, Tp = prompt.shape[0], prompt.shape[2]
        else:
            B, Tp = batch_size, 0
        text = self.text_inputs(condition) if condition is not None else None
        if text is not None:
            if prompt is None:
                B = text["input_ids"].shape[0]
            elif text["input_ids"].shape[0] != B:
                raise MusicGenError(f"{text['input_ids'].shape[0]} conditions for a prompt batch of {B}")
        if Tp + n_frames > self.max_positions:
            raise MusicGenError(
                f"prompt ({Tp} frames) + {n_frames} new frames exceed the model's {self.max_positions}-frame context"
            )
        max_length = Tp + n_frames + K  # delayed stream incl. the BOS column
        bos = torch.full((B, K, 1), self.special, dtype=torch.long, device=self.device)
        dec_ids = (torch.cat([bos, prompt], dim=2) if prompt is not None else bos).reshape(B * K, Tp + 1)
        use_cfg = text is not None and cfg_scale > 1.0
        if isinstance(temperature, (tuple, list)):
            raise MusicGenError("a per-codebook temperature is a builtin-generator option; give MusicGen one number")
        greedy = temperature <= 0
        kwargs = dict(
            do_sample=not greedy,
            temperature=1.0 if greedy else float(temperature),
            top_k=int(top_k or 0),
            top_p=float(top_p) if top_p and 0 < top_p < 1 else 1.0,
            max_length=max_length,
            max_new_tokens=None,
            min_length=0,
            min_new_tokens=None,
            guidance_scale=float(cfg_scale) if use_cfg else None,
            use_cache=use_cache,
        )
        if not self.composite and Tp > 0:
            kwargs["use_cache"] = False  # transformers 5.23 drops the prompt at a cached decoder-only prefill
        kwargs.update(generate_kwargs)
        discarded = self._count_discarded_prefills()
        recorder = _StepRecorder(on_step)
        from transformers import StoppingCriteriaList

        # "generation" tells hooks a new generation starts (its first forward may have T == 1 here, unlike the
        # built-in generator's prefix): steering can use it to restart its step count (see the module docstring)
        self._generations += 1
        self.batch_layout = {"cfg": use_cfg, "n_cond": B, "generation": self._generations, "prompt_frames": Tp}
        self.decoder_forwards = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self._skip_forwards, self._hooks_live = discarded, True
            try:
                if self.composite:
                    inputs = text if text is not None else self._null_inputs(B)
                    self.model.generate(
                        **inputs,
                        decoder_input_ids=dec_ids,
                        stopping_criteria=StoppingCriteriaList([recorder]),
                        **kwargs,
                    )
                else:
                    self.model.generate(
                        dec_ids, num_return_sequences=1, stopping_criteria=StoppingCriteriaList([recorder]), **kwargs
                    )
            finally:
                self._skip_forwards, self._hooks_live = 0, True
        if recorder.ids is None or recorder.ids.shape[-1] != max_length:
            got = None if recorder.ids is None else recorder.ids.shape[-1]
            raise MusicGenError(f"generate() stopped early: delayed stream of {got} positions, expected {max_length}")
        pattern = self._delayed_stream(dec_ids, max_length)
        stream = self.lm.apply_delay_pattern_mask(recorder.ids, pattern).reshape(B, K, max_length)
        codes = torch.stack([stream[:, k, k + 1 : k + 1 + Tp + n_frames] for k in range(K)], dim=1)
        if bool((codes >= self.card).any()) or bool((codes < 0).any()):
            raise MusicGenError("generated stream holds special tokens where frames should be")
        return codes


def weights_fingerprint(model: nn.Module) -> str:
    """The MusicGen fingerprint of a transformers model: config (runtime keys left out) + every weight as float32."""
    config = json.dumps(_strip_runtime(model.config.to_dict()), sort_keys=True, default=str)
    h = hashlib.sha256(b"musicgen:" + config.encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        if t.is_floating_point():
            t = t.float()
        t = t.cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


# ------------------------------------------------------------------------------------------------- loading
def find_musicgen_dir(path: str | Path) -> Path | None:
    """The folder holding a MusicGen config.json when `path` is (or is a hub cache folder of) a MusicGen checkpoint,
    else None. Cheap: reads one JSON file, loads nothing."""
    try:
        folder = resolve_local_dir(path)
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (MusicGenError, OSError, ValueError):
        return None
    return folder if model_type in ("musicgen", "musicgen_decoder") else None


def musicgen_shape(folder: str | Path) -> dict:
    """n_layers / n_heads / head_dim of a local MusicGen checkpoint from its config.json (no weights loaded): enough
    to refuse a probe set made on another model size before loading gigabytes."""
    cfg = json.loads((resolve_local_dir(folder) / "config.json").read_text())
    dec = cfg.get("decoder", cfg) if cfg.get("model_type") == "musicgen" else cfg
    layers, heads = int(dec["num_hidden_layers"]), int(dec["num_attention_heads"])
    return {"n_layers": layers, "n_heads": heads, "head_dim": int(dec["hidden_size"]) // heads}


def resolve_local_dir(path: str | Path) -> Path:
    """A `save_pretrained` folder, or a hub cache folder (`models--facebook--musicgen-small`, its `snapshots/`, or a
    snapshot): the folder holding config.json. Never downloads."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MusicGenError(f"no MusicGen weights at {path} (a local folder is needed; nothing is downloaded)")
    if (path / "config.json").exists():
        return path
    snapshots = path / "snapshots" if (path / "snapshots").is_dir() else path
    ref = path / "refs" / "main"
    if ref.exists() and (snapshots / ref.read_text().strip() / "config.json").exists():
        return snapshots / ref.read_text().strip()
    found = sorted(p.parent for p in snapshots.glob("*/config.json"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise MusicGenError(f"{path} holds {len(found)} snapshots; point generator.path at one of them")
    raise MusicGenError(
        f"{path} has no config.json (expected a save_pretrained folder or a Hugging Face cache "
        "folder such as ~/.cache/huggingface/hub/models--facebook--musicgen-small)"
    )


def load_musicgen(
    path: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    codec_path: str | Path | None = None,
    allow_pickle_weights: bool = False,
) -> tuple[MusicGenGenerator, object]:
    """(generator in eval mode, codec) from local MusicGen weights. The codec is the model's own EnCodec; a
    decoder-only checkpoint needs `codec_path` (an EnCodec save_pretrained folder) for audio. Weights are read from
    safetensors only: a `pytorch_model.bin` is a pickle, which runs code when loaded, so it is refused unless
    `allow_pickle_weights` (generator.allow_pickle_weights, --allow-pickle-weights) says the user trusts it."""
    from transformers import AutoTokenizer, MusicgenForCausalLM, MusicgenForConditionalGeneration

    from models.codec import EncodecCodec

    folder = resolve_local_dir(path)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise MusicGenError(f"cannot read {folder / 'config.json'}: {e}") from None
    classes = {"musicgen": MusicgenForConditionalGeneration, "musicgen_decoder": MusicgenForCausalLM}
    if model_type not in classes:
        raise MusicGenError(
            f"{folder} holds a {model_type!r} model; the MusicGen backend reads 'musicgen' "
            "(text-to-music) or 'musicgen_decoder' checkpoints (MusicGen-Melody is not supported)"
        )
    if isinstance(dtype, str):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise MusicGenError(f"generator.dtype must be float32, float16 or bfloat16, not {dtype!r}")
        dtype = getattr(torch, dtype)
    try:
        if not allow_pickle_weights and not list(folder.glob("*.safetensors")):
            pickled = sorted(p.name for p in folder.glob("*.bin"))
            raise MusicGenError(
                f"{folder} has no safetensors weights"
                + (f" (only {', '.join(pickled)}, a pickle that runs code when loaded)" if pickled else "")
                + "; convert them, or pass "
                "--allow-pickle-weights if you trust the files"
            )
        model = classes[model_type].from_pretrained(
            str(folder),
            local_files_only=True,
            dtype=torch.float32,
            use_safetensors=None if allow_pickle_weights else True,
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MusicGenError(f"cannot load MusicGen from {folder}: {first}") from None
    fingerprint = weights_fingerprint(model)  # the checkpoint's, before any cast
    try:
        model = model.to(device=device, dtype=dtype or torch.float32).eval()
    except (RuntimeError, AssertionError) as e:  # e.g. cuda asked for on a machine without it
        raise MusicGenError(f"cannot move MusicGen to {device!r}: {str(e).strip().splitlines()[0]}") from None
    tokenizer = None
    if any((folder / f).exists() for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    generator = MusicGenGenerator(model, tokenizer, fingerprint=fingerprint, source=folder)
    if generator.composite:
        codec = musicgen_codec(model)
    elif codec_path is not None:
        codec = EncodecCodec.from_pretrained(codec_path)
    else:
        codec = None
    if codec is not None and (codec.n_codebooks != generator.n_codebooks or codec.card != generator.card):
        raise MusicGenError(
            f"codec ({codec.n_codebooks} codebooks x {codec.card}) does not match the MusicGen "
            f"decoder ({generator.n_codebooks} x {generator.card})"
        )
    return generator, codec


def musicgen_codec(model):
    """The composite model's own EnCodec as a `models.codec.EncodecCodec`, at the bandwidth that yields the decoder's
    codebook count (MusicGen's 32 kHz EnCodec: 4 codebooks at 2.2 kbps)."""
    from models.codec import EncodecCodec

    enc = model.audio_encoder
    K = int(model.decoder.config.num_codebooks)
    bandwidth = K * math.log2(enc.config.codebook_size) * enc.config.frame_rate / 1000.0
    codec = EncodecCodec(enc, bandwidth)
    if codec.n_codebooks != K:
        raise MusicGenError(
            f"the model's EnCodec gives {codec.n_codebooks} codebooks at {bandwidth} kbps, the decoder reads {K}"
        )
    return codec


# ------------------------------------------------------------------------------------------------ debug preset
def debug_musicgen(
    seed: int = 0,
    decoder_only: bool = False,
    card: int = 32,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 4,
    codebooks: int = 4,
    sample_rate: int = 800,
):
    """A tiny random MusicGen (hidden 16, 2 layers, 4 heads, 4 codebooks of `card` codes; 1-layer T5 of width 8;
    EnCodec at 800 Hz, or 8000 Hz for audio descriptors that need a few kHz of bandwidth, 50 frames/s) with the
    generation config the real checkpoints ship; builds in well under a second, no download. Returns the
    transformers model."""
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForCausalLM,
        MusicgenForConditionalGeneration,
        T5Config,
    )

    dec = MusicgenDecoderConfig(
        vocab_size=card,
        max_position_embeddings=128,
        num_hidden_layers=layers,
        ffn_dim=2 * hidden,
        num_attention_heads=heads,
        hidden_size=hidden,
        num_codebooks=codebooks,
        pad_token_id=card,
        bos_token_id=card,
        dropout=0.0,
    )
    torch.manual_seed(seed)
    if decoder_only:
        model = MusicgenForCausalLM(dec)
    else:
        t5 = T5Config(
            vocab_size=64,
            d_model=8,
            d_kv=4,
            d_ff=16,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        # 800 Hz / (4 * 4) = 50 frames/s; log2(32) bits x 50 = 250 bps per codebook -> 4 codebooks at 1 kbps
        ratios = {800: [4, 4], 8000: [8, 5, 4]}
        if sample_rate not in ratios:
            raise MusicGenError(f"debug_musicgen: sample_rate must be one of {sorted(ratios)}")
        enc = EncodecConfig(
            sampling_rate=sample_rate,
            target_bandwidths=[codebooks * math.log2(card) * 50 / 1000.0],
            hidden_size=8,
            num_filters=2,
            num_residual_layers=1,
            upsampling_ratios=ratios[sample_rate],
            num_lstm_layers=1,
            codebook_size=card,
            kernel_size=3,
            last_kernel_size=3,
            residual_kernel_size=3,
        )
        model = MusicgenForConditionalGeneration(
            MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(), decoder=dec.to_dict())
        )
        # random EnCodec codebooks start at zero (every frame would quantise to code 0): spread them out so that
        # different audio gives different tokens
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.copy_(0.1 * torch.randn_like(layer.codebook.embed))
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
    g = model.generation_config
    g.decoder_start_token_id, g.pad_token_id, g.bos_token_id = card, card, card
    g.do_sample, g.guidance_scale, g.max_length = True, 3.0, 64
    return model.eval()


__all__ = [
    "MusicGenGenerator",
    "OutProjHeads",
    "MusicGenError",
    "load_musicgen",
    "musicgen_codec",
    "find_musicgen_dir",
    "musicgen_shape",
    "weights_fingerprint",
    "resolve_local_dir",
    "debug_musicgen",
]
