"""Typed params.yaml section `probes` (every default is here): one probe set per trait, its data source and its
training knobs. Kept free of torch so that the registry can read the trait names cheaply."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from core.config import Section


class StemsSource(Section):
    """Rows of the clips table whose `traits` name the trait."""

    kind: Literal["stems"] = "stems"
    pairs_only: bool = True  # keep only (mix_id, clip_index) keys with both a with- and a without-rendering


class FoldersSource(Section):
    """Audio files under path/with/ and path/without/ (a file and its namesake in the other folder are a pair)."""

    kind: Literal["folders"]
    path: str
    sample_rate: int = Field(32000, gt=0)  # files are decoded (resampled) at this rate
    max_seconds: float | None = Field(30.0, gt=0)  # decode at most this much of each file (null: all of it)


class PredicateSource(Section):
    """Every clips-table row, labelled by an expression over its columns and traits."""

    kind: Literal["predicate"]
    expr: str  # e.g. 'mode == "minor"', 'tempo_bpm > 140 and drums'


TraitSource = StemsSource | FoldersSource | PredicateSource


class SplitFractions(Section):
    """Shares of the groups (mix_id / source hash) hashed into each split."""

    train: float = Field(0.6, gt=0)
    valid: float = Field(0.2, gt=0)  # head accuracies
    tune: float = Field(0.2, ge=0)  # sigma along each direction (0: computed on train + valid)


class ProbeTrainingParams(Section):
    """The training knobs of one trait's probe set: the `probes` section's, with the trait's overrides."""

    position: Literal["last", "mean"] = "last"  # head output at the last position (SMITIN) | mean over time
    window_seconds: float | None = Field(4.0, gt=0)  # tokens teacher-forced per clip from its start (null: all)
    direction: Literal["mass_mean", "probe"] = "mass_mean"  # mass-mean difference | logistic-regression weight
    C: float = Field(1.0, gt=0)  # logistic-regression inverse regularisation (on standardised activations)
    weight_power: float = Field(3.0, ge=0)  # SMITIN soft head weights ((acc - min) / (max - min)) ** p
    split_fractions: SplitFractions = Field(default_factory=SplitFractions)
    batch_size: int = Field(16, ge=1)  # clips per forward pass of the activation capture
    max_iter: int = Field(1000, ge=1)  # logistic-regression iterations
    max_train_pairs: int | None = Field(None, ge=1)  # keep this many training pairs / groups (null: all)
    max_clips: int | None = Field(None, ge=1)  # keep about this many clips in all, whole pairs (null: all)
    threads: int = Field(1, ge=1)  # torch intra-op threads
    seed: int = 0  # splits, subsets and the random control directions


class ProbeTrait(Section):
    """One entry of `probes.traits`: the trait's data source and any training knob to set for it alone
    (absent or null: the section's value)."""

    source: Annotated[TraitSource, Field(discriminator="kind")] = Field(default_factory=StemsSource)
    position: Literal["last", "mean"] | None = None
    window_seconds: float | None = Field(None, gt=0)
    direction: Literal["mass_mean", "probe"] | None = None
    C: float | None = Field(None, gt=0)
    weight_power: float | None = Field(None, ge=0)
    split_fractions: SplitFractions | None = None
    batch_size: int | None = Field(None, ge=1)
    max_iter: int | None = Field(None, ge=1)
    max_train_pairs: int | None = Field(None, ge=1)
    max_clips: int | None = Field(None, ge=1)
    seed: int | None = None

    @field_validator("source", mode="before")
    @classmethod
    def _source_shorthand(cls, value):
        if isinstance(value, str):  # `source: stems`
            return {"kind": value}
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": "stems", **value}
        return value

    def overrides(self) -> dict:
        return {k: v for k, v in self if k != "source" and v is not None}


class ProbesParams(ProbeTrainingParams):
    """params.yaml `probes` (every default is here): one probe set per trait (DVC stage train_probes)."""

    traits: dict[str, ProbeTrait] = Field(
        default_factory=lambda: {"drums": ProbeTrait(source=StemsSource(pairs_only=True))}
    )

    @field_validator("traits", mode="before")
    @classmethod
    def _empty_traits(cls, value):
        if value is None:
            return {}
        if isinstance(value, dict):  # `drums:` with nothing under it: the defaults
            return {k: {} if v is None else v for k, v in value.items()}
        return value
