import json
import math
import re

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from pipeline.config import PipelineConfig, apply_overrides
from stages import data_prep, finetune
from stages.finetune import _param_groups, _RunningLossScale, lr_factor
from stages.multitask_model import load_multitask, predict
from stages.batches import load_split
from stages.samplers import train_rows
from tests.stages.test_checkpoint import run_killed_after


def _cfg(data_dir, model_dir, **overrides):
    return apply_overrides(PipelineConfig(), {
        "device": "cpu", "data.dir": str(data_dir), "model.dir": str(model_dir),
        "data.max_rows": 48, "data.max_length": 32, "data.on_bad_rows": "drop",
        "train.epochs": 2, "train.batch_size": 16, "train.eval_batch_size": 64,
        "train.lr": 1e-3, "train.warmup_ratio": 0.0, **overrides})






def _run(cfg, prepared, out, **inputs):
    logged = []
    result = finetune.run(cfg, {"data_prep": prepared, **inputs}, out, lambda m, step=None: logged.append((step, m)))
    return result, logged


def test_two_epochs_write_history_and_a_loadable_best_model(prepared, shared_data_dir, tiny_model_dir, tmp_path):
    cfg = _cfg(shared_data_dir, tiny_model_dir)
    result, logged = _run(cfg, prepared, tmp_path)

    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert [step for step, _ in logged] == [1, 2]
    for row in history:
        assert {"train/loss_sst", "train/loss_para", "train/loss_sts", "train/examples_per_s",
                "dev/sst_acc", "dev/para_acc", "dev/sts_corr", "dev/overall"} <= set(row)
        assert row["dev/overall"] == pytest.approx(
            (row["dev/sst_acc"] + row["dev/para_acc"] + (row["dev/sts_corr"] + 1) / 2) / 3)

    best = max(history, key=lambda row: row["dev/overall"])
    metrics = result["metrics"]
    assert metrics["best/dev_overall"] == best["dev/overall"]
    assert metrics["best/epoch"] == best["epoch"]
    assert metrics["train/examples_per_s"] > 0
    assert result["model"] == str(tmp_path / "model")

    # The saved model is the best epoch's: its dev predictions reproduce that epoch's sst accuracy.
    model = load_multitask(tmp_path / "model")
    sst_dev = load_split(prepared / "sst-dev.arrow")
    preds = predict(model, "sst", sst_dev, 64, "cpu")
    assert np.mean(preds == sst_dev.labels) == pytest.approx(best["dev/sst_acc"])
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    assert not (tmp_path / "model.tmp").exists()


def _progress_lines(printed: str, epoch: int) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith(f"finetune epoch {epoch}/2: ")]


def _dev_line(epoch: int, metrics: dict, best: bool) -> str:
    return (f"finetune: epoch {epoch}/2: sst {metrics['dev/sst_acc']:.3f} para {metrics['dev/para_acc']:.3f} "
            f"sts {metrics['dev/sts_corr']:.3f} overall {metrics['dev/overall']:.3f}{' (best)' if best else ''}")


# 48 rows of each task in batches of 16: 9 steps an epoch, so the quarter marks (2.25, 4.5,
# 6.75, 9) are reached at steps 3, 5, 7 and 9.
QUARTERS = ["33% (3/9 steps)", "55% (5/9 steps)", "77% (7/9 steps)", "100% (9/9 steps)"]


def test_prints_a_line_per_quarter_epoch_and_the_dev_scores_after_each_epoch(prepared, shared_data_dir,
                                                                           tiny_model_dir, tmp_path, capsys):
    cfg = _cfg(shared_data_dir, tiny_model_dir)
    result, logged = _run(cfg, prepared, tmp_path)
    printed = capsys.readouterr().out  # not a TTY: the plain lines a log file gets
    assert "\r" not in printed and "" not in printed.splitlines()
    history = json.loads((tmp_path / "history.json").read_text())
    best_epoch = result["metrics"]["best/epoch"]
    expected = []
    for row in history:
        epoch = row["epoch"]
        lines = _progress_lines(printed, epoch)
        assert [line.split(", ")[0] for line in lines] == [f"finetune epoch {epoch}/2: {q}" for q in QUARTERS]
        # The rate, then the epoch's mean loss so far of each task trained so far.
        assert all(re.fullmatch(r".*, \d+\.\d ex/s, loss( (sst|para|sts) \d+\.\d{3})+", line) for line in lines), lines
        # The last line's losses are the epoch's means, as logged.
        assert lines[-1].endswith(f"loss sst {row['train/loss_sst']:.3f} para {row['train/loss_para']:.3f} "
                                  f"sts {row['train/loss_sts']:.3f}")
        # Epoch 1 is always saved; "(best)" marks a later epoch only when it beat the earlier ones.
        expected += lines + [_dev_line(epoch, row, best=epoch == 1 or epoch == best_epoch)]
    finetune_lines = [line for line in printed.splitlines() if line.startswith("finetune")]
    assert finetune_lines[0].startswith("finetune: precision: auto, ")  # which precision, and why
    assert finetune_lines[1:] == expected


