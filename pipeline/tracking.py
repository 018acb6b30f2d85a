"""MLflow bookkeeping: one parent run per pipeline run, a nested child run per stage.

Runs are created by the driver (so a stage that dies still has a run to mark FAILED); Ray
workers log metrics into their stage's run through `StageLogger`, which is the `log`
callable a stage receives. A server that stops answering mid-run costs one retry budget, not
the run: see "a server that stops answering" below.
"""

from __future__ import annotations

import dataclasses
import json
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
    re-runs a task whose worker died, and the retry finds the previous attempt's tag (a server
    that does not answer has none to give: then 1)."""
    previous = get_tags(uri, run_id).get("attempt", "0")
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
    items = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if items:
        _write({"op": "metrics", "uri": uri, "run_id": run_id, "metrics": items, "step": step or 0,
                "time_ms": int(time.time() * 1000)})


def log_params(uri: str, run_id: str, params: dict) -> None:
    if params:
        _write({"op": "params", "uri": uri, "run_id": run_id, "params": {k: _param_value(v) for k, v in params.items()}})


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    _write({"op": "tags", "uri": uri, "run_id": run_id, "tags": {k: str(v) for k, v in tags.items()}})


def get_tags(uri: str, run_id: str) -> dict:
    """The run's tags; {} when the server has stopped answering (see `_write`)."""
    try:
        return _answered(uri, lambda: dict(MlflowClient(uri).get_run(run_id).data.tags))
    except TrackingDown:
        return {}


