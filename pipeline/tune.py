"""`python -m pipeline tune`: hyperparameter search over finetune + evaluate with Ray Tune.

    python -m pipeline tune [CONFIG] --space search_spaces/NAME.yaml [--trials N] [--smoke] [--resume]

data_prep (and mlm_pretrain when enabled) run once through the DAG cache; then a Ray Tune
experiment samples the search space with Optuna's TPE (seeded), stops weak trials early with
ASHA on the per-epoch `dev/overall`, and runs each trial's finetune + evaluate on those
artifacts. The search is one MLflow parent run; each trial is a nested child run carrying the
same flattened config params as a plain `run`, its per-epoch metrics and its final dev/*. The
best trial's config is written as YAML that `python -m pipeline run` accepts, and its model
is registered in the MLflow model registry.

Files of a search, under `<artifacts>/tune/<name>/`: Tune's own state (what `--resume`
restores), `search.json` (the driver's state), `base_config.yaml` and `space.yaml` (what every
trial starts from), `trials/<trial id>/` (each trial's finetune and evaluate outputs and its
`trial.json`) and `best_config.yaml`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from ray.tune import Callback

from pipeline import dag, tracking
from pipeline.config import (ConfigError, PipelineConfig, check_value, did_you_mean, field_types, apply_overrides,
                             dump_yaml, flatten, get, load_config)
from pipeline.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
METRIC = "dev/overall"
DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "int", "choice")
# A trial runs finetune + evaluate only, so it can vary only what those stages read; the rest
# (data, model.dir, mlm) shaped the artifacts every trial shares.
SEARCHABLE = ("seed", "device", "model.", "train.", "loss.")
PRE_STAGES = ("data_prep", "mlm_pretrain")


# ---------------------------------------------------------------- the command


def cmd_tune(args) -> int:
    """The `tune` verb: prepare, search, record the best trial. Returns the exit status."""
    from pipeline.cli import artifacts_location, resolve_paths, smoke_config

    config_path = Path(args.config).resolve()
    space_path = Path(args.space).resolve()
    cfg = load_config(config_path)
    ablation = "none"
    if args.variant:
        from pipeline.grids import variant_overrides

        ablation, variant = variant_overrides(args.variant, cfg)
        cfg = apply_overrides(cfg, variant)
    cfg = apply_overrides(cfg, args.overrides)
    config_dir = config_path.parent
    store_location = artifacts_location(cfg, config_dir)
    store = ArtifactStore(store_location)
    tune_root = _tune_root(store)

    if args.resume:
        exp_dir = tune_root / args.name if args.name else _latest_search(tune_root, space_path, args.smoke)
        if exp_dir is None or not (exp_dir / "search.json").is_file():
            which = f"named {args.name}" if args.name else f"of {space_path}{' with --smoke' if args.smoke else ''}"
            raise ConfigError(f"--resume: no search {which} under {tune_root}")
        state = json.loads((exp_dir / "search.json").read_text())
        store = ArtifactStore(state["store"])
        cfg = load_config(exp_dir / "base_config.yaml")
        space = load_space(exp_dir / "space.yaml", cfg)
        print(f"tune: resuming {exp_dir.name} ({state['trials']} trials; its saved config and space, "
              f"not the command line's, apply)")
    else:
        if args.smoke:
            cfg = smoke_config(cfg, store_location)
        cfg = resolve_paths(cfg, config_dir)
        space = load_space(space_path, cfg)  # a bad space is an error before anything starts
        cfg = apply_overrides(cfg, space.fixed)
        if not (cfg.stages.finetune.enabled and cfg.stages.evaluate.enabled):
            raise ConfigError(f"{config_path}: tune needs stages.finetune and stages.evaluate enabled")
        if args.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {args.trials}")
        points = [space.config_point(cfg)] if args.include_config else []
        name = args.name or f"{space_path.stem}{'-smoke' if args.smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp_dir = tune_root / name
        if (exp_dir / "search.json").exists():
            raise ConfigError(f"--name {name}: {exp_dir} already holds a search; add --resume to continue it")
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "base_config.yaml").write_text(dump_yaml(cfg))
        shutil.copyfile(space_path, exp_dir / "space.yaml")
        state = {"name": name, "trials": args.trials, "seed": cfg.seed if args.seed is None else args.seed,
                 "points_to_evaluate": points, "smoke": args.smoke, "ablation": ablation,
                 "config_file": str(config_path), "space_file": str(space_path), "store": store.location,
                 "finished": False}

    uri = state.get("tracking_uri") if args.resume and not os.environ.get("MLFLOW_TRACKING_URI") else None
    uri = state["tracking_uri"] = uri or tracking.tracking_uri(cfg.tracking.uri, config_dir)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)  # driver first: sqlite races otherwise
    commit = tracking.git_commit(REPO)
    planned = [p for p in dag.plan(cfg, store) if p.stage.name in PRE_STAGES]
    if "parent_run_id" not in state:
        state["parent_run_id"] = tracking.start_run(
            uri, experiment_id, f"tune {state['name']}",
            {"stage": "tune", "git_commit": commit, "ablation": state["ablation"], "smoke": state["smoke"],
             "config_file": state["config_file"], "tune_space": state["space_file"],
             "tune_trials": state["trials"], "tune_seed": state["seed"], "tune_storage": str(exp_dir)},
            params=flatten(cfg))
        tracking.log_text(uri, state["parent_run_id"], dump_yaml(cfg), "config.yaml")
        tracking.log_artifact(uri, state["parent_run_id"], exp_dir / "space.yaml")
    elif not state["finished"]:
        _reopen_run(uri, state["parent_run_id"])
    parent = state["parent_run_id"]
    _write_state(exp_dir, state)

    print(f"tune: {state['name']}: {state['trials']} trials over {len(space.params)} quantities "
          f"({', '.join(space.params)}); outputs in {exp_dir}")
    for p in planned:
        print(f"  {p.stage.name:<13} {'cached, skipped' if p.cached else 'to run'}  key {p.key}")

    _init_ray(cfg)
    stage_runs = {p.stage.name: tracking.start_run(
        uri, experiment_id, p.stage.name,
        {"stage": p.stage.name, "git_commit": commit, "ablation": state["ablation"], "cache_key": p.key,
         "cache_hit": p.cached}, parent_id=parent, params=flatten(cfg))
        for p in planned if not (args.resume and p.cached)}
    try:
        results = dag.execute(planned, dag.RunContext(cfg, store.location, uri), stage_runs,
                              dag.ray_address(cfg), cfg.ray.num_cpus)
    except (dag.StageFailed, ValueError, KeyboardInterrupt) as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        for p in planned:
            if p.stage.name in stage_runs:
                done = store.is_finished(p.stage.name, p.key)
                tracking.end_run(uri, stage_runs[p.stage.name], "FINISHED" if done else status)
        tracking.set_tags(uri, parent, {"error": str(e)[-4000:]})
        tracking.end_run(uri, parent, status)
        print(f"\nerror: {e}" if str(e) else "\ninterrupted", file=sys.stderr)
        return 130 if status == "KILLED" else 1
    for p in planned:
        if p.stage.name in stage_runs:
            tracking.log_metrics(uri, stage_runs[p.stage.name], results[p.stage.name].get("metrics", {}))
            tracking.end_run(uri, stage_runs[p.stage.name])

    ctx = TrialContext(
        cfg=cfg, space=space, inputs={p.stage.name: str(store.local_dir(p.stage.name, p.key)) for p in planned},
        tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent, git_commit=commit,
        ablation=state["ablation"], trials_dir=str(exp_dir / "trials"), resources=trial_resources(cfg),
        smoke=state["smoke"], search=state["name"])
    start = time.time()
    try:
        outcome = run_search(ctx, exp_dir, trials=state["trials"], seed=state["seed"],
                             points_to_evaluate=state["points_to_evaluate"], resume=args.resume)
    except KeyboardInterrupt:  # a second Ctrl-C; the first one ends Tune's loop gracefully
        outcome = "interrupted"
    except BaseException as e:
        tracking.set_tags(uri, parent, {"error": f"{type(e).__name__}: {e}"[-4000:]})
        tracking.end_run(uri, parent, "FAILED")
        raise
    _stop_ray()  # flushes the trials' forwarded output before the summary
    records = trial_records(exp_dir / "trials")
    if outcome == "interrupted":
        for record in records:
            if record["status"] == "running":
                _close_trial(uri, exp_dir / "trials" / record["trial_id"], "interrupted", "KILLED")
        tracking.end_run(uri, parent, "KILLED")
        print(f"\ntune: interrupted; {sum(r['status'] != 'running' for r in records)} trials done. Continue with:\n"
              f"  python -m pipeline tune {config_path.name} --space {args.space} --resume --name {state['name']}"
              f"{' --smoke' if state['smoke'] else ''}", file=sys.stderr)
        return 130
    if state["finished"]:
        print(f"\ntune: {state['name']} had already finished; no trial was re-run")
        _print_summary(state, records, uri)
        return 0
    return _finish_search(ctx, exp_dir, state, records, time.time() - start)


# ---------------------------------------------------------------- the search space


@dataclass
class Param:
    """One searched config key: its distribution, bounds and where it is in the space file."""
    key: str
    distribution: Literal["loguniform", "uniform", "quniform", "int", "choice"]
    low: float | int | None = None
    high: float | int | None = None
    q: float | None = None
    values: list = field(default_factory=list)
    line: int = 0


@dataclass
class SearchSpace:
    path: str
    fixed: dict[str, Any]  # key: value set for every trial (applied before data_prep)
    params: dict[str, Param]

    def tune_domains(self) -> dict:
        """{key: ray.tune domain}: what Tune's random search samples from."""
        from ray import tune

        out = {}
        for key, p in self.params.items():
            if p.distribution == "loguniform":
                out[key] = tune.loguniform(p.low, p.high)
            elif p.distribution == "uniform":
                out[key] = tune.uniform(p.low, p.high)
            elif p.distribution == "quniform":
                out[key] = tune.quniform(p.low, p.high, p.q)
            elif p.distribution == "int":
                out[key] = tune.randint(p.low, p.high + 1)  # randint's upper bound is exclusive
            else:
                out[key] = tune.choice(list(p.values))
        return out

    def optuna_distributions(self) -> dict:
        """{key: optuna distribution}: what OptunaSearch's TPE samples from."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out = {}
        for key, p in self.params.items():
            if p.distribution == "loguniform":
                out[key] = FloatDistribution(p.low, p.high, log=True)
            elif p.distribution == "uniform":
                out[key] = FloatDistribution(p.low, p.high)
            elif p.distribution == "quniform":
                out[key] = FloatDistribution(p.low, p.high, step=p.q)
            elif p.distribution == "int":
                out[key] = IntDistribution(p.low, p.high)
            else:
                out[key] = CategoricalDistribution(list(p.values))
        return out

    def normalize(self, sampled: dict) -> dict:
        """A sampled point as config values: plain Python types, quniform snapped to its grid."""
        out = {}
        for key, p in self.params.items():
            value = sampled[key]
            value = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune
            if p.distribution == "quniform":
                value = round(p.low + round((value - p.low) / p.q) * p.q, 12)
            elif p.distribution == "int":
                value = int(value)
            out[key] = value
        return out

    def config_point(self, cfg: PipelineConfig) -> dict:
        """The config's own values of the searched keys (for points_to_evaluate); must lie in the space."""
        point = {}
        for key, p in self.params.items():
            value = get(cfg, key)
            inside = value in p.values if p.distribution == "choice" else (
                value is not None and p.low <= value <= p.high)
            if not inside:
                where = f"{{{', '.join(map(repr, p.values))}}}" if p.distribution == "choice" else f"[{p.low}, {p.high}]"
                raise ConfigError(f"{self.path}:{p.line}: {key}: --include-config: the config's value {value!r} is "
                                  f"outside the space {where}; widen the space or drop --include-config")
            point[key] = value
        return point