def test_a_resumed_epoch_prints_only_the_quarters_after_its_checkpoint(prepared, shared_data_dir, tiny_model_dir,
                                                                      tmp_path, capsys):
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.checkpoint_every": 3})
    run_killed_after(8, finetune.run, cfg, {"data_prep": prepared}, tmp_path, lambda *a, **k: None)
    capsys.readouterr()
    _run(cfg, prepared, tmp_path)  # resumes at epoch 1 after 6 of its 9 steps
    printed = capsys.readouterr().out
    assert "after 6 of its steps" in printed
    assert [line.split(", ")[0] for line in _progress_lines(printed, 1)] == [
        "finetune epoch 1/2: 77% (7/9 steps)", "finetune epoch 1/2: 100% (9/9 steps)"]
    assert len(_progress_lines(printed, 2)) == 4
    assert re.search(r"^finetune: epoch 1/2: sst .* overall \d\.\d{3}", printed, re.M)


def test_same_seed_gives_identical_dev_metrics(prepared, shared_data_dir, tiny_model_dir, tmp_path):
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 1, "train.sampling": "annealed"})
    first, _ = _run(cfg, prepared, tmp_path / "a")
    second, _ = _run(cfg, prepared, tmp_path / "b")
    history_a = json.loads((tmp_path / "a" / "history.json").read_text())
    history_b = json.loads((tmp_path / "b" / "history.json").read_text())
    strip = lambda h: [{k: v for k, v in row.items() if k != "train/examples_per_s"} for row in h]
    assert strip(history_a) == strip(history_b)
    other, _ = _run(_cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 1, "train.sampling": "annealed",
                                                             "seed": 1}), prepared, tmp_path / "c")
    history_c = json.loads((tmp_path / "c" / "history.json").read_text())
    assert strip(history_c) != strip(history_a)


def test_tiny_overfit_lowers_the_training_loss(prepared, shared_data_dir, tiny_model_dir, tmp_path):
    # 16 sst rows only, one batch per step, no dropout: the loss must fall well below its start.
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{
        "data.max_rows": 16, "train.epochs": 4, "train.batch_size": 16, "train.lr": 3e-3, "model.dropout": 0.0,
        "train.sampling": "round_robin", "train.steps_per_epoch": 8,
        "loss.weights.para": 0.0, "loss.weights.sts": 0.0})
    small = tmp_path / "data"
    data_prep.run(cfg, {}, small, lambda *a, **k: None)
    result, logged = _run(cfg, small, tmp_path / "out")
    losses = [m["train/loss_sst"] for _, m in logged]
    assert "train/loss_para" not in logged[0][1]  # weight 0: not trained at all
    assert losses[-1] < 0.5 * losses[0], losses


def test_starts_from_mlm_pretrain_model_when_given(prepared, shared_data_dir, tiny_model_dir, tmp_path):
    from stages.encoder import load_bert, save_bert

    # A "pretrained" encoder that differs from cfg.model.dir: all weights zeroed but LayerNorms.
    encoder = load_bert(tiny_model_dir)
    with torch.no_grad():
        encoder.embeddings.word_embeddings.weight.zero_()
    save_bert(encoder, tmp_path / "mlm" / "model", tokenizer_from=tiny_model_dir)
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 1, "train.lr": 1e-9})
    _run(cfg, prepared, tmp_path / "out", mlm_pretrain=tmp_path / "mlm")
    loaded = load_multitask(tmp_path / "out" / "model").encoder.embeddings.word_embeddings.weight
    assert loaded.abs().max().item() < 1e-6  # started from the zeroed encoder, lr ~ 0


def test_skips_tasks_without_a_split(prepared, shared_data_dir, tiny_model_dir, tmp_path):
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 1, "data.sts_train": None,
                                                   "data.sts_dev": None, "data.sts_test": None})
    data = tmp_path / "data"
    data_prep.run(cfg, {}, data, lambda *a, **k: None)
    result, logged = _run(cfg, data, tmp_path / "out")
    metrics = logged[0][1]
    assert "train/loss_sts" not in metrics and "dev/sts_corr" not in metrics and "dev/overall" not in metrics
    assert {"train/loss_sst", "train/loss_para", "dev/sst_acc", "dev/para_acc"} <= set(metrics)
    assert "best/dev_overall" not in result["metrics"] and result["metrics"]["best/epoch"] == 1


