"""Stage reference: the backbone scored without finetuning, so every comparison shows what
training added (the `untrained` row of ablate's, tune's and report's tables).

The encoder is the one finetune starts from (cfg.model.dir; the driver has made it absolute,
the packaged all-MiniLM-L6-v2 when the config says null), frozen. Each sentence becomes the
mean of its last-layer token vectors over the attention mask (length-sorted batches of
train.eval_batch_size, torch.inference_mode). Then, on the dev splits:

    sts   Pearson of cos(u, v) with the gold scores: nothing is fitted
    sst   a multinomial logistic-regression probe on the frozen sentence vectors of sst-train
    para  a logistic probe on [u, v, |u - v|, u * v] of the para-train pairs (SBERT's features
          plus the product)

and the majority-class accuracies (the most frequent train label, scored on dev). A probe is
fitted full-batch with L-BFGS from zero weights, on features standardised by the train split's
mean and std, with a small fixed L2 penalty: nothing is random, so no seed is read and an
ablation's seeds share one reference. The metric names are the ones finetune and evaluate log
(dev/sst_acc, dev/para_acc, dev/sts_corr, dev/overall by stages.metrics), plus
reference/sst_majority and reference/para_majority. A task whose train or dev split data_prep
did not write is left out (and dev/overall with it). Extra evaluation sets (data.extra_eval) are
scored the same way, sts by the cosine and sst / para by that task's probe, under evaluate's
names (eval/<name>/pearson, ...): the comparison's untrained row has their columns too.
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages.batches import bucketed_batches, load_split, pad_batch
from stages.device import autocast, pick_device, pick_precision
from stages.encoder import load_bert, pool
from stages.metrics import METRIC_NAMES, accuracy, extra_eval_metrics, overall, pearson

# The probes' L2 penalty on the weights (not the bias), added to the mean cross entropy:
# l2 / 2 * ||W||^2 on standardised features. Small: with 8.5k-16k rows and 384-1536 features a
# probe barely overfits, and the penalty keeps L-BFGS's problem strictly convex (one optimum).
PROBE_L2 = 1e-3
PROBE_MAX_ITER = 200  # L-BFGS iterations; the loss has long converged by then on these sizes
SST_CLASSES = 5


def run(cfg, inputs: dict, out: Path, log) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data_dir = Path(inputs["data_prep"])
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: data_prep manifest not found")
    manifest = json.loads(manifest_path.read_text())
    splits = manifest.get("splits", {})

    def split(name: str):
        return load_split(data_dir / splits[name].get("file", f"{name}.arrow")) if name in splits else None

    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device, "reference")
    encoder = load_bert(cfg.model.dir).to(device)  # eval mode: no dropout
    batch_size = cfg.train.eval_batch_size
    metrics, sentences, left_out = {}, 0, []
    probes = {}  # task -> its probe, for the extra evaluation sets of that task

    # ---- sts: the cosine of the two sentence vectors, no fitting
    sts_dev = split("sts-dev")
    if sts_dev is not None:
        u, v = embed_pairs(encoder, sts_dev, batch_size, device, precision)
        metrics[METRIC_NAMES["sts"]] = cosine_pearson(u, v, sts_dev.labels)
        sentences += 2 * len(sts_dev)
    else:
        left_out.append("sts (no sts-dev)")

    # ---- sst: a 5-class probe on the sentence vectors
    sst_train, sst_dev = split("sst-train"), split("sst-dev")
    if sst_train is not None and sst_dev is not None:
        x_train = embed(encoder, sst_train, "input_ids", batch_size, device, precision)
        x_dev = embed(encoder, sst_dev, "input_ids", batch_size, device, precision)
        y_train = torch.from_numpy(sst_train.labels.astype(np.int64))
        probe = probes["sst"] = fit_probe(x_train, y_train, SST_CLASSES)
        metrics[METRIC_NAMES["sst"]] = accuracy(probe_predict(probe, x_dev), sst_dev.labels)
        metrics["reference/sst_majority"] = majority_accuracy(sst_train.labels, sst_dev.labels)
        sentences += len(sst_train) + len(sst_dev)
    else:
        left_out.append("sst (no sst-train or sst-dev)")

    # ---- para: a 2-class probe on the pair features
    para_train, para_dev = split("para-train"), split("para-dev")
    if para_train is not None and para_dev is not None:
        x_train = pair_features(*embed_pairs(encoder, para_train, batch_size, device, precision))
        x_dev = pair_features(*embed_pairs(encoder, para_dev, batch_size, device, precision))
        y_train, y_dev = (s.labels.astype(np.int64) for s in (para_train, para_dev))  # 0.0/1.0 -> class 0/1
        probe = probes["para"] = fit_probe(x_train, torch.from_numpy(y_train), 2)
        metrics[METRIC_NAMES["para"]] = accuracy(probe_predict(probe, x_dev), y_dev)
        metrics["reference/para_majority"] = majority_accuracy(y_train, y_dev)
        sentences += 2 * (len(para_train) + len(para_dev))
    else:
        left_out.append("para (no para-train or para-dev)")

    # ---- extra evaluation sets (data.extra_eval): sts by the cosine, sst and para by their task's probe
    for name, entry in manifest.get("extra_eval", {}).items():
        task, extra = entry["task"], load_split(data_dir / entry["file"])
        if task == "sts":
            preds = F.cosine_similarity(*embed_pairs(encoder, extra, batch_size, device, precision), dim=-1).numpy()
        elif task in probes:
            x = (embed(encoder, extra, "input_ids", batch_size, device, precision) if task == "sst"
                 else pair_features(*embed_pairs(encoder, extra, batch_size, device, precision)))
            preds = probe_predict(probes[task], x)
        else:
            left_out.append(f"extra set {name} (no {task} probe)")
            continue
        metrics.update(extra_eval_metrics(name, task, preds, extra.labels))
        sentences += len(extra) * (1 if task == "sst" else 2)

    names = [METRIC_NAMES[t] for t in ("sst", "para", "sts")]
    if all(n in metrics for n in names):
        metrics["dev/overall"] = overall(*(metrics[n] for n in names))
    log(metrics)
    seconds = time.perf_counter() - start
    shown = {"sts cos": METRIC_NAMES["sts"], "sst probe": METRIC_NAMES["sst"], "sst majority": "reference/sst_majority",
             "para probe": METRIC_NAMES["para"], "para majority": "reference/para_majority", "overall": "dev/overall"}
    c = encoder.config
    print(f"reference (the {c.num_hidden_layers}-layer, {c.hidden_size}-wide backbone untrained): "
          + ", ".join(f"{label} {metrics[key]:.4f}" for label, key in shown.items() if key in metrics)
          + f"; {sentences} sentences in {seconds:.1f} s" + (f"; left out: {', '.join(left_out)}" if left_out else ""))
    return {"metrics": metrics, "sentences": sentences, "params": {"resolved.precision": precision}}


# ---------------------------------------------------------------- the parts


@torch.inference_mode()
def embed(encoder, split, column: str, batch_size: int, device, precision: str = "fp32") -> torch.Tensor:
    """The mean-pooled last-layer vector of each row of `column`, [rows, hidden] float32 on the
    CPU, in the split's row order; batches of similar length (longest first), so little padding."""
    vectors = torch.empty(len(split), encoder.config.hidden_size)
    for idx in bucketed_batches(split.lengths(column), batch_size, None):
        input_ids, attention_mask = (t.to(device) for t in pad_batch(split, column, idx))
        with autocast(torch.device(device), precision):
            hidden = encoder(input_ids, attention_mask)
        vectors[torch.from_numpy(idx)] = pool(hidden.float(), attention_mask, "mean").cpu()
    return vectors


