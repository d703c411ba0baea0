"""Generate more frames than a generator's context holds, in windows: each window continues the last half-context
of what came before (the prompt's tail, then the frames generated so far). A steering plan stays attached across
all windows, and its report's steps are numbered on from one window to the next.

    result = generate_long(generator, n_frames, batch_size=2, prompt=codes, plan=plan, seed=3, top_k=50)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from models.steering import steer


class WindowedGenerator(Protocol):
    """What `generate_long` needs of a generator; the builtin `Generator` and `MusicGenGenerator` both offer it
    (steering needs more: see `models.steering`)."""

    @property
    def context_frames(self) -> int:
        """Frames one `generate` call may hold, prompt included."""
        ...

    def generate(
        self,
        n_frames: int,
        prompt: torch.Tensor | None = None,
        condition=None,
        batch_size: int = 1,
        temperature=1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        cfg_scale: float = 1.0,
        seed: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """`n_frames` new frames after `prompt` [B, K, Tp]: [B, K, Tp + n_frames] un-delayed codes; `on_step(i)`
        after each decoding step."""
        ...


@dataclass
class LongGeneration:
    codes: torch.Tensor  # [B, K, n_frames] on the CPU: the new frames only, not the prompt
    steps: list[dict]  # the steering report's rows, steps counted from the first window ([] without a plan)
    windows: int


def generate_long(
    generator: WindowedGenerator,
    n_frames: int,
    *,
    batch_size: int,
    prompt: torch.Tensor | None = None,
    condition=None,
    cfg_scale: float = 1.0,
    seed: int = 0,
    plan=None,
    progress: Callable[[int, int], None] | None = None,
    **generate_kwargs,
) -> LongGeneration:
    """`n_frames` new frames for each of `batch_size` rows, continuing `prompt` [K, Tp] (the same for every row)
    when given. Window i is sampled with seed `seed + i`; `plan` (a `models.steering.SteeringPlan`) steers every
    window; `progress(done, n_frames)` follows each decoding step. Other keyword arguments (sampling settings, and the
    builtin generator's attributes, prompt_guidance, plausibility) go to every window's `generate` call."""
    limit = generator.context_frames
    keep = limit // 2
    history = prompt[None].expand(batch_size, -1, -1).clone() if prompt is not None else None
    if history is not None and history.shape[2] > keep:
        history = history[:, :, -keep:]
    new_frames, steps, done, window = [], [], 0, 0
    with steer(generator, plan) if plan is not None else nullcontext() as session:
        while done < n_frames:
            ctx = history[:, :, -keep:] if history is not None else None
            ctx_len = ctx.shape[2] if ctx is not None else 0
            n = min(n_frames - done, limit - ctx_len)
            # progress after every decoding step, so a caller can also stop a long window (raise from `progress`)
            on_step = (lambda i, done=done, n=n: progress(done + min(i + 1, n), n_frames)) if progress else None
            with torch.inference_mode():
                codes = generator.generate(
                    n,
                    prompt=ctx,
                    condition=condition,
                    batch_size=batch_size,
                    cfg_scale=cfg_scale,
                    seed=seed + window,
                    on_step=on_step,
                    **generate_kwargs,
                )
            fresh = codes[:, :, ctx_len:].cpu()  # a MusicGen on a GPU returns GPU codes; the prompt is on the CPU
            new_frames.append(fresh)
            history = fresh if history is None else torch.cat([history, fresh], dim=2)[:, :, -keep:]
            if session is not None:
                offset = steps[-1]["step"] + 1 if steps else 0
                steps += [{**s, "step": s["step"] + offset} for s in session.report().steps]
            done += n
            window += 1
            if progress:
                progress(done, n_frames)
    return LongGeneration(torch.cat(new_frames, dim=2), steps, window)