def test_missing_manifest_is_a_clear_error(shared_data_dir, tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        finetune.run(_cfg(shared_data_dir, tiny_model_dir), {"data_prep": tmp_path}, tmp_path / "out",
                     lambda *a, **k: None)


def test_linear_warmup_then_decay_schedule():
    # 10 steps, 4 warmup: (s + 1) / 5 up to step 3, then (10 - s) / 6 down to 1/6 at step 9
    values = [lr_factor("linear", s, 4, 10) for s in range(10)]
    assert values == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert lr_factor("linear", 0, 0, 4) == 1.0 and lr_factor("linear", 3, 0, 4) == 0.25


def test_constant_and_cosine_schedules_by_hand():
    # constant: the same warmup (s + 1) / 5, then 1 to the end; no warmup: 1 from the first step
    assert [lr_factor("constant", s, 4, 10) for s in range(10)] == pytest.approx([0.2, 0.4, 0.6, 0.8] + [1.0] * 6)
    assert [lr_factor("constant", s, 0, 3) for s in range(3)] == [1.0, 1.0, 1.0]
    # cosine, 10 steps, 4 warmup: after the warmup (1 + cos(pi * (s - 4) / 6)) / 2:
    # s = 4: 1; 5: (1 + cos(pi/6)) / 2 = (2 + sqrt 3) / 4; 7: (1 + cos(pi/2)) / 2 = 1/2;
    # 9: (1 + cos(5 pi/6)) / 2 = (2 - sqrt 3) / 4; at 10 (= total) it reaches 0
    r3 = 3 ** 0.5
    assert [lr_factor("cosine", s, 4, 10) for s in range(4, 11)] == pytest.approx(
        [1.0, (2 + r3) / 4, 0.75, 0.5, 0.25, (2 - r3) / 4, 0.0])
    assert [lr_factor("cosine", s, 4, 10) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    # no warmup, 4 steps: (1 + cos(pi * s / 4)) / 2
    assert [lr_factor("cosine", s, 0, 4) for s in range(4)] == pytest.approx(
        [1.0, (2 + 2 ** 0.5) / 4, 0.5, (2 - 2 ** 0.5) / 4])
    with pytest.raises(ValueError, match="schedule"):
        lr_factor("step", 0, 0, 4)


def test_normalized_weighting_divides_by_the_running_mean_on_a_hand_sequence():
    scale = _RunningLossScale(decay=0.5)
    # m1 = 4; m2 = 0.5 * 4 + 0.5 * 2 = 3; m3 = 0.5 * 3 + 0.5 * 5 = 4; another task has its own mean
    assert scale("sst", 4.0) == 4.0
    assert scale("sst", 2.0) == 3.0
    assert scale("para", 0.5) == 0.5
    assert scale("sst", 5.0) == 4.0
    assert scale.means == {"sst": 4.0, "para": 0.5}
    assert scale("sts", 0.0) > 0  # a zero loss gives a tiny floor, not a division by zero


def test_layerwise_lr_groups_on_the_tiny_model(tiny_model_dir):
    from stages.encoder import load_bert
    from stages.multitask_model import MultitaskModel

    model = MultitaskModel(load_bert(tiny_model_dir), "cls", 0.1)
    groups = _param_groups(model, lr=1.0, weight_decay=0.01, layerwise_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)  # every parameter in exactly one group
    # 2 layers: heads 1, layer 1 0.5, layer 0 0.25, embeddings 0.125
    expected = {"heads.sst.weight": (1.0, 0.01), "heads.sts.bias": (1.0, 0.0),
                "encoder.encoder.layer.1.attention.self.query.weight": (0.5, 0.01),
                "encoder.encoder.layer.1.output.LayerNorm.weight": (0.5, 0.0),
                "encoder.encoder.layer.0.intermediate.dense.weight": (0.25, 0.01),
                "encoder.embeddings.word_embeddings.weight": (0.125, 0.01),
                "encoder.embeddings.LayerNorm.bias": (0.125, 0.0)}
    for name, want in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(want), name
    # separate encoders: each task's encoder decays the same way
    separate = MultitaskModel(load_bert(tiny_model_dir), "cls", 0.1, shared_encoder=False)
    lr_of = {id(p): g["lr"] for g in _param_groups(separate, 1.0, 0.01, 0.5) for p in g["params"]}
    named = dict(separate.named_parameters())
    assert lr_of[id(named["task_encoders.sts.encoder.layer.1.output.dense.weight"])] == 0.5
    assert lr_of[id(named["task_encoders.para.embeddings.position_embeddings.weight"])] == 0.125
    # decay 1.0: one lr for all, two groups (with and without weight decay)
    assert {g["lr"] for g in _param_groups(model, 1e-3, 0.01, 1.0)} == {1e-3}
    # frozen parameters are left out
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    frozen = _param_groups(model, 1.0, 0.01, 1.0)
    assert sum(len(g["params"]) for g in frozen) == len(list(model.heads.parameters()))


def _record_training_steps(monkeypatch):
    """(tasks of every training batch built, number of optimizer steps) as the run goes."""
    batches, steps = [], []
    real_make_batch = finetune.make_batch

    def make_batch(task, split, idx, device, *args):
        batches.append(task)
        return real_make_batch(task, split, idx, device, *args)

    monkeypatch.setattr(finetune, "make_batch", make_batch)  # predict() uses its own import: dev batches not seen
    handle = register_optimizer_step_post_hook(lambda *a: steps.append(1))
    return batches, steps, handle


@pytest.mark.parametrize("sampling,epoch_batches,steps_per_epoch", [
    # 48 rows per task, batch 16: 3 batches each
    ("summed", ["sst", "para", "sts"] * 3, 3),        # one batch of every task per step, one backward
    ("sequential", ["sst"] * 3 + ["para"] * 3 + ["sts"] * 3, 9),
    ("round_robin", ["sst", "para", "sts"] * 3, 9),
])
def test_sampling_modes_take_the_batches_of_their_schedule(sampling, epoch_batches, steps_per_epoch, monkeypatch,
                                                           prepared, shared_data_dir, tiny_model_dir, tmp_path):
    batches, steps, handle = _record_training_steps(monkeypatch)
    try:
        _run(_cfg(shared_data_dir, tiny_model_dir, **{"train.sampling": sampling}), prepared, tmp_path)
    finally:
        handle.remove()
    assert batches == epoch_batches * 2
    assert len(steps) == steps_per_epoch * 2


def test_pcgrad_gets_every_tasks_weighted_loss(monkeypatch, prepared, shared_data_dir, tiny_model_dir, tmp_path):
    calls = []
    real = finetune.pcgrad_backward

    def spy(task_losses, params, rng):
        calls.append({t: loss.item() for t, loss in task_losses.items()})
        return real(task_losses, params, rng)

    monkeypatch.setattr(finetune, "pcgrad_backward", spy)
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 1, "train.sampling": "summed", "train.pcgrad": True,
                                                   "loss.weights.para": 0.5})
    _, logged = _run(cfg, prepared, tmp_path)
    assert len(calls) == 3 and all(set(c) == {"sst", "para", "sts"} for c in calls)
    # train/loss_para is the unweighted mean; pcgrad saw it times 0.5
    assert sum(c["para"] for c in calls) / 3 == pytest.approx(0.5 * logged[0][1]["train/loss_para"], rel=1e-5)


