"""MLflow bookkeeping: one parent run per pipeline run, a nested child run per stage.

Runs are created by the driver (so a stage that dies still has a run to mark FAILED); Ray
workers log metrics into their stage's run through `StageLogger`, which is the `log`
callable a stage receives.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Against a tracking server MLflow prints "View run ... at URL" for every run it ends (each
# stage, variant and trial): the command's own summary names the parent run instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

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
    return local_uri(config_dir)


def check_reachable(uri: str, timeout: float = 5.0) -> str | None:
    """None when the tracking store answers; else why not. Only HTTP(S) servers are probed
    (one short request, no retries): a sqlite or file store is local and created on use."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: a server that is up (the health route may need auth)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason


def local_uri(config_dir: Path) -> str:
    """The sqlite store beside the config: the default, and the fallback for an unreachable server."""
    store = config_dir / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def next_attempt(uri: str, run_id: str) -> int:
    """Count one more attempt at the stage whose run this is (tag `attempt`: 1, 2, ...); Ray
    re-runs a task whose worker died, and the retry finds the previous attempt's tag."""
    previous = MlflowClient(uri).get_run(run_id).data.tags.get("attempt", "0")
    attempt = int(previous) + 1 if previous.isdigit() else 1
    set_tags(uri, run_id, {"attempt": attempt})
    return attempt


def ensure_experiment(uri: str, name: str) -> str:
    """Create the experiment in the driver before any worker or trial touches the store."""
    if uri.startswith("sqlite:///"):
        # Two runs starting at once on a new sqlite store would both create its tables (MLflow
        # runs its schema migrations on first use, which collide); one at a time.
        import fcntl

        lock_path = Path(uri[len("sqlite:///"):]).with_suffix(".init-lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return _ensure_experiment(uri, name)
    return _ensure_experiment(uri, name)


def _ensure_experiment(uri: str, name: str) -> str:
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


def log_params(uri: str, run_id: str, params: dict) -> None:
    if params:
        MlflowClient(uri).log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def get_tags(uri: str, run_id: str) -> dict:
    return dict(MlflowClient(uri).get_run(run_id).data.tags)


def log_artifacts(uri: str, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
    MlflowClient(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def log_artifact(uri: str, run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
    MlflowClient(uri).log_artifact(run_id, str(local_file), artifact_path)


def log_table(uri: str, run_id: str, columns: dict[str, list], artifact_file: str) -> None:
    """A table (column -> values) as an MLflow table artifact (`artifact_file` ends in .json), shown
    as a table in the run's artifact view and across runs in the experiment's Evaluation view."""
    MlflowClient(uri).log_table(run_id, data=columns, artifact_file=artifact_file)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient(uri).log_text(run_id, text, artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(uri).set_terminated(run_id, status=status)


def reopen_run(uri: str, run_id: str) -> None:
    """An ended run RUNNING again (a resumed search continues its parent run)."""
    MlflowClient(uri).update_run(run_id, status="RUNNING")


class StageLogger:
    """The `log(metrics, step=None)` callable a stage gets; picklable, so it crosses to Ray workers.

    A tracking store that fails mid-stage (after MLflow's own retries) never stops training:
    the metrics are kept and sent with the next call that gets through, and the stage's final
    result is in its published output either way.
    """

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.pending: list[tuple[dict, int | None]] = []

    def __call__(self, metrics: dict, step: int | None = None) -> None:
        self.pending.append((dict(metrics), step))
        try:
            while self.pending:
                log_metrics(self.uri, self.run_id, *self.pending[0])
                self.pending.pop(0)
        except Exception as e:  # noqa: BLE001 - any store failure: keep training, keep the metrics
            print(f"warning: MLflow at {self.uri} did not take {len(self.pending)} metric batch(es), "
                  f"kept to retry with the next ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)


def git_commit(repo_dir: Path) -> str:
    """HEAD's commit, with '+dirty' when the work tree has uncommitted changes.

    A Ray job's uploaded working dir has no .git: `pipeline submit` passes the submitting
    checkout's commit in PIPELINE_GIT_COMMIT."""
    if os.environ.get("PIPELINE_GIT_COMMIT"):
        return os.environ["PIPELINE_GIT_COMMIT"]
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
