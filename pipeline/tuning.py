"""The Tune experiment behind `pipeline tune`: Optuna's TPE (seeded) behind a concurrency limit,
ASHA on the per-epoch dev/overall, and the trial function that runs in a Ray worker.

Each trial is finetune + evaluate on the artifacts every trial shares, in its own folder
`trials/<trial id>/` with a `trial.json` record (its values, status, per-epoch scores and
final metrics), and its own nested MLflow run carrying the same flattened config params as
a plain `run`, its per-epoch metrics and, as the latest value, evaluate's final dev/*.
Trials ASHA stopped end FINISHED with tag early_stopped=true (their metrics are real results;
KILLED is for interrupted searches).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from pipeline import lifecycle, tracking
from pipeline.config import ConfigError, PipelineConfig, apply_overrides, flatten, get
from pipeline.constants import ERROR_TAG, METRIC, REFERENCE_STAGE, error_text
from pipeline.search_space import SearchSpace

# Run once through the cache before the trials: every trial reads data_prep's and mlm_pretrain's
# outputs; the reference (the untrained backbone's scores) is the search table's `untrained` row.
PRE_STAGES = ("data_prep", "mlm_pretrain", REFERENCE_STAGE)


@dataclass
class TrialContext:
    """What every trial receives besides its sampled values (picklable, all paths absolute)."""
    cfg: PipelineConfig  # resolved: smoke, paths and the space's fixed values applied
    space: SearchSpace
    inputs: dict[str, str]  # upstream stage -> its output folder (data_prep, mlm_pretrain)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    git_commit: str
    ablation: str
    trials_dir: str
    resources: dict[str, float]
    smoke: bool
    search: str  # the search's name
    driver: dict[str, str]  # lifecycle.driver_tags() of the driver: its death makes the trial runs stale


def trial_resources(cfg: PipelineConfig) -> dict[str, float]:
    """What one trial asks Ray for: enough for the bigger of its two stages."""
    stages = (cfg.stages.finetune, cfg.stages.evaluate)
    return {"cpu": max(s.num_cpus for s in stages), "gpu": max(s.num_gpus for s in stages)}


def max_concurrent(cluster: dict[str, float], resources: dict[str, float], trials: int) -> int:
    """How many trials fit on the cluster at once (fractional GPUs pack several per GPU)."""
    fits = trials
    for name, want in (("CPU", resources["cpu"]), ("GPU", resources["gpu"])):
        if want > 0:
            fits = min(fits, int(cluster.get(name, 0) // want + 1e-9))
    return max(1, fits)


def startup_trials(trials: int) -> int:
    """TPE's random warm-up: Optuna's default 10 would make a short search all random."""
    return max(2, min(10, trials // 4))


def optuna_searcher(space: SearchSpace, seed: int, trials: int, points_to_evaluate: list[dict] = ()):
    """OptunaSearch with a seeded TPE sampler over the space (the first points, if any, tried first)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(trials))
    return OptunaSearch(space.optuna_distributions(), metric=METRIC, mode="max",
                        points_to_evaluate=list(points_to_evaluate) or None, sampler=sampler)


def reported_epochs(epochs: int) -> range:
    """The epochs whose dev scores a trial reports to Tune while it trains: all but the last, whose
    score reaches Tune with evaluate's. So a trial makes `epochs` reports and ASHA, which decides at
    a report, can cut it only with an epoch still to train, never between its last epoch and its
    evaluate."""
    return range(1, epochs)


