"""bench/gpu_check.py on a machine without CUDA: one line saying so, at once, and exit status 2
(where torch sees a GPU, the check itself runs: make gpu-check)."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.integration  # every test here runs a CLI subprocess, Ray or a server


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run in full")
def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "GPU-RESULTS.md"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"gpu_check: no CUDA device (torch {torch.__version__} sees none); nothing measured"]
    assert not out.exists()
