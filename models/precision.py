"""Which numeric precision runs fast on this hardware (shared by the Coconet and codec-decoder training)."""

from __future__ import annotations

import torch


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """bfloat16 convolutions run natively: a CUDA device with bf16 support, or a CPU with AMX (Sapphire Rapids and
    later), where oneDNN runs them several times faster than float32. Elsewhere they are emulated and slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags
