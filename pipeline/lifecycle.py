"""The run lifecycle every verb goes through: where to log, which MLflow runs a command opens,
and how each of them ends.

    uri = tracking_uri_for(cfg, config_dir)             # raises TrackingUnreachable (exit 3)
    with opened_runs(uri, cfg.tracking, config_dir) as runs:  # sends kept records, marks stale runs KILLED
        parent = runs.start("pipeline", {"stage": "pipeline", ...}, params=flatten(cfg))
        stage_runs = start_stage_runs(runs, planned, parent, ablation, params)
        ...                                              # run the stages
        end_stage_runs(runs, store, planned, stage_runs, results)
        runs.end(parent)

What opens a run closes it: leaving the `with` block by an exception ends every run still
open FAILED (KILLED for Ctrl-C) with the error as its `error` tag, and leaving it normally
ends the rest FINISHED, so no command leaves a run RUNNING. A driver killed with SIGKILL can
close nothing; every run therefore carries its driver's pid, host and start time, and the
next command on the same experiment marks RUNNING runs whose driver is gone KILLED.

A server that stops answering mid-command does not stop it: each MLflow call waits at most
tracking.retry_seconds, and what is not recorded is kept under mlruns/unsent/ beside the
config (tracking.py), sent by the next command on that config before it opens its own runs.
"""

from __future__ import annotations

import csv
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline import tracking
from pipeline.constants import (DRIVER_HOST_TAG, DRIVER_PID_TAG, DRIVER_START_TAG, ERROR_TAG, REPO,
                                error_text)


class TrackingUnreachable(RuntimeError):
    """The MLflow server does not answer and tracking.on_unreachable is `error` (exit status 3)."""


# ---------------------------------------------------------------- Ctrl-C and SIGTERM

TERMINATED = "terminated (SIGTERM)"
_sigterm_received = False


def interrupt_on_sigterm(signum, frame) -> None:
    """The CLI's SIGTERM handler (`kill`, `ray job stop`, a scheduler's time limit): a
    KeyboardInterrupt, so the command ends as after Ctrl-C, its runs KILLED, finished stages
    cached. Ray's ray.get re-raises it as a plain KeyboardInterrupt: a flag says what it was."""
    global _sigterm_received
    _sigterm_received = True
    raise KeyboardInterrupt(TERMINATED)


def interruption() -> str:
    """What the KeyboardInterrupt that stopped this command was: Ctrl-C or SIGTERM."""
    return TERMINATED if _sigterm_received else "interrupted"


def tracking_uri_for(cfg, config_dir: Path, chosen: str | None = None) -> str:
    """The MLflow store to log to (`chosen`, else MLFLOW_TRACKING_URI, else tracking.uri, else
    mlruns/mlflow.db beside the config), checked before anything runs. A server that does not
    answer is an error, or with tracking.on_unreachable: local, the local store (said on stderr)."""
    uri = chosen or tracking.tracking_uri(cfg.tracking.uri, config_dir)
    unreachable = tracking.check_reachable(uri)
    if unreachable and cfg.tracking.on_unreachable == "error":
        raise TrackingUnreachable(
            f"MLflow tracking server at {uri} is unreachable: {unreachable}; nothing was run. Start it, "
            f"point MLFLOW_TRACKING_URI / tracking.uri elsewhere, or set tracking.on_unreachable: local "
            f"to log to a local store and continue")
    if unreachable:
        uri = tracking.local_uri(config_dir)
        print(f"warning: MLflow tracking server unreachable ({unreachable}); tracking.on_unreachable: local, "
              f"so this run logs to {uri}", file=sys.stderr)
    return uri


# ---------------------------------------------------------------- the runs of one command


def driver_tags() -> dict[str, str]:
    """Who opened a run: this process. Runs opened for it elsewhere (a Tune trial in a Ray
    worker) carry the same tags, so the driver's death is what makes them stale."""
    return {DRIVER_PID_TAG: str(os.getpid()), DRIVER_HOST_TAG: socket.gethostname(),
            DRIVER_START_TAG: str(_process_start(os.getpid()))}


