"""Where tensors live: pick the accelerator, its autocast dtype, and CPU thread settings."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    """Return CUDA device 0 when available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Return the mixed-precision dtype for `device`: bf16 on CUDA if supported, else fp16; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def configure_cpu(threads: int) -> None:
    """Set the intra-op thread count and flush denormals (denormal floats are very slow on CPUs)."""
    torch.set_num_threads(max(1, int(threads)))
    torch.set_flush_denormal(True)
