"""`python -m pipeline run`: the pipeline's stages, cached ones skipped, as Ray tasks.

    python -m pipeline run [CONFIG] [--set KEY=VALUE ...] [--force STAGE|all] [--smoke] [--variant GRID:NAME]

MLflow: one parent run (tag stage=pipeline, or `smoke`) with a child run per stage; on the
parent the final dev/* scores, `pipeline/seconds`, the resolved config and the submission zip.
"""

from __future__ import annotations

import time

from pipeline import dag, lifecycle, tracking
from pipeline.config import dump_yaml, flatten
from pipeline.constants import DEV_METRICS, EXTRA_EVAL_PREFIX, REFERENCE_STAGE
from pipeline.prepare import prepare
from pipeline.store import ArtifactStore


def main(args) -> int:
    prepared = prepare(args.config, args.overrides, args.smoke, args.variant)
    cfg = prepared.cfg
    store = ArtifactStore(prepared.store_location)
    planned = dag.plan(cfg, store, args.force)
    print(f"pipeline: {prepared.config_path.name}{' (smoke)' if args.smoke else ''}; artifacts in {store.location}")
    for p in planned:
        print(f"  {p.stage.name:<13} {'cached, skipped' if p.cached else 'to run'}  key {p.key}")

    uri = lifecycle.tracking_uri_for(cfg, prepared.config_dir)
    params = flatten(cfg)
    start = time.time()
    with lifecycle.opened_runs(uri, cfg.tracking, prepared.config_dir) as runs:
        parent = runs.start("smoke" if args.smoke else "pipeline",
                            {"stage": "pipeline", "ablation": prepared.ablation, "smoke": args.smoke,
                             "config_file": str(prepared.config_path)}, params=params)
        tracking.log_text(uri, parent, dump_yaml(cfg), "config.yaml")
        stage_runs = lifecycle.start_stage_runs(runs, planned, parent, prepared.ablation, params)
        ctx = dag.RunContext(cfg, store.location, uri, resume=args.resume)
        try:
            results = dag.execute(planned, ctx, stage_runs, dag.ray_address(cfg), cfg.ray.num_cpus)
        except BaseException as e:
            lifecycle.end_stage_runs(runs, store, planned, stage_runs, getattr(e, "results", None) or {}, e)
            raise
        lifecycle.end_stage_runs(runs, store, planned, stage_runs, results)
        evaluate = next((p for p in planned if p.stage.name == "evaluate"), None)
        if evaluate is not None:
            submission = store.local_dir("evaluate", evaluate.key) / results["evaluate"].get("submission", "submission.zip")
            if submission.exists():
                tracking.log_artifact(uri, parent, submission)
        final = results.get("evaluate", results.get("finetune", {})).get("metrics", {})
        tracking.log_metrics(uri, parent, {**final, "pipeline/seconds": time.time() - start})
        runs.end(parent)
    dag.stop_ray()
    _print_summary(planned, results, store, uri, parent, cfg, time.time() - start)
    return 0


def _print_summary(planned, results, store, uri, parent, cfg, seconds) -> None:
    print(f"\npipeline finished in {seconds:.1f} s")
    for p in planned:
        how = "cached" if p.cached else f"ran in {results[p.stage.name].get('seconds', 0):.1f} s"
        print(f"  {p.stage.name:<13} {how}")
    metrics = results.get("evaluate", {}).get("metrics", {})
    if metrics:
        print("\ndev scores:")
        for name in DEV_METRICS:
            if name in metrics:
                print(f"  {name:<14} {metrics[name]:.4f}")
    extra = {k: v for k, v in metrics.items() if k.startswith(EXTRA_EVAL_PREFIX)}
    if extra:  # data.extra_eval
        print("extra evaluation sets:")
        for name, value in extra.items():
            print(f"  {name:<14} {value:.4f}")
    untrained = results.get(REFERENCE_STAGE, {}).get("metrics", {})
    if untrained:  # stages.reference.enabled: true
        print("untrained:     " + ", ".join(f"{n} {untrained[n]:.4f}" for n in DEV_METRICS if n in untrained)
              + " (the backbone without finetuning)")
    evaluate = next((p for p in planned if p.stage.name == "evaluate"), None)
    if evaluate:
        out = store.path("evaluate", evaluate.key)
        print(f"\npredictions:   {out}/{results['evaluate'].get('predictions', 'predictions')}")
        print(f"submission:    {out}/{results['evaluate'].get('submission', 'submission.zip')}")
    print(f"MLflow:        run {parent} in experiment '{cfg.tracking.experiment}' at {uri}")
    if uri.startswith("sqlite:"):
        print(f"               browse with: mlflow ui --backend-store-uri {uri}")