def asha_scheduler(epochs: int):
    """ASHA on dev/overall at rungs of 1, 2, 4, ... reports, for trials of up to `epochs` epochs:
    a trial's last report (reported_epochs) is at max_t, where ASHA ends it without comparing."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=1, reduction_factor=2)


def run_search(ctx: TrialContext, exp_dir: Path, trials: int, seed: int, points_to_evaluate: list[dict] = (),
               resume: bool = False, searcher: str = "optuna", scheduler: str = "asha", verbose: bool = True) -> str:
    """Run (or resume) the Tune experiment in `exp_dir`; "finished" or "interrupted"."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table reporter below
    cluster = ray.cluster_resources()
    _check_trial_fits(ctx.resources, cluster)
    concurrency = max_concurrent(cluster, ctx.resources, trials)
    trainable = tune.with_resources(tune.with_parameters(trial, ctx=ctx), ctx.resources)
    if resume and tune.Tuner.can_restore(str(exp_dir)):
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True)
    else:
        if searcher == "optuna":
            search_alg = ConcurrencyLimiter(optuna_searcher(ctx.space, seed, trials, points_to_evaluate),
                                            max_concurrent=concurrency)
            param_space = {}
        else:
            search_alg = BasicVariantGenerator(points_to_evaluate=list(points_to_evaluate) or None,
                                               max_concurrent=concurrency, random_state=seed)
            param_space = ctx.space.tune_domains()
        chosen_scheduler = (asha_scheduler(max(_possible_values(ctx, "train.epochs"))) if scheduler == "asha"
                            else FIFOScheduler())
        columns = {key: short(key) for key in ctx.space.params}
        reporter = tune.CLIReporter(
            metric_columns={"training_iteration": "iter", METRIC: METRIC, "dev/sst_acc": "sst",
                            "dev/para_acc": "para", "dev/sts_corr": "sts"},
            parameter_columns=columns, sort_by_metric=True,  # metric and mode: from TuneConfig
            max_report_frequency=20 if sys.stdout.isatty() else 60, max_progress_rows=40)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=search_alg,
                                        scheduler=chosen_scheduler, num_samples=trials),
            run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent),
                                      callbacks=[TrialRuns(ctx.trials_dir, ctx.tracking_uri)],
                                      progress_reporter=reporter if verbose else None, verbose=1 if verbose else 0))
    results = tuner.fit()
    # Tune returns normally after a Ctrl-C, with trials left pending or running.
    return "finished" if results.num_terminated + results.num_errors >= trials else "interrupted"


def trial(config: dict, ctx: TrialContext) -> None:
    """One trial (runs in a Ray worker): finetune + evaluate, its own nested MLflow run."""
    import torch
    from ray import tune

    from stages import evaluate, finetune

    trial_id = tune.get_context().get_trial_id()
    values = ctx.space.normalize(config)
    cfg = apply_overrides(ctx.cfg, values)
    out = Path(ctx.trials_dir) / trial_id
    uri = ctx.tracking_uri
    previous = _read_record(out)
    if previous and previous["status"] == "running":  # its driver died mid-trial; this is the re-run
        close_trial(uri, out, "restarted", "KILLED")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run_id = tracking.start_run(
        uri, ctx.experiment_id, f"trial {trial_id}",
        {"stage": "trial", "git_commit": ctx.git_commit, "ablation": ctx.ablation, "trial_id": trial_id,
         "tune_search": ctx.search, "smoke": ctx.smoke, **ctx.driver}, parent_id=ctx.parent_run_id, params=flatten(cfg))
    _write_record(out, {"trial_id": trial_id, "run_id": run_id, "values": values, "status": "running",
                        "started": time.time()})
    torch.set_num_threads(max(1, int(ctx.resources["cpu"])))  # a trial's torch uses the CPUs Ray reserved

    def log_epoch(metrics: dict, step: int | None = None) -> None:
        tracking.log_metrics(uri, run_id, metrics, step)
        if step is not None:
            if METRIC in metrics:  # kept before reporting: ASHA may end the trial inside tune.report
                record = _read_record(out)
                _write_record(out, {**record, "epochs": [*record.get("epochs", []), metrics[METRIC]]})
            if step in reported_epochs(cfg.train.epochs):
                tune.report({**metrics, "epoch": step})  # ASHA decides on this epoch's dev/overall

    def log_final(metrics: dict, step: int | None = None) -> None:
        # At the last epoch's step and later: MLflow shows the latest value, evaluate's score.
        tracking.log_metrics(uri, run_id, metrics, cfg.train.epochs)

    inputs = {name: Path(path) for name, path in ctx.inputs.items()}
    try:
        tuned = finetune.run(cfg, inputs, out / "finetune", log_epoch)
        evaluated = evaluate.run(cfg, {"data_prep": inputs["data_prep"], "finetune": out / "finetune"},
                                 out / "evaluate", log_final)
    except SystemExit:  # Tune stopped it from inside tune.report: ASHA's early stop
        close_trial(uri, out, "early_stopped", "FINISHED")
        raise
    except BaseException as e:
        tracking.set_tags(uri, run_id, {ERROR_TAG: error_text(e)})
        close_trial(uri, out, "failed", "FAILED")
        raise
    metrics = {**tuned.get("metrics", {}), **evaluated.get("metrics", {})}
    tracking.log_metrics(uri, run_id, tuned.get("metrics", {}), cfg.train.epochs)
    tracking.log_params(uri, run_id, tuned.get("params", {}))  # what the trial trained in: resolved.precision
    lifecycle.log_analysis(uri, run_id, out / "evaluate" / "analysis")  # the trial's run is its evaluate's
    _write_record(out, {**_read_record(out), "status": "finished", "metrics": metrics,
                        "model": str(out / "finetune" / "model")})
    tracking.end_run(uri, run_id, "FINISHED")
    tune.report({**evaluated.get("metrics", {}), "epoch": cfg.train.epochs})  # last: Tune may stop the trial here