def test_lookahead_without_a_sync_is_plain_adamw_and_its_lr_follows_the_schedule(prepared, shared_data_dir,
                                                                                   tiny_model_dir, tmp_path):
    # k beyond the run's 18 steps: Lookahead never syncs, so it changes nothing, provided the LR
    # schedule still drives the inner AdamW. A sync every 2 steps must change the run.
    strip = lambda h: [{k: v for k, v in row.items() if k != "train/examples_per_s"} for row in h]
    histories = {}
    for name, overrides in {"plain": {}, "no_sync": {"train.lookahead": True, "train.lookahead_k": 100},
                            "alpha05": {"train.lookahead": True, "train.lookahead_k": 2}}.items():
        cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 2, "train.sampling": "round_robin",
                                                       "train.warmup_ratio": 0.25, **overrides})
        _, logged = _run(cfg, prepared, tmp_path / name)
        histories[name] = strip([m for _, m in logged])
    assert histories["no_sync"] == histories["plain"]
    assert histories["alpha05"] != histories["plain"]
    # 9 steps per epoch, 18 in all, warmup int(0.25 * 18) = 4: after step 9 the factor is (18 - 9) / 14
    assert histories["alpha05"][0]["train/lr"] == pytest.approx(1e-3 * 9 / 14)
    assert histories["alpha05"][1]["train/lr"] == 0.0


@pytest.mark.parametrize("batch_size", [16, 4])  # 4: some sts batches have < 2 similar pairs and are skipped
def test_sts_trains_with_mnr_on_similar_pairs_first_then_the_cosine_loss(batch_size, monkeypatch, prepared,
                                                                         shared_data_dir, tiny_model_dir, tmp_path):
    seen = []  # (positives in the batch, rows mnr_loss got)
    real_make_batch, real_mnr = finetune.make_batch, finetune.mnr_loss

    def make_batch(task, split, idx, device, *args):
        batch = real_make_batch(task, split, idx, device, *args)
        if task == "sts":
            seen.append([int((batch["labels"] >= 4).sum()), None])
        return batch

    def mnr_loss(u, v, scale, similarity):
        assert (scale, similarity) == (7.0, "cosine")
        seen[-1][1] = len(u)
        return real_mnr(u, v, scale, similarity)

    monkeypatch.setattr(finetune, "make_batch", make_batch)
    monkeypatch.setattr(finetune, "mnr_loss", mnr_loss)
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"model.sts.head": "cosine", "loss.sts_mnr_epochs": 1,
                                                   "loss.mnr_scale": 7.0, "train.sampling": "round_robin",
                                                   "train.batch_size": batch_size})
    _, logged = _run(cfg, prepared, tmp_path)
    per_epoch = 48 // batch_size
    first, second = seen[:per_epoch], seen[per_epoch:]
    assert len(second) == per_epoch and all(rows is None for _, rows in second)  # epoch 2: the cosine head's loss
    assert all(rows == (positives if positives >= 2 else None) for positives, rows in first), first
    assert "train/loss_sts" in logged[1][1] and "train/loss_sts" not in logged[0][1]
    assert any(rows for _, rows in first) and "train/loss_sts_mnr" in logged[0][1], first
    if batch_size == 4:
        assert any(positives < 2 for positives, _ in first), first


def test_fused_adamw_on_cpu_gives_the_default_update(tiny_model_dir):
    """finetune uses AdamW's fused kernel on CPU too (a speed lever, bench/README.md): over a few
    steps with finetune's parameter groups (weight decay on matrices only, layer-wise LR decay),
    it moves every parameter as the default implementation does, up to float rounding."""
    from stages.encoder import load_bert
    from stages.finetune import _fused_adamw
    from stages.multitask_model import MultitaskModel

    assert _fused_adamw(torch.device("cpu"))
    torch.manual_seed(0)
    models = [MultitaskModel(load_bert(tiny_model_dir), pooling="cls") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.AdamW(_param_groups(m, 1e-3, 0.01, 0.8), lr=1e-3, fused=fused)
                  for m, fused in zip(models, (False, True))]
    for step in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- per-task epochs, train fractions, lr schedules


