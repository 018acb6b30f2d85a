"""Paired bootstrap of dev-score differences: is a variant's delta against the baseline real or noise?

Pure numpy on arrays (pipeline/differences.py finds the per-example dev predictions and labels).

A resample draws each task's dev examples with replacement (each task's dev set separately, the
same number of rows as it has); every run is scored on the *same* resampled indices (baseline and
variant, every seed), so the difference on one resample is paired: what the two models did on the
same examples. Each task's metric is recomputed on it (sst and para accuracy, sts Pearson) and the
overall score from the three, as stages/metrics.py defines them. A fixed seed makes the same table
give the same intervals.

Across seeds (`ablate --seeds N`): the table's delta is the mean over seeds of the variant minus
the mean of the baseline, so the interval is that mean's, with both the dev examples and the seeds
resampled (a two-level bootstrap; seeds paired by their number, since a variant's seed k and the
baseline's seed k share the initialisation and the data order). Resampling the examples alone
would leave out seed-to-seed training noise and give intervals too narrow to trust; pooling every
seed's paired resamples would give the spread of one seed's delta, wider than the mean's.
"""

from __future__ import annotations

import numpy as np

from pipeline.constants import METRIC

RESAMPLES = 1000
SEED = 14  # fixed: a report read twice gives the same intervals
LEVEL = 0.95
TASK_METRIC = {"sst": "dev/sst_acc", "para": "dev/para_acc", "sts": "dev/sts_corr"}
CHUNK = 100  # resamples drawn at a time: 100 x 20k Quora rows of indices, not 1000 x 20k


def resampled_scores(golds: dict[str, np.ndarray], preds: dict[str, list[np.ndarray]],
                     resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, np.ndarray]:
    """Every run's dev score on each of `resamples` bootstrap resamples of the dev examples.

    golds: task -> gold labels (n_task,); preds: task -> one prediction array per run, aligned with
    the gold (the same runs, in the same order, for every task). Returns metric name -> an array
    (runs, resamples); dev/overall too when all three tasks are there.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for task in ("sst", "para", "sts"):  # a fixed order: the same seed draws the same indices per task
        if task not in golds:
            continue
        gold = np.asarray(golds[task], dtype=np.float64)
        runs = np.stack([np.asarray(p, dtype=np.float64) for p in preds[task]])
        if runs.shape[1] != len(gold):
            raise ValueError(f"{task}: {runs.shape[1]} predictions per run for {len(gold)} gold labels")
        scores = np.empty((len(runs), resamples))
        for start in range(0, resamples, CHUNK):
            idx = rng.integers(0, len(gold), size=(min(CHUNK, resamples - start), len(gold)))
            part, drawn = slice(start, start + len(idx)), gold[idx]
            if task == "sts":
                scores[:, part] = [pearson_rows(run[idx], drawn) for run in runs]
            else:
                scores[:, part] = [(run[idx] == drawn).mean(axis=1) for run in runs]
        out[TASK_METRIC[task]] = scores
    if len(out) == 3:
        out[METRIC] = (out["dev/sst_acc"] + out["dev/para_acc"] + (out["dev/sts_corr"] + 1) / 2) / 3
    return out


def pearson_rows(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of pred with the same row of gold; 0.0 where a row is
    constant (as stages/metrics.pearson reports it)."""
    dp = pred - pred.mean(axis=1, keepdims=True)
    dg = gold - gold.mean(axis=1, keepdims=True)
    denom = np.sqrt((dp * dp).sum(axis=1) * (dg * dg).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (dp * dg).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)


def resampled_differences(base: np.ndarray, variant: np.ndarray, seed: int = SEED) -> np.ndarray:
    """The variant's mean over seeds minus the baseline's, on each resample.

    base, variant: (seeds, resamples) from resampled_scores, row k of each the same seed. With one
    seed, the paired difference itself; with more, each resample also draws the seeds with
    replacement (the same draw for both), so seed-to-seed noise widens the interval.
    """
    base, variant = np.atleast_2d(base), np.atleast_2d(variant)
    if base.shape != variant.shape:
        raise ValueError(f"paired scores of different shapes: {base.shape} and {variant.shape}")
    diffs = variant - base
    seeds, resamples = diffs.shape
    if seeds == 1:
        return diffs[0]
    pick = np.random.default_rng(seed + 1).integers(0, seeds, size=(resamples, seeds))
    return diffs[pick, np.arange(resamples)[:, None]].mean(axis=1)


def interval(differences: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval: the middle `level` of the resampled differences."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(differences, [tail, 100 - tail])
    return float(low), float(high)


def excludes_zero(ci: tuple[float, float], tolerance: float = 1e-12) -> bool:
    """A difference whose whole interval lies on one side of 0: marked `*` in the tables. (Two
    models whose scores differ only by float rounding, e.g. a rescaled sts head, are not.)"""
    return ci[0] > tolerance or ci[1] < -tolerance