class TrialRuns(Callback):
    """Driver side: closes the MLflow runs of trials that cannot close their own.

    ASHA-stopped trials end FINISHED with tag early_stopped=true, not KILLED: their per-epoch
    metrics are real results the compare view should show, and KILLED is kept for searches
    interrupted by the user. A trial whose worker died ends FAILED.
    """

    def __init__(self, trials_dir: str, uri: str):
        self.trials_dir, self.uri = trials_dir, uri

    def on_trial_complete(self, iteration, trials, trial, **info):
        out = Path(self.trials_dir) / trial.trial_id
        if (_read_record(out) or {}).get("status") == "running":
            close_trial(self.uri, out, "early_stopped", "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        out = Path(self.trials_dir) / trial.trial_id
        if (_read_record(out) or {}).get("status") == "running":
            close_trial(self.uri, out, "failed", "FAILED")


def trial_records(trials_dir: Path) -> list[dict]:
    """Every trial's trial.json, in the order the trials started."""
    records = [r for r in (_read_record(d) for d in Path(trials_dir).glob("*")) if r]
    return sorted(records, key=lambda r: r["started"])


def best_record(records: list[dict]) -> dict | None:
    """The evaluated trial with the highest final dev/overall."""
    scored = [r for r in records if r["status"] == "finished" and math.isfinite(r.get("metrics", {}).get(METRIC, math.nan))]
    return max(scored, key=lambda r: r["metrics"][METRIC], default=None)


def _check_trial_fits(resources: dict, cluster: dict) -> None:
    for name, want in (("CPU", resources["cpu"]), ("GPU", resources["gpu"])):
        if want > cluster.get(name, 0):
            raise ConfigError(f"a trial needs {want:g} {name}s (stages.finetune/evaluate.num_{name.lower()}s) but "
                              f"Ray has {cluster.get(name, 0):g}; lower it with --set stages.finetune.num_"
                              f"{name.lower()}s=... or run on a cluster (ray.address)")


def _possible_values(ctx: TrialContext, key: str) -> list:
    p = ctx.space.params.get(key)
    if p is None:
        return [get(ctx.cfg, key)]
    return list(p.values) if p.distribution == "choice" else [p.high]


def close_trial(uri: str, out: Path, status: str, mlflow_status: str) -> None:
    from stages import checkpoint

    # A trial never resumes (a restarted one starts in a clean folder), so its checkpoint,
    # hundreds of MB with MiniLM, is only disk to free.
    checkpoint.remove(out / "finetune")
    record = _read_record(out)
    if not record:
        return
    if status == "early_stopped":
        tracking.set_tags(uri, record["run_id"], {"early_stopped": "true"})
    elif status in ("interrupted", "restarted"):
        tracking.set_tags(uri, record["run_id"], {"interrupted": "true"})
    tracking.end_run(uri, record["run_id"], mlflow_status)
    _write_record(out, {**record, "status": status})


def _read_record(out: Path) -> dict | None:
    path = Path(out) / "trial.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_record(out: Path, record: dict) -> None:
    tmp = Path(out) / "trial.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(Path(out) / "trial.json")


def short(key: str) -> str:
    parts = key.split(".")
    return "w_" + parts[-1] if key.startswith("loss.weights.") else parts[-1]


def fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
