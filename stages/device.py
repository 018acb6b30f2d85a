"""Where tensors live and at what precision: CUDA with bf16 autocast when present, else CPU."""

import contextlib

import torch


def pick_device(setting: str = "auto") -> torch.device:
    """`auto` takes CUDA when it is there; `cuda` without a GPU is an error, not a silent CPU run."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but torch sees no CUDA device")
    if setting in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full fp32 on CPU (CPU bf16 matmuls are slower on most hosts)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