def _record_batches(monkeypatch):
    """(task, row indices) of every training batch built, and len() of every split predicted."""
    batches, predicted = [], []
    real_make_batch, real_predict = finetune.make_batch, finetune.predict

    def make_batch(task, split, idx, device, *args):
        batches.append((task, np.asarray(idx).copy()))
        return real_make_batch(task, split, idx, device, *args)

    def predict(model, task, split, *args):
        predicted.append((task, len(split)))
        return real_predict(model, task, split, *args)

    monkeypatch.setattr(finetune, "make_batch", make_batch)
    monkeypatch.setattr(finetune, "predict", predict)
    return batches, predicted


@pytest.mark.parametrize("sampling", ["sequential", "round_robin", "summed"])
def test_a_task_trains_only_its_own_epochs(sampling, monkeypatch, prepared, shared_data_dir, tiny_model_dir, tmp_path):
    batches, predicted = _record_batches(monkeypatch)
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 3, "train.task_epochs.para": 1,
                                                   "train.task_epochs.sts": 2, "train.sampling": sampling})
    _, logged = _run(cfg, prepared, tmp_path)
    # 48 rows, batch 16: 3 batches per task; sequential: epoch 1 all 9, epoch 2 sst + sts (6), epoch 3 sst (3);
    # round robin: 3 x the smallest (3) = 9, then 2 x 3, then 3; summed: 3 steps of every task still training
    tasks = [t for t, _ in batches]
    per_epoch = [tasks[:9], tasks[9:15], tasks[15:]]
    assert len(tasks) == 18
    assert sorted(per_epoch[0]) == ["para"] * 3 + ["sst"] * 3 + ["sts"] * 3
    assert sorted(per_epoch[1]) == ["sst"] * 3 + ["sts"] * 3
    assert per_epoch[2] == ["sst"] * 3
    assert "train/loss_para" in logged[0][1] and "train/loss_para" not in logged[1][1]
    assert "train/loss_sts" in logged[1][1] and "train/loss_sts" not in logged[2][1]
    # every epoch still scores all three dev splits
    assert [t for t, _ in predicted] == ["sst", "para", "sts"] * 3


def test_a_data_fraction_trains_on_that_share_of_the_train_rows_and_scores_the_whole_dev_split(
        monkeypatch, prepared, shared_data_dir, tiny_model_dir, tmp_path, capsys):
    batches, predicted = _record_batches(monkeypatch)
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.data_fraction.para": 0.25, "train.sampling": "sequential"})
    _run(cfg, prepared, tmp_path)
    rows = {t: np.concatenate([idx for task, idx in batches if task == t]) for t in ("sst", "para", "sts")}
    # round(0.25 * 48) = 12 para rows, in one batch of 12 per step; each used once per pass over them
    para_rows = set(rows["para"].tolist())
    assert len(para_rows) == 12 and para_rows == set(train_rows(48, 0.25, seed=cfg.seed + 1).tolist())
    assert all(len(idx) == 12 for task, idx in batches if task == "para")
    assert len(set(rows["sst"].tolist())) == 48 and len(set(rows["sts"].tolist())) == 48
    # sequential: each task's batches once per epoch, para's 12 rows one batch
    assert [t for t, _ in batches] == (["sst"] * 3 + ["para"] + ["sts"] * 3) * 2
    assert ("para", 48) in predicted  # dev stays whole
    assert "para trains on 12 of its 48 train rows" in capsys.readouterr().out


@pytest.mark.parametrize("schedule,factor_after_epoch_1", [
    # 9 steps per epoch, 18 in all, warmup int(0.25 * 18) = 4; train/lr is the factor after 9 steps
    ("constant", 1.0),
    ("linear", (18 - 9) / 14),
    ("cosine", (1 + math.cos(math.pi * 5 / 14)) / 2),
])
def test_the_lr_schedule_drives_the_optimizer(schedule, factor_after_epoch_1, prepared, shared_data_dir,
                                              tiny_model_dir, tmp_path):
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.sampling": "round_robin", "train.warmup_ratio": 0.25,
                                                   "train.lr_schedule": schedule})
    _, logged = _run(cfg, prepared, tmp_path)
    assert logged[0][1]["train/lr"] == pytest.approx(1e-3 * factor_after_epoch_1)
    assert logged[1][1]["train/lr"] == pytest.approx(1e-3 if schedule == "constant" else 0.0, abs=1e-12)


