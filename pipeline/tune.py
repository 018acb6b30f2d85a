"""`python -m pipeline tune`: hyperparameter search over finetune + evaluate with Ray Tune.

    python -m pipeline tune [CONFIG] --space search_spaces/NAME.yaml [--trials N] [--smoke] [--resume]

data_prep (and mlm_pretrain when enabled, and the reference: the untrained backbone's scores,
the `untrained` row `report` shows with the trials) run once through the DAG cache; then a Ray Tune
experiment (pipeline/tuning.py) samples the search space (pipeline/search_space.py) with
Optuna's TPE, stops weak trials early with ASHA and runs each trial's finetune + evaluate on
those artifacts. The search is one MLflow parent run (stage=tune) with the shared stages' runs
and a nested run per trial under it. The best trial's config is written as YAML that
`python -m pipeline run` accepts, and its model is registered in the MLflow model registry.

Files of a search, under `<artifacts>/tune/<name>/`: Tune's own state (what `--resume`
restores), `search.json` (the driver's state), `base_config.yaml` and `space.yaml` (what every
trial starts from), `trials/<trial id>/` (each trial's finetune and evaluate outputs and its
`trial.json`) and `best_config.yaml`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from pipeline import dag, lifecycle, registry, tracking
from pipeline.config import ConfigError, apply_overrides, dump_yaml, flatten, load_config
from pipeline.constants import EXTRA_EVAL_PREFIX, METRIC
from pipeline.prepare import prepare, with_reference
from pipeline.search_space import load_space
from pipeline.store import ArtifactStore
from pipeline.tuning import (PRE_STAGES, TrialContext, best_record, close_trial, fmt, run_search, short,
                             trial_records, trial_resources)


def main(args) -> int:
    """The `tune` verb: prepare, search, record the best trial. Returns the exit status."""
    space_path = Path(args.space).resolve()
    if args.resume:
        exp_dir, state, cfg, space, store = _resumed(args, space_path)
    else:
        prepared = prepare(args.config, args.overrides, args.smoke, args.variant)
        cfg, store = prepared.cfg, ArtifactStore(prepared.store_location)
        space = load_space(space_path, cfg)  # a bad space is an error before anything starts
        cfg = apply_overrides(cfg, space.fixed)
        if not (cfg.stages.finetune.enabled and cfg.stages.evaluate.enabled):
            raise ConfigError(f"{prepared.config_path}: tune needs stages.finetune and stages.evaluate enabled")
        if args.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {args.trials}")
        points = [space.config_point(cfg)] if args.include_config else []
        name = args.name or f"{space_path.stem}{'-smoke' if args.smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp_dir = _tune_root(store) / name
        if (exp_dir / "search.json").exists():
            raise ConfigError(f"--name {name}: {exp_dir} already holds a search; add --resume to continue it")
        state = {"name": name, "trials": args.trials, "seed": cfg.seed if args.seed is None else args.seed,
                 "points_to_evaluate": points, "smoke": args.smoke, "ablation": prepared.ablation,
                 "config_file": str(prepared.config_path), "space_file": str(space_path), "store": store.location,
                 "finished": False}
    config_path = Path(state["config_file"])
    # A resumed search keeps logging where it started, unless MLFLOW_TRACKING_URI says otherwise.
    kept = state.get("tracking_uri") if args.resume and not os.environ.get("MLFLOW_TRACKING_URI") else None
    uri = lifecycle.tracking_uri_for(cfg, config_path.parent, kept)
    # stages.reference null is on here: the search's table (`report`) gets its `untrained` row
    planned = [p for p in dag.plan(with_reference(cfg), store) if p.stage.name in PRE_STAGES]
    params = flatten(cfg)

    with lifecycle.opened_runs(uri, cfg.tracking, config_path.parent) as runs:
        if not args.resume:
            exp_dir.mkdir(parents=True, exist_ok=True)
            (exp_dir / "base_config.yaml").write_text(dump_yaml(cfg))
            shutil.copyfile(space_path, exp_dir / "space.yaml")
        state["tracking_uri"] = uri
        if "parent_run_id" not in state:
            state["parent_run_id"] = runs.start(
                f"tune {state['name']}",
                {"stage": "tune", "ablation": state["ablation"], "smoke": state["smoke"],
                 "config_file": state["config_file"], "tune_space": state["space_file"],
                 "tune_trials": state["trials"], "tune_seed": state["seed"], "tune_storage": str(exp_dir)},
                params=params)
            tracking.log_text(uri, state["parent_run_id"], dump_yaml(cfg), "config.yaml")
            tracking.log_artifact(uri, state["parent_run_id"], exp_dir / "space.yaml")
        elif not state["finished"]:
            runs.adopt(state["parent_run_id"])
        parent = state["parent_run_id"]
        _write_state(exp_dir, state)

        print(f"tune: {state['name']}: {state['trials']} trials over {len(space.params)} quantities "
              f"({', '.join(space.params)}); outputs in {exp_dir}")
        for p in planned:
            print(f"  {p.stage.name:<13} {'cached, skipped' if p.cached else 'to run'}  key {p.key}")

        stage_runs = lifecycle.start_stage_runs(runs, planned, parent, state["ablation"], params,
                                                skip_cached=args.resume)
        dag.init_ray(dag.ray_address(cfg), cfg.ray.num_cpus)  # the trials need it even when every stage is cached
        try:
            results = dag.execute(planned, dag.RunContext(cfg, store.location, uri), stage_runs,
                                  dag.ray_address(cfg), cfg.ray.num_cpus)
        except BaseException as e:
            lifecycle.end_stage_runs(runs, store, planned, stage_runs, getattr(e, "results", None) or {}, e)
            raise
        lifecycle.end_stage_runs(runs, store, planned, stage_runs, results)

        ctx = TrialContext(
            cfg=cfg, space=space, inputs={p.stage.name: str(store.local_dir(p.stage.name, p.key)) for p in planned},
            tracking_uri=uri, experiment_id=runs.experiment_id, parent_run_id=parent, git_commit=runs.git_commit,
            ablation=state["ablation"], trials_dir=str(exp_dir / "trials"), resources=trial_resources(cfg),
            smoke=state["smoke"], search=state["name"], driver=lifecycle.driver_tags())
        start = time.time()
        try:
            outcome = run_search(ctx, exp_dir, trials=state["trials"], seed=state["seed"],
                                 points_to_evaluate=state["points_to_evaluate"], resume=args.resume)
        except KeyboardInterrupt:  # a second Ctrl-C; the first one ends Tune's loop gracefully
            outcome = "interrupted"
        except BaseException:  # the trial runs were opened in Ray workers: close the ones left open
            dag.stop_ray()
            for record in trial_records(exp_dir / "trials"):
                if record["status"] == "running":
                    close_trial(uri, exp_dir / "trials" / record["trial_id"], "failed", "FAILED")
            raise
        dag.stop_ray()  # flushes the trials' forwarded output before the summary
        records = trial_records(exp_dir / "trials")
        if outcome == "interrupted":
            for record in records:
                if record["status"] == "running":
                    close_trial(uri, exp_dir / "trials" / record["trial_id"], "interrupted", "KILLED")
            runs.end(parent, "KILLED", "interrupted; continue with tune --resume")
            print(f"\ntune: interrupted; {sum(r['status'] != 'running' for r in records)} trials done. Continue with:\n"
                  f"  python -m pipeline tune {config_path.name} --space {args.space} --resume --name {state['name']}"
                  f"{' --smoke' if state['smoke'] else ''}", file=sys.stderr)
            return 130
        if state["finished"]:
            print(f"\ntune: {state['name']} had already finished; no trial was re-run")
            _print_summary(state, records, uri)
            return 0
        return _finish_search(runs, ctx, exp_dir, state, records, time.time() - start)


def _resumed(args, space_path: Path):
    """(search folder, driver state, base config, space, store) of the search --resume continues."""
    prepared = prepare(args.config, args.overrides, False, args.variant)
    tune_root = _tune_root(ArtifactStore(prepared.store_location))
    exp_dir = tune_root / args.name if args.name else _latest_search(tune_root, space_path, args.smoke)
    if exp_dir is None or not (exp_dir / "search.json").is_file():
        which = f"named {args.name}" if args.name else f"of {space_path}{' with --smoke' if args.smoke else ''}"
        raise ConfigError(f"--resume: no search {which} under {tune_root}")
    state = json.loads((exp_dir / "search.json").read_text())
    cfg = load_config(exp_dir / "base_config.yaml")
    print(f"tune: resuming {exp_dir.name} ({state['trials']} trials; its saved config and space, "
          f"not the command line's, apply)")
    return exp_dir, state, cfg, load_space(exp_dir / "space.yaml", cfg), ArtifactStore(state["store"])


# ---------------------------------------------------------------- after the search


def _finish_search(runs: lifecycle.Runs, ctx: TrialContext, exp_dir: Path, state: dict, records: list[dict],
                   seconds: float) -> int:
    uri, parent = ctx.tracking_uri, ctx.parent_run_id
    best = best_record(records)
    if best is None:
        runs.end(parent, "FAILED", f"no trial finished with a {METRIC}")
        print(f"\nerror: no trial finished with a {METRIC}; see the trial runs' error tags", file=sys.stderr)
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
    version = registry.register_model(uri, ctx.cfg.tracking.experiment, best["run_id"], "model", {
        "tune_search": state["name"], "trial_id": best["trial_id"], METRIC: f"{best['metrics'][METRIC]:.6f}"},
        description=f"best of {len(records)} trials of tune search {state['name']}")
    tracking.set_tags(uri, best["run_id"], {"tune_best": "true"})
    if not state["smoke"]:  # the alias `leaderboard` submits; a smoke model never takes it
        if registry.promote_champion(uri, ctx.cfg.tracking.experiment, version, best["metrics"][METRIC]):
            print(f"tune: version {version} of '{ctx.cfg.tracking.experiment}' is now its 'champion' (leaderboard submits it)")
    tracking.set_tags(uri, parent, {"best_trial": best["trial_id"], "best_run_id": best["run_id"],
                                    "registered_model": f"{ctx.cfg.tracking.experiment}/{version}"})
    tracking.log_metrics(uri, parent, {**{k: v for k, v in best["metrics"].items() if k.startswith(("dev/", EXTRA_EVAL_PREFIX))},
                                       "tune/seconds": seconds, "tune/trials": len(records),
                                       "tune/early_stopped": sum(r["status"] == "early_stopped" for r in records)})
    runs.end(parent)
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
              + " ".join(f"{short(k)}={fmt(v)}" for k, v in r["values"].items()))
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


def _write_state(exp_dir: Path, state: dict) -> None:
    tmp = exp_dir / "search.json.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(exp_dir / "search.json")
