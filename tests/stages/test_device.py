"""stages/device.py: which precision a setting resolves to on this machine and on a CPU whose
/proc/cpuinfo lacks bf16 (a cpuinfo file written here: the seam), and what autocast then runs."""

import platform
from pathlib import Path

import pytest
import torch

from stages import device as dev

CPU = torch.device("cpu")
ZEN4_FLAGS = "fpu vme de pse tsc msr avx2 avx512f avx512bw avx512_bf16 avx512_vnni"  # an AMD EPYC 9004
SKYLAKE_FLAGS = "fpu vme de pse tsc msr avx2 avx512f avx512bw avx512_vnni"  # AVX-512, no bf16


def _cpuinfo(tmp_path: Path, text: str, name: str = "cpuinfo") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    two_cores = f"processor\t: 0\nflags\t\t: {ZEN4_FLAGS}\n\nprocessor\t: 1\nflags\t\t: {ZEN4_FLAGS}\n"
    assert dev.native_bf16(CPU, _cpuinfo(tmp_path, two_cores))
    assert not dev.native_bf16(CPU, _cpuinfo(tmp_path, f"processor\t: 0\nflags\t\t: {SKYLAKE_FLAGS}\n"))
    assert dev.native_bf16(CPU, _cpuinfo(tmp_path, "flags\t: fpu amx_tile amx_bf16 amx_int8\n"))  # Sapphire Rapids AMX
    # aarch64 lists "Features"; bf16 there is the ARMv8.6 extension (Graviton3, Neoverse V1)
    assert dev.native_bf16(CPU, _cpuinfo(tmp_path, "Features\t: fp asimd sve bf16 i8mm\n"))
    assert not dev.native_bf16(CPU, _cpuinfo(tmp_path, "Features\t: fp asimd evtstrm aes crc32\n"))
    assert not dev.native_bf16(CPU, tmp_path / "absent")  # nothing readable: no


@pytest.mark.skipif(platform.machine() != "x86_64", reason="torch's own CPU check is x86-only")
def test_native_bf16_on_this_machine_agrees_with_torchs_own_cpu_check():
    torch_says = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert dev.native_bf16(CPU) == torch_says


def test_each_setting_resolves_on_a_cpu_with_and_without_bf16(tmp_path):
    with_bf16 = _cpuinfo(tmp_path, f"flags\t: {ZEN4_FLAGS}\n", "zen4")
    without = _cpuinfo(tmp_path, f"flags\t: {SKYLAKE_FLAGS}\n", "skylake")
    # fp32 is fp32 anywhere
    assert dev.resolve_precision("fp32", CPU, with_bf16) == ("fp32", "precision: fp32")
    # bf16 is bf16 anywhere; without the instructions it runs emulated and says it will be slower
    assert dev.resolve_precision("bf16", CPU, with_bf16) == ("bf16", "precision: bf16")
    precision, why = dev.resolve_precision("bf16", CPU, without)
    assert precision == "bf16" and "this CPU has no native bf16: emulated, slower than fp32" in why
    # auto: never bf16 without the instructions; with them, as AUTO_BF16_ON says for CPUs
    assert dev.resolve_precision("auto", CPU, without) == ("fp32", "precision: auto, this CPU has no native bf16")
    precision, why = dev.resolve_precision("auto", CPU, with_bf16)
    assert precision == ("bf16" if "cpu" in dev.AUTO_BF16_ON else "fp32")
    assert why.startswith("precision: auto, ")


def test_auto_on_this_machine_follows_its_flags_and_auto_bf16_on():
    precision, _ = dev.resolve_precision("auto", CPU)
    assert precision == ("bf16" if dev.native_bf16(CPU) and "cpu" in dev.AUTO_BF16_ON else "fp32")


def test_autocast_runs_matmuls_in_bf16_and_keeps_weights_and_outside_math_fp32():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with dev.autocast(CPU, "bf16"):
        inside = layer(x)
    assert inside.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with dev.autocast(CPU, "fp32"):
        assert layer(x).dtype == torch.float32
    loss = inside.float().pow(2).mean()
    loss.backward()
    assert layer.weight.grad.dtype == torch.float32  # the master weights' gradients stay fp32
