"""Stage finetune: train the multitask model (sst, para, sts) on data_prep's splits.

Reads top to bottom like nanoGPT's train.py: seed, data, model, the whole run's batch plan,
optimizer and schedule, then the epoch loop. Which task(s) a step trains comes from
stages.samplers: one task per step (round robin, proportional, annealed, sequential) or a batch
of every task with the losses summed (summed; with train.pcgrad, the per-task gradients go
through PCGrad, stages/pcgrad.py). Per task, the loss is weighted by loss.weights (and with
loss.weighting: normalized, divided by its running mean); a one-task step whose gradient is clipped
to train.grad_clip comes out the same whatever its weight, so train/clipped_<task> logs how often
that happened (and epoch 1's end says so when loss.weights differ), and train.weighted_clip makes
the limit grad_clip x the weight; train.smart adds SMART's adversarial
and proximal terms (stages/smart.py); loss.sts_mnr_epochs trains sts with a multiple-negatives
ranking loss first; loss.sst_label_smoothing smooths sst's cross-entropy targets, loss.sst_rdrop
adds R-Drop's consistency term between two dropout passes of each sst batch. The optimizer
is AdamW (layer-wise LR decay, optionally inside Lookahead), its lr following train.lr_schedule.
train.task_epochs ends a task's training after its own epochs, train.data_fraction trains a task
on a random part of its train split. With train.ema_decay, torch's AveragedModel keeps an
exponential moving average of the weights, and that average is what each epoch end scores and saves.
With model.freeze_encoder and no PALs, a parameter-free pair head (sts cosine or dot, para cosine)
leaves its task nothing to train: that loss is logged without a gradient, the other tasks train.
After each epoch every dev split is predicted and scored; the best epoch by dev/overall is
saved to out/model (encoder as a HuggingFace BERT folder + heads), and out/history.json keeps
the per-epoch metrics. Starts from mlm_pretrain's model when that stage ran, else cfg.model.dir.
On the console (stages/progress.py): a line per quarter epoch, then the epoch's dev scores.

Every train.checkpoint_every steps and at each epoch end the whole training state goes to
out/checkpoint/ (stages/checkpoint.py); a run whose `out` already holds a checkpoint of the same
config and data continues from it and ends with the metrics of an uninterrupted run: the batch
plan is redrawn from the seed, and the random state after it is restored from the checkpoint.
"""

import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stages import checkpoint, smart
from stages.batches import bucketed_batches, load_split
from stages.device import autocast, pick_device, resolve_precision
from stages.metrics import dev_metrics
from stages.multitask_model import batch_lengths, build_model, make_batch, mnr_loss, predict, save_multitask
from stages.pcgrad import pcgrad_backward
from stages.progress import Progress
from stages.samplers import annealed_alpha, batch_counts, epoch_steps, train_rows

TASKS = ("sst", "para", "sts")
# loss.weighting: normalized divides a task's loss by an exponential moving average of its
# detached value; 0.99 averages over roughly the last 100 steps of that task.
LOSS_EMA_DECAY = 0.99
MNR_MIN_SIMILARITY = 4.0  # sts pairs at least this similar are the MNR positives
MNR_COSINE_SCALE = 20.0  # SBERT's MultipleNegativesRankingLoss default
MNR_DOT_SCALE = 1.0  # a dot product is its own scale: the logits are u_i . v_j (report D)


