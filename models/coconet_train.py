"""Training Coconet as an orderless NADE: the pure function behind the DVC stage `train_coconet`.

Each step takes random crops of training pieces (optionally transposed), masks a uniformly sized random subset
of their (voice, frame) cells, and minimises the rescaled cross-entropy of the masked cells (models.coconet).
Validation uses fixed crops and fixed masks, so its loss is comparable from one evaluation to the next; the best
weights (of the exponential moving average, when on) are kept. Resumable from a checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from core.config import Section
from models.coconet import (
    Coconet,
    CoconetConfig,
    CoconetError,
    orderless_loss,
    orderless_mask,
    roll_to_classes,
    save_coconet,
)
from models.distributed import DataParallel, threads_per_rank
from models.optimizer_state import flatten_optimizer, unflatten_optimizer

log = logging.getLogger(__name__)


class TrainCoconetParams(Section):
    """params.yaml `train_coconet` (every default is here)."""

    seed: int = 0
    preset: Literal["demo", "cpu", "gpu", "debug"] = "demo"
    model: dict = Field(default_factory=dict)  # overrides of the preset's architecture (CoconetConfig fields)
    crop_frames: int = Field(64, ge=8)  # training crops: 4 bars of 4/4 in 16ths
    batch_size: int = Field(24, ge=1)
    steps: int = Field(2000, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(200, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)  # 0: no weight average
    transpose: int = Field(3, ge=0)  # random transposition of each crop by up to +-this many semitones
    rescale_loss: bool = True  # the paper's 1/k weighting of each example's masked cells
    eval_every: int = Field(250, ge=1)
    patience: int = Field(8, ge=1)  # evaluations without improvement before early stopping
    max_minutes: float = Field(30.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile the training step's network: batch norm, ReLU and the residual adds fused into the
    # convolutions' neighbours (benchmarks/coconet.py measures the gain); needs a C++ compiler, costs seconds once
    compile: bool = False
    threads: int = Field(2, ge=1)
    presets: dict[str, dict] = Field(  # per preset: overrides of the keys above
        default_factory=lambda: {
            "demo": {
                "steps": 250,
                "lr": 0.008,
                "warmup": 30,
                "max_minutes": 2,
                "ema_decay": 0.98,
                "eval_every": 100,
                "transpose": 0,
            },
            "cpu": {
                "steps": 4000,
                "max_minutes": 30,
                "lr": 8e-3,
                "ema_decay": 0.998,
                "eval_every": 200,
                "patience": 20,
                "compile": True,
            },
            "gpu": {"steps": 60000, "batch_size": 32, "max_minutes": 240, "eval_every": 1000, "compile": True},
            "debug": {"steps": 20, "batch_size": 4, "eval_every": 10, "max_minutes": 1, "ema_decay": 0.0},
        }
    )

    def resolved(self) -> TrainCoconetParams:
        """These params with the chosen preset's overrides applied."""
        over = dict(self.presets.get(self.preset) or {})
        if "presets" in over or "preset" in over:
            raise CoconetError("train_coconet.presets entries cannot set preset or presets")
        return self.with_overrides(over, f"train_coconet.presets.{self.preset}") if over else self

    def config(self, n_voices: int = 4) -> CoconetConfig:
        return CoconetConfig.preset(self.preset, n_voices=n_voices, **self.model)


