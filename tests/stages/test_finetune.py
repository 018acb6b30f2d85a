import json

import numpy as np
import pytest
import torch

from pipeline.config import PipelineConfig, apply_overrides
from stages import data_prep, finetune
from stages.finetune import _linear_warmup_decay
from stages.multitask_model import load_multitask, predict
from stages.batches import load_split


def _cfg(data_dir, model_dir, **overrides):
    return apply_overrides(PipelineConfig(), {
        "device": "cpu", "data.dir": str(data_dir), "model.dir": str(model_dir),
        "data.max_rows": 48, "data.max_length": 32, "data.on_bad_rows": "drop",
        "train.epochs": 2, "train.batch_size": 16, "train.eval_batch_size": 64,
        "train.lr": 1e-3, "train.warmup_ratio": 0.0, **overrides})



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from two threads, and on a busy 2-core machine the second
    thread spin-waits for a core; one thread keeps these tests at a few seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("data_prep")
    data_prep.run(_cfg(shared_data_dir, tiny_model_dir), {}, out, lambda *a, **k: None)
    return out


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
    values = [_linear_warmup_decay(s, 4, 10) for s in range(10)]
    assert values == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert _linear_warmup_decay(0, 0, 4) == 1.0 and _linear_warmup_decay(3, 0, 4) == 0.25
