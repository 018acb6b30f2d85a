"""What every benchmark section shares: the config, prepared data, the machine, timers, RSS.

Nothing here downloads: the weights are the packaged all-MiniLM-L6-v2 folder, the data the
CS224N files the config points at (`../shared/data/cs224n` beside the checkout).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.prepare import packaged_model_dir, resolve_paths  # noqa: E402
from pipeline.config import PipelineConfig, apply_overrides, load_config  # noqa: E402


def base_config(overrides: dict | None = None) -> PipelineConfig:
    """pipeline.yaml as shipped (absolute data and model folders, CPU), plus overrides."""
    cfg = load_config(REPO / "pipeline.yaml")
    cfg = apply_overrides(cfg, {"device": "cpu", **(overrides or {})})
    return resolve_paths(cfg, REPO)


@dataclass
class Context:
    """Per suite run: the scratch folder, quick or full sizes, prepared-data cache, threads."""
    work: Path
    quick: bool
    threads: int
    _prepared: dict = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return Path(packaged_model_dir())

    def prepared(self, max_rows: int | None = None, max_length: int = 128) -> Path:
        """data_prep's output for these sizes (real CS224N files, MiniLM tokenizer), made once."""
        key = (max_rows, max_length)
        if key not in self._prepared:
            from stages import data_prep

            out = self.work / f"data_prep-{max_rows or 'all'}-{max_length}"
            cfg = base_config({"data.max_rows": max_rows, "data.max_length": max_length})
            data_prep.run(cfg, {}, out, lambda *a, **k: None)
            self._prepared[key] = out
        return self._prepared[key]

    def train_only(self, prepared: Path) -> Path:
        """A view of a data_prep folder that lists only its train splits: finetune then skips
        the per-epoch dev evaluation, so its time is training (plus model load and save)."""
        view = prepared.with_name(prepared.name + "-train-only")
        if not view.exists():
            view.mkdir()
            manifest = json.loads((prepared / "manifest.json").read_text())
            manifest["splits"] = {k: v for k, v in manifest["splits"].items() if k.endswith("-train")}
            for entry in manifest["splits"].values():
                (view / entry["file"]).symlink_to(prepared / entry["file"])
            (view / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return view


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def busy_warning(threads: int, load: str | None = None) -> str | None:
    """A warning when other work already keeps the cores busy: torch's threads then wait on each
    other (on 2 cores with a 2-thread job beside it, one training step took 8x longer)."""
    try:
        one_minute = float((load or loadavg()).split()[0])
    except (ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    if one_minute + threads <= cores + 0.5:
        return None
    return (f"the machine is busy (load average {one_minute:.1f} on {cores} cores, plus {threads} torch "
            f"threads here): absolute numbers are slower and noisier than on a quiet machine; ratios hold "
            f"better because the sides are interleaved; with more threads than free cores try --threads 1")


def machine(threads: int) -> dict:
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = "not installed"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "transformers": tf_version, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run)"}


# ---------------------------------------------------------------- timing and memory


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def matmul_peak_gflops(threads: int, n: int = 2048, repeats: int = 5, dtype: str = "fp32") -> float:
    """This machine's matmul rate in `dtype` (fp32 or bf16): the best of `repeats` torch.mm of two
    n x n matrices."""
    import torch

    torch.set_num_threads(threads)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
    torch.mm(a, b)  # warm-up (allocations, thread pool)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kib(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Measured:
    returncode: int
    seconds: float
    stdout: str
    peak_rss_mib: float  # the largest peak RSS (VmHWM) of any one process of the tree
    peak_tree_rss_mib: float  # the largest sum of the tree's current RSS seen at one sample


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path = REPO, timeout: float | None = None,
                 echo: bool = False) -> Measured:
    """Runs a command, samples the RSS of it and all its descendants (Ray workers too) every
    0.25 s from /proc, and returns wall time, output and peaks."""
    full_env = dict(os.environ) if env is None else env
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak = {"one": 0, "tree": 0}
    lines: list[str] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = _descendants(proc.pid)
            peak["one"] = max([peak["one"], *(_status_kib(p, "VmHWM") for p in pids)])
            peak["tree"] = max(peak["tree"], sum(_status_kib(p, "VmRSS") for p in pids))
            done.wait(0.25)

    def read():
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write("    | " + line)

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read, daemon=True)]
    for t in threads:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    seconds = time.perf_counter() - start
    done.set()
    for t in threads:
        t.join(timeout=5)
    return Measured(proc.returncode, seconds, "".join(lines), peak["one"] / 1024, peak["tree"] / 1024)


def clean_env(tmp: Path) -> dict:
    """Environment for a pipeline subprocess: its own MLflow store, a local Ray, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO),
                "PYTHONUNBUFFERED": "1"})
    return env


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
