"""Typed params.yaml sections of generation: `generator` (which generator probes, steering and `smitin generate` run
on) and `generate` (the defaults of `smitin generate` / `generation.generate`). Every default is here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from core.config import Section


class GeneratorParams(Section):
    """params.yaml `generator`."""

    backend: Literal["builtin", "musicgen"] = "builtin"  # builtin: the one train_generator makes
    path: str | None = None  # musicgen: the local folder of the weights
    device: str = Field("cpu", min_length=1)  # musicgen: cpu | cuda | cuda:0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # musicgen (half precision on a GPU)
    codec_path: str | None = None  # musicgen decoder-only checkpoints: an EnCodec save_pretrained folder
    allow_pickle_weights: bool = False  # musicgen: also load pytorch_model.bin (a pickle) without safetensors


class GeneratorChoice(GeneratorParams):
    """The `generator` section with a command's overrides applied (`models.backends.choose_backend`), plus the
    builtin generator's folder when the command named one (not a params key)."""

    builtin_dir: str | None = None


NonNegative = Annotated[float, Field(ge=0)]
AtLeastOne = Annotated[float, Field(ge=1)]


class GenerateSteeringParams(Section):
    """params.yaml `generate.steering`: how `smitin generate --steer` pushes."""

    every: int = Field(1, ge=1)  # smitin: push every s-th step
    add_every: int | None = Field(12, ge=1)  # smitin: push interval of an added trait (null: `every`)
    add_gain: float = Field(2.0, gt=0)  # smitin: an added trait's push is this many times its strength
    decay: float = Field(1.0, ge=0)  # push factor (1 - C / tau) ** decay below tau
    tau: float | None = None  # null: median(acc) - std(acc) of the probe set
    monitor_heads: int = Field(16, ge=1)  # heads whose trait probability the report follows
    iti_top_k: int = Field(16, ge=1)  # heads ITI steers (--mode iti)
    # the monitor trusts only sustained presence (models.steering.SustainedMonitor); 1, 0, 0: the paper's monitor
    smooth_steps: int = Field(1, ge=1)  # moving average of the monitored probability over about this many steps
    hold_steps: int = Field(60, ge=0)  # the trait must read present this many steps in a row before the push stops
    hold_floor: float = Field(0.25, ge=0, le=1)  # the push factor's floor until then
    remove_floor: float | None = Field(0.125, ge=0, le=1)  # the floor while removing a trait (null: hold_floor)
    # after a --continue prompt the monitor reads the generated audio's share of the heads' mix (models.steering)
    prompt_relative: bool = True


class GenerateParams(Section):
    """params.yaml `generate` (each value has a command-line flag)."""

    seed: int = 0
    duration: float = Field(8.0, gt=0)  # seconds of new audio; longer than the context is generated in windows
    max_duration: float = Field(600.0, gt=0)  # longer requests are refused with one line
    alias: str = Field("champion", min_length=1)  # alias of the probe sets (and of the generator unless given)
    cfg_scale: float = Field(3.0, ge=0)  # classifier-free guidance of a caption
    temperature: NonNegative | list[NonNegative] = 1.0  # one, or one per codebook (coarse first); 0: greedy
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(0.0, ge=0, le=1)  # 0: off
    prompt_guidance: AtLeastOne | list[AtLeastOne] = 1.0  # builtin generator: one scale, or one per codebook; 1: off
    prompt_plausibility: float = Field(0.003, ge=0, lt=1)  # with prompt guidance: the plausibility cut (0: off)
    steering: GenerateSteeringParams = Field(default_factory=GenerateSteeringParams)
