"""Stage finetune: train the multitask model (sst, para, sts) on data_prep's splits.

Reads top to bottom like nanoGPT's train.py: seed, data, model, optimizer and schedule, then
the epoch loop. Each step takes one batch of one task; which task comes from
stages.samplers (round robin, proportional or annealed). After each epoch every dev split is
predicted and scored; the best epoch by dev/overall is saved to out/model (encoder as a
HuggingFace BERT folder + heads), and out/history.json keeps the per-epoch metrics.
Starts from mlm_pretrain's model when that stage ran, else from cfg.model.dir.
"""

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.batches import bucketed_batches, load_split
from stages.device import autocast, pick_device
from stages.encoder import load_bert
from stages.metrics import dev_metrics
from stages.multitask_model import MultitaskModel, batch_lengths, make_batch, predict, save_multitask
from stages.samplers import annealed_alpha, epoch_tasks

TASKS = ("sst", "para", "sts")


def run(cfg, inputs: dict, out: Path, log) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.train

    # ---- seed everything: torch (weights of the heads, dropout) and numpy (batches, task order)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)

    # ---- data
    data_dir = Path(inputs["data_prep"])
    train = _load_splits(data_dir, "train")
    dev = _load_splits(data_dir, "dev")
    # A task with loss weight 0 contributes no gradient; its steps would only cost time.
    train = {t: s for t, s in train.items() if getattr(cfg.loss.weights, t) > 0 and len(s) > 0}
    if not train:
        raise ValueError(f"{data_dir}: no train split with rows and a non-zero loss weight; "
                         f"nothing to fine-tune (manifest: {data_dir / 'manifest.json'})")
    weights = {t: getattr(cfg.loss.weights, t) for t in train}

    # ---- model
    encoder_dir = Path(inputs["mlm_pretrain"]) / "model" if inputs.get("mlm_pretrain") else Path(cfg.model.dir)
    encoder = load_bert(encoder_dir, dropout=cfg.model.dropout)
    model = MultitaskModel(encoder, cfg.model.pooling, cfg.model.dropout).to(device)

    # ---- the whole run's batches and task order, drawn up front so the schedule knows its length
    lengths = {t: batch_lengths(t, s) for t, s in train.items()}
    plan = []  # per epoch: [(task, row indices), ...]
    cursors = {t: [] for t in train}  # each task's remaining batches; refilled (reshuffled) when empty
    for epoch in range(tc.epochs):
        alpha = annealed_alpha(epoch, tc.epochs, tc.alpha_start, tc.alpha_end)
        n_batches = {t: math.ceil(len(s) / tc.batch_size) for t, s in train.items()}
        order = epoch_tasks(n_batches, tc.sampling, rng, alpha=alpha, steps=tc.steps_per_epoch)
        steps = []
        for task in order:
            if not cursors[task]:
                cursors[task] = list(bucketed_batches(lengths[task], tc.batch_size, rng))
            steps.append((task, cursors[task].pop(0)))
        plan.append(steps)
    total_steps = sum(len(steps) for steps in plan)

    # ---- optimizer: no weight decay on biases and LayerNorm weights (the 1-D parameters)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, fused=device.type == "cuda")
    warmup = int(tc.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _linear_warmup_decay(step, warmup, total_steps))

    # ---- the epoch loop
    history = []
    best = None  # (score, epoch)
    total_examples, total_seconds = 0, 0.0
    for epoch, steps in enumerate(plan, start=1):
        model.train()
        loss_sums = {t: 0.0 for t in train}
        loss_counts = {t: 0 for t in train}
        examples = 0
        start = time.perf_counter()
        bar = tqdm(steps, desc=f"finetune epoch {epoch}/{tc.epochs}", unit="step", file=sys.stderr,
                   mininterval=2.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
        for task, idx in bar:
            batch = make_batch(task, train[task], idx, device)
            with autocast(device):
                output = model(task, batch)
            loss = model.loss(task, output, batch["labels"])
            (loss * weights[task]).backward()
            if tc.grad_clip and tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            loss_sums[task] += loss.item()
            loss_counts[task] += 1
            examples += len(idx)
            # refresh=False: the bar redraws on its own mininterval, not on every step
            bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{examples / (time.perf_counter() - start):.0f}",
                            refresh=False)
        bar.close()
        seconds = time.perf_counter() - start
        total_examples += examples
        total_seconds += seconds

        preds = {t: predict(model, t, s, tc.eval_batch_size, device) for t, s in dev.items() if s.labels is not None}
        golds = {t: np.asarray(dev[t].labels) for t in preds}
        metrics = {f"train/loss_{t}": loss_sums[t] / loss_counts[t] for t in train if loss_counts[t]}
        metrics["train/examples_per_s"] = examples / seconds if seconds > 0 else 0.0
        metrics["train/lr"] = scheduler.get_last_lr()[0]
        metrics.update(dev_metrics(preds, golds) if preds else {})
        log(metrics, step=epoch)
        history.append({"epoch": epoch, **metrics})
        (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")

        score = _selection_score(metrics)
        # Without any dev split there is nothing to choose by: the last epoch is kept.
        if best is None or score is None or score > best[0]:
            best = (score, epoch)
            _save_atomically(model, out / "model", encoder_dir)

    result_metrics = {"best/epoch": float(best[1]),
                      "train/examples_per_s": total_examples / total_seconds if total_seconds > 0 else 0.0}
    best_row = history[best[1] - 1]
    if "dev/overall" in best_row:
        result_metrics["best/dev_overall"] = best_row["dev/overall"]
    for key in ("dev/sst_acc", "dev/para_acc", "dev/sts_corr"):
        if key in best_row:
            result_metrics["best/" + key.replace("/", "_")] = best_row[key]
    return {"metrics": result_metrics, "model": str(out / "model")}


# ---------------------------------------------------------------- helpers


def _load_splits(data_dir: Path, split: str) -> dict:
    """{task: Split} for the `{task}-{split}` entries data_prep's manifest lists."""
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: missing; is {data_dir} a data_prep output folder?")
    try:
        entries = json.loads(manifest_path.read_text())["splits"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path}: not a data_prep manifest (needs a 'splits' mapping): {e}") from None
    splits = {}
    for task in TASKS:
        key = f"{task}-{split}"
        if key not in entries:
            continue
        path = data_dir / entries[key].get("file", f"{key}.arrow")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {manifest_path} under '{key}' but missing")
        splits[task] = load_split(path)
    return splits


def _linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """LR multiplier: 0 -> 1 over `warmup` steps, then 1 -> 0 linearly at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def _selection_score(metrics: dict) -> float | None:
    """dev/overall when all three dev splits were scored; else the same average over the tasks
    that were (sts correlation mapped to [0, 1]); None without any dev split."""
    if "dev/overall" in metrics:
        return metrics["dev/overall"]
    parts = [metrics[k] for k in ("dev/sst_acc", "dev/para_acc") if k in metrics]
    if "dev/sts_corr" in metrics:
        parts.append((metrics["dev/sts_corr"] + 1) / 2)
    return sum(parts) / len(parts) if parts else None


def _save_atomically(model, model_dir: Path, tokenizer_from: Path) -> None:
    """Write to a sibling folder, then swap, so out/model is never half-written."""
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_multitask(model, tmp, tokenizer_from=tokenizer_from)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