class Runs:
    """The MLflow runs one command has open, in the order it opened them."""

    def __init__(self, uri: str, experiment_id: str, git_commit: str):
        self.uri, self.experiment_id, self.git_commit = uri, experiment_id, git_commit
        self.open: list[str] = []

    def start(self, name: str, tags: dict, parent: str | None = None, params: dict | None = None) -> str:
        run_id = tracking.start_run(self.uri, self.experiment_id, name,
                                    {"git_commit": self.git_commit, **tags, **driver_tags()},
                                    parent_id=parent, params=params)
        self.open.append(run_id)
        return run_id

    def adopt(self, run_id: str) -> str:
        """A run this command did not create but now owns (a search's parent, reopened on resume)."""
        tracking.reopen_run(self.uri, run_id)
        tracking.set_tags(self.uri, run_id, driver_tags())
        if run_id not in self.open:
            self.open.append(run_id)
        return run_id

    def end(self, run_id: str, status: str = "FINISHED", error: BaseException | str | None = None) -> None:
        if error is not None:
            tracking.set_tags(self.uri, run_id, {ERROR_TAG: error_text(error)})
        tracking.end_run(self.uri, run_id, status)
        if run_id in self.open:
            self.open.remove(run_id)

    def end_all(self, status: str, error: BaseException | str | None = None) -> None:
        """Every run still open, newest first (children before their parent); `error` is tagged
        on each that has no error of its own yet (a stage's task tags its own traceback)."""
        for run_id in reversed(list(self.open)):
            if error is not None and ERROR_TAG in tracking.get_tags(self.uri, run_id):
                self.end(run_id, status)
            else:
                self.end(run_id, status, error)


UNSENT_STATUS = 4  # the work is done, part of its record is kept for later, under on_unreachable: error
_on_unreachable = "error"


def unsent_outcome() -> tuple[str | None, int]:
    """(the line saying what this command could not record and how it will be, or None; the exit
    status it asks for: UNSENT_STATUS under tracking.on_unreachable: error, else 0)."""
    line = tracking.unsent_line()
    return line, (UNSENT_STATUS if line and _on_unreachable == "error" else 0)


def unsent_dir(config_dir: Path) -> Path:
    """Where a command keeps the tracking records a server that stopped answering did not take."""
    return config_dir / "mlruns" / "unsent"


def send_unsent(config_dir: Path) -> int:
    """Send what earlier commands on this config kept; said in one line. Records left (the
    server still not answering): how many."""
    sent, left, run_ids = tracking.send_unsent(unsent_dir(config_dir))
    if sent:
        print(f"MLflow: sent {sent} record(s) kept by an earlier command when the server did not answer "
              f"(runs {', '.join(sorted(r[:8] for r in run_ids))})", file=sys.stderr)
    if left:
        print(f"MLflow: {left} kept record(s) still not sent (the server does not answer); they stay in "
              f"{unsent_dir(config_dir)}", file=sys.stderr)
    return left


@contextmanager
def opened_runs(uri: str, tracking_cfg, config_dir: Path) -> Iterator[Runs]:
    """The experiment (created by the driver first: trials creating it at once race on sqlite),
    what earlier commands kept sent, its stale runs closed, and a Runs whose every run is ended
    when the block is left."""
    global _on_unreachable
    _on_unreachable = tracking_cfg.on_unreachable
    tracking.configure(tracking_cfg.retry_seconds, unsent_dir(config_dir))
    experiment_id = tracking.ensure_experiment(uri, tracking_cfg.experiment)
    send_unsent(config_dir)  # before the stale check: a kept record may be the run's own end
    stale = mark_stale_runs(uri, experiment_id)
    if stale:
        print(f"MLflow: marked {len(stale)} run(s) KILLED whose driver process is gone "
              f"(killed before it could close them): {', '.join(r[:8] for r in stale[:5])}"
              f"{' ...' if len(stale) > 5 else ''}", file=sys.stderr)
    runs = Runs(uri, experiment_id, tracking.git_commit(REPO))
    try:
        yield runs
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        if runs.open:
            first = runs.open[0]
            runs.end_all(status, TERMINATED if _sigterm_received else e)
            print(f"MLflow: run {first} and the {status.lower()} runs under it marked {status}", file=sys.stderr)
        raise
    runs.end_all("FINISHED")


