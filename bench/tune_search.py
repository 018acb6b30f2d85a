"""Benchmark: Optuna TPE vs random search, same trial budget, same task, several seeds.

    .venv/bin/python bench/tune_search.py [--trials 8] [--repeats 3] [--space search_spaces/loss_and_sampling.yaml]
                                          [--set KEY=VALUE ...]

Each repeat runs two Tune experiments over the same search space on a smoke-sized task (the
smoke run's tiny random-weight BERT, but 256 rows per split and 4 epochs so that trials differ:
at 64 rows and 2 epochs most settings score the same majority-class dev/overall; data_prep
runs once and is shared): OptunaSearch (TPE,
seeded) and Tune's random search (BasicVariantGenerator, same seed), both under the same ASHA
scheduler and concurrency, with the trials' own training seed fixed, so the searcher is the
only difference. A trial's score is the best dev/overall any of its epochs reached (an
ASHA-stopped trial counts with what it reached before it was cut). Prints, per repeat, the best
each searcher found and after how many trials, then the means and their ratio.

Everything (artifacts, Tune state, an MLflow store) goes to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import dag, tracking  # noqa: E402
from pipeline.prepare import resolve_paths, smoke_config  # noqa: E402
from pipeline.config import apply_overrides, flatten, load_config  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402
from pipeline.lifecycle import driver_tags  # noqa: E402
from pipeline.search_space import load_space  # noqa: E402
from pipeline.tuning import PRE_STAGES, TrialContext, run_search, trial_records, trial_resources  # noqa: E402

SEARCHERS = ("optuna", "random")
BENCH_OVERRIDES = {"data.max_rows": 256, "train.epochs": 4}  # on top of the smoke settings; --set wins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="searcher seed of the first repeat (then +1, +2, ...)")
    parser.add_argument("--config", default=str(REPO / "pipeline.yaml"))
    parser.add_argument("--space", default=str(REPO / "search_spaces" / "loss_and_sampling.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cpus-per-trial", type=float, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    try:
        return bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(args, work: Path) -> int:
    config_path = Path(args.config).resolve()
    cfg = load_config(config_path)
    cfg = smoke_config(apply_overrides(cfg, {"artifacts": str(work / "artifacts")}), str(work / "artifacts"))
    cfg = resolve_paths(cfg, config_path.parent)
    cfg = apply_overrides(cfg, {"stages.finetune.num_cpus": args.cpus_per_trial,
                                "stages.evaluate.num_cpus": args.cpus_per_trial, "stages.mlm_pretrain.enabled": False})
    cfg = apply_overrides(apply_overrides(cfg, BENCH_OVERRIDES), args.overrides)
    space = load_space(args.space, cfg)
    cfg = apply_overrides(cfg, space.fixed)

    store = ArtifactStore(str(work / "artifacts"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment(uri, "tune-bench")
    parent = tracking.start_run(uri, experiment_id, "bench", {"stage": "bench"}, params=flatten(cfg))
    planned = [p for p in dag.plan(cfg, store) if p.stage.name in PRE_STAGES]
    import ray

    # the trials' own output would bury the table; the bench prints one line per experiment
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}})
    runs = {p.stage.name: tracking.start_run(uri, experiment_id, p.stage.name, {"stage": p.stage.name}, parent)
            for p in planned}
    dag.execute(planned, dag.RunContext(cfg, store.location, uri), runs, None, cfg.ray.num_cpus)
    base = TrialContext(
        cfg=cfg, space=space, inputs={p.stage.name: str(store.local_dir(p.stage.name, p.key)) for p in planned},
        tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent, git_commit="bench", ablation="none",
        trials_dir="", resources=trial_resources(cfg), smoke=True, search="", driver=driver_tags())

    print(f"bench: {args.trials} trials x {len(SEARCHERS)} searchers x {args.repeats} repeats, "
          f"{len(space.params)} searched quantities from {Path(args.space).name}; smoke task, ASHA for both")
    rows = []
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        row = {"seed": seed}
        for searcher in SEARCHERS:
            exp_dir = work / "tune" / f"{searcher}-{seed}"
            ctx = dataclasses.replace(base, trials_dir=str(exp_dir / "trials"), search=exp_dir.name)
            start = time.time()
            outcome = run_search(ctx, exp_dir, trials=args.trials, seed=seed, searcher=searcher, verbose=False)
            if outcome != "finished":
                print(f"bench: {exp_dir.name} did not finish ({outcome})", file=sys.stderr)
                return 1
            records = trial_records(exp_dir / "trials")
            failed = [r["trial_id"] for r in records if r["status"] == "failed"]
            if failed or len(records) < args.trials:
                print(f"bench: {exp_dir.name}: {len(records)} trials ran, failed: {failed or 'none'}; "
                      f"the comparison needs every trial", file=sys.stderr)
                return 1
            scores = [trial_score(r) for r in records]
            row[searcher] = {"scores": scores, "seconds": time.time() - start}
            print(f"  seed {seed} {searcher:<6} best {max(scores):.4f} in {time.time() - start:5.1f} s; "
                  f"per trial: {' '.join(f'{s:.3f}' for s in scores)}", flush=True)
        rows.append(row)
    print_table(rows, args.trials)
    return 0


def trial_score(record: dict) -> float:
    """The best dev/overall any epoch of the trial reached (evaluate's score included)."""
    return max([*record.get("epochs", []), record.get("metrics", {}).get("dev/overall", -math.inf)])


def reached_after(scores: list[float], target: float) -> str:
    """Trials needed until the running best reaches `target`."""
    best = -math.inf
    for i, score in enumerate(scores, start=1):
        best = max(best, score)
        if best >= target - 1e-12:
            return str(i)
    return "never"


def print_table(rows: list[dict], trials: int) -> None:
    print("\n| seed | TPE best | random best | TPE / random | TPE reached random's best after | "
          "random reached its best after |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        tpe, rnd = row["optuna"]["scores"], row["random"]["scores"]
        print(f"| {row['seed']} | {max(tpe):.4f} | {max(rnd):.4f} | {max(tpe) / max(rnd):.3f} | "
              f"{reached_after(tpe, max(rnd))} of {trials} | {reached_after(rnd, max(rnd))} of {trials} |")
    tpe_mean = statistics.mean(max(r["optuna"]["scores"]) for r in rows)
    rnd_mean = statistics.mean(max(r["random"]["scores"]) for r in rows)
    print(f"| mean | {tpe_mean:.4f} | {rnd_mean:.4f} | {tpe_mean / rnd_mean:.3f} | | |")
    seconds = {s: sum(r[s]["seconds"] for r in rows) for s in SEARCHERS}
    print(f"\nwall time: TPE {seconds['optuna']:.0f} s, random {seconds['random']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
