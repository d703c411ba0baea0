"""Typed sections of params.yaml: one pydantic model per section, validated once when read.

Defaults live on the model's fields, nowhere else. An unknown key, a wrong type or a value out of range is one
line naming the key (`params.yaml: train_coconet.batch_size: Input should be a valid integer`), never a silent
fallback."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import UserError

S = TypeVar("S", bound="Section")


class Section(BaseModel):
    """Base of every params section: unknown keys are errors; instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls: type[S], data: dict | None, where: str) -> S:
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
            raise UserError(f"{where}.{key}: {err['msg']}{more}") from None

    def with_overrides(self: S, overrides: dict, where: str) -> S:
        return type(self).parse({**self.model_dump(), **overrides}, where)


def read_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of sections")
    return data


def load_section(cls: type[S], path: str | Path, name: str) -> S:
    """Section `name` of the params file as `cls`; the top-level `seed` is passed in when the model has one."""
    params = read_params(path)
    section = dict(params.get(name) or {})
    if "seed" in cls.model_fields and "seed" not in section and "seed" in params:
        section["seed"] = params["seed"]
    return cls.parse(section, f"{path}: {name}")