def log_artifacts(uri: str, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
    _write({"op": "artifacts", "uri": uri, "run_id": run_id, "local": str(local_dir), "artifact_path": artifact_path})


def log_artifact(uri: str, run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
    _write({"op": "artifact", "uri": uri, "run_id": run_id, "local": str(local_file), "artifact_path": artifact_path})


def log_table(uri: str, run_id: str, columns: dict[str, list], artifact_file: str) -> None:
    """A table (column -> values) as an MLflow table artifact (`artifact_file` ends in .json), shown
    as a table in the run's artifact view and across runs in the experiment's Evaluation view."""
    _write({"op": "table", "uri": uri, "run_id": run_id, "columns": columns, "artifact_file": artifact_file})


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    _write({"op": "text", "uri": uri, "run_id": run_id, "text": text, "artifact_file": artifact_file})


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _write({"op": "end", "uri": uri, "run_id": run_id, "status": status, "time_ms": int(time.time() * 1000)})


def reopen_run(uri: str, run_id: str) -> None:
    """An ended run RUNNING again (a resumed search continues its parent run)."""
    MlflowClient(uri).update_run(run_id, status="RUNNING")


class StageLogger:
    """The `log(metrics, step=None)` callable a stage gets; picklable, so it crosses to Ray workers.

    A tracking store that fails mid-stage never stops training: what it did not take is kept
    (see `_write`) and the stage's final result is in its published output either way.
    """

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def __call__(self, metrics: dict, step: int | None = None) -> None:
        try:
            log_metrics(self.uri, self.run_id, metrics, step)
        except Exception as e:  # noqa: BLE001 - a local store's own failure (a locked sqlite file): keep training
            print(f"warning: MLflow at {self.uri} did not take a metric batch ({type(e).__name__}: "
                  f"{str(e)[:200]}); training goes on", file=sys.stderr)


# ---------------------------------------------------------------- a server that stops answering
#
# Every write to an HTTP(S) tracking server is one record, sent with a retry budget of
# `tracking.retry_seconds`. A record the server does not take within it marks the server down
# for the rest of this process: that record and every later one are kept (in the driver, appended
# to a JSON-lines file under mlruns/unsent/ beside the config; in a Ray worker, in memory, handed
# back with the stage's result), so the work goes on at full speed. `send_unsent` sends them later,
# in order, into the same runs: the next command on the config does, or `pipeline sync`.


class TrackingDown(RuntimeError):
    """The tracking server did not answer within tracking.retry_seconds."""


@dataclasses.dataclass
class _Offline:
    retry_seconds: float = 15.0
    file: Path | None = None  # where this process appends what it keeps (None: in memory only)
    down: str | None = None  # why the server stopped answering, once it has
    down_at: float = 0.0
    kept: list[dict] = dataclasses.field(default_factory=list)  # in memory, not yet in a file
    kept_count: int = 0
    kept_runs: set = dataclasses.field(default_factory=set)


_offline = _Offline()


def configure(retry_seconds: float, unsent_dir: Path | None = None) -> None:
    """This process's retry budget per tracking call, and (in the driver) the folder that keeps
    what a server that stopped answering did not take. MLflow's own HTTP retries (7, with
    backoff: minutes per call) are turned off so the budget is the whole wait."""
    global _offline
    _offline = _Offline(retry_seconds=retry_seconds,
                        file=unsent_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.jsonl" if unsent_dir else None)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(retry_seconds)))


def _write(record: dict) -> None:
    """Send one record; if the server does not answer within the budget, keep it instead."""
    if _offline.down is not None and _is_http(record["uri"]):
        _keep(record)
        return
    try:
        _answered(record["uri"], lambda: _apply(record))
    except TrackingDown:
        _keep(record)


def _answered(uri: str, call):
    """call(), retried while the server does not answer, for at most the retry budget; after that,
    TrackingDown (and the server counts as down for this process). Only HTTP(S) servers: a local
    store's errors are its own."""
    if not _is_http(uri):
        return call()
    if _offline.down is not None:
        raise TrackingDown(_offline.down)
    deadline = time.monotonic() + _offline.retry_seconds
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - sorted below: only "no answer" is retried
            if not _no_answer(e):
                raise
            if time.monotonic() >= deadline:
                _offline.down, _offline.down_at = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", time.time()
                print(f"warning: MLflow at {uri} did not answer for {_offline.retry_seconds:g} s "
                      f"(tracking.retry_seconds); going on without it: what is not recorded is kept, "
                      f"and the command's last line says where", file=sys.stderr, flush=True)
                raise TrackingDown(_offline.down) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _no_answer(error: BaseException) -> bool:
    """A server that is not there (refused, reset, timed out) or that its proxy says is down."""
    import requests

    if isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    text = str(error)
    return ("failed with exception" in text or "failed with timeout exception" in text
            or any(f"error code {code}" in text for code in (502, 503, 504)))


def _keep(record: dict) -> None:
    _offline.kept_count += 1
    _offline.kept_runs.add(record["run_id"])
    if _offline.file is None:
        _offline.kept.append(record)
        return
    _offline.file.parent.mkdir(parents=True, exist_ok=True)
    with open(_offline.file, "a", encoding="utf-8") as f:  # one line per record: a kill loses none already kept
        f.write(json.dumps(record) + "\n")


def keep_all(records: list[dict]) -> None:
    """Records a Ray worker kept (handed back with its stage's result), kept here as this process's own."""
    for record in records:
        _keep(record)


def take_kept() -> list[dict]:
    """What this process kept in memory (a Ray worker: no file of its own), handed over once."""
    records, _offline.kept = _offline.kept, []
    return records


def unsent_line() -> str | None:
    """One line saying what was not recorded and how it will be; None when everything was."""
    if not _offline.kept_count:
        return None
    since = f" from {time.strftime('%H:%M:%S', time.localtime(_offline.down_at))}" if _offline.down_at else ""
    where = f"kept in {_offline.file}" if _offline.file else "kept in memory"
    return (f"MLflow did not answer{since}: {_offline.kept_count} record(s) of {len(_offline.kept_runs)} run(s) "
            f"not recorded, {where}; the next command on this config sends them, or now: python -m pipeline sync")


def send_unsent(folder: Path) -> tuple[int, int, set]:
    """Send every kept record under `folder` (other processes' files), oldest file first, each in
    order; a file fully sent is deleted. (sent, left, run ids sent to). A record its server refuses
    (the run was deleted) is dropped with a warning; a server that does not answer stops the
    sending, keeping the rest for next time."""
    sent, runs, left = 0, set(), 0
    files = sorted(p for p in folder.glob("*.jsonl") if p != _offline.file) if folder.is_dir() else []
    for i, path in enumerate(files):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for j, line in enumerate(lines):
            record = json.loads(line)
            try:
                _answered(record["uri"], lambda: _apply(record))
            except TrackingDown:
                path.write_text("".join(f"{rest}\n" for rest in lines[j:]), encoding="utf-8")
                left = len(lines) - j + sum(_count_lines(p) for p in files[i + 1:])
                return sent, left, runs
            except Exception as e:  # noqa: BLE001 - one refused record does not hold back the rest
                print(f"warning: MLflow refused a kept {record['op']} record of run {record['run_id']} "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); dropped", file=sys.stderr)
                continue
            sent += 1
            runs.add(record["run_id"])
        path.unlink()
    return sent, left, runs


def _apply(record: dict) -> None:
    """Send one record as the MLflow call it stands for."""
    client, run_id, op = MlflowClient(record["uri"]), record["run_id"], record["op"]
    if op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, record["time_ms"], record["step"])
                                          for k, v in record["metrics"].items()])
    elif op == "params":
        items = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif op == "artifacts":
        client.log_artifacts(run_id, record["local"], record["artifact_path"])
    elif op == "artifact":
        client.log_artifact(run_id, record["local"], record["artifact_path"])
    elif op == "table":
        client.log_table(run_id, data=record["columns"], artifact_file=record["artifact_file"])
    elif op == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif op == "end":
        client.set_terminated(run_id, status=record["status"], end_time=record["time_ms"])
    else:
        raise ValueError(f"unknown record op {op!r}")


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


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
