"""`python -m pipeline ablate`: a grid's variants side by side, compared in one MLflow parent run.

    python -m pipeline ablate [CONFIG] --grid search_spaces/ablations/NAME.yaml [--seeds N] [--smoke] [--only A,B]

Every variant (x seed) is the pipeline's DAG with the variant's overrides. All of them are
planned against the cache first, and a stage whose key several variants share (data_prep,
an mlm_pretrain of the same config) runs once as one Ray task; the rest run as Ray tasks side
by side as resources allow (dag.execute_many). A variant that fails does not stop the others.

MLflow: a parent run `ablation NAME` (tag stage=ablation); under it one run per variant and
seed (tag stage=variant, ablation=<variant>, seed; `published/sst`, ... when the grid has the
variant's published numbers, pipeline/published.py) with the same params as a plain run, the
per-epoch dev/train metrics at step = epoch and the final dev/* scores, `variant/seconds` (the
compute of its stages, less those every variant shares) and `variant/peak_rss_mb` (the largest
peak of those stages). A variant's stage runs nest under it; shared stages nest under the
parent (tag shared_by). When all have finished, the comparison (pipeline/comparison.py: CSV, Markdown, bar and curve PNGs) is logged on
the parent under comparison/ and printed; for a grid with claims (pipeline/claims.py), so is the
verdict on each (pipeline/verdicts.py), under claims/.

The table's `untrained` row is the stage `reference` (the backbone scored without finetuning,
stages/reference.py), planned once for the data and backbone of the `baseline` variant (else
the first one), from the cache like any stage, its run under the parent (tag stage=reference).
It is on unless stages.reference.enabled is false (null is on here, off for `run`).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import comparison, dag, differences, lifecycle, published, tracking, verdicts
from pipeline.config import ConfigError, PipelineConfig, apply_overrides, dump_yaml, flatten, load_config
from pipeline.constants import METRIC, REFERENCE_STAGE, is_remote
from pipeline.grids import read_grid
from pipeline.prepare import artifacts_location, prepared_config, with_reference
from pipeline.store import ArtifactStore


@dataclass
class VariantRun:
    """One variant at one seed: its config, plan and MLflow runs."""
    variant: str
    seed: int
    cfg: PipelineConfig
    planned: list[dag.PlannedStage]
    run_id: str = ""
    stage_runs: dict[str, str] | None = None


def main(args) -> int:
    config_path = Path(args.config).resolve()
    grid_path = Path(args.grid).resolve()
    config_dir = config_path.parent
    cfg = load_config(config_path)
    grid = read_grid(grid_path, cfg)
    base, variants, published_rows = grid.base, grid.variants, grid.published
    if args.only:
        wanted = [v.strip() for v in args.only.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in variants]
        if unknown:
            raise ConfigError(f"--only {unknown[0]}: no such variant in {args.grid}; it has {', '.join(variants)}")
        variants = {v: variants[v] for v in wanted}
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: must be at least 1")
    store = ArtifactStore(artifacts_location(apply_overrides(apply_overrides(cfg, base), args.overrides), config_dir))

    runs: list[VariantRun] = []
    for name, overrides in variants.items():
        variant_cfg, _ = prepared_config(cfg, {**base, **overrides}, args.overrides, args.smoke, config_dir)
        for i in range(args.seeds):
            seeded = apply_overrides(variant_cfg, {"seed": variant_cfg.seed + i})
            planned = [p for p in dag.plan(seeded, store, args.force) if p.stage.name != REFERENCE_STAGE]
            runs.append(VariantRun(name, seeded.seed, seeded, planned))
    # The untrained row: data_prep (the baseline's, shared with it) + reference, once.
    source = next((r for r in runs if r.variant == comparison.BASELINE), runs[0])
    reference_cfg = with_reference(source.cfg)
    reference = [p for p in dag.plan(reference_cfg, store, args.force)
                 if p.stage.name in ("data_prep", REFERENCE_STAGE)]
    if not any(p.stage.name == REFERENCE_STAGE for p in reference):  # stages.reference.enabled: false
        reference = []

    users = _stage_users(runs)
    shared_by_all = {k for k, who in users.items() if len(who) == len(runs)}
    name = args.name or grid_path.stem + ("-smoke" if args.smoke else "")
    print(f"ablation {name}: {len(variants)} variant(s) x {args.seeds} seed(s) from {args.grid}; "
          f"artifacts in {store.location}")
    for (stage, key), who in users.items():
        cached = next(p.cached for p in runs[who[0]].planned if (p.stage.name, p.key) == (stage, key))
        owner = "shared by all" if len(who) == len(runs) else ", ".join(sorted({_run_name(runs[i], args.seeds) for i in who}))
        print(f"  {stage:<13} {'cached' if cached else 'to run':<7} key {key}  ({owner})")
    for p in reference:
        if p.stage.name == REFERENCE_STAGE:
            print(f"  {p.stage.name:<13} {'cached' if p.cached else 'to run':<7} key {p.key}  "
                  f"(the {comparison.UNTRAINED} row: {source.variant}'s data and backbone)")

    uri = lifecycle.tracking_uri_for(runs[0].cfg, config_dir)
    common = apply_overrides(cfg, args.overrides)
    start = time.time()
    with lifecycle.opened_runs(uri, runs[0].cfg.tracking, config_dir) as mlflow_runs:
        parent = mlflow_runs.start(
            f"ablation {name}",
            {"stage": "ablation", "ablation_grid": str(grid_path), "smoke": args.smoke,
             "ablation_variants": ",".join(variants), "seeds": args.seeds, "config_file": str(config_path)},
            params=flatten(common))
        tracking.log_artifact(uri, parent, grid_path)
        tracking.log_text(uri, parent, dump_yaml(common), "config.yaml")
        for run in runs:
            run.run_id = mlflow_runs.start(
                _run_name(run, args.seeds),
                {"stage": "variant", "ablation": run.variant, "seed": run.seed, "smoke": args.smoke,
                 "config_file": str(config_path), "ablation_grid": str(grid_path),
                 **published.to_tags(published_rows.get(run.variant))},
                parent=parent, params=flatten(run.cfg))
        stage_runs: dict[tuple[str, str], str] = {}
        for (stage, key), who in users.items():
            shared = len(who) > 1
            first = runs[who[0]]
            p = next(p for p in first.planned if (p.stage.name, p.key) == (stage, key))
            tags = lifecycle.stage_tags(p, "shared" if shared else first.variant)
            if shared:
                tags["shared_by"] = ",".join(sorted({_run_name(runs[i], args.seeds) for i in who}))[:5000]
            stage_runs[(stage, key)] = mlflow_runs.start(stage, tags, parent=parent if shared else first.run_id,
                                                         params=flatten(first.cfg))
        for run in runs:
            run.stage_runs = {p.stage.name: stage_runs[(p.stage.name, p.key)] for p in run.planned}
        for p in reference:  # its data_prep is the baseline's, opened above; the reference, a row, under the parent
            if (p.stage.name, p.key) not in stage_runs:
                stage_runs[(p.stage.name, p.key)] = mlflow_runs.start(
                    p.stage.name, lifecycle.stage_tags(p, comparison.UNTRAINED), parent=parent,
                    params=flatten(reference_cfg))
        reference_runs = {p.stage.name: stage_runs[(p.stage.name, p.key)] for p in reference}

        # A variant that fails comes back as its StageFailed; only the driver's own failure
        # (or Ctrl-C) raises, and then opened_runs ends every run still open.
        plans = [(r.planned, dag.RunContext(r.cfg, store.location, uri,
                                            label=_run_name(r, args.seeds).replace(" seed ", "/")), r.stage_runs)
                 for r in runs]
        if reference:
            plans.append((reference, dag.RunContext(reference_cfg, store.location, uri, label=comparison.UNTRAINED),
                          reference_runs))
        outcomes = dag.execute_many(plans, dag.ray_address(runs[0].cfg), runs[0].cfg.ray.num_cpus)
        dag.stop_ray()

        failed = _end_variants(mlflow_runs, uri, store, runs, outcomes, args.seeds, shared_by_all)
        reference_failed = bool(reference) and isinstance(outcomes[-1], dag.StageFailed)
        if reference:
            results = outcomes[-1].results if reference_failed else outcomes[-1]
            lifecycle.end_stage_runs(mlflow_runs, store, reference, reference_runs, results,
                                     outcomes[-1] if reference_failed else None)
            if reference_failed:
                print(f"the {comparison.UNTRAINED} reference failed: {str(outcomes[-1]).splitlines()[0]}",
                      file=sys.stderr)

        seconds = time.time() - start
        groups, printed, out_dir = _compare(uri, parent, store, name, args.seeds, grid.claims)
        _tag_parent(uri, parent, groups, failed, reference_failed, seconds)
        mlflow_runs.end(parent, "FAILED" if failed or reference_failed else "FINISHED")

    print(f"\nablation {name} finished in {seconds:.1f} s"
          + (f"; {len(failed)} variant run(s) FAILED: {', '.join(failed)}" if failed else "")
          + (f"; the {comparison.UNTRAINED} reference FAILED" if reference_failed else ""))
    print()
    print("\n".join(printed))
    print(f"comparison:    {out_dir} (also on the parent run's artifacts, comparison/"
          + (f" and {verdicts.ARTIFACTS}/)" if grid.claims else ")"))
    print(f"MLflow:        parent run {parent} in experiment '{runs[0].cfg.tracking.experiment}' at {uri}")
    print(f"               python -m pipeline report {parent}" + (f" {args.config}" if args.config != "pipeline.yaml" else ""))
    return 1 if failed or reference_failed else 0


# ---------------------------------------------------------------- helpers


def _end_variants(mlflow_runs, uri: str, store: ArtifactStore, runs: list[VariantRun], outcomes: list,
                  seeds: int, shared_by_all: set[tuple[str, str]]) -> list[str]:
    """Each variant run's stage runs ended and its scores recorded; returns the failed ones' names."""
    failed = []
    for run, outcome in zip(runs, outcomes):
        failure = outcome if isinstance(outcome, dag.StageFailed) else None
        results = failure.results if failure else outcome
        lifecycle.end_stage_runs(mlflow_runs, store, run.planned, run.stage_runs, results, failure)
        if failure:
            failed.append(_run_name(run, seeds))
            mlflow_runs.end(run.run_id, "FAILED", failure)
            print(f"variant {_run_name(run, seeds)} failed: {str(failure).splitlines()[0]}", file=sys.stderr)
            continue
        _record_variant(uri, run, results, store, shared_by_all)
        mlflow_runs.end(run.run_id)
    return failed


def _compare(uri: str, parent: str, store: ArtifactStore, name: str, seeds: int, claims: dict
             ) -> tuple[list[comparison.Group], list[str], Path]:
    """The comparison and, for a grid with claims, their verdicts (pipeline/verdicts.py): written
    to one folder, logged on the parent under comparison/ and claims/; returns the groups, the
    lines to print and the folder."""
    parent_tags, groups = comparison.comparison(uri, parent)
    note = differences.add_intervals(uri, parent, groups, comparison.reference_label(parent_tags, groups), store)
    out_dir = _comparison_dir(store, parent, name)
    title = f"ablation {name}" + (f" ({seeds} seeds)" if seeds > 1 else "")
    for path in comparison.write_comparison(groups, out_dir, title):
        tracking.log_artifact(uri, parent, path, "comparison")
    printed = [comparison.to_markdown(groups), *([note] if note else [])]
    if claims:
        rows, claims_note = verdicts.measure(uri, parent, groups, claims, store)
        for path in verdicts.write(rows, out_dir, title):
            tracking.log_artifact(uri, parent, path, verdicts.ARTIFACTS)
        tracking.log_metrics(uri, parent, verdicts.counts(rows))
        printed += ["Which published claims hold:\n", verdicts.to_markdown(rows), *([claims_note] if claims_note else [])]
    return groups, printed, out_dir


def _tag_parent(uri: str, parent: str, groups: list[comparison.Group], failed: list[str], reference_failed: bool,
                seconds: float) -> None:
    """The parent's outcome: failures, the best variant, the time and the two headline scores."""
    base_group = next((g for g in groups if g.label == comparison.BASELINE), None)
    best = max((g for g in groups if METRIC in g.mean and g.label != comparison.UNTRAINED),
               key=lambda g: g.mean[METRIC], default=None)
    tags = {"failed_variants": ",".join(failed)} if failed else {}
    if reference_failed:
        tags["reference_failed"] = "true"
    if best is not None:
        tags["best_variant"] = best.label
    tracking.set_tags(uri, parent, tags)
    tracking.log_metrics(uri, parent, {"ablation/seconds": seconds, "ablation/variants_failed": len(failed),
                                       **({"best/dev_overall": best.mean[METRIC]} if best else {}),
                                       **({"baseline/dev_overall": base_group.mean[METRIC]}
                                          if base_group and METRIC in base_group.mean else {})})


