"""Evaluate the fine-tuned multitask model: dev metrics, and prediction files for every dev and
test split in the CS224N starter's exact format, zipped for submission.

The starter (multitask_classifier.py, test_multitask) writes, per file, a header line
"id \\t Predicted_<Name> \\n" and one line f"{id} , {prediction} \\n" per example, in the
split's row order. Its sts header really says "Predicted_Similiary"; para predictions are the
floats of sigmoid().round() ("0.0"/"1.0"). Those details are kept byte for byte here, because
graders parse these files. sts scores use a fixed format, f"{v:.4f}".
"""

import json
import zipfile
from pathlib import Path

import numpy as np

from stages.batches import load_split
from stages.device import pick_device
from stages.metrics import dev_metrics
from stages.multitask_model import load_multitask, predict

TASKS = ("sst", "para", "sts")
HEADERS = {"sst": "id \t Predicted_Sentiment \n",
           "para": "id \t Predicted_Is_Paraphrase \n",
           "sts": "id \t Predicted_Similiary \n"}  # sic: the starter's spelling


def run(cfg, inputs: dict, out: Path, log) -> dict:
    out = Path(out)
    data_dir = Path(inputs["data_prep"])
    model_dir = Path(inputs["finetune"]) / "model"
    device = pick_device(cfg.device)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: data_prep manifest not found")
    splits = json.loads(manifest_path.read_text()).get("splits", {})
    model = load_multitask(model_dir, device=device)

    predictions_dir = out / "predictions"
    predictions_dir.mkdir(parents=True, exist_ok=True)
    dev_preds, dev_golds, missing = {}, {}, []
    for task in TASKS:
        for split_name in ("dev", "test"):
            name = f"{task}-{split_name}"
            file_name = f"{name}-output.csv"
            if name not in splits:
                missing.append(file_name)
                continue
            split_path = data_dir / splits[name].get("file", f"{name}.arrow")
            split = load_split(split_path)
            preds = np.asarray(predict(model, task, split, cfg.train.eval_batch_size, device))
            if preds.shape != (len(split),):
                raise ValueError(f"evaluate: predict() gave shape {preds.shape} for {split_path} "
                                 f"with {len(split)} rows")
            _write_predictions(predictions_dir / file_name, task, split.ids, preds)
            if split_name == "dev":
                if split.labels is None:
                    raise ValueError(f"{split_path}: dev split has no label column")
                dev_preds[task], dev_golds[task] = preds, np.asarray(split.labels)

    # One line each, not one per file or metric: the run's log stays short.
    if missing:
        print(f"evaluate: not written, no such split in {manifest_path}: {', '.join(missing)}")
    metrics = dev_metrics(dev_preds, dev_golds) if dev_preds else {}
    if metrics:
        log(metrics)
        print("evaluate: " + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))

    submission = out / "submission.zip"
    with zipfile.ZipFile(submission, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(predictions_dir.glob("*.csv")):
            zf.write(path, arcname=f"predictions/{path.name}")
    missing_test = [m for m in missing if "-test-" in m]
    return {"metrics": metrics, "predictions": str(predictions_dir), "submission": str(submission),
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
