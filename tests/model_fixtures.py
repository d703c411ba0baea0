"""Small real models for tests that need something the registry can serve and the generation code can load: a
debug generator with its codec, a probe set for it, a debug Coconet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def probe_set_for(generator, trait: str, best: float, seed: int, fingerprint: str | None = None):
    """A probe set for `generator`'s shape with random directions and accuracies up to `best`, saved by the
    real `models.probes` code (no training)."""
    from models.probes import ProbeSet, soft_weights

    L, H, D = generator.n_layers, generator.n_heads, generator.head_dim
    rng = np.random.default_rng(seed)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    acc = rng.uniform(best - 0.3, best, (L, H)).astype(np.float32)
    acc.flat[0] = best
    direction = unit(rng.standard_normal((L, H, D)))
    flat = np.sort(acc.reshape(-1))[::-1]
    return ProbeSet(
        trait=trait,
        generator_fingerprint=fingerprint or generator.fingerprint(),
        coef=(3.0 * direction).astype(np.float32),
        intercept=np.zeros((L, H), np.float32),
        direction=direction,
        sigma=rng.uniform(0.5, 2.0, (L, H)).astype(np.float32),
        accuracy=acc,
        weight=soft_weights(acc, 3.0),
        random_direction=unit(rng.standard_normal((L, H, D))),
        random_sigma=rng.uniform(0.5, 2.0, (L, H)).astype(np.float32),
        data_hash=f"d{seed}",
        params={"position": "last"},
        metrics={"best_acc": float(flat[0]), "mean_acc": float(flat.mean()), "top16_acc": float(flat[:16].mean())},
        created_at="2026-11-22T00:00:00Z",
    )


def debug_models(root: Path) -> dict[str, Path]:
    """Folders of a debug generator (+ codec), a drums probe set for it and a debug Coconet, as the stages save
    them."""
    from models.coconet import Coconet, CoconetConfig, save_coconet
    from models.codec import MelCodecConfig, MelRVQCodec
    from models.generator import Generator, GeneratorConfig, save_generator

    rng = np.random.default_rng(0)
    codec = MelRVQCodec.fit(
        [(rng.standard_normal(16000).astype(np.float32) * 0.1, 16000) for _ in range(3)], MelCodecConfig.debug()
    )
    torch.manual_seed(0)
    generator = Generator(GeneratorConfig.debug()).eval()
    save_generator(generator, codec, root / "generator")
    probe_set_for(generator, "drums", 0.85, 1).save(root / "probes-drums")
    torch.manual_seed(0)
    save_coconet(Coconet(CoconetConfig.preset("debug")).eval(), root / "coconet", {"metrics": {"valid_loss": 3.0}})
    return {"generator": root / "generator", "probes": root / "probes-drums", "coconet": root / "coconet"}