def _stage_users(runs: list[VariantRun]) -> dict[tuple[str, str], list[int]]:
    """(stage, key) -> the indexes of the variant runs whose DAG holds it, in DAG order."""
    users: dict[tuple[str, str], list[int]] = {}
    for stage in dag.STAGE_NAMES:
        for i, run in enumerate(runs):
            for p in run.planned:
                if p.stage.name == stage:
                    users.setdefault((stage, p.key), []).append(i)
    return users


def _run_name(run: VariantRun, seeds: int) -> str:
    return run.variant if seeds == 1 else f"{run.variant} seed {run.seed}"


def _record_variant(uri: str, run: VariantRun, results: dict, store: ArtifactStore,
                    shared_by_all: set[tuple[str, str]]) -> None:
    """Per-epoch metrics at step = epoch, then the final scores at the last epoch's step (so the
    latest value MLflow shows is evaluate's), the variant's compute seconds and peak memory."""
    finetune = next((p for p in run.planned if p.stage.name == "finetune"), None)
    epochs = run.cfg.train.epochs
    if finetune is not None:
        history_file = store.local_dir("finetune", finetune.key) / "history.json"
        if history_file.is_file():
            for row in json.loads(history_file.read_text()):
                epoch = int(row.pop("epoch"))
                tracking.log_metrics(uri, run.run_id, row, step=epoch)
                epochs = max(epochs, epoch)
    final = {**results.get("finetune", {}).get("metrics", {}), **results.get("evaluate", {}).get("metrics", {})}
    own = [p for p in run.planned if (p.stage.name, p.key) not in shared_by_all]
    final["variant/seconds"] = sum(results[p.stage.name].get("seconds", 0.0) for p in own)
    # Its own stages' peak: a stage every variant shares (data_prep) would be everyone's maximum.
    peaks = [results[p.stage.name].get("metrics", {}).get("stage/peak_rss_mb") for p in own or run.planned]
    if any(v is not None for v in peaks):
        final["variant/peak_rss_mb"] = max(v for v in peaks if v is not None)
    final = {k: v for k, v in final.items() if not k.startswith("stage/")}
    tracking.log_metrics(uri, run.run_id, final, step=epochs)


def _comparison_dir(store: ArtifactStore, parent: str, name: str) -> Path:
    """Beside the stage outputs when the store is a local folder; a temp folder otherwise."""
    if is_remote(store.location):
        return Path(tempfile.mkdtemp(prefix=f"ablation-{name}-"))
    return Path(store.location) / "ablations" / f"{name}-{parent[:8]}"