def test_mnr_scored_by_dot_product_gets_scale_1(monkeypatch, prepared, shared_data_dir, tiny_model_dir, tmp_path):
    calls = []
    real = finetune.mnr_loss

    def mnr_loss(u, v, scale, similarity):
        calls.append((scale, similarity))
        return real(u, v, scale, similarity)

    monkeypatch.setattr(finetune, "mnr_loss", mnr_loss)
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"model.sts.head": "dot", "loss.sts_mnr_epochs": 1,
                                                   "loss.mnr_similarity": "dot", "train.sampling": "round_robin"})
    _run(cfg, prepared, tmp_path)
    assert calls and set(calls) == {(1.0, "dot")}


def test_ema_scores_and_saves_the_moving_average_of_the_weights(monkeypatch, prepared, shared_data_dir,
                                                                tiny_model_dir, tmp_path):
    # The weights after each of the epoch's 9 optimizer steps, folded here by hand into
    # e_1 = w_1, e_t = d * e_(t-1) + (1 - d) * w_t: that is the model the run must save and score.
    decay = 0.8
    built, after_step = [], []
    real_build = finetune.build_model
    monkeypatch.setattr(finetune, "build_model", lambda *a: built.append(real_build(*a)) or built[-1])
    handle = register_optimizer_step_post_hook(
        lambda *_: after_step.append({n: p.detach().clone() for n, p in built[0].named_parameters()}))
    try:
        cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 1, "train.ema_decay": decay})
        _, logged = _run(cfg, prepared, tmp_path)
    finally:
        handle.remove()
    assert len(after_step) == 9
    expected = dict(after_step[0])
    for weights in after_step[1:]:
        expected = {n: decay * expected[n] + (1 - decay) * w for n, w in weights.items()}

    saved_model = load_multitask(tmp_path / "model")
    saved = dict(saved_model.named_parameters())
    assert saved.keys() == expected.keys()
    assert all(torch.allclose(saved[n], expected[n], atol=1e-6) for n in expected)
    moved = [n for n in expected if not torch.allclose(expected[n], after_step[-1][n], atol=1e-6)]
    assert moved  # the average is not the last step's weights
    sst_dev = load_split(prepared / "sst-dev.arrow")
    preds = predict(saved_model, "sst", sst_dev, 64, "cpu")
    assert np.mean(preds == sst_dev.labels) == pytest.approx(logged[0][1]["dev/sst_acc"])


def test_symmetric_kl_by_hand():
    # row 1: p_a = softmax([0, ln 3]) = [1/4, 3/4], p_b = [1/2, 1/2]; row 2: equal logits, KL 0.
    a = torch.tensor([[0.0, math.log(3)], [1.0, 2.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    kl_ab = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl_ba = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert finetune.symmetric_kl(a, b).item() == pytest.approx((kl_ab + kl_ba) / 2 / 2, rel=1e-6)
    assert finetune.symmetric_kl(b, a).item() == pytest.approx(finetune.symmetric_kl(a, b).item(), rel=1e-6)


def test_rdrop_compares_two_dropout_passes_of_every_sst_batch(monkeypatch, prepared, shared_data_dir, tiny_model_dir,
                                                              tmp_path):
    sst_labels, kl_inputs = [], []
    real_batch, real_kl = finetune.make_batch, finetune.symmetric_kl

    def recording_batch(task, *args):
        batch = real_batch(task, *args)
        sst_labels.extend([batch["labels"]] if task == "sst" else [])
        return batch
    monkeypatch.setattr(finetune, "make_batch", recording_batch)
    monkeypatch.setattr(finetune, "symmetric_kl", lambda a, b: kl_inputs.append((a.detach(), b.detach())) or real_kl(a, b))
    # fp32: the cross-entropy below is recomputed from the logits; under bf16 autocast the stage's
    # own is taken from logits rounded differently (bf16 R-Drop: BF16_SETUPS' recipe).
    overrides = {"train.epochs": 1, "train.sampling": "annealed", "precision": "fp32"}
    _, logged = _run(_cfg(shared_data_dir, tiny_model_dir, **overrides, **{"loss.sst_rdrop": 1.0}), prepared, tmp_path / "on")
    assert len(kl_inputs) == len(sst_labels) > 0  # once per sst batch, never for para or sts
    assert all(not torch.allclose(a, b) for a, b in kl_inputs)  # the two passes drew different dropout masks
    # The logged sst loss is the epoch's mean of the two passes' mean cross-entropy (the KL is not in it).
    two_pass_ce = [(torch.nn.functional.cross_entropy(a, y.long()) + torch.nn.functional.cross_entropy(b, y.long())) / 2
                   for (a, b), y in zip(kl_inputs, sst_labels)]
    assert logged[-1][1]["train/loss_sst"] == pytest.approx(torch.stack(two_pass_ce).mean().item(), rel=1e-5)

    # Without dropout both passes are the same: KL 0 and the mean of two equal cross-entropies, so
    # the run is the plain run (its second forward only costs time).
    no_dropout = {**overrides, "model.dropout": 0.0}
    kl_inputs.clear()
    _run(_cfg(shared_data_dir, tiny_model_dir, **no_dropout, **{"loss.sst_rdrop": 1.0}), prepared, tmp_path / "on0")
    _run(_cfg(shared_data_dir, tiny_model_dir, **no_dropout), prepared, tmp_path / "off0")
    assert kl_inputs and all(torch.equal(a, b) for a, b in kl_inputs)
    on0 = dict(load_multitask(tmp_path / "on0" / "model").named_parameters())
    off0 = dict(load_multitask(tmp_path / "off0" / "model").named_parameters())
    assert all(torch.allclose(on0[n], off0[n], atol=1e-6) for n in off0)


def test_clipped_share_per_task_is_the_steps_whose_gradient_norm_was_over_grad_clip(
        prepared, shared_data_dir, tiny_model_dir, tmp_path, monkeypatch, capsys):
    steps = []  # (task, pre-clip norm) of each training step: one task per step (annealed)
    real_batch, real_clip = finetune.make_batch, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(finetune, "make_batch", lambda task, *a, **k: steps.append([task]) or real_batch(task, *a, **k))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: steps[-1].append(float(norm := real_clip(params, max_norm))) or norm)
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 1, "train.grad_clip": 10.0,
                                                   "loss.weights.sst": 2.5})
    _run(cfg, prepared, tmp_path)
    trained = [s for s in steps if len(s) == 2]  # dev predictions come after the epoch's steps and are not clipped
    history = json.loads((tmp_path / "history.json").read_text())
    shares = {t: history[0][f"train/clipped_{t}"] for t in ("sst", "para", "sts")}
    for task, share in shares.items():
        norms = [n for t, n in trained if t == task]
        assert norms and share == sum(n > 10.0 for n in norms) / len(norms)
    assert min(shares.values()) < max(shares.values())  # counted per task (here sst and sts 1.0, para 0.0)
    assert f"gradients clipped to train.grad_clip 10 on sst {shares['sst']:.0%}, para" in capsys.readouterr().out
    _run(apply_overrides(cfg, {"loss.weights.sst": 1.0}), prepared, tmp_path / "equal")
    assert "gradients clipped" not in capsys.readouterr().out  # equal weights: nothing was undone