def run(cfg, inputs: dict, out: Path, log) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.train

    # ---- seed everything: torch (weights of the heads, dropout) and numpy (batches, task order)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    precision = _precision(cfg, device)

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
    # The rows of each train split this run trains on (train.data_fraction); dev stays whole.
    rows = {t: train_rows(len(s), getattr(tc.data_fraction, t), seed=cfg.seed + TASKS.index(t))
            for t, s in train.items()}
    for t in train:
        if len(rows[t]) < len(train[t]):
            print(f"finetune: {t} trains on {len(rows[t])} of its {len(train[t])} train rows "
                  f"(train.data_fraction.{t}: {getattr(tc.data_fraction, t)})")

    # ---- model
    encoder_dir = Path(inputs["mlm_pretrain"]) / "model" if inputs.get("mlm_pretrain") else Path(cfg.model.dir)
    model = build_model(cfg, encoder_dir).to(device)
    encodings = {t: model.batch_encoding(t) for t in TASKS}  # what make_batch builds per task

    # ---- the whole run's batches and task order, drawn up front so the schedule knows its length
    lengths = {t: batch_lengths(t, s, encodings[t])[rows[t]] for t, s in train.items()}
    task_epochs = {t: getattr(tc.task_epochs, t) for t in train}
    plan = []  # per epoch: per step [(task, row indices), ...], one entry per task the step trains
    cursors = {t: [] for t in train}  # each task's remaining batches; refilled (reshuffled) when empty
    for epoch in range(tc.epochs):
        alpha = annealed_alpha(epoch, tc.epochs, tc.alpha_start, tc.alpha_end)
        n_batches = batch_counts({t: len(r) for t, r in rows.items()}, tc.batch_size, epoch, task_epochs)
        if not any(n_batches.values()):
            raise ValueError(f"finetune: no task left to train in epoch {epoch + 1} of {tc.epochs}: "
                             f"train.task_epochs {task_epochs} ends every task with a train split before it")
        steps = []
        for step_tasks in epoch_steps(n_batches, tc.sampling, rng, alpha=alpha, steps=tc.steps_per_epoch):
            step = []
            for task in step_tasks:
                if not cursors[task]:
                    cursors[task] = list(bucketed_batches(lengths[task], tc.batch_size, rng))
                step.append((task, rows[task][cursors[task].pop(0)]))
            steps.append(step)
        plan.append(steps)
    total_steps = sum(len(steps) for steps in plan)

    # ---- optimizer: AdamW over the trainable parameters (a frozen encoder has none), layer-wise
    # LR decay from the head down, no weight decay on biases and LayerNorm weights (1-D parameters)
    trainable = [p for p in model.parameters() if p.requires_grad]
    base_optimizer = torch.optim.AdamW(_param_groups(model, tc.lr, tc.weight_decay, tc.layerwise_lr_decay),
                                       lr=tc.lr, fused=_fused_adamw(device))
    optimizer = base_optimizer
    if tc.lookahead:
        from pytorch_optimizer import Lookahead

        # Lookahead's param_groups are the inner AdamW's own list, so the scheduler below (on
        # the inner AdamW) drives the lr AdamW uses. A parameter without a gradient at a sync
        # step (another task's head, one task per step) is synced at a later one.
        optimizer = Lookahead(base_optimizer, k=tc.lookahead_k, alpha=tc.lookahead_alpha)
    warmup = int(tc.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        base_optimizer, lambda step: lr_factor(tc.lr_schedule, step, warmup, total_steps))
    loss_scale = _RunningLossScale(LOSS_EMA_DECAY) if cfg.loss.weighting == "normalized" else None
    sc = tc.smart
    # MNR logits: scale * similarity; the scale's default depends on the similarity (config.py)
    mnr_scale = cfg.loss.mnr_scale or (MNR_DOT_SCALE if cfg.loss.mnr_similarity == "dot" else MNR_COSINE_SCALE)
    proximal = smart.make_proximal_copy(model) if sc.enabled and sc.proximal_weight > 0 else None
    # train.ema_decay: after every optimizer step ema = decay * ema + (1 - decay) * weights (the
    # first step copies them); the encoder's buffers are not trained, so they are not averaged.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay)) if tc.ema_decay > 0 else None

    # ---- resume: `out` holds a checkpoint of this same run (a killed earlier attempt)
    history = []
    best = None  # (score, epoch)
    total_examples, total_seconds = 0, 0.0
    resume_at = (1, 0)  # (epoch, steps of it already done)
    epoch_progress = None  # a resumed epoch's loss sums and counts, examples and seconds so far
    train_cfg = {k: v for k, v in dataclasses.asdict(tc).items() if k != "checkpoint_every"}
    fingerprint = checkpoint.fingerprint(cfg.seed, precision, dataclasses.asdict(cfg.model), train_cfg,
                                         dataclasses.asdict(cfg.loss), str(encoder_dir),
                                         (data_dir / "manifest.json").read_text())
    saved = checkpoint.load(out, fingerprint, "finetune")
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if proximal is not None:
            proximal.load_state_dict(saved["proximal"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        if loss_scale is not None:
            loss_scale.means = dict(saved["loss_scale"])
        checkpoint.restore_rng(saved["rng"], {"plan": rng})
        history, best = saved["history"], saved["best"] and tuple(saved["best"])
        total_examples, total_seconds = saved["total_examples"], saved["total_seconds"]
        resume_at, epoch_progress = tuple(saved["resume_at"]), saved["epoch_progress"]
        print(f"finetune: resuming from {out / checkpoint.DIR} at epoch {resume_at[0]}, "
              f"after {resume_at[1]} of its steps")

    def save_checkpoint(at: tuple[int, int], progress: dict | None) -> None:
        checkpoint.save(out, {
            "fingerprint": fingerprint, "resume_at": at, "epoch_progress": progress,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "proximal": proximal.state_dict() if proximal is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "loss_scale": dict(loss_scale.means) if loss_scale is not None else None,
            "rng": checkpoint.rng_state({"plan": rng}), "history": history, "best": best,
            "total_examples": total_examples, "total_seconds": total_seconds})

    # ---- the epoch loop
    untrained = set()  # the tasks said to have no gradient (_with_gradient), each said once
    for epoch, steps in enumerate(plan, start=1):
        if epoch < resume_at[0]:
            continue
        first_step = resume_at[1] if epoch == resume_at[0] else 0
        steps_before = sum(len(s) for s in plan[:epoch - 1])
        model.train()
        mnr_epoch = epoch <= cfg.loss.sts_mnr_epochs
        loss_sums, loss_counts = {}, {}
        clipped, clip_steps = {}, {}  # per task: its steps whose gradient norm was over train.grad_clip, of all
        examples, seconds_before = 0, 0.0
        if first_step and epoch_progress:
            loss_sums, loss_counts = dict(epoch_progress["loss_sums"]), dict(epoch_progress["loss_counts"])
            clipped, clip_steps = dict(epoch_progress["clipped"]), dict(epoch_progress["clip_steps"])
            examples, seconds_before = epoch_progress["examples"], epoch_progress["seconds"]
        start = time.perf_counter()
        examples_before = examples  # a resumed epoch's examples were not seen in this attempt's time
        progress = Progress(f"finetune epoch {epoch}/{tc.epochs}", total=len(steps), initial=first_step)
        for done, step in enumerate(steps[first_step:], start=first_step + 1):
            task_losses = {}  # task -> the loss that task's gradient comes from (weighted)
            limit = tc.grad_clip  # the step's clipping limit
            for task, idx in step:
                batch = make_batch(task, train[task], idx, device, encodings[task])
                if task == "sts" and mnr_epoch:
                    # MNR: the pairs with similarity >= 4 are positives, the other rows' v in-batch negatives
                    keep = batch["labels"] >= MNR_MIN_SIMILARITY
                    if int(keep.sum()) < 2:
                        continue
                    with autocast(device, precision):
                        u, v = model.pair_embeddings(task, batch)
                    loss = mnr_loss(u[keep].float(), v[keep].float(), mnr_scale, cfg.loss.mnr_similarity)
                    name = "sts_mnr"
                    objective = loss
                else:
                    rng_state = smart.capture_rng(device) if sc.enabled else None
                    with autocast(device, precision):
                        output = model(task, batch)
                    loss, name = model.loss(task, output, batch["labels"], cfg.loss.sst_label_smoothing), task
                    objective = loss
                    if task == "sst" and cfg.loss.sst_rdrop > 0:
                        # R-Drop: a second pass draws other dropout masks; the KL pulls the two predictions together
                        with autocast(device, precision):
                            second = model(task, batch)
                        loss = (loss + model.loss(task, second, batch["labels"], cfg.loss.sst_label_smoothing)) / 2
                        objective = loss + cfg.loss.sst_rdrop * symmetric_kl(output, second)
                    if sc.enabled:
                        objective = objective + smart.smart_adversarial_loss(model, task, batch, output, sc, rng_state)
                        if proximal is not None:
                            objective = objective + smart.proximal_loss(proximal, task, batch, output, sc, rng_state)
                value = loss.item()
                scale = weights[task] / loss_scale(name, value) if loss_scale else weights[task]
                task_losses[task] = objective * scale
                if tc.weighted_clip:  # one task per step (config_rules): the step's limit carries its weight
                    limit = tc.grad_clip * scale
                loss_sums[name] = loss_sums.get(name, 0.0) + value
                loss_counts[name] = loss_counts.get(name, 0) + 1
                examples += len(idx)
            if not task_losses:
                progress.update(done)  # the step still counts: the epoch's length is the plan's
                continue  # an sts-only step whose batch had too few MNR positives
            # A step whose losses have no gradient still steps the optimizer (a no-op without
            # gradients) and the schedule: the other tasks' lr stays the plan's, frozen or not.
            task_losses = _with_gradient(task_losses, model, untrained)
            if tc.pcgrad and task_losses:
                pcgrad_backward(task_losses, trainable, rng)
            elif task_losses:
                sum(task_losses.values()).backward()
            if tc.grad_clip and tc.grad_clip > 0 and task_losses:
                norm = torch.nn.utils.clip_grad_norm_(trainable, limit)
                for task in task_losses:  # a tensor sum: no device sync per step
                    clipped[task] = clipped.get(task, 0) + (norm > limit).int()
                    clip_steps[task] = clip_steps.get(task, 0) + 1
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if proximal is not None:
                smart.update_proximal(proximal, model, sc.proximal_beta)
            if ema is not None:
                ema.update_parameters(model)

            elapsed = time.perf_counter() - start
            progress.update(done, f"{(examples - examples_before) / elapsed:.1f} ex/s" if elapsed > 0 else "",
                            _loss_summary(loss_sums, loss_counts))
            if tc.checkpoint_every and (steps_before + done) % tc.checkpoint_every == 0 and done < len(steps):
                save_checkpoint((epoch, done), {"loss_sums": loss_sums, "loss_counts": loss_counts, "examples": examples,
                                                "clipped": {t: int(n) for t, n in clipped.items()},
                                                "clip_steps": clip_steps,
                                                "seconds": seconds_before + time.perf_counter() - start})
        progress.close()
        seconds = seconds_before + time.perf_counter() - start
        total_examples += examples
        total_seconds += seconds

        scored = ema.module if ema is not None else model  # the model this epoch is scored and saved as
        preds = {t: predict(scored, t, s, tc.eval_batch_size, device, precision)
                 for t, s in dev.items() if s.labels is not None}
        golds = {t: np.asarray(dev[t].labels) for t in preds}
        metrics = {f"train/loss_{name}": loss_sums[name] / loss_counts[name] for name in loss_sums}
        metrics.update({f"train/clipped_{t}": int(clipped[t]) / clip_steps[t] for t in TASKS if clip_steps.get(t)})
        metrics["train/examples_per_s"] = examples / seconds if seconds > 0 else 0.0
        metrics["train/lr"] = scheduler.get_last_lr()[-1]  # the last group's: the heads, at train.lr
        if tc.sampling == "annealed":
            metrics["train/alpha"] = annealed_alpha(epoch - 1, tc.epochs, tc.alpha_start, tc.alpha_end)
        metrics.update(dev_metrics(preds, golds) if preds else {})
        log(metrics, step=epoch)
        history.append({"epoch": epoch, **metrics})
        (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")

        score = _selection_score(metrics)
        # Without any dev split there is nothing to choose by: the last epoch is kept.
        saved_best = best is None or score is None or score > best[0]
        if saved_best:
            best = (score, epoch)
            _save_atomically(scored, out / "model", encoder_dir)
        print(_epoch_line(epoch, tc.epochs, metrics, saved_best and score is not None and tc.epochs > 1), flush=True)
        if epoch == 1 and tc.sampling != "summed" and len(set(weights.values())) > 1 and clip_steps \
                and not tc.weighted_clip:  # once: later epochs' shares are in MLflow
            print(_clipping_line(metrics, tc.grad_clip), flush=True)
        save_checkpoint((epoch + 1, 0), None)

    result_metrics = {"best/epoch": float(best[1]),
                      "train/examples_per_s": total_examples / total_seconds if total_seconds > 0 else 0.0}
    best_row = history[best[1] - 1]
    if "dev/overall" in best_row:
        result_metrics["best/dev_overall"] = best_row["dev/overall"]
    for key in ("dev/sst_acc", "dev/para_acc", "dev/sts_corr"):
        if key in best_row:
            result_metrics["best/" + key.replace("/", "_")] = best_row[key]
    checkpoint.remove(out)  # finished: the output needs no optimizer state
    return {"metrics": result_metrics, "model": str(out / "model"), "params": {"resolved.precision": precision}}


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


def _with_gradient(task_losses: dict, model, untrained: set) -> dict:
    """The step's task losses that have a trainable parameter behind them.

    A parameter-free pair head (sts cosine or dot, para cosine) on a frozen encoder without PALs
    gives a loss with nothing to train, and backward on it would raise. Skipped rather than made
    a config error: a grid's frozen-encoder variant asks what freezing costs with the config's
    own heads, and the frozen vectors' cosine is a real answer for sts (the untrained backbone's);
    the task's loss is still logged (train/loss_<task>) and the other tasks train. Only a config
    where no trained task has a parameter is an error (pipeline/config_rules.py). Said once per
    task on the console, so a flat loss is not read as a training failure.
    """
    kept = {task: loss for task, loss in task_losses.items() if loss.requires_grad}
    for task in [t for t in task_losses if t not in kept and t not in untrained]:
        untrained.add(task)
        print(f"finetune: {task} has nothing to train (model.freeze_encoder: true, model.{task}.head: "
              f"{model.head_kind(task)} has no parameters, no PALs): its loss is logged, no gradient is taken",
              flush=True)
    return kept


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """(KL(p_a || p_b) + KL(p_b || p_a)) / 2 of the softmaxes, averaged over the batch (R-Drop's term)."""
    log_a, log_b = torch.log_softmax(logits_a.float(), -1), torch.log_softmax(logits_b.float(), -1)
    kl_ab = torch.nn.functional.kl_div(log_b, log_a, reduction="batchmean", log_target=True)  # KL(p_a || p_b)
    kl_ba = torch.nn.functional.kl_div(log_a, log_b, reduction="batchmean", log_target=True)
    return (kl_ab + kl_ba) / 2


def _loss_summary(loss_sums: dict, loss_counts: dict) -> str:
    """The epoch's mean training loss so far per loss name (the train/loss_* it will log),
    e.g. "loss sst 1.502 para 0.671 sts 2.310"; one step's loss alone is too noisy to read."""
    if not loss_sums:
        return ""
    names = sorted(loss_sums, key=lambda name: (TASKS.index(name.split("_")[0]), name))  # sst, para, sts, sts_mnr
    return "loss " + " ".join(f"{name} {loss_sums[name] / loss_counts[name]:.3f}" for name in names)


def _epoch_line(epoch: int, epochs: int, metrics: dict, best: bool) -> str:
    """The line printed after an epoch's dev evaluation, e.g.
    "finetune: epoch 1/2: sst 0.447 para 0.737 sts 0.322 overall 0.615 (best)"."""
    names = {"dev/sst_acc": "sst", "dev/para_acc": "para", "dev/sts_corr": "sts", "dev/overall": "overall"}
    scores = " ".join(f"{short} {metrics[key]:.3f}" for key, short in names.items() if key in metrics)
    return f"finetune: epoch {epoch}/{epochs}: {scores or 'no dev split to score'}{' (best)' if best else ''}"


def _clipping_line(metrics: dict, grad_clip: float) -> str:
    """With one task per step, clipping a step's gradient to norm grad_clip undoes that task's
    loss weight: e.g. "finetune: gradients clipped to train.grad_clip 1 on sst 100%, para 88%,
    sts 100% of their steps; on those, loss.weights changed nothing"."""
    shares = ", ".join(f"{t} {metrics[f'train/clipped_{t}']:.0%}" for t in TASKS if f"train/clipped_{t}" in metrics)
    return (f"finetune: gradients clipped to train.grad_clip {grad_clip:g} on {shares} of their steps; "
            f"on those, loss.weights changed nothing")


def _precision(cfg, device: torch.device) -> str:
    """The step's precision (stages.device), said on the log. SMART trains in fp32: its perturbation
    of the embeddings (train.smart.epsilon, 1e-5 by default) is far below bf16's resolution (8 bits of
    mantissa), so under bf16 the term measures rounding, not smoothness (on one MiniLM sst batch:
    1.4e-6 under bf16 autocast, 3.3e-7 in fp32). precision: bf16 with SMART is a config error."""
    precision, why = resolve_precision(cfg.precision, device)
    if precision == "bf16" and cfg.train.smart.enabled:
        precision, why = "fp32", f"{why}; fp32 for train.smart (bf16 rounding would swamp its perturbation)"
    print(f"finetune: {why}", flush=True)
    return precision


def _fused_adamw(device: torch.device) -> bool:
    """AdamW's fused kernel (one pass over each parameter) on CUDA and on CPU: the same update as
    the default per-parameter implementation (tests/stages/test_finetune.py), and on CPU about 5x
    faster; unfused, the optimizer step was a large part of a MiniLM training step (bench/README.md)."""
    return device.type in ("cuda", "cpu")


def _param_groups(model, lr: float, weight_decay: float, layerwise_decay: float = 1.0) -> list[dict]:
    """AdamW groups of the trainable parameters, by (lr, weight decay).

    Layer-wise LR decay (the HF names tell the depth): a parameter in encoder.layer.{i}. of an
    L-layer encoder gets lr * decay^(L - i), one in embeddings. lr * decay^(L + 1), the rest
    (heads, PALs) lr. 1-D parameters (biases, LayerNorm) get no weight decay.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layer_of = {n: int(m.group(1)) for n, _ in named if (m := re.search(r"(?:^|\.)encoder\.layer\.(\d+)\.", n))}
    n_layers = max(layer_of.values(), default=-1) + 1
    groups: dict[tuple[float, float], list] = {}
    for name, p in named:
        if name in layer_of:
            depth = n_layers - layer_of[name]
        elif re.search(r"(?:^|\.)embeddings\.", name):
            depth = n_layers + 1
        else:
            depth = 0
        key = (lr * layerwise_decay ** depth, weight_decay if p.ndim >= 2 else 0.0)
        groups.setdefault(key, []).append(p)
    # Deepest first, so the last group is a full-lr one (train/lr logs it).
    return [{"params": ps, "lr": group_lr, "weight_decay": wd}
            for (group_lr, wd), ps in sorted(groups.items(), key=lambda kv: kv[0])]


class _RunningLossScale:
    """Per loss name, an exponential moving average of its detached value, m <- d m + (1 - d) l,
    starting at the first value; calling it updates the average and returns it."""

    def __init__(self, decay: float):
        self.decay = decay
        self.means: dict[str, float] = {}

    def __call__(self, name: str, value: float) -> float:
        mean = self.means.get(name)
        mean = value if mean is None else self.decay * mean + (1 - self.decay) * value
        self.means[name] = mean
        return max(mean, 1e-12)  # a loss of exactly 0 would divide by 0


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """The lr multiplier at 0-based optimizer step `step` of `total` (LambdaLR's step count: the
    factor the step-th update uses): (step + 1) / (warmup + 1) during warmup, then
    constant: 1; linear: (total - step) / (total - warmup), 1 -> 0 at `total`;
    cosine: (1 + cos(pi * (step - warmup) / (total - warmup))) / 2, 1 -> 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    raise ValueError(f"lr_factor: schedule must be constant, linear or cosine, got {schedule!r}")


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