def load_space(path: str | Path, cfg: PipelineConfig | None = None) -> SearchSpace:
    """Read and check a search-space YAML; every error names the file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: search space file not found")
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if root is None or not isinstance(root, yaml.MappingNode) or not root.value:
        raise ConfigError(f"{path}: a search space is a non-empty mapping of config key -> distribution")
    cfg = cfg or PipelineConfig()
    leaves = flatten(PipelineConfig())
    fixed, params, lines = {}, {}, {}
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        where = f"{path}:{line}: {key}"
        if key in lines:
            raise ConfigError(f"{where}: duplicate key (first at line {lines[key]})")
        lines[key] = line
        if key not in leaves:
            raise ConfigError(f"{where}: unknown config key" + did_you_mean(key, leaves)
                              + " (keys are dotted config keys, as in --set)")
        value = yaml.safe_load(yaml.serialize(value_node))
        if isinstance(value, dict):
            params[key] = _parse_param(key, value, line, where)
        elif isinstance(value, list):
            raise ConfigError(f"{where}: a list is not a distribution; write {{distribution: choice, values: [...]}}")
        else:
            fixed[key] = value
    for key, value in fixed.items():
        fixed[key] = check_value(_leaf_annotation(key), value, key, f"{path}:{lines[key]}")
    try:
        base = apply_overrides(cfg, fixed)
    except ConfigError as e:
        raise ConfigError(f"{path}: its fixed values do not go together: {e}") from None
    for key, p in params.items():
        _check_param_fits_config(p, base, f"{path}:{p.line}: {key}")
    if not params:
        raise ConfigError(f"{path}: nothing to search: every entry is a fixed value")
    return SearchSpace(str(path), fixed, params)


def _parse_param(key: str, spec: dict, line: int, where: str) -> Param:
    """One `{distribution: ..., bounds}` mapping -> Param, checked on its own."""
    if not key.startswith(SEARCHABLE):
        raise ConfigError(f"{where}: cannot be searched: trials run finetune + evaluate only, on artifacts every "
                          f"trial shares; a search varies seed, device, model.*, train.* or loss.* "
                          f"(set {key} as a fixed value instead)")
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: distribution must be one of {', '.join(DISTRIBUTIONS)}, got {dist!r}")
    allowed = {"choice": {"values"}, "quniform": {"low", "high", "q"}}.get(dist, {"low", "high"})
    given = set(spec) - {"distribution"}
    if given - allowed:
        raise ConfigError(f"{where}: unknown field '{sorted(given - allowed)[0]}' for {dist} "
                          f"(it takes {', '.join(sorted(allowed))})")
    if allowed - given:
        raise ConfigError(f"{where}: {dist} needs {', '.join(sorted(allowed - given))}")
    if dist == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: choice needs a non-empty list of values, got {values!r}")
        for v in values:
            if isinstance(v, (list, dict)):
                raise ConfigError(f"{where}: choice values must be single values, got {v!r}")
        if len({json.dumps(v) for v in values}) < len(values):
            raise ConfigError(f"{where}: choice values repeat: {values}")
        return Param(key, dist, values=values, line=line)
    low, high = _number(spec["low"], "low", where), _number(spec["high"], "high", where)
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high}); for a constant write `{key}: {low}`")
    q = None
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    if dist == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}: int needs integer bounds, got low {low!r}, high {high!r}")
    if dist == "quniform":
        q = _number(spec["q"], "q", where)
        steps = (high - low) / q if q > 0 else -1
        if q <= 0 or abs(steps - round(steps)) > 1e-9 * max(1.0, steps):
            raise ConfigError(f"{where}: quniform needs q > 0 dividing high - low ({high} - {low}), got q = {q}")
    return Param(key, dist, low=low, high=high, q=q, line=line)


def _check_param_fits_config(p: Param, base: PipelineConfig, where: str) -> None:
    """Every value the distribution can produce must be a valid value of the config key."""
    kind = _leaf_type(p.key)
    if p.distribution in ("loguniform", "uniform", "quniform") and kind is not float:
        raise ConfigError(f"{where}: a {p.distribution} gives real numbers but the key holds "
                          f"{_type_name(kind)}; use {'int or ' if kind is int else ''}choice")
    if p.distribution == "int" and kind not in (int, float):
        raise ConfigError(f"{where}: int gives integers but the key holds {_type_name(kind)}; use choice")
    candidates = p.values if p.distribution == "choice" else [p.low, p.high]
    for value in candidates:
        try:
            apply_overrides(base, {p.key: value})
        except ConfigError as e:
            raise ConfigError(f"{where}: value {value!r} is not valid: {e}") from None


def _leaf_annotation(key: str):
    tp: Any = PipelineConfig
    for part in key.split("."):
        tp = field_types(tp)[part]
    return tp


def _leaf_type(key: str):
    """The annotated type of a dotted config key, Optional unwrapped."""
    tp = _leaf_annotation(key)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {int: "integers", bool: "true/false", str: "text"}.get(tp, str(tp))


def _number(value, name: str, where: str):
    if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    return value


# ---------------------------------------------------------------- the Tune experiment


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


def run_search(ctx: TrialContext, exp_dir: Path, trials: int, seed: int, points_to_evaluate: list[dict] = (),
               resume: bool = False, searcher: str = "optuna", scheduler: str = "asha", verbose: bool = True) -> str:
    """Run (or resume) the Tune experiment in `exp_dir`; "finished" or "interrupted"."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
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
        epochs = max(_possible_values(ctx, "train.epochs"))
        # One report per epoch, then one after evaluate: max_t past the last epoch, so ASHA may
        # cut a trial at any epoch's rung but never kills one that is about to be evaluated.
        chosen_scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1, grace_period=1,
                                          reduction_factor=2) if scheduler == "asha" else FIFOScheduler())
        columns = {key: _short(key) for key in ctx.space.params}
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
        _close_trial(uri, out, "restarted", "KILLED")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run_id = tracking.start_run(
        uri, ctx.experiment_id, f"trial {trial_id}",
        {"stage": "trial", "git_commit": ctx.git_commit, "ablation": ctx.ablation, "trial_id": trial_id,
         "tune_search": ctx.search, "smoke": ctx.smoke}, parent_id=ctx.parent_run_id, params=flatten(cfg))
    _write_record(out, {"trial_id": trial_id, "run_id": run_id, "values": values, "status": "running",
                        "started": time.time()})
    torch.set_num_threads(max(1, int(ctx.resources["cpu"])))  # a trial's torch uses the CPUs Ray reserved

    def log_epoch(metrics: dict, step: int | None = None) -> None:
        tracking.log_metrics(uri, run_id, metrics, step)
        if step is not None:
            if METRIC in metrics:  # kept before reporting: ASHA may end the trial inside tune.report
                record = _read_record(out)
                _write_record(out, {**record, "epochs": [*record.get("epochs", []), metrics[METRIC]]})
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
        _close_trial(uri, out, "early_stopped", "FINISHED")
        raise
    except BaseException as e:
        tracking.set_tags(uri, run_id, {"error": f"{type(e).__name__}: {e}"[-4000:]})
        _close_trial(uri, out, "failed", "FAILED")
        raise
    metrics = {**tuned.get("metrics", {}), **evaluated.get("metrics", {})}
    tracking.log_metrics(uri, run_id, tuned.get("metrics", {}), cfg.train.epochs)
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
            _close_trial(self.uri, out, "early_stopped", "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        out = Path(self.trials_dir) / trial.trial_id
        if (_read_record(out) or {}).get("status") == "running":
            _close_trial(self.uri, out, "failed", "FAILED")


# ---------------------------------------------------------------- after the search


def trial_records(trials_dir: Path) -> list[dict]:
    """Every trial's trial.json, in the order the trials started."""
    records = [r for r in (_read_record(d) for d in Path(trials_dir).glob("*")) if r]
    return sorted(records, key=lambda r: r["started"])


def best_record(records: list[dict]) -> dict | None:
    """The evaluated trial with the highest final dev/overall."""
    scored = [r for r in records if r["status"] == "finished" and math.isfinite(r.get("metrics", {}).get(METRIC, math.nan))]
    return max(scored, key=lambda r: r["metrics"][METRIC], default=None)


def _finish_search(ctx: TrialContext, exp_dir: Path, state: dict, records: list[dict], seconds: float) -> int:
    uri, parent = ctx.tracking_uri, ctx.parent_run_id
    best = best_record(records)
    if best is None:
        tracking.set_tags(uri, parent, {"error": "no trial finished with a dev/overall"})
        tracking.end_run(uri, parent, "FAILED")
        print("\nerror: no trial finished with a dev/overall; see the trial runs' error tags", file=sys.stderr)
        return 1
    best_cfg = apply_overrides(ctx.cfg, best["values"])
    # Absolute store and tracking locations: the file lives away from the config it came from.
    best_cfg = apply_overrides(best_cfg, {"artifacts": state["store"], "tracking.uri": uri})
    best_path = exp_dir / "best_config.yaml"
    header = (f"# Best trial {best['trial_id']} of tune search {state['name']}: {METRIC} = "
              f"{best['metrics'][METRIC]:.4f}{' (smoke-sized: tiny model, few rows)' if state['smoke'] else ''}\n"
              f"# Searched values: {json.dumps(best['values'])}\n"
              f"# Run it:  python -m pipeline run {best_path}\n")
    best_path.write_text(header + dump_yaml(best_cfg))
    load_config(best_path)  # what `run` will do with it: fail here, not there
    tracking.log_artifact(uri, parent, best_path)
    tracking.log_artifacts(uri, best["run_id"], Path(best["model"]), "model")
    version = _register_model(uri, ctx.cfg.tracking.experiment, best["run_id"], "model", {
        "tune_search": state["name"], "trial_id": best["trial_id"], METRIC: f"{best['metrics'][METRIC]:.6f}"},
        description=f"best of {len(records)} trials of tune search {state['name']}")
    tracking.set_tags(uri, best["run_id"], {"tune_best": "true"})
    if not state["smoke"]:  # the alias `leaderboard` submits; a smoke model never takes it
        from pipeline.leaderboard import promote_champion

        if promote_champion(uri, ctx.cfg.tracking.experiment, version, best["metrics"][METRIC]):
            print(f"tune: version {version} of '{ctx.cfg.tracking.experiment}' is now its 'champion' (leaderboard submits it)")
    tracking.set_tags(uri, parent, {"best_trial": best["trial_id"], "best_run_id": best["run_id"],
                                    "registered_model": f"{ctx.cfg.tracking.experiment}/{version}"})
    tracking.log_metrics(uri, parent, {**{k: v for k, v in best["metrics"].items() if k.startswith("dev/")},
                                       "tune/seconds": seconds, "tune/trials": len(records),
                                       "tune/early_stopped": sum(r["status"] == "early_stopped" for r in records)})
    tracking.end_run(uri, parent)
    for record in records:  # only the best model is kept (logged and registered); no optimizer states
        finetune_dir = Path(ctx.trials_dir) / record["trial_id"] / "finetune"
        shutil.rmtree(finetune_dir / "checkpoint", ignore_errors=True)  # left by trials ASHA stopped
        if record is not best:
            shutil.rmtree(finetune_dir / "model", ignore_errors=True)
    state.update(finished=True, best=best["trial_id"], best_config=str(best_path),
                 registered={"name": ctx.cfg.tracking.experiment, "version": version})
    _write_state(exp_dir, state)
    _print_summary(state, records, uri)
    return 0


def _print_summary(state: dict, records: list[dict], uri: str) -> None:
    print(f"\ntune: {state['name']}: {len(records)} trials "
          f"({sum(r['status'] == 'early_stopped' for r in records)} stopped early by ASHA, "
          f"{sum(r['status'] == 'failed' for r in records)} failed)")
    best = next((r for r in records if r["trial_id"] == state.get("best")), None)
    for r in records:
        score = r.get("metrics", {}).get(METRIC)
        shown = f"{score:.4f}" if score is not None else (f"({r['epochs'][-1]:.4f} at epoch {len(r['epochs'])})"
                                                         if r.get("epochs") else "-")
        mark = "*" if r is best else " "
        print(f" {mark} {r['trial_id']:<10} {r['status']:<14} {METRIC} {shown:<7} "
              + " ".join(f"{_short(k)}={_fmt(v)}" for k, v in r["values"].items()))
    if best:
        print(f"\nbest trial:    {best['trial_id']}  {METRIC} = {best['metrics'][METRIC]:.4f}")
        print(f"best config:   {state['best_config']}")
        print(f"               run it: python -m pipeline run {state['best_config']}")
        print(f"registered:    model '{state['registered']['name']}' version {state['registered']['version']}")
    print(f"MLflow:        parent run {state['parent_run_id']} at {uri}")


# ---------------------------------------------------------------- helpers


def _tune_root(store: ArtifactStore) -> Path:
    if store.is_local:
        return Path(store.root) / "tune"
    import tempfile  # Tune keeps its state and the trials' models on local disk

    return Path(tempfile.gettempdir()) / "minbert-tune"


def _latest_search(tune_root: Path, space_path: Path, smoke: bool) -> Path | None:
    """The most recently active search of this space file (smoke or not)."""
    found = []
    for path in tune_root.glob("*/search.json"):
        state = json.loads(path.read_text())
        if state.get("space_file") == str(space_path) and state.get("smoke") == smoke:
            found.append(path)
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


def _init_ray(cfg: PipelineConfig) -> None:
    """A local Ray in-process (or the cluster at ray.address), as `run` starts it."""
    dag.init_ray(dag.ray_address(cfg), cfg.ray.num_cpus)


def _reopen_run(uri: str, run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).update_run(run_id, status="RUNNING")


def _register_model(uri: str, name: str, run_id: str, artifact_path: str, tags: dict, description: str) -> str:
    """A new version of registered model `name` from a run's artifacts; its version number.

    The finetune output is a HuggingFace BERT folder plus heads, not an MLflow flavor, so it is
    registered as the plain artifact folder (source runs:/<run>/model), loadable with
    stages.multitask_model.load_multitask after `mlflow artifacts download`.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        client.create_registered_model(name, description="multitask BERT (sst, para, sts) from pipeline tune")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    version = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()}, description=description)
    return str(version.version)


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


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


def _close_trial(uri: str, out: Path, status: str, mlflow_status: str) -> None:
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


def _write_state(exp_dir: Path, state: dict) -> None:
    tmp = exp_dir / "search.json.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(exp_dir / "search.json")


def _short(key: str) -> str:
    parts = key.split(".")
    return "w_" + parts[-1] if key.startswith("loss.weights.") else parts[-1]


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