def test_weighted_clip_limits_each_one_task_step_to_grad_clip_times_its_weight(
        prepared, shared_data_dir, tiny_model_dir, tmp_path, monkeypatch):
    steps = []  # [task, limit passed to the clip, pre-clip norm, norm after] of each training step
    real_batch, real_clip = finetune.make_batch, torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):
        params = list(params)
        norm = real_clip(params, max_norm)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
        steps[-1] += [max_norm, float(norm), float(after)]
        return norm

    monkeypatch.setattr(finetune, "make_batch", lambda task, *a, **k: steps.append([task]) or real_batch(task, *a, **k))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    weights = {"sst": 2.5, "para": 1.0, "sts": 4.0}
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 1, "train.grad_clip": 3.0, "train.weighted_clip": True,
                                                   **{f"loss.weights.{t}": w for t, w in weights.items()}})
    _run(cfg, prepared, tmp_path)
    trained = [s for s in steps if len(s) == 4]
    assert {t for t, *_ in trained} == set(weights)
    assert any(n > lim and t != "para" for t, lim, n, _ in trained)  # some weighted steps were clipped
    for task, limit, norm, after in trained:
        assert limit == 3.0 * weights[task]
        assert after == pytest.approx(min(norm, limit), rel=1e-4)  # the weight survives: clipped to 3 x weight, not 3
    history = json.loads((tmp_path / "history.json").read_text())
    for task in weights:
        norms = [(n, lim) for t, lim, n, _ in trained if t == task]
        assert history[0][f"train/clipped_{task}"] == sum(n > lim for n, lim in norms) / len(norms)


BF16_SETUPS = {
    # the shipped recipe's switches: mean pooling, concatenated para, cosine sts, R-Drop
    "recipe": {"model.pooling": "mean", "model.para.encoding": "concat", "model.sts.head": "cosine",
               "loss.sst_rdrop": 1.0, "train.sampling": "annealed"},
    # PALs beside every layer's attention, PCGrad over the flattened per-task gradients
    "pals_pcgrad": {"model.pals.enabled": True, "model.pals.size": 16, "model.pals.heads": 2,
                    "train.sampling": "summed", "train.pcgrad": True},
    # MNR on cosine pairs (its logits from bf16 embeddings)
    "mnr": {"loss.sts_mnr_epochs": 1, "model.sts.head": "cosine", "train.epochs": 2},
    # a learned hybrid blend with 3-layer heads (BatchNorm under autocast)
    "hybrid_deep": {"model.sts.head": "hybrid", "model.head_layers": 3},
}


