"""Read a stage's section of params.yaml: `core.config.load_params` under the name the pipelines have used."""

from core.config import load_params

__all__ = ["load_params"]