# ----------------------------------------------------------------------------------------------------- data
class RollSet:
    """Pieces of one split as class-index rolls [V, T], with random or fixed crops."""

    def __init__(self, rolls: list[np.ndarray], cfg: CoconetConfig, names: list[str] | None = None):
        if not rolls:
            raise CoconetError("no pieces to train or validate on")
        self.cfg = cfg
        self.rolls = [np.asarray(r, dtype=np.int64) for r in rolls]
        self.classes = [roll_to_classes(r, cfg) for r in self.rolls]
        self.names = names or [str(i) for i in range(len(rolls))]

    def __len__(self) -> int:
        return len(self.rolls)

    @property
    def frames(self) -> int:
        return sum(r.shape[1] for r in self.rolls)

    def _crop(self, i: int, start: int, length: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
        roll = self.rolls[i][:, start : start + length]
        roll = np.where(roll >= 0, roll + shift, roll)
        out = np.full((self.cfg.n_voices, length), self.cfg.silent_class, np.int64)
        out[:, : roll.shape[1]] = roll_to_classes(roll, self.cfg)
        valid = np.zeros((self.cfg.n_voices, length), bool)
        valid[:, : roll.shape[1]] = True
        return out, valid

    def random_batch(self, batch: int, length: int, transpose: int, rng: np.random.Generator):
        """(classes [B, V, L], valid [B, V, L]): random pieces, random crops, random transpositions that keep every
        pitch in range (a piece shorter than L is padded; padding is never masked or scored)."""
        cs, vs = [], []
        for i in rng.integers(0, len(self), batch):
            T = self.rolls[i].shape[1]
            start = int(rng.integers(0, max(1, T - length + 1)))
            shift = 0
            if transpose:
                seg = self.rolls[i][:, start : start + length]
                sounding = seg[seg >= 0]
                lo = max(-transpose, self.cfg.min_pitch - int(sounding.min())) if sounding.size else -transpose
                hi = min(transpose, self.cfg.max_pitch - int(sounding.max())) if sounding.size else transpose
                shift = int(rng.integers(lo, hi + 1)) if hi >= lo else 0
            c, v = self._crop(i, start, length, shift)
            cs.append(c)
            vs.append(v)
        return torch.from_numpy(np.stack(cs)), torch.from_numpy(np.stack(vs))

    def fixed_batches(self, length: int, batch: int, seed: int):
        """Every piece cut into consecutive crops of L frames, each with a mask drawn from a fixed seed: the same
        cells are scored at every evaluation."""
        crops = [(i, s) for i, r in enumerate(self.rolls) for s in range(0, max(1, r.shape[1] - length // 2), length)]
        gen = torch.Generator().manual_seed(seed)
        for k in range(0, len(crops), batch):
            parts = [self._crop(i, s, length, 0) for i, s in crops[k : k + batch]]
            c = torch.from_numpy(np.stack([p[0] for p in parts]))
            v = torch.from_numpy(np.stack([p[1] for p in parts]))
            yield c, v, orderless_mask(v, gen)


@torch.no_grad()
def validation_loss(model: Coconet, data: RollSet, length: int, batch: int, seed: int, rescale: bool = True) -> float:
    """Rescaled masked-cell cross-entropy (nats per cell) over fixed crops and masks, weighted by crop."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for c, v, m in data.fixed_batches(length, batch, seed):
        total += float(orderless_loss(model(c, m), c, m, rescale=rescale, valid=v)) * len(c)
        n += len(c)
    model.train(was_training)
    return total / max(n, 1)


# ----------------------------------------------------------------------------------------------------- training
def data_hash(rolls: dict[str, list[np.ndarray]]) -> str:
    h = hashlib.sha256()
    for split in sorted(rolls):
        for r in rolls[split]:
            a = np.ascontiguousarray(np.asarray(r, dtype=np.int16))
            h.update(f"{split}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _identity(p: TrainCoconetParams, cfg: CoconetConfig, data: str) -> str:
    """What a checkpoint must share with this run to be resumed (steps and time budget may change)."""
    schedule = p.model_dump(exclude={"steps", "max_minutes", "threads", "compile", "eval_every", "patience", "presets"})
    return hashlib.sha256(json.dumps([schedule, asdict(cfg), data], sort_keys=True).encode()).hexdigest()


def _make_optimizer(model: Coconet, p: TrainCoconetParams):
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / max(1, p.warmup), total_iters=max(1, p.warmup))
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, p.steps - p.warmup), eta_min=0.05 * p.lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[max(1, p.warmup)])
    return opt, sched


# share of the time budget the projected steps may fill: validation passes and the last save take the rest
TIME_FIT_MARGIN = 0.93


def fit_horizon_to_time(
    sched, state: dict, p: TrainCoconetParams, elapsed: float, say, dp=None, first_step: float = 0.0
) -> None:
    """At the end of warm-up, project how many steps fit in `max_minutes` at the speed seen so far; if fewer than
    `steps`, anneal the learning rate to that step instead. A run cut by the clock mid-schedule stops with its
    learning rate still high and its loss well above what the same steps reach once annealed. `first_step`: the
    seconds this session's first step took (compiling, choosing kernels), spent once and not projected. Under data
    parallelism rank 0's projection holds for all."""
    spent = state["train_seconds"] + elapsed
    if first_step and state["step"] > 1:
        per_step = (spent - first_step) / (state["step"] - 1)
    else:
        per_step = spent / max(1, state["step"])
    per_step = max(per_step, 1e-9)
    budget = p.max_minutes * 60 * TIME_FIT_MARGIN - spent
    fits = state["step"] + int(budget / per_step)
    if dp is not None:
        fits = dp.from_main(fits)
    if fits >= p.steps:
        return
    horizon = max(state["step"] + 1, fits)
    decay = sched._schedulers[-1]  # the cosine phase starts now: its length can still change
    decay.T_max = max(1, horizon - max(1, p.warmup))
    state["horizon"] = horizon
    say(
        f"{p.steps} steps would take {per_step * p.steps / 60:.0f} min at {per_step:.2f} s a step: the learning "
        f"rate anneals over {horizon} steps to fit {p.max_minutes:g} min"
    )


def train_coconet(
    train_rolls: list[np.ndarray],
    valid_rolls: list[np.ndarray],
    out_dir: str | Path,
    params: TrainCoconetParams,
    checkpoint_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    resume: bool = True,
    progress: Callable[[str], None] | None = None,
    extra_meta: dict | None = None,
) -> dict:
    """Train on `train_rolls` ([4, T] MIDI pitch arrays), keep the weights with the best validation loss, write
    the model to `out_dir` and the metrics / loss curve. Returns the metrics."""
    from safetensors.torch import load_file, save_file
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    dp = DataParallel.from_env()
    say = (progress or log.info) if dp.is_main else (lambda _msg: None)
    p = params.resolved()
    rows = dp.rows(p.batch_size)
    torch.manual_seed(p.seed)
    torch.set_num_threads(threads_per_rank(p.threads))
    cfg = p.config()
    train, valid = RollSet(train_rolls, cfg), RollSet(valid_rolls, cfg)
    model = Coconet(cfg).use_precision(p.precision)
    net = dp.wrap(model)  # what the loss is computed through: DDP averages the ranks' gradients
    if p.compile:
        net = torch.compile(net)  # training only: validation runs the plain module in eval mode
    precision = "bf16" if model.autocast_dtype is not None else "fp32"
    opt, sched = _make_optimizer(model, p)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(p.ema_decay), use_buffers=True)
        if p.ema_decay > 0
        else None
    )
    dhash = data_hash({"train": train.rolls, "valid": valid.rolls})
    state = {
        "step": 0,
        "best_valid": float("inf"),
        "best_step": 0,
        "bad_evals": 0,
        "history": [],
        "train_seconds": 0.0,
        "run": _identity(p, cfg, dhash),
        "horizon": None,  # the step the learning rate anneals to when `steps` do not fit the time budget
    }
    best_state = None
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt and resume and (ckpt / "state.json").is_file():
        saved = json.loads((ckpt / "state.json").read_text())
        if saved.get("run") == state["run"]:
            model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            unflatten_optimizer(opt, load_file(str(ckpt / "optimizer.safetensors")), saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            best_state = load_file(str(ckpt / "best.safetensors"))
            if ema is not None:
                ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
            state = {k: saved.get(k, state[k]) for k in state}
            say(f"resumed from {ckpt} at step {state['step']}")
        else:
            say(f"checkpoint in {ckpt} is from another run (params, model or data differ): starting afresh")
    rng = np.random.default_rng([p.seed, state["step"]])
    mask_gen = torch.Generator().manual_seed(p.seed * 1_000_003 + state["step"])
    say(
        f"coconet {p.preset}: {cfg.n_layers} layers x {cfg.filters} filters, {model.num_params() / 1e6:.2f}M params, "
        f"{precision}; {len(train)} train pieces ({train.frames} frames), {len(valid)} valid"
        + (f"; {dp.world} processes, {p.batch_size // dp.world} crops each" if dp.world > 1 else "")
    )

    model.train()
    t0, seen, running = time.time(), 0, []
    first_step = None  # seconds of this session's first step
    stop = "steps"
    horizon = lambda: state["horizon"] or p.steps  # noqa: E731
    while state["step"] < horizon():
        # the global batch, drawn alike on every rank; each trains on its rows
        classes, valid_cells = train.random_batch(p.batch_size, p.crop_frames, p.transpose, rng)
        mask = orderless_mask(valid_cells, mask_gen)
        classes, valid_cells, mask = classes[rows], valid_cells[rows], mask[rows]
        loss = orderless_loss(net(classes, mask), classes, mask, rescale=p.rescale_loss, valid=valid_cells)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        running.append(float(loss.detach()))  # this rank's rows; averaged over ranks when reported
        seen += p.batch_size * p.crop_frames
        state["step"] += 1
        elapsed = time.time() - t0
        if first_step is None:
            first_step = elapsed
        if state["step"] == max(1, p.warmup) and state["horizon"] is None:
            fit_horizon_to_time(sched, state, p, elapsed, say, dp, first_step=first_step)
        out_of_time = (state["train_seconds"] + elapsed) / 60 >= p.max_minutes
        if dp.world > 1:
            out_of_time = dp.any(out_of_time)  # the ranks' clocks differ; they must stop at the same step
        if state["step"] % p.eval_every == 0 or state["step"] == horizon() or out_of_time:
            # the live weights and their average are both judged; the better one is kept (early in a run the
            # average still remembers the first steps, late in it the average is usually ahead)
            v_live = validation_loss(model, valid, p.crop_frames, 64, p.seed, p.rescale_loss)
            v_avg = (
                validation_loss(ema.module, valid, p.crop_frames, 64, p.seed, p.rescale_loss)
                if ema is not None
                else float("inf")
            )
            judged = ema.module if v_avg < v_live else model
            v = min(v_live, v_avg)
            rec = {
                "step": state["step"],
                "train_loss": dp.mean(float(np.mean(running))),  # over the global batch
                "valid_loss": v,
                "valid_loss_live": v_live,
                **({"valid_loss_average": v_avg} if ema is not None else {}),
                "lr": opt.param_groups[0]["lr"],
                "frames_per_s": seen / max(elapsed, 1e-9),
                "minutes": round((state["train_seconds"] + elapsed) / 60, 2),
            }
            running = []
            state["history"].append(rec)
            say(
                f"step {rec['step']}/{horizon()} train {rec['train_loss']:.4f} valid {v_live:.4f}"
                + (f" (average {v_avg:.4f})" if ema is not None else "")
                + " nats/cell "
                f"({rec['frames_per_s']:.0f} frames/s, {rec['minutes']:.1f} min)"
            )
            if v < state["best_valid"] - 1e-4:
                state.update(best_valid=v, best_step=state["step"], bad_evals=0)
                best_state = {k: t.detach().clone().contiguous() for k, t in judged.state_dict().items()}
            else:
                state["bad_evals"] += 1
            if ckpt and dp.is_main:
                _save_checkpoint(ckpt, model, opt, sched, ema, best_state, state, elapsed, save_file, flatten_optimizer)
            if state["bad_evals"] >= p.patience:
                stop = "early_stopping"
                break
            if out_of_time:
                stop = "time_limit"
                break
    train_seconds = state["train_seconds"] + time.time() - t0
    final = Coconet(cfg)
    final.load_state_dict(best_state if best_state is not None else model.state_dict())
    final.eval()
    metrics = {
        "steps": state["step"],
        "stop_reason": stop,
        "lr_horizon": horizon(),
        "best_step": state["best_step"],
        "valid_loss": state["best_valid"],
        "params": final.num_params(),
        "precision": precision,
        "train_seconds": round(train_seconds, 1),
        "train_pieces": len(train),
        "train_frames": train.frames,
        "frames_per_s": round(float(np.mean([r["frames_per_s"] for r in state["history"]])), 1),
        "preset": p.preset,
        "fingerprint": final.fingerprint(),
    }
    if dp.world > 1:
        metrics["processes"] = dp.world
    if not dp.is_main:
        dp.barrier()  # rank 0 writes the outputs
        return metrics
    save_coconet(
        final,
        out_dir,
        {
            "metrics": metrics,
            "data_hash": dhash,
            "train_params": p.model_dump(exclude={"presets"}),
            **(extra_meta or {}),
        },
    )
    if metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text(json.dumps(metrics, indent=2) + "\n")
    if plot_path:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        Path(plot_path).write_text(
            json.dumps([{k: r[k] for k in ("step", "train_loss", "valid_loss")} for r in state["history"]], indent=1)
            + "\n"
        )
    dp.barrier()
    return metrics


def _save_checkpoint(
    ckpt: Path, model, opt, sched, ema, best_state, state: dict, elapsed: float, save_file, flatten
) -> None:
    """Model, optimizer, average and best weights as safetensors, counters as JSON; the JSON is written last and
    atomically, so a crash mid-save leaves the previous checkpoint's JSON naming files that may be newer but are
    complete (each is renamed into place)."""
    ckpt.mkdir(parents=True, exist_ok=True)

    def put(tensors: dict, name: str) -> None:
        tmp = ckpt / f".{name}.tmp"
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp))
        tmp.replace(ckpt / name)

    put(model.state_dict(), "model.safetensors")
    put(best_state or model.state_dict(), "best.safetensors")
    if ema is not None:
        put(ema.state_dict(), "ema.safetensors")
    tensors, opt_meta = flatten(opt)
    put(tensors, "optimizer.safetensors")
    doc = {
        **state,
        "train_seconds": state["train_seconds"] + elapsed,
        "optimizer": opt_meta,
        "scheduler": sched.state_dict(),
    }
    tmp = ckpt / ".state.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(ckpt / "state.json")
