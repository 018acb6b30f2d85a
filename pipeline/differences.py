"""95% confidence intervals for a comparison's deltas, from each row's per-example dev predictions.

    tags, groups = comparison.comparison(uri, parent_id)
    note = differences.add_intervals(uri, parent_id, groups, comparison.reference_label(tags, groups), store)
    found, note = differences.pair_differences(uri, parent_id, groups, [("pals", "baseline")], store)

Each finished row (a variant at one seed, a trial) is found on disk through MLflow, its dev
predictions paired with the reference row's on the same dev examples, and the difference of
every dev score bootstrapped (pipeline/bootstrap.py); each group's `ci` gets metric -> (low, high).
`pair_differences` gives the same resampled differences for any pairs of groups (a grid's claims,
pipeline/verdicts.py), all rows scored on the same resamples as the table's.

Where the files are. An ablation variant's evaluate run (a child of the variant run) has tag
`cache_key`: its output is `<store>/evaluate/<key>/predictions/<task>-dev-output.csv`. A search's
trial keeps its own outputs in the search's folder (the parent's tag `tune_storage`),
`trials/<trial_id>/evaluate/predictions/`. The gold labels are data_prep's dev splits
(`<store>/data_prep/<key>/<task>-dev.arrow`) of the reference row: its variant's own data_prep
run, else the one its parent shares. The store is the one the run's config named (its
`artifacts` param, beside its config file), else the caller's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import bootstrap, comparison, registry, tracking
from pipeline.store import ArtifactStore

TASKS = ("sst", "para", "sts")


def add_intervals(uri: str, parent_id: str, groups: list[comparison.Group], reference: str | None,
                  store: ArtifactStore | None = None) -> str | None:
    """Fill each group's `ci` with the 95% interval of its delta against the `reference` group.
    Returns None, or one line saying which intervals could not be computed and why: a table
    without intervals is still the table, so unreadable outputs are said, not raised."""
    base = next((g for g in groups if g.label == reference), None)
    if base is None:
        return f"no intervals: no '{reference}' row to compare against" if reference else None
    pairs = [(g.label, reference) for g in groups if g is not base and g.label != comparison.UNTRAINED]
    found, note = pair_differences(uri, parent_id, groups, pairs, store, gold_from=reference)
    for g in groups:
        if (g.label, reference) in found:
            g.ci = {metric: bootstrap.interval(d) for metric, d in found[(g.label, reference)].items()}
    return note


def pair_differences(uri: str, parent_id: str, groups: list[comparison.Group], pairs: list[tuple[str, str]],
                     store: ArtifactStore | None = None, gold_from: str | None = None
                     ) -> tuple[dict[tuple[str, str], dict[str, np.ndarray]], str | None]:
    """({(variant, against): {metric: the resampled differences of variant minus against}}, a note).

    Every finished row of every group (but the untrained one) is read and scored on the same
    resamples, so any pair's difference is paired and the same whichever pairs are asked for; the
    gold labels are `gold_from`'s data_prep output (else the first pair's against). A pair whose
    rows have no predictions is left out and named in the note, as are unreadable outputs."""
    try:
        return _pair_differences(uri, parent_id, groups, pairs, store, gold_from)
    except (OSError, ValueError, KeyError) as e:
        return {}, f"no intervals: the dev predictions or labels could not be read ({type(e).__name__}: {e})"


def _pair_differences(uri: str, parent_id: str, groups: list[comparison.Group], pairs: list[tuple[str, str]],
                      store: ArtifactStore | None, gold_from: str | None):
    by_label = {g.label: g for g in groups if g.label != comparison.UNTRAINED}
    pairs = [(a, b) for a, b in pairs if a in by_label and b in by_label and a != b]
    if not pairs:
        return {}, None
    client = tracking.MlflowClient(uri)
    parent = client.get_run(parent_id)
    parent_children = _children(client, parent)
    located, missing = {}, []
    for g in by_label.values():  # the untrained row scores probes and writes no dev predictions
        for row in g.runs:
            if row.status != "FINISHED":
                continue
            found = _locate(client, parent, parent_children, row, store)
            if found is None:
                missing.append(row.label + (f" seed {row.seed}" if len(g.runs) > 1 else ""))
            else:
                located[row.run_id] = found
    rows = {label: [r for r in g.runs if r.run_id in located] for label, g in by_label.items()}
    source = next((label for label in (gold_from, *(b for _, b in pairs)) if rows.get(label)), None)
    if source is None:
        against = gold_from if gold_from in by_label else pairs[0][1]
        return {}, f"no intervals: the dev predictions of '{against}' were not found (outputs deleted?)"
    scores = _scores(located, _dev_labels(located[rows[source][0].run_id][1]))
    if scores is None:
        return {}, "no intervals: no task has dev predictions for every row"
    values, position = scores
    out = {}
    for a, b in pairs:
        matched = _seed_pairs(rows[b], rows[a])
        if matched:
            against, variant = [position[r.run_id] for r, _ in matched], [position[r.run_id] for _, r in matched]
            out[(a, b)] = {metric: bootstrap.resampled_differences(v[against], v[variant]) for metric, v in values.items()}
    return out, f"no intervals for {', '.join(missing)}: their dev predictions were not found" if missing else None


def _scores(located: dict, golds: dict) -> tuple[dict[str, np.ndarray], dict[str, int]] | None:
    """({metric: (runs, resamples) scores}, {run id: its row}) of every located run on the dev
    examples they all predicted; None when no task has them."""
    predictions = {run_id: _dev_predictions(folder) for run_id, (folder, _) in located.items()}
    run_ids = list(located)
    aligned_golds, aligned_preds = {}, {}
    for task, (ids, labels) in golds.items():
        if not all(task in predictions[r] for r in run_ids):
            continue
        keep = [i for i, id_ in enumerate(ids) if all(id_ in predictions[r][task] for r in run_ids)]
        if len(keep) < 2:
            continue
        aligned_golds[task] = labels[keep]
        aligned_preds[task] = [np.array([predictions[r][task][ids[i]] for i in keep]) for r in run_ids]
    if not aligned_golds:
        return None
    return bootstrap.resampled_scores(aligned_golds, aligned_preds), {run_id: i for i, run_id in enumerate(run_ids)}


def _seed_pairs(base: list, variant: list) -> list[tuple]:
    """(baseline row, variant row) of the same seed; rows of different seeds in order when none
    match (a variant that sets its own seed)."""
    by_seed = {r.seed: r for r in base}
    pairs = [(by_seed[r.seed], r) for r in variant if r.seed in by_seed]
    return pairs or list(zip(base, variant))


# ---------------------------------------------------------------- finding the files


def _children(client, run) -> list:
    return client.search_runs([run.info.experiment_id], max_results=5000,
                              filter_string=f"tags.`{tracking.PARENT_TAG}` = '{run.info.run_id}'")


def _locate(client, parent, parent_children: list, row, store: ArtifactStore | None) -> tuple[Path, Path] | None:
    """(the folder of a row's dev prediction files, its data_prep output folder), or None."""
    run = client.get_run(row.run_id)
    stores = registry.stores_of(run) + registry.stores_of(parent, store)  # a trial's run names no config file
    children = _children(client, run)
    data_prep = _stage_run("data_prep", children, parent_children, run.info.run_name, any_shared=True)
    data_dir = _finished_dir(stores, "data_prep", data_prep.data.tags.get("cache_key")) if data_prep else None
    if run.data.tags.get("stage") == "trial":
        storage, trial = parent.data.tags.get("tune_storage"), run.data.tags.get("trial_id")
        predictions = Path(storage) / "trials" / trial / "evaluate" / "predictions" if storage and trial else None
    else:
        evaluate = _stage_run("evaluate", children, parent_children, run.info.run_name)
        output = _finished_dir(stores, "evaluate", evaluate.data.tags.get("cache_key")) if evaluate else None
        predictions = output / "predictions" if output else None
    if predictions is None or not predictions.is_dir() or data_dir is None:
        return None
    return predictions, data_dir


def _stage_run(stage: str, own: list, shared: list, name: str, any_shared: bool = False):
    """The row's own `stage` run, else the parent's that lists it in shared_by (two variants that
    resolve to the same config share their stages; under --smoke, several do), else with
    `any_shared` any of the parent's (data_prep: the dev labels are the same whichever row's)."""
    pools = [own, [r for r in shared if name in r.data.tags.get("shared_by", "").split(",")]]
    for runs in pools + ([shared] if any_shared else []):
        found = [r for r in runs if r.data.tags.get("stage") == stage and r.data.tags.get("cache_key")]
        if found:
            return found[0]
    return None


def _finished_dir(stores: list[ArtifactStore], stage: str, key: str | None) -> Path | None:
    for candidate in stores if key else ():
        if candidate.is_finished(stage, key):
            return candidate.local_dir(stage, key)
    return None


def _dev_labels(data_dir: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """task -> (ids, gold labels) of data_prep's dev splits."""
    import pyarrow as pa

    splits = json.loads((data_dir / "manifest.json").read_text()).get("splits", {})
    out = {}
    for task in TASKS:
        if f"{task}-dev" not in splits:
            continue
        with pa.memory_map(str(data_dir / splits[f"{task}-dev"].get("file", f"{task}-dev.arrow")), "r") as source:
            table = pa.ipc.open_file(source).read_all()
        if "label" in table.column_names:
            out[task] = (table.column("id").to_pylist(), np.asarray(table.column("label").to_numpy(), dtype=np.float64))
    return out


def _dev_predictions(folder: Path) -> dict[str, dict[str, float]]:
    """task -> {id: prediction} from evaluate's `<task>-dev-output.csv` (header, then `id , value `)."""
    out = {}
    for task in TASKS:
        path = folder / f"{task}-dev-output.csv"
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()[1:]
            out[task] = {id_.strip(): float(value) for id_, value in (line.split(" , ", 1) for line in lines if line)}
    return out
