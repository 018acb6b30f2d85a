"""Evaluate the fine-tuned multitask model: dev metrics, and prediction files for every dev and
test split in the CS224N starter's exact format, zipped for submission.

The starter (multitask_classifier.py, test_multitask) writes, per file, a header line
"id \\t Predicted_<Name> \\n" and one line f"{id} , {prediction} \\n" per example, in the
split's row order. Its sts header really says "Predicted_Similiary"; para predictions are the
floats of sigmoid().round() ("0.0"/"1.0"). Those details are kept byte for byte here, because
graders parse these files. sts scores use a fixed format, f"{v:.4f}".

Error analysis of the dev splits, in out/analysis/ (the driver logs it to MLflow: the PNGs and
analysis.json as artifacts, each worst-*.csv as an MLflow table): the sst confusion matrix
(sst_confusion.png; counts in analysis.json) and per-class F1, para precision / recall / F1, sts
Spearman (metrics dev/sst_f1_<k>, dev/sst_macro_f1, dev/para_precision, dev/para_recall,
dev/para_f1, dev/sts_spearman) and a predicted-vs-gold scatter (sts_scatter.png); the worst dev
examples with their sentences (read back from the split's source file named in the manifest):
the most confident wrong sst and para predictions and the largest sts errors.

Extra evaluation sets (data.extra_eval, in the manifest's `extra_eval`) are scored with their
task's head: metrics eval/<name>/accuracy and macro_f1 (sst), accuracy and f1 (para), pearson
and spearman (sts, on 0..5), logged beside the dev/* ones; their predictions go to
out/extra_eval/<name>-output.csv, outside the submission zip.
"""

import csv
import json
import zipfile
from pathlib import Path

import numpy as np

from stages.batches import load_split
from stages.data_prep import read_file
from stages.device import pick_device, pick_precision
from stages.metrics import SST_CLASSES, analysis_metrics, confusion_matrix, dev_metrics, extra_eval_metrics
from stages.multitask_model import load_multitask, predict_with_scores

TASKS = ("sst", "para", "sts")
HEADERS = {"sst": "id \t Predicted_Sentiment \n",
           "para": "id \t Predicted_Is_Paraphrase \n",
           "sts": "id \t Predicted_Similiary \n"}  # sic: the starter's spelling
WORST_EXAMPLES = 20  # rows of each worst-*.csv


