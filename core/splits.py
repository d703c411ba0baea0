"""Train / valid / test assignment by hashing: deterministic, and the same for every row of one source."""

from __future__ import annotations

import hashlib


def assign_split(key: str, fractions: dict[str, float]) -> str:
    """Deterministic split from a hash of the source (or its group): all clips of a file share it."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    total = 0.0
    for name in ("train", "valid", "test"):
        total += float(fractions.get(name, 0.0))
        if u < total:
            return name
    return "train"
