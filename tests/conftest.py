"""Shared test fixtures: a tiny random-weight BERT folder and the path to the CS224N data."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "cs224n"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A HuggingFace-format BERT folder: width 32, 2 layers, random weights, the real vocab."""
    from stages.tiny_bert import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"CS224N data not found at {SHARED_DATA}")
    return SHARED_DATA


def pipeline_env(**extra) -> dict:
    """The environment the CLI tests run `python -m pipeline` in: this checkout, no tracking URI
    or Ray address leaking in from the shell, a short private Ray temp dir (Ray's socket paths
    have a length limit); extra variables on top."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env.update(extra)
    return env


def run_pipeline(work: Path, *args: str, timeout: int = 600, **extra_env):
    """Run `python -m pipeline ARGS...` in `work` to the end; its output is printed for pytest."""
    env = pipeline_env(**extra_env)
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def write_experiment(folder: Path, experiment: str, extra: str = "", data_dir: Path = SHARED_DATA,
                     stages: str = "  finetune: {num_cpus: 1}\n  evaluate: {num_cpus: 1}\n", data: str = "") -> Path:
    """`folder/exp.yaml` for a CLI test: the shared data (its two bad Quora rows dropped), stages
    on one CPU each (so two fit on this machine), its own MLflow experiment; `extra` YAML appended
    (top-level sections, or more `tracking:` keys indented two spaces); `data`, more `data:` keys
    (indented two spaces)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "exp.yaml"
    path.write_text(f"# {experiment}: a test's config\n"
                    f"data:\n  dir: {data_dir}\n  on_bad_rows: drop\n{data}"
                    f"stages:\n{stages}"
                    f"tracking:\n  experiment: {experiment}\n{extra}")
    return path


def local_store(work: Path) -> str:
    """The MLflow store a run in `work` logs to by default."""
    return f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"


def mlflow_runs(store: str | Path, experiment: str):
    """(client, every run of the experiment oldest first); `store` is a tracking URI or a workdir."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store if isinstance(store, str) else local_store(store))
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} at {client.tracking_uri}"
    return client, client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000)


def children_of(runs, parent) -> dict:
    """{stage tag: run} of the runs directly under `parent`."""
    return {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, shared_data_dir):
    """(workdir, the finished process) of one `run --smoke` (MLflow experiment `e2e`, mlm_pretrain
    on): tests/pipeline/test_cli.py checks the run, test_predict.py predicts with its model."""
    work = tmp_path_factory.mktemp("e2e")
    write_experiment(work, "e2e", data_dir=shared_data_dir, stages="  mlm_pretrain: {enabled: true, num_cpus: 1}\n"
                     "  finetune: {num_cpus: 1}\n  evaluate: {num_cpus: 1}\n")
    proc = run_pipeline(work, "run", "exp.yaml", "--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 in its own process group (its workers are child
    processes: `kill` ends the whole group): sqlite backend, artifacts proxied over HTTP to a
    folder under `root`. `start` again after `kill` brings it back on the same port and store."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
            start_new_session=True)
        log.close()
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.kill()
                    pytest.fail(f"mlflow server did not come up: {(self.root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