def run(cfg, inputs: dict, out: Path, log) -> dict:
    out = Path(out)
    data_dir = Path(inputs["data_prep"])
    model_dir = Path(inputs["finetune"]) / "model"
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device, "evaluate")
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: data_prep manifest not found")
    manifest = json.loads(manifest_path.read_text())
    splits = manifest.get("splits", {})
    model = load_multitask(model_dir, device=device)

    predictions_dir = out / "predictions"
    predictions_dir.mkdir(parents=True, exist_ok=True)
    dev_preds, dev_scores, dev_golds, dev_ids, missing = {}, {}, {}, {}, []
    for task in TASKS:
        for split_name in ("dev", "test"):
            name = f"{task}-{split_name}"
            file_name = f"{name}-output.csv"
            if name not in splits:
                missing.append(file_name)
                continue
            split_path = data_dir / splits[name].get("file", f"{name}.arrow")
            split = load_split(split_path)
            preds, scores = predict_with_scores(model, task, split, cfg.train.eval_batch_size, device, precision)
            if preds.shape != (len(split),):
                raise ValueError(f"evaluate: predict() gave shape {preds.shape} for {split_path} "
                                 f"with {len(split)} rows")
            _write_predictions(predictions_dir / file_name, task, split.ids, preds)
            if split_name == "dev":
                if split.labels is None:
                    raise ValueError(f"{split_path}: dev split has no label column")
                dev_preds[task], dev_golds[task] = preds, np.asarray(split.labels)
                dev_scores[task], dev_ids[task] = scores, [str(i) for i in split.ids]

    # One line each, not one per file or metric: the run's log stays short.
    if missing:
        print(f"evaluate: not written, no such split in {manifest_path}: {', '.join(missing)}")
    metrics = dev_metrics(dev_preds, dev_golds) if dev_preds else {}
    if metrics:
        print("evaluate: " + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
        metrics.update(analysis_metrics(dev_preds, dev_golds))
        sentences = {task: _sentences(data_dir / "manifest.json", splits, task) for task in dev_preds}
        _write_analysis(out / "analysis", dev_ids, dev_preds, dev_scores, dev_golds, sentences)
    extra = _score_extra_sets(model, data_dir, manifest.get("extra_eval", {}), out / "extra_eval",
                              cfg.train.eval_batch_size, device, precision)
    if extra:
        print("evaluate: extra sets: " + ", ".join(f"{key} {value:.4f}" for key, value in extra.items()))
        metrics.update(extra)
    if metrics:
        log(metrics)

    submission = out / "submission.zip"
    with zipfile.ZipFile(submission, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(predictions_dir.glob("*.csv")):
            zf.write(path, arcname=f"predictions/{path.name}")
    missing_test = [m for m in missing if "-test-" in m]
    return {"metrics": metrics, "params": {"resolved.precision": precision},
            "predictions": str(predictions_dir), "submission": str(submission),
            "analysis": str(out / "analysis"), "extra_eval": str(out / "extra_eval"),
            "missing_test_files": missing_test,
            "missing_dev_files": [m for m in missing if "-dev-" in m]}


def format_prediction(task: str, value) -> str:
    """One prediction as the starter printed it: sst an int, para "0.0"/"1.0", sts 4 decimals."""
    if task == "sst":
        return str(int(value))
    if task == "para":
        return f"{float(round(float(value))):.1f}"
    if task == "sts":
        return f"{float(value):.4f}"
    raise KeyError(f"unknown task '{task}'; expected sst, para or sts")


def _write_predictions(path: Path, task: str, ids, preds: np.ndarray) -> None:
    if len(ids) != len(preds):
        raise ValueError(f"{path}: {len(preds)} predictions for {len(ids)} ids")
    lines = [HEADERS[task]] + [f"{id_} , {format_prediction(task, p)} \n" for id_, p in zip(ids, preds)]
    # newline="" so the bytes are exactly "\n" on every OS, as graders expect.
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.writelines(lines)


def _score_extra_sets(model, data_dir: Path, extra_sets: dict, folder: Path, batch_size: int, device,
                      precision: str) -> dict:
    """eval/<name>/<metric> for each extra set in the manifest, and its predictions in
    folder/<name>-output.csv (the starter's format; sts on 0..5, whatever the file's scale).
    Not in predictions/: the submission zip holds the leaderboard's files only."""
    metrics = {}
    for name, entry in extra_sets.items():
        split_path = data_dir / entry["file"]
        split = load_split(split_path)
        if split.labels is None:
            raise ValueError(f"{split_path}: extra evaluation set '{name}' has no label column")
        preds, _ = predict_with_scores(model, entry["task"], split, batch_size, device, precision)
        folder.mkdir(parents=True, exist_ok=True)
        _write_predictions(folder / f"{name}-output.csv", entry["task"], split.ids, preds)
        metrics.update(extra_eval_metrics(name, entry["task"], preds, np.asarray(split.labels)))
    return metrics


# ---------------------------------------------------------------- error analysis


def _sentences(manifest_path: Path, splits: dict, task: str) -> dict[str, tuple[str, ...]]:
    """id -> the dev split's sentences, from the source file data_prep read; {} when that file is
    gone or unreadable (the worst-examples tables then show ids and values only)."""
    source = splits.get(f"{task}-dev", {}).get("source")
    try:
        rows, _ = read_file(Path(source), task, is_test=False, drop=True, config_key=f"{manifest_path} source")
    except (TypeError, OSError, ValueError):
        return {}
    return {row_id: sentences for _, row_id, sentences, _ in rows}


def _write_analysis(folder: Path, ids: dict, preds: dict, scores: dict, golds: dict, sentences: dict) -> None:
    """analysis.json, the two PNGs and worst-<task>.csv for the dev splits there are."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = {}
    if "sst" in preds:
        counts = confusion_matrix(preds["sst"], golds["sst"], SST_CLASSES)
        summary["sst_confusion"] = counts.tolist()  # rows gold 0..4, columns predicted 0..4
        _plot_confusion(counts, folder / "sst_confusion.png")
        confidence = scores["sst"].max(axis=1)
        _write_worst(folder / "worst-sst.csv", "sst", ids["sst"], sentences["sst"], golds["sst"], preds["sst"],
                     confidence, wrong=preds["sst"] != golds["sst"], order=-confidence)
    if "para" in preds:
        p = scores["para"]
        confidence = np.maximum(p, 1 - p)  # of the class predicted
        _write_worst(folder / "worst-para.csv", "para", ids["para"], sentences["para"], golds["para"], preds["para"],
                     p, wrong=preds["para"] != golds["para"], order=-confidence)
    if "sts" in preds:
        error = np.abs(preds["sts"] - golds["sts"])
        _plot_scatter(golds["sts"], preds["sts"], folder / "sts_scatter.png")
        _write_worst(folder / "worst-sts.csv", "sts", ids["sts"], sentences["sts"], golds["sts"], preds["sts"],
                     error, wrong=np.ones(len(error), dtype=bool), order=-error)
    (folder / "analysis.json").write_text(json.dumps(summary, indent=2) + "\n")


def _write_worst(path: Path, task: str, ids, sentences: dict, gold, pred, score, wrong, order) -> None:
    """The WORST_EXAMPLES wrong rows first by `order` (ties: the split's order), one CSV row each."""
    score_column = {"sst": "confidence", "para": "p_paraphrase", "sts": "abs_error"}[task]
    columns = ["id"] + (["sentence"] if task == "sst" else ["sentence1", "sentence2"]) + ["gold", "predicted", score_column]
    chosen = [i for i in np.argsort(order, kind="stable") if wrong[i]][:WORST_EXAMPLES]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i in chosen:
            text = sentences.get(ids[i], ("",) * (len(columns) - 4))
            values = [f"{float(v):.4f}" if task == "sts" else str(int(v)) for v in (gold[i], pred[i])]
            writer.writerow([ids[i], *text, *values, f"{float(score[i]):.4f}"])


def _plot_confusion(counts: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(counts, cmap="Blues")
    for (g, p), n in np.ndenumerate(counts):
        ax.text(p, g, str(n), ha="center", va="center", color="white" if n > counts.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="gold", xticks=range(len(counts)), yticks=range(len(counts)),
           title=f"sst dev confusion matrix ({counts.sum()} rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scatter(gold: np.ndarray, pred: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.scatter(gold, pred, s=6, alpha=0.4)
    ax.plot([0, 5], [0, 5], color="black", linewidth=0.8, linestyle="--")
    ax.set(xlabel="gold similarity", ylabel="predicted", xlim=(-0.1, 5.1), ylim=(-0.1, 5.1),
           title=f"sts dev: predicted vs gold ({len(gold)} rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
