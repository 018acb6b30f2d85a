"""Where tensors live and at what precision.

`device: auto` takes CUDA when it is there. `precision: bf16` runs the forward passes under
torch's bf16 autocast: matmuls and attention in bf16; weights, gradients, optimizer state,
losses and scores stay fp32. `precision: auto` takes bf16 where the hardware executes it
natively and the measured quality allows (AUTO_BF16_ON), fp32 elsewhere: on a CPU without bf16
instructions torch emulates bf16 matmuls, slower than fp32 ones.
"""

import contextlib
import re
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")  # where a Linux CPU lists its instruction-set flags
# x86: AVX512-BF16 or AMX-BF16 (Zen 4, Cooper Lake, Sapphire Rapids on); aarch64: the BF16 extension.
CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
# Where `auto` takes bf16 when the hardware has it. CPU: make run's recipe at its full budget, 3 seeds,
# scored the same in bf16 as in fp32 within the bar set for it (docs/results.md, "Precision").
AUTO_BF16_ON = ("cuda", "cpu")


def pick_device(setting: str = "auto") -> torch.device:
    """`auto` takes CUDA when it is there; `cuda` without a GPU is an error, not a silent CPU run."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but torch sees no CUDA device")
    if setting in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def native_bf16(device: torch.device, cpuinfo: Path | None = None) -> bool:
    """Whether `device` executes bf16 matmuls in hardware: CUDA asks torch; a CPU reads its
    flags from `cpuinfo` (default /proc/cpuinfo; none readable: no)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        text = (cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            flags.update(re.split(r"\s+", value.strip().lower()))
    return bool(flags & CPU_BF16_FLAGS)


def resolve_precision(setting: str, device: torch.device, cpuinfo: Path | None = None) -> tuple[str, str]:
    """(precision, why): "bf16" or "fp32" for `setting` auto | fp32 | bf16 on `device`, and a
    few words saying why, for the stage's log line."""
    where = "CUDA" if device.type == "cuda" else "this CPU"
    if setting == "fp32":
        return "fp32", "precision: fp32"
    native = native_bf16(device, cpuinfo)
    if setting == "bf16":
        if native:
            return "bf16", "precision: bf16"
        return "bf16", f"precision: bf16, but {where} has no native bf16: emulated, slower than fp32"
    if native and device.type in AUTO_BF16_ON:
        return "bf16", f"precision: auto, {where} executes bf16 natively"
    if native:
        return "fp32", (f"precision: auto, fp32 ({where} has native bf16, but auto takes it on "
                        f"{' and '.join(AUTO_BF16_ON)} only: docs/results.md, Precision)")
    return "fp32", f"precision: auto, {where} has no native bf16"


def pick_precision(setting: str, device: torch.device, stage: str) -> str:
    """resolve_precision's choice, said on the stage's log: e.g. "finetune: precision: auto, this
    CPU has no native bf16"."""
    precision, why = resolve_precision(setting, device)
    print(f"{stage}: {why}", flush=True)
    return precision


def autocast(device: torch.device, precision: str = "fp32"):
    """bf16 autocast for precision "bf16" (on CUDA or CPU); nothing (full fp32) for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