def mark_stale_runs(uri: str, experiment_id: str) -> list[str]:
    """End KILLED every RUNNING run of the experiment opened by a driver on this host that no
    longer runs (its pid is gone, or now belongs to a process started at another time).
    Runs of other hosts are left alone: from here nobody can tell whether their driver lives."""
    host = socket.gethostname()
    client = tracking.MlflowClient(uri)
    running = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.{DRIVER_HOST_TAG} = '{host}'",
        max_results=5000)
    stale = []
    for run in running:
        tags = run.data.tags
        pid, started = tags.get(DRIVER_PID_TAG, ""), tags.get(DRIVER_START_TAG, "")
        if not pid.isdigit() or _alive(int(pid), started):
            continue
        tracking.set_tags(uri, run.info.run_id, {
            ERROR_TAG: f"its driver (pid {pid} on {host}) ended without closing this run (killed?); "
                       f"marked KILLED by a later command", "stale": "true"})
        tracking.end_run(uri, run.info.run_id, "KILLED")
        stale.append(run.info.run_id)
    return stale


# ---------------------------------------------------------------- stage runs


def start_stage_runs(runs: Runs, planned, parent: str, ablation: str, params: dict,
                     skip_cached: bool = False) -> dict[str, str]:
    """One child run per planned stage (dag.PlannedStage), tagged with its cache key."""
    return {p.stage.name: runs.start(p.stage.name, stage_tags(p, ablation), parent=parent, params=params)
            for p in planned if not (skip_cached and p.cached)}


def stage_tags(p, ablation: str) -> dict:
    return {"stage": p.stage.name, "ablation": ablation, "cache_key": p.key, "cache_hit": p.cached}


def record_stage(uri: str, run_id: str, result: dict, out: Path | None = None) -> None:
    """A finished stage's metrics and seconds on its MLflow run; with `out` (evaluate's output
    folder) its prediction files and error analysis too."""
    metrics = dict(result.get("metrics", {}))
    if "seconds" in result:
        metrics["stage/seconds"] = result["seconds"]
    tracking.log_metrics(uri, run_id, metrics)
    tracking.log_params(uri, run_id, result.get("params", {}))  # what a stage resolved: resolved.precision
    if out is not None and (out / result.get("predictions", "predictions")).is_dir():
        tracking.log_artifacts(uri, run_id, out / result.get("predictions", "predictions"), "predictions")
    if out is not None:
        log_analysis(uri, run_id, out / result.get("analysis", "analysis"))


def log_analysis(uri: str, run_id: str, folder: Path) -> None:
    """evaluate's analysis/ on its run: the PNGs and analysis.json as artifacts under analysis/,
    each worst-<task>.csv as an MLflow table analysis/worst-<task>.json (sentences, gold, predicted)."""
    if not folder.is_dir():
        return  # an evaluate output from before error analysis existed
    for path in sorted(folder.iterdir()):
        if path.suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            columns = {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])} if rows else {}
            tracking.log_table(uri, run_id, columns, f"analysis/{path.stem}.json")
        else:
            tracking.log_artifact(uri, run_id, path, "analysis")


def end_stage_runs(runs: Runs, store, planned, stage_runs: dict[str, str], results: dict[str, dict],
                   failure: BaseException | None = None) -> None:
    """Close a plan's stage runs: each stage in `results` (or, after a failure that carries no
    results, each whose output the store holds) recorded and FINISHED; the failed stage and
    those after it FAILED (KILLED after Ctrl-C), the failed one with the error."""
    status = "KILLED" if isinstance(failure, KeyboardInterrupt) else "FAILED"
    for p in planned:
        run_id = stage_runs.get(p.stage.name)
        if run_id is None or run_id not in runs.open:
            continue
        result = results.get(p.stage.name)
        if result is None and failure is not None and getattr(failure, "results", None) is None \
                and store.is_finished(p.stage.name, p.key) and not p.forced:
            result = store.read_result(p.stage.name, p.key)
        if result is not None:
            evaluated = store.local_dir("evaluate", p.key) if p.stage.name == "evaluate" else None
            record_stage(runs.uri, run_id, result, evaluated)
            runs.end(run_id)
        elif getattr(failure, "stage", None) == p.stage.name and ERROR_TAG not in tracking.get_tags(runs.uri, run_id):
            runs.end(run_id, status, failure)  # a worker that died could not tag its own traceback
        else:
            runs.end(run_id, status)


# ---------------------------------------------------------------- helpers


def _process_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux); 0 where /proc has none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    if started.isdigit() and int(started) and _process_start(pid) not in (0, int(started)):
        return False  # the pid was reused by a process started later
    return True