def embed_pairs(encoder, split, batch_size: int, device, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v): the vectors of each pair's first and second sentence."""
    return tuple(embed(encoder, split, column, batch_size, device, precision) for column in ("input_ids_1", "input_ids_2"))


def cosine_pearson(u: torch.Tensor, v: torch.Tensor, gold) -> float:
    """Pearson correlation of cos(u_i, v_i) with the gold similarity scores."""
    return pearson(F.cosine_similarity(u, v, dim=-1).numpy(), gold)


def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[u, v, |u - v|, u * v]: what the para probe reads of a pair."""
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


def majority_accuracy(train_labels, dev_labels) -> float:
    """Dev accuracy of always predicting the train split's most frequent label (ties: the smallest)."""
    values, counts = np.unique(np.asarray(train_labels), return_counts=True)
    return accuracy(np.full(len(dev_labels), values[np.argmax(counts)]), dev_labels)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = PROBE_L2,
              max_iter: int = PROBE_MAX_ITER) -> dict:
    """Multinomial logistic regression: W, b minimising mean CE(z W + b, y) + l2 / 2 ||W||^2,
    z = x standardised by its own per-feature mean and std; full batch, L-BFGS from zeros.

    Returns {"mean", "std", "weight" [features, classes], "bias" [classes]} for probe_predict.
    """
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)  # a constant feature stays 0, not NaN
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # a caller in inference mode would leave the loss without a graph
        optimizer.step(closure)
    return {"mean": mean, "std": std, "weight": weight.detach(), "bias": bias.detach()}


def probe_predict(probe: dict, x: torch.Tensor) -> np.ndarray:
    """The probe's class (int64) for each row of x."""
    z = (x.float() - probe["mean"]) / probe["std"]
    return (z @ probe["weight"] + probe["bias"]).argmax(-1).numpy()
