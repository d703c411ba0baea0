"""Codec fitting, tokenization and generator training: the pure functions behind the DVC stages
`fit_codec`, `tokenize` and `train_generator` (their CLI entry points in `models/cli.py` stay thin).

Token files (`tokenize` output, one pair per split):
  {split}.safetensors  codes [K, total_frames] (int32, clips concatenated), offsets [N + 1] (int64),
                       condition [N, 384] (caption embeddings), attributes [N, 2] (tempo/key ids)
  {split}.json         clip_id, mix_id, traits, caption per clip, plus the codec fingerprint
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from core.config import Section
from core.errors import UserError
from models.codec import MelCodecConfig, MelRVQCodec, load_codec
from models.codec_decoder import DecoderParams
from models.distributed import DataParallel, threads_per_rank
from models.generator import Generator, GeneratorConfig, attribute_ids, save_generator
from models.optimizer_state import flatten_optimizer, unflatten_optimizer

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
TOKENIZE_COLUMNS = ["clip_id", "audio", "sample_rate", "traits", "caption", "mix_id", "tempo_bpm", "key", "mode"]


class TrainingDataError(UserError):
    """The clips table or token files cannot be used for training (missing, empty, wrong codec)."""


# ------------------------------------------------------------------------------------------------ clips table
def read_clips(clips_dir: str, split: str, columns: list[str]):
    """Rows of one split as a pyarrow table; missing/empty tables and columns become one-line user errors."""
    from core.clips_table import ClipsTableError, read_clips_table

    try:
        table = read_clips_table(clips_dir, columns=columns, split=split)
    except ClipsTableError as e:
        raise TrainingDataError(str(e)) from None
    except Exception as e:  # pyarrow refuses a projection on a column a shard lacks (ArrowInvalid)
        if type(e).__name__ != "ArrowInvalid":
            raise
        import glob

        import pyarrow.parquet as pq

        missing = sorted(
            {
                c
                for shard in glob.glob(f"{clips_dir.rstrip('/')}/clips-*.parquet")
                for c in columns
                if c not in pq.read_schema(shard).names
            }
        )
        raise TrainingDataError(
            f"clips table at {clips_dir} lacks column(s) {', '.join(missing) or '?'}: rebuild the dataset"
        ) from None
    return table


def iter_waves(clips_dir: str, split: str, limit: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
    from core.audio import decode_flac

    table = read_clips(clips_dir, split, ["audio"])
    if table.num_rows == 0:
        raise TrainingDataError(f"split {split!r} of the clips table at {clips_dir} is empty")
    n = table.num_rows if limit is None else min(limit, table.num_rows)
    for i in range(n):
        wave, sr = decode_flac(table["audio"][i].as_py()["bytes"])
        yield wave, sr


# ---------------------------------------------------------------------------------------------------- codec
class FitCodecParams(Section):
    """params.yaml `fit_codec` (every default is here): the mel-RVQ codec and how much audio fits it."""

    seed: int = 0
    sample_rate: int = Field(16000, gt=0)
    n_fft: int = Field(1024, gt=0)
    hop: int = Field(400, gt=0)  # samples between frames (16000 / 400 = 40 frames/s)
    n_mels: int = Field(64, ge=1)
    fmin: float = Field(30.0, ge=0)  # lowest mel band edge (Hz)
    n_codebooks: int = Field(4, ge=1)  # residual k-means stages (K)
    card: int = Field(256, ge=2)  # codes per codebook
    kmeans_iters: int = Field(15, ge=1)  # Lloyd iterations per codebook
    inversion: Literal["learned", "pinv"] = "learned"  # ridge log-mel -> log-magnitude | filterbank pseudo-inverse
    griffin_lim_iters: int = Field(48, ge=1)
    decoder: Literal["network", "griffin_lim"] = "network"  # griffin_lim: no network is trained
    network: DecoderParams = DecoderParams()  # the decoder network (models/codec_decoder.py)
    max_clips: int | None = Field(600, ge=1)  # train clips read to fit (null: all)
    max_frames: int = Field(150_000, ge=1)  # frames sampled for k-means

    def codec_config(self) -> MelCodecConfig:
        return MelCodecConfig.from_dict(self.model_dump())


def fit_codec(clips_dir: str, out_dir: str, params: FitCodecParams) -> MelRVQCodec:
    """Fit the default mel-RVQ codec on (up to `max_clips`) training clips, then (with `decoder: network`) train its
    decoder network on up to `network.clips` of them, and save it to `out_dir`."""
    t0 = time.time()
    codec = MelRVQCodec.fit(
        iter_waves(clips_dir, "train", params.max_clips),
        params.codec_config(),
        seed=params.seed,
        max_frames=params.max_frames,
    )
    log.info(
        "codebooks fitted in %.1fs: %d x %d codes at %.1f frames/s",
        time.time() - t0,
        codec.n_codebooks,
        codec.card,
        codec.frame_rate,
    )
    if params.decoder == "network":
        net = params.network
        summary = codec.fit_network(iter_waves(clips_dir, "train", net.clips), net, seed=params.seed)
        log.info(
            "decoder network trained: %d steps in %.0fs, loss %.3f",
            summary["steps"],
            summary["seconds"],
            summary["loss_last_100"],
        )
    codec.save(out_dir)
    return codec


# ------------------------------------------------------------------------------------------------- tokenize
def tokenize(clips_dir: str, codec_dir: str, out_dir: str, splits=SPLITS, embed=None) -> dict:
    """Encode every clip of each split with the codec and embed its caption; returns clip counts per split."""
    from safetensors.torch import save_file

    from core.audio import decode_flac
    from core.clips_table import traits_dict

    if embed is None:
        from models.conditioning import embed_captions as embed
    codec = load_codec(codec_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in splits:
        table = read_clips(clips_dir, split, TOKENIZE_COLUMNS)
        if table.num_rows == 0:
            raise TrainingDataError(f"split {split!r} of the clips table at {clips_dir} is empty")
        rows = table.to_pylist()
        codes, offsets = [], [0]
        for row in rows:
            wave, sr = decode_flac(row["audio"]["bytes"])
            c = codec.encode(wave, sr).to(torch.int32)
            codes.append(c)
            offsets.append(offsets[-1] + c.shape[1])
        condition = embed([r["caption"] or "" for r in rows])
        attributes = torch.tensor([attribute_ids(r["tempo_bpm"], r["key"], r["mode"]) for r in rows], dtype=torch.long)
        save_file(
            {
                "codes": torch.cat(codes, 1).contiguous(),
                "offsets": torch.tensor(offsets, dtype=torch.long),
                "condition": condition.contiguous(),
                "attributes": attributes,
            },
            str(out / f"{split}.safetensors"),
        )
        meta = {
            "codec": codec.identity(),
            "clip_id": [r["clip_id"] for r in rows],
            "mix_id": [r["mix_id"] for r in rows],
            "traits": [traits_dict(r["traits"]) for r in rows],
            "caption": [r["caption"] for r in rows],
        }
        (out / f"{split}.json").write_text(json.dumps(meta))
        counts[split] = len(rows)
        log.info("tokenized %s: %d clips, %d frames", split, len(rows), offsets[-1])
    return counts


def frame_levels(codec, codes: torch.Tensor) -> torch.Tensor:
    """Per frame of `codes` [K, T], its dequantized log-mel averaged over bands (the codec's standardised units: 0 is
    the training audio's mean level); a frame below about -1.5 is near silence."""
    return codec.dequantize(codes).mean(1)


class TokenSet:
    """One split's token file in memory: clip i is codes[:, offsets[i]:offsets[i + 1]]."""

    def __init__(self, directory: str | Path, split: str):
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / f"{split}.safetensors"
        if not path.exists():
            raise TrainingDataError(f"no {split} tokens in {directory}; run `smitin tokenize` first")
        t = load_file(str(path))
        self.codes, self.offsets = t["codes"].long(), t["offsets"]
        self.condition, self.attributes = t["condition"], t["attributes"]
        self.meta = json.loads((directory / f"{split}.json").read_text())
        if len(self.offsets) < 2:
            raise TrainingDataError(f"split {split!r} in {directory} has no clips")
        self.spans: torch.Tensor | None = None  # per clip, the [start, end) frames `batch` takes windows from

    def keep_off_quiet_edges(self, codec, level: float) -> int:
        """Let `batch` leave out each clip's leading and trailing frames whose dequantized log-mel (the codec's
        standardised units, averaged over bands) lies below `level`; a clip quiet all through keeps every frame.
        Returns the frames left out. `clip` still returns whole clips."""
        quiet = (frame_levels(codec, self.codes) < level).tolist()
        spans, left_out = [], 0
        for i in range(len(self)):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            start, end = a, b
            while start < end and quiet[start]:
                start += 1
            while end > start and quiet[end - 1]:
                end -= 1
            if start == end:
                start, end = a, b
            spans.append((start - a, end - a))
            left_out += (b - a) - (end - start)
        self.spans = torch.tensor(spans, dtype=torch.long)
        return left_out

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def clip(self, i: int) -> torch.Tensor:
        return self.codes[:, self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def batch(self, idx: list[int], window: int, gen: torch.Generator | None, start: int | None = None):
        """Windows of `window` frames (random start unless `start`), with conditions and attributes."""
        out = []
        for i in idx:
            c = self.clip(i)
            if self.spans is not None:
                c = c[:, int(self.spans[i, 0]) : int(self.spans[i, 1])]
            if c.shape[1] < window:
                c = (
                    torch.cat([c, c[:, : window - c.shape[1]]], 1)
                    if c.shape[1] >= window // 2
                    else c.repeat(1, math.ceil(window / c.shape[1]))
                )
            s = start if start is not None else int(torch.randint(0, c.shape[1] - window + 1, (1,), generator=gen))
            out.append(c[:, s : s + window])
        idx_t = torch.tensor(idx)
        return torch.stack(out), self.condition[idx_t], self.attributes[idx_t]


# ---------------------------------------------------------------------------------------------------- train
class GeneratorModelParams(Section):
    """params.yaml `train_generator.model`: the generator's architecture (GeneratorConfig; the number and size of
    the codebooks come from the codec)."""

    dim: int = Field(128, ge=1)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)  # must divide dim
    mlp_ratio: int = Field(4, ge=1)
    max_frames: int = Field(256, ge=1)  # context length in delayed frames (bounds prompts and caches)
    dropout: float = Field(0.1, ge=0, lt=1)
    cond_dropout: float = Field(0.3, ge=0, le=1)  # share of training rows whose caption is dropped (for CFG)
    use_attributes: bool = True  # tempo-bucket and key tokens after the caption token


class TrainGeneratorParams(Section):
    """params.yaml `train_generator` (every default is here); `resolved()` applies the chosen preset."""

    seed: int = 0
    preset: str = "cpu"  # cpu (the keys below) | debug (GeneratorConfig.debug's architecture) | a key of `presets`
    model: GeneratorModelParams = Field(default_factory=GeneratorModelParams)
    window_frames: int = Field(160, ge=1)  # frames per training window
    # windows stay off each clip's leading and trailing frames quieter than this (the codec's standardised log-mel,
    # averaged over bands): a generator that learned silence at clip edges falls silent when pushed (docs/steering.md)
    quiet_edge_level: float | None = None
    batch_size: int = Field(8, ge=1)
    steps: int = Field(3000, ge=1)
    lr: float = Field(0.003, gt=0)  # peak learning rate: linear warmup, cosine decay to a tenth of it
    warmup: int = Field(30, ge=0)  # warmup steps
    weight_decay: float = Field(0.05, ge=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)  # weight average evaluated, kept and exported (0: off)
    eval_every: int = Field(50, ge=1)  # steps between validations (and checkpoints)
    eval_clips: int = Field(32, ge=1)  # validation clips per evaluation
    patience: int = Field(2, ge=1)  # evaluations in a row without a `min_delta` improvement before early stopping
    min_delta: float = Field(0.005, ge=0)  # nats/token by which an evaluation must beat the last progress to count
    max_minutes: float = Field(14.0, gt=0)  # training time limit
    threads: int = Field(2, ge=0)  # torch threads on the CPU (0: torch's default)
    presets: dict[str, dict] = Field(  # per preset: overrides of the keys above (`model`: of single keys)
        default_factory=lambda: {
            "demo": {"steps": 1300, "max_minutes": 10},
            "debug": {
                "steps": 30,
                "batch_size": 4,
                "window_frames": 32,
                "eval_every": 10,
                "eval_clips": 8,
                "max_minutes": 2,
                "ema_decay": 0.0,
            },
            "gpu": {
                "model": {"dim": 512, "n_layers": 8, "n_heads": 8, "max_frames": 512},
                "window_frames": 400,
                "batch_size": 32,
                "steps": 30000,
                "lr": 0.0006,
                "warmup": 1000,
                "eval_every": 500,
                "patience": 8,
                "min_delta": 0.001,
                "max_minutes": 240,
                "ema_decay": 0.999,
            },
        }
    )

    def resolved(self) -> TrainGeneratorParams:
        """These params with the chosen preset's overrides applied. `debug` starts from the debug architecture
        (GeneratorConfig.debug), every other preset from `model`; a preset's `model` block overrides single keys."""
        known = list(dict.fromkeys(["cpu", "debug", *self.presets]))
        if self.preset not in known:
            raise UserError(f"unknown train_generator preset {self.preset!r} (known: {', '.join(known)})")
        over = dict(self.presets[self.preset]) if self.preset in self.presets else {}
        if "presets" in over or "preset" in over:
            raise UserError("train_generator.presets entries cannot set preset or presets")
        if self.preset == "debug":
            debug = asdict(GeneratorConfig.debug())
            model = {k: debug[k] for k in GeneratorModelParams.model_fields}
        else:
            model = self.model.model_dump()
        model_over = over.pop("model", {})
        # a preset's model block overrides single keys (anything but a mapping is left to fail validation)
        over["model"] = {**model, **model_over} if isinstance(model_over, dict) else model_over
        return self.with_overrides(over, f"train_generator.presets.{self.preset}")


def generator_config(params: TrainGeneratorParams, codec) -> GeneratorConfig:
    """The GeneratorConfig of the params (their preset applied); `codec`: anything with `n_codebooks` and `card`
    (a codec, or FitCodecParams)."""
    model = params.resolved().model.model_dump()
    return GeneratorConfig(**model, n_codebooks=codec.n_codebooks, card=codec.card)


def _run_identity(codec, tokens_dir: str, p: TrainGeneratorParams) -> str:
    """What a checkpoint must share with this run to be resumed: the codec, the train/valid token files and
    the training schedule. `steps`, `max_minutes` and `threads` may change: a longer run continues, its cosine
    learning-rate decay stretched to the new step count (the rate steps up where the run resumes)."""
    h = hashlib.sha256(codec.fingerprint().encode())
    for split in ("train", "valid"):
        for name in (f"{split}.json", f"{split}.safetensors"):
            with open(Path(tokens_dir) / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    schedule = {k: getattr(p, k) for k in ("seed", "batch_size", "window_frames", "lr", "warmup", "weight_decay")}
    if p.ema_decay > 0:  # (keeps the identity of checkpoints from before the option existed)
        schedule["ema_decay"] = p.ema_decay
    if p.quiet_edge_level is not None:  # (the same)
        schedule["quiet_edge_level"] = p.quiet_edge_level
    h.update(json.dumps(schedule, sort_keys=True).encode())
    return h.hexdigest()


def unigram_nats(train: TokenSet, valid: TokenSet, card: int) -> float:
    """Cross-entropy of the valid codes under per-codebook unigram frequencies of train (a floor to beat)."""
    total = 0.0
    for k in range(train.codes.shape[0]):
        p = torch.bincount(train.codes[k], minlength=card).float() + 1.0
        p = p / p.sum()
        total += float(-torch.log(p[valid.codes[k]]).mean())
    return total / train.codes.shape[0]


@torch.no_grad()
def evaluate(
    model: Generator, data: TokenSet, window: int, batch_size: int, max_clips: int, device: str
) -> torch.Tensor:
    """Per-codebook validation cross-entropy over fixed windows (the first `window` frames of each clip)."""
    model.eval()
    idx = list(range(min(len(data), max_clips)))
    losses, weights = [], []
    for i in range(0, len(idx), batch_size):
        codes, cond, attrs = data.batch(idx[i : i + batch_size], window, None, start=0)
        _, per_cb = model.loss(codes.to(device), cond.to(device), attrs.to(device))
        losses.append(per_cb.cpu())
        weights.append(len(codes))
    model.train()
    w = torch.tensor(weights, dtype=torch.float32)
    return (torch.stack(losses) * w[:, None]).sum(0) / w.sum()


def train_generator(
    tokens_dir: str,
    codec_dir: str,
    out_dir: str,
    params: TrainGeneratorParams,
    checkpoint_dir: str | None = None,
    metrics_path: str | None = None,
    plot_path: str | None = None,
    device: str | None = None,
    resume: bool = True,
    progress=None,
) -> dict:
    """Train the generator on token files; keep the best-validation weights; write metrics and the loss curve.

    Resumable: every evaluation writes model + optimizer state (safetensors) and the loop counters (JSON) to
    `checkpoint_dir`; a later run with the same config continues from there. Stops at `steps`, after
    `max_minutes`, or when validation loss has not improved for `patience` evaluations.
    """
    p = params.resolved()
    torch.manual_seed(p.seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dp = DataParallel.from_env(device)
    device = dp.device
    say = (progress or log.info) if dp.is_main else (lambda _msg: None)
    if device == "cpu" and p.threads:
        torch.set_num_threads(threads_per_rank(p.threads))
    codec = load_codec(codec_dir)
    train, valid = _training_tokens(tokens_dir, codec)
    if p.quiet_edge_level is not None:
        for name, split in (("train", train), ("valid", valid)):
            left_out = split.keep_off_quiet_edges(codec, p.quiet_edge_level)
            say(f"{name}: windows keep off {left_out} quiet edge frames of {split.codes.shape[1]}")
    cfg = generator_config(p, codec)
    window = p.window_frames
    if window + cfg.n_codebooks - 1 > cfg.max_frames:
        raise UserError(f"window_frames {window} + delay {cfg.n_codebooks - 1} exceeds max_frames {cfg.max_frames}")
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    # hashing the token files is only needed to tell a resumable checkpoint from another run's
    run_identity = _run_identity(codec, tokens_dir, p) if ckpt else None
    training = _Training(p, cfg, train, valid, device, ckpt, run_identity, say, dp)
    if ckpt and resume and (ckpt / "state.json").exists():
        training.resume()
    floor = unigram_nats(train, valid, cfg.card)
    say(
        f"generator {training.model.num_params() / 1e6:.2f}M params, {len(train)} train / {len(valid)} valid clips, "
        f"unigram floor {floor:.3f} nats"
    )
    stop_reason, elapsed = training.run()
    model = training.export(codec, out_dir if dp.is_main else None)
    history = training.state["history"]
    best = min(history, key=lambda r: r["valid_loss"]) if history else {}
    metrics = {
        "steps": training.state["step"],
        "stop_reason": stop_reason,
        "params": model.num_params(),
        "train_seconds": round(training.state["train_seconds"] + elapsed, 1),
        "unigram_valid_loss": floor,
        "best_step": best.get("step"),
        "valid_loss": best.get("valid_loss"),
        "train_loss": best.get("train_loss"),
        **{k: v for k, v in best.items() if k.startswith(("valid_loss_cb", "train_loss_cb"))},
        "tokens_per_s": best.get("tokens_per_s"),
        "fingerprint": model.fingerprint(),
        **({"processes": dp.world} if dp.world > 1 else {}),
    }
    if dp.is_main:
        _write_training_outputs(metrics, history, metrics_path, plot_path)
    dp.barrier()
    return metrics


def _training_tokens(tokens_dir: str, codec) -> tuple[TokenSet, TokenSet]:
    """The train and valid token sets; refuses tokens made with another codec."""
    train, valid = TokenSet(tokens_dir, "train"), TokenSet(tokens_dir, "valid")
    for split in (train, valid):
        if split.meta["codec"]["fingerprint"] != codec.fingerprint():
            raise TrainingDataError(f"tokens in {tokens_dir} were made with another codec; re-run `smitin tokenize`")
    return train, valid


def _learning_rate(p: TrainGeneratorParams, step: int) -> float:
    """Linear warmup to `lr`, then cosine decay to a tenth of it at `steps`."""
    base = p.lr
    if step < p.warmup:
        return base * (step + 1) / p.warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - p.warmup) / max(1, p.steps - p.warmup)))))


