"""MLflow bookkeeping: one parent run per pipeline run, a nested child run per stage.

Runs are created by the driver (so a stage that dies still has a run to mark FAILED); Ray
workers log metrics into their stage's run through `StageLogger`, which is the `log`
callable a stage receives.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit


def tracking_uri(configured: str | None, config_dir: Path) -> str:
    """MLFLOW_TRACKING_URI wins, then the config, then sqlite under mlruns/ beside the config."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if configured:
        return configured
    store = config_dir / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def ensure_experiment(uri: str, name: str) -> str:
    """Create the experiment in the driver before any worker or trial touches the store."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the cwd
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        return client.get_experiment_by_name(name).experiment_id


def start_run(uri: str, experiment_id: str, name: str, tags: dict, parent_id: str | None = None,
              params: dict | None = None) -> str:
    client = MlflowClient(uri)
    tags = {k: str(v) for k, v in tags.items()}
    if parent_id:
        tags[PARENT_TAG] = parent_id
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    if params:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run.info.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict, step: int | None = None) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if items:
        MlflowClient(uri).log_batch(run_id, metrics=items)


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(uri: str, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
    MlflowClient(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def log_artifact(uri: str, run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
    MlflowClient(uri).log_artifact(run_id, str(local_file), artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient(uri).log_text(run_id, text, artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(uri).set_terminated(run_id, status=status)


class StageLogger:
    """The `log(metrics, step=None)` callable a stage gets; picklable, so it crosses to Ray workers."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def __call__(self, metrics: dict, step: int | None = None) -> None:
        log_metrics(self.uri, self.run_id, metrics, step)


def git_commit(repo_dir: Path) -> str:
    """HEAD's commit, with '+dirty' when the work tree has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _param_value(value) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]  # MLflow's param value limit
