"""Dev-set metrics for the three tasks and the CS224N leaderboard's overall score.

sst and para are scored by accuracy, sts by Pearson correlation; the overall score maps the
correlation from [-1, 1] to [0, 1] and averages the three:
    overall = (sst_acc + para_acc + (sts_corr + 1) / 2) / 3
"""

import warnings

import numpy as np

METRIC_NAMES = {"sst": "dev/sst_acc", "para": "dev/para_acc", "sts": "dev/sts_corr"}


def accuracy(pred, gold) -> float:
    """Fraction of positions where pred equals gold."""
    pred, gold = _same_length(pred, gold)
    if len(gold) == 0:
        raise ValueError("accuracy: no examples")
    return float(np.mean(pred == gold))


def pearson(pred, gold) -> float:
    """Pearson correlation; 0.0 (with a warning) when either side is constant, never NaN."""
    pred, gold = _same_length(pred, gold)
    if len(gold) < 2:
        raise ValueError(f"pearson: needs at least 2 examples, got {len(gold)}")
    pred = pred.astype(np.float64)
    gold = gold.astype(np.float64)
    dp, dg = pred - pred.mean(), gold - gold.mean()
    denom = np.sqrt((dp * dp).sum() * (dg * dg).sum())
    if denom == 0:
        side = "predictions" if (dp * dp).sum() == 0 else "gold scores"
        warnings.warn(f"pearson: the {side} are constant, correlation is undefined; reporting 0.0")
        return 0.0
    return float((dp * dg).sum() / denom)


def overall(sst_acc: float, para_acc: float, sts_corr: float) -> float:
    return (sst_acc + para_acc + (sts_corr + 1) / 2) / 3


def dev_metrics(preds: dict[str, np.ndarray], golds: dict[str, np.ndarray]) -> dict[str, float]:
    """{"dev/sst_acc", "dev/para_acc", "dev/sts_corr"} for the tasks present, plus
    "dev/overall" when all three are."""
    unknown = set(preds) - set(METRIC_NAMES)
    if unknown:
        raise KeyError(f"dev_metrics: unknown task(s) {sorted(unknown)}; expected sst, para, sts")
    out = {}
    for task in ("sst", "para", "sts"):
        if task not in preds:
            continue
        if task not in golds:
            raise KeyError(f"dev_metrics: predictions for '{task}' but no gold labels")
        score = pearson if task == "sts" else accuracy
        out[METRIC_NAMES[task]] = score(preds[task], golds[task])
    if len(out) == 3:
        out["dev/overall"] = overall(out["dev/sst_acc"], out["dev/para_acc"], out["dev/sts_corr"])
    return out


def _same_length(pred, gold) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(pred).reshape(-1), np.asarray(gold).reshape(-1)
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold labels")
    return pred, gold
