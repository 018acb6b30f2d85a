"""`python -m pipeline report RUN_ID [CONFIG] [--out DIR]`: an ablation's or a search's table.

The parent run's variant (or trial) child runs, read back from MLflow (pipeline/comparison.py),
printed as Markdown with each delta's 95% interval (pipeline/differences.py); with --out also
written as CSV, Markdown and the two PNG plots. An ablation of a grid with claims also gets the
verdict on each (pipeline/verdicts.py), recomputed from the same runs as `ablate` printed it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline import differences, tracking, verdicts
from pipeline.comparison import comparison, reference_label, to_markdown, write_comparison
from pipeline.config import load_config
from pipeline.prepare import artifacts_location
from pipeline.store import ArtifactStore


def main(args) -> int:
    from mlflow.exceptions import MlflowException

    config_path = Path(args.config).resolve()
    cfg = load_config(config_path) if config_path.is_file() else None
    configured = cfg.tracking.uri if cfg else None
    uri = args.tracking_uri or tracking.tracking_uri(configured, config_path.parent)
    try:
        tags, groups = comparison(uri, args.run_id)
    except MlflowException as e:
        print(f"error: no run {args.run_id} in the MLflow store at {uri}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if not groups:
        print(f"error: run {args.run_id} at {uri} has no variant or trial child runs: report reads an "
              f"ablation's or a search's parent run", file=sys.stderr)
        return 2
    # The runs' own configs name their artifact store; this config's is the fallback.
    store = ArtifactStore(artifacts_location(cfg, config_path.parent)) if cfg else None
    note = differences.add_intervals(uri, args.run_id, groups, reference_label(tags, groups), store)
    what = tags.get("mlflow.runName", args.run_id)
    print(f"{what} (run {args.run_id}, {tags.get('stage', '?')}) at {uri}\n")
    print(to_markdown(groups))
    if note:
        print(note)
    claims = verdicts.of_run(uri, args.run_id, tags)
    rows, claims_note = verdicts.measure(uri, args.run_id, groups, claims, store) if claims else ([], None)
    if rows:
        print("Which published claims hold:\n")
        print(verdicts.to_markdown(rows))
        if claims_note:
            print(claims_note)
    if args.out:
        paths = write_comparison(groups, Path(args.out), what) + (verdicts.write(rows, Path(args.out), what) if rows else [])
        for path in paths:
            print(f"wrote {path}")
    return 0
