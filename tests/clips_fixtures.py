"""A tiny synthetic clips table for the models tests: tonal clips with and without a click-track 'drum kit'."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SR = 32000


def tonal(seconds: float, seed: int, drums: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 110 * 2 ** (rng.integers(0, 12) / 12)
    x = sum(0.3 * 0.5**h * np.sin(2 * np.pi * f0 * (h + 1) * t) for h in range(4))
    if drums:
        period = 60 / rng.uniform(90, 140) / 2
        for onset in np.arange(0, seconds, period):
            n = int(onset * SR)
            m = min(1600, len(x) - n)
            x[n : n + m] += 0.8 * rng.standard_normal(m) * np.exp(-np.arange(m) / 250)
    return (0.8 * x / np.abs(x).max()).astype(np.float32)


def write_clips_table(folder: Path, n_per_split=(8, 4, 4), seconds: float = 2.0, drop: tuple[str, ...] = ()) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.audio import encode_flac
    from core.clips_table import CLIPS_SCHEMA, shard_name

    rows = []
    for split, n in zip(("train", "valid", "test"), n_per_split):
        for i in range(n):
            drums = i % 2 == 0
            seed = hash((split, i)) % 10_000
            cap = "a tone" + (" with drums" if drums else "")
            rows.append(
                {
                    "clip_id": f"{split}-{i}",
                    "split": split,
                    "mix_id": f"{split}-{i // 2}",
                    "sample_rate": SR,
                    "audio": {"bytes": encode_flac(tonal(seconds, seed, drums), SR), "path": None},
                    "traits": [{"name": "drums", "present": drums}],
                    "caption": cap,
                    "tempo_bpm": 120.0,
                    "key": "C",
                    "mode": "major",
                }
            )
    schema = pa.schema([f for f in CLIPS_SCHEMA if f.name not in drop])
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in drop} for r in rows], schema=schema)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / shard_name(0, 1))
    return folder


def fake_embed(captions: list[str]):
    """Deterministic stand-in for the sentence model (keeps unit tests fast; the real one is tested once)."""
    import torch

    out = torch.zeros(len(captions), 384)
    for i, c in enumerate(captions):
        g = torch.Generator().manual_seed(sum(map(ord, c)))
        out[i] = torch.randn(384, generator=g)
    return out / out.norm(dim=1, keepdim=True)