class _Training:
    """One run of `train_generator`: the model, its optimizer and weight average, the loop counters (`state`, what
    a checkpoint's state.json holds besides the optimizer's settings) and the best weights so far."""

    def __init__(
        self,
        p: TrainGeneratorParams,
        cfg: GeneratorConfig,
        train: TokenSet,
        valid: TokenSet,
        device: str,
        ckpt: Path | None,
        run_identity: str | None,
        say,
        dp: DataParallel | None = None,
    ):
        self.p, self.cfg, self.device, self.say = p, cfg, device, say
        self.dp = dp or DataParallel(device=device)
        self.rows = self.dp.rows(p.batch_size)
        self.train, self.valid = train, valid
        self.ckpt = ckpt
        self.model = Generator(cfg).to(device)
        # the loss is computed through DDP's forward, so that it averages the ranks' gradients; a step may leave
        # parameters unused on a rank (the null condition when none of its rows drops its caption)
        self.net = self.dp.wrap(_Loss(self.model), find_unused_parameters=True)
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=p.lr,
            betas=(0.9, 0.95),
            weight_decay=p.weight_decay,
        )
        # Exponential moving average of the weights: evaluated, kept as best and exported instead of the live weights
        # (the live ones keep training). On the cpu preset it lowered validation loss 3.56 -> 3.52 nats/token.
        self.ema = copy.deepcopy(self.model) if p.ema_decay > 0 else None
        self.judged = self.ema if self.ema is not None else self.model
        self.state = {
            "step": 0,
            "best_valid": float("inf"),  # the lowest validation loss: the weights kept and exported
            "progress_valid": float("inf"),  # the loss of the last evaluation that counted as progress (patience)
            "bad_evals": 0,
            "history": [],
            "train_seconds": 0.0,
            "config": asdict(cfg),
        }
        if run_identity is not None:
            self.state["run"] = run_identity
        self.best_state = None

    def resume(self) -> None:
        """Continue from the checkpoint when it is this run's (same config, codec, tokens and schedule)."""
        from safetensors.torch import load_file

        ckpt, device, steps = self.ckpt, self.device, self.p.steps
        saved = json.loads((ckpt / "state.json").read_text())
        if saved.get("config") != asdict(self.cfg) or saved.get("run") != self.state["run"]:
            # a checkpoint of another model, codec, token set or schedule (e.g. before a data refresh): resuming
            # it would continue training on tokens whose codes mean something else
            self.say(
                f"checkpoint in {ckpt} is from another run (config, codec, tokens or schedule differ): starting afresh"
            )
            return
        self.model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=device))
        unflatten_optimizer(self.opt, load_file(str(ckpt / "optimizer.safetensors"), device=device), saved["optimizer"])
        self.best_state = load_file(str(ckpt / "best.safetensors"), device=device)
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=device))
        saved = {"progress_valid": saved["best_valid"], **saved}  # checkpoints from before min_delta lack it
        self.state = {k: saved[k] for k in self.state}
        planned = saved.get("target_steps")
        if planned is not None and planned < steps:
            # e.g. a preset change: the user may expect a fresh run of the new preset, which trains differently
            self.say(
                f"resumed from {ckpt} at step {self.state['step']}: a run planned for {planned} steps continues to "
                f"{steps}, its learning-rate decay stretched (delete {ckpt} to train from scratch)"
            )
        else:
            self.say(f"resumed from {ckpt} at step {self.state['step']}")

    def run(self) -> tuple[str, float]:
        """Train until `steps`, early stopping or the time limit: (stop reason, seconds this call trained)."""
        p, state = self.p, self.state
        gen = torch.Generator().manual_seed(p.seed + state["step"])
        self.model.train()
        t_start, frames_done, run_train = time.time(), 0, []
        while state["step"] < p.steps:
            run_train.append(self._step(gen))
            frames_done += p.batch_size * p.window_frames
            elapsed = time.time() - t_start
            # the ranks' clocks differ: they agree on running out, so that all stop at the same step
            out_of_time = self.dp.any((state["train_seconds"] + elapsed) / 60 >= p.max_minutes)
            if state["step"] % p.eval_every == 0 or state["step"] == p.steps or out_of_time:
                self._validate(run_train, frames_done, elapsed)
                run_train = []
                if self.ckpt and self.dp.is_main:
                    self._save_checkpoint(elapsed)
                if state["bad_evals"] >= p.patience:
                    return "early_stopping", time.time() - t_start
                if out_of_time:
                    return "time_limit", time.time() - t_start
        return "steps", time.time() - t_start

    def _step(self, gen: torch.Generator) -> torch.Tensor:
        """One optimizer step on a random batch of windows; returns its per-codebook losses."""
        model, opt, device, step = self.model, self.opt, self.device, self.state["step"]
        for g in opt.param_groups:
            g["lr"] = _learning_rate(self.p, step)
        # the global batch, drawn alike on every rank; each trains on its rows
        idx = torch.randint(0, len(self.train), (self.p.batch_size,), generator=gen).tolist()
        codes, cond, attrs = (x[self.rows].to(device) for x in self.train.batch(idx, self.p.window_frames, gen))
        loss, per_cb = self.net(codes, cond, attrs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, w in zip(self.ema.parameters(), model.parameters()):
                    e.lerp_(w, 1.0 - self.p.ema_decay)
        self.state["step"] = step + 1
        return per_cb.cpu()

    def _validate(self, run_train: list[torch.Tensor], frames_done: int, elapsed: float) -> None:
        """Record the validation loss of the judged weights (the average, if kept) and keep them if they are the
        best so far."""
        p, state, n_codebooks = self.p, self.state, self.cfg.n_codebooks
        v = evaluate(self.judged, self.valid, p.window_frames, p.batch_size, p.eval_clips, self.device)
        tr = torch.tensor([self.dp.mean(float(x)) for x in torch.stack(run_train).mean(0)])  # the global batch's
        rec = {
            "step": state["step"],
            "train_loss": float(tr.mean()),
            "valid_loss": float(v.mean()),
            "tokens_per_s": frames_done * n_codebooks / max(elapsed, 1e-9),
            **{f"train_loss_cb{k}": float(tr[k]) for k in range(n_codebooks)},
            **{f"valid_loss_cb{k}": float(v[k]) for k in range(n_codebooks)},
        }
        state["history"].append(rec)
        self.say(
            f"step {rec['step']}/{p.steps} train {rec['train_loss']:.3f} valid {rec['valid_loss']:.3f} "
            f"({rec['tokens_per_s']:.0f} tokens/s)"
        )
        # The weights kept are the lowest validation loss's; patience counts the evaluations since the loss last
        # improved by min_delta, so a run stops on a plateau instead of creeping on by thousandths of a nat.
        if rec["valid_loss"] < state["best_valid"]:
            state["best_valid"] = rec["valid_loss"]
            self.best_state = {k: t.detach().clone() for k, t in self.judged.state_dict().items()}
        if rec["valid_loss"] < state["progress_valid"] - p.min_delta:
            state["progress_valid"], state["bad_evals"] = rec["valid_loss"], 0
        else:
            state["bad_evals"] += 1

    def _save_checkpoint(self, elapsed: float) -> None:
        from safetensors.torch import save_file

        ckpt, model, ema = self.ckpt, self.model, self.ema
        ckpt.mkdir(parents=True, exist_ok=True)
        save_file({k: t.contiguous() for k, t in model.state_dict().items()}, str(ckpt / "model.safetensors"))
        save_file(self.best_state, str(ckpt / "best.safetensors"))
        if ema is not None:
            save_file({k: t.contiguous() for k, t in ema.state_dict().items()}, str(ckpt / "ema.safetensors"))
        tensors, opt_meta = flatten_optimizer(self.opt)
        save_file(tensors, str(ckpt / "optimizer.safetensors"))
        (ckpt / "state.json").write_text(
            json.dumps(
                {
                    **self.state,
                    "train_seconds": self.state["train_seconds"] + elapsed,
                    "optimizer": opt_meta,
                    "target_steps": self.p.steps,
                }
            )
        )

    def export(self, codec, out_dir: str | None) -> Generator:
        """Save the best weights (else the average, else the live ones) with the codec (when `out_dir` is given);
        returns that model."""
        model = self.model
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        elif self.ema is not None:
            model.load_state_dict(self.ema.state_dict())
        model.eval()
        if out_dir is not None:
            save_generator(model.cpu(), codec, out_dir)
        return model


class _Loss(torch.nn.Module):
    """The generator's training loss as a module's forward (what DistributedDataParallel wraps)."""

    def __init__(self, model: Generator):
        super().__init__()
        self.model = model

    def forward(self, codes, cond, attrs):
        return self.model.loss(codes, cond, attrs)


def _write_training_outputs(
    metrics: dict, history: list[dict], metrics_path: str | None, plot_path: str | None
) -> None:
    """The metrics JSON and the loss curve (train and valid loss per evaluation)."""
    if metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text(json.dumps(metrics, indent=2))
    if plot_path:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        Path(plot_path).write_text(
            json.dumps(
                [{"step": r["step"], "train_loss": r["train_loss"], "valid_loss": r["valid_loss"]} for r in history],
                indent=1,
            )
        )
