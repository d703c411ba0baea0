"""Params of the trait-carrying evaluation (`smitin evaluate-carrying`, models.detectors.evaluate_trait_carrying):
held-out drum / drum-free prompts continued by the generator and judged by the independent drum detector."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from core.config import Section

Guidance = Annotated[float, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0)]


class EvaluateCarryingParams(Section):
    """params.yaml `evaluate_carrying` (every default is here)."""

    seed: int = 0
    split: Literal["train", "valid", "test"] = "test"  # token split the prompts come from
    prompt_seconds: float = Field(2.0, gt=0)
    continuation_seconds: float = Field(2.0, gt=0)  # generated after each prompt and judged (prompt excluded)
    prompts_per_class: int = Field(48, ge=1)  # drum / drum-free prompts each
    samples_per_prompt: int = Field(3, ge=1)  # continuations per prompt (seeds)
    # unconditional | caption; *_unguided: the same without prompt guidance or plausibility (the baseline)
    modes: list[Literal["unconditional", "caption", "unconditional_unguided", "caption_unguided"]] = Field(
        default_factory=lambda: ["unconditional", "unconditional_unguided", "caption"]
    )
    prompt_guidance: Guidance | list[Guidance] = Field(
        default_factory=lambda: [6.0, 1.0, 1.0, 1.0]
    )  # one scale (1: off) or one per codebook, coarse first (Generator.generate)
    prompt_plausibility: float = Field(0.003, ge=0, lt=1)  # with guidance: never sample a token below this x top's p
    temperature: Temperature | list[Temperature] = 1.0  # one, or one per codebook (0: greedy)
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(0.0, ge=0, le=1)  # 0: off
    cfg_scale: float = Field(3.0, ge=0)  # classifier-free guidance of the caption modes (1: off)
    detector_max_segments: int = Field(400, ge=1)  # segments per split the drum detector is fitted / tested on
    detector_token_noise: float = Field(0.06, ge=0, lt=1)  # share of tokens randomised in the detector's extra copies
    samples_per_class: int = Field(2, ge=0)  # WAVs written per mode and class with --samples
