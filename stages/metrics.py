"""Dev-set metrics for the three tasks and the CS224N leaderboard's overall score.

sst and para are scored by accuracy, sts by Pearson correlation; the overall score maps the
correlation from [-1, 1] to [0, 1] and averages the three:
    overall = (sst_acc + para_acc + (sts_corr + 1) / 2) / 3

Extra evaluation sets (data.extra_eval) are scored by extra_eval_metrics, eval/<name>/<metric>.

For error analysis (evaluate's analysis/ folder): the sst confusion matrix and per-class F1,
para precision / recall / F1 of the paraphrase class, sts Spearman correlation.
"""

import warnings

import numpy as np

METRIC_NAMES = {"sst": "dev/sst_acc", "para": "dev/para_acc", "sts": "dev/sts_corr"}
SST_CLASSES = 5  # sentiment 0 (negative) .. 4 (positive)


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


# ---------------------------------------------------------------- error analysis (evaluate's analysis/)


def confusion_matrix(pred, gold, classes: int) -> np.ndarray:
    """counts[g, p]: how many examples of gold class g were predicted p (rows gold, columns predicted)."""
    pred, gold = _same_length(pred, gold)
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (gold.astype(np.int64), pred.astype(np.int64)), 1)
    return counts


def per_class_f1(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, F1) of each class from a confusion matrix (rows gold, columns predicted);
    0 where a class was never predicted (precision), never gold (recall), or both are 0 (F1)."""
    counts = np.asarray(counts, dtype=np.float64)
    hits = np.diag(counts)
    predicted, gold = counts.sum(axis=0), counts.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, gold, out=np.zeros_like(hits), where=gold > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(hits), where=total > 0)
    return precision, recall, f1


def binary_precision_recall_f1(pred, gold) -> tuple[float, float, float]:
    """Precision, recall and F1 of the positive class (1: a paraphrase); 0 where undefined."""
    pred, gold = _same_length(pred, gold)
    precision, recall, f1 = per_class_f1(confusion_matrix(pred, gold, 2))
    return float(precision[1]), float(recall[1]), float(f1[1])


def ranks(values) -> np.ndarray:
    """0-based ranks, ties sharing the mean of their positions ([10, 20, 20, 30] -> [0, 1.5, 1.5, 3])."""
    _, inverse, counts = np.unique(np.asarray(values, dtype=np.float64), return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2)[inverse]


def spearman(pred, gold) -> float:
    """Spearman's rank correlation: Pearson's on the (tie-averaged) ranks."""
    pred, gold = _same_length(pred, gold)
    return pearson(ranks(pred), ranks(gold))


def analysis_metrics(preds: dict[str, np.ndarray], golds: dict[str, np.ndarray]) -> dict[str, float]:
    """What dev_metrics leaves out, named beside it: dev/sst_f1_<class> and dev/sst_macro_f1,
    dev/para_precision, dev/para_recall, dev/para_f1, dev/sts_spearman (for the tasks present)."""
    out = {}
    if "sst" in preds:
        _, _, f1 = per_class_f1(confusion_matrix(preds["sst"], golds["sst"], SST_CLASSES))
        out.update({f"dev/sst_f1_{k}": float(v) for k, v in enumerate(f1)})
        out["dev/sst_macro_f1"] = float(f1.mean())
    if "para" in preds:
        out["dev/para_precision"], out["dev/para_recall"], out["dev/para_f1"] = \
            binary_precision_recall_f1(preds["para"], golds["para"])
    if "sts" in preds:
        out["dev/sts_spearman"] = spearman(preds["sts"], golds["sts"])
    return out


def _same_length(pred, gold) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(pred).reshape(-1), np.asarray(gold).reshape(-1)
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold labels")
    return pred, gold


def extra_eval_metrics(name: str, task: str, pred, gold) -> dict[str, float]:
    """An extra evaluation set's scores, named by the set: sst eval/<name>/accuracy and
    eval/<name>/macro_f1; para eval/<name>/accuracy and eval/<name>/f1 (of the paraphrase
    class); sts eval/<name>/pearson and eval/<name>/spearman (on the 0..5 scale data_prep maps
    every set onto; a linear rescale changes neither correlation)."""
    prefix = f"eval/{name}/"
    if task == "sst":
        _, _, f1 = per_class_f1(confusion_matrix(pred, gold, SST_CLASSES))
        return {prefix + "accuracy": accuracy(pred, gold), prefix + "macro_f1": float(f1.mean())}
    if task == "para":
        return {prefix + "accuracy": accuracy(pred, gold), prefix + "f1": binary_precision_recall_f1(pred, gold)[2]}
    if task == "sts":
        return {prefix + "pearson": pearson(pred, gold), prefix + "spearman": spearman(pred, gold)}
    raise KeyError(f"extra_eval_metrics: unknown task '{task}'; expected sst, para or sts")