@pytest.mark.parametrize("setup", BF16_SETUPS)
def test_bf16_runs_matmuls_in_bf16_and_keeps_weights_gradients_and_losses_fp32(
        setup, monkeypatch, prepared, shared_data_dir, tiny_model_dir, tmp_path):
    seen = {"train_linear": set(), "grad": set(), "loss": set()}

    def on_linear(module, _inputs, output):
        if module.training:
            seen["train_linear"].add(output.dtype)

    handles = []
    real_build = finetune.build_model

    def build(*args):
        model = real_build(*args)
        handles.extend(m.register_forward_hook(on_linear) for m in model.modules() if isinstance(m, torch.nn.Linear))
        return model

    def on_step(optimizer, *_):
        seen["grad"].update(p.grad.dtype for group in optimizer.param_groups for p in group["params"]
                            if p.grad is not None)

    monkeypatch.setattr(finetune, "build_model", build)
    real_pcgrad = finetune.pcgrad_backward

    def pcgrad(task_losses, params, rng):
        seen["loss"].update(loss.dtype for loss in task_losses.values())
        return real_pcgrad(task_losses, params, rng)

    monkeypatch.setattr(finetune, "pcgrad_backward", pcgrad)
    handle = register_optimizer_step_post_hook(on_step)
    try:
        cfg = _cfg(shared_data_dir, tiny_model_dir, **{"precision": "bf16", "train.epochs": 1, **BF16_SETUPS[setup]})
        result, logged = _run(cfg, prepared, tmp_path)
    finally:
        handle.remove()
        for h in handles:
            h.remove()
    assert seen["train_linear"] == {torch.bfloat16}  # every Linear of a training step ran in bf16
    assert seen["grad"] == {torch.float32}  # master weights and their gradients: fp32
    if cfg.train.pcgrad:
        assert seen["loss"] == {torch.float32}
    metrics = logged[0][1]
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith(("train/loss", "dev/")))
    assert result["params"] == {"resolved.precision": "bf16"}
    saved = load_multitask(tmp_path / "model")
    assert {p.dtype for p in saved.parameters()} == {torch.float32}


def test_smart_trains_in_fp32_where_auto_would_pick_bf16(monkeypatch, prepared, shared_data_dir, tiny_model_dir,
                                                         tmp_path, capsys):
    from stages import device

    zen4 = tmp_path / "cpuinfo"
    zen4.write_text("flags\t: fpu avx512f avx512_bf16\n")
    monkeypatch.setattr(device, "CPUINFO", zen4)
    monkeypatch.setattr(device, "AUTO_BF16_ON", ("cuda", "cpu"))  # a host where auto takes bf16
    dtypes = set()
    real_build = finetune.build_model

    def build(*args):
        model = real_build(*args)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        return model

    monkeypatch.setattr(finetune, "build_model", build)
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"train.epochs": 1, "train.steps_per_epoch": 3})
    assert finetune._precision(cfg, torch.device("cpu")) == "bf16"  # without SMART: bf16 on this host
    cfg = apply_overrides(cfg, {"train.smart.enabled": True})
    result, _ = _run(cfg, prepared, tmp_path / "out")
    assert dtypes == {torch.float32} and result["params"] == {"resolved.precision": "fp32"}
    assert "finetune: precision: auto, this CPU executes bf16 natively; fp32 for train.smart" in capsys.readouterr().out


PALS = {"model.pals.enabled": True, "model.pals.size": 8, "model.pals.heads": 2}


@pytest.mark.parametrize("switches,sts_trains", [
    ({"model.sts.head": "cosine"}, False),  # nothing behind sts's loss: backward on it raised
    ({"model.sts.head": "cosine", "train.sampling": "summed", "train.pcgrad": True}, False),
    ({"model.sts.head": "cosine", "loss.sts_mnr_epochs": 1, "train.epochs": 2}, False),  # MNR, then MSE
    ({"model.sts.head": "cosine", **PALS}, True),  # sts's own PALs are behind its loss
    ({"model.sts.head": "hybrid"}, True),  # the NN part and the learned split
], ids=["cosine", "cosine_pcgrad", "cosine_mnr", "cosine_pals", "hybrid"])
def test_a_frozen_encoder_trains_what_has_parameters_and_logs_every_tasks_loss(
        switches, sts_trains, monkeypatch, prepared, shared_data_dir, tiny_model_dir, tmp_path, capsys):
    initial, built = {}, []
    real_build = finetune.build_model

    def build(*args):
        built.append(real_build(*args))
        initial.update({n: p.detach().clone() for n, p in built[0].named_parameters()})
        return built[0]

    monkeypatch.setattr(finetune, "build_model", build)
    cfg = _cfg(shared_data_dir, tiny_model_dir, **{"model.freeze_encoder": True, "train.epochs": 1, **switches})
    _, logged = _run(cfg, prepared, tmp_path)

    for _, metrics in logged:
        assert math.isfinite(metrics["dev/overall"])
        assert all(math.isfinite(metrics[f"train/loss_{t}"]) for t in ("sst", "para"))
    assert math.isfinite(logged[-1][1]["train/loss_sts"])  # logged, trained or not
    final = dict(built[0].named_parameters())
    changed = {n for n, p in initial.items() if not torch.equal(p, final[n])}
    assert not changed & {n for n, _ in built[0].encoder_parameters()}  # frozen
    assert any(n.startswith("heads.sst.") for n in changed) and any(n.startswith("heads.para.") for n in changed)
    sts_parameters = {n for n in initial if n.startswith("heads.sts") or n.startswith("encoder.pals.sts.")}
    assert bool(sts_parameters) == sts_trains
    assert bool(changed & sts_parameters) == sts_trains
    said = f"finetune: sts has nothing to train (model.freeze_encoder: true, model.sts.head: {cfg.model.sts.head} "
    assert capsys.readouterr().out.count(said) == (0 if sts_trains else 1)
