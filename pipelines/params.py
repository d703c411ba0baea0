"""Read a stage's section of params.yaml (every tunable number lives there, grouped by stage)."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.errors import PipelineUserError


def load_params(path: str | Path = "params.yaml", section: str | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise PipelineUserError(f"params file not found: {path}")
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if section is None:
        return params
    if section not in params:
        raise PipelineUserError(f"{path} has no section {section!r}")
    merged = dict(params[section] or {})
    merged.setdefault("seed", params.get("seed", 0))
    return merged
