import json
import math

import numpy as np
import pytest
import torch

from pipeline.config import PipelineConfig, apply_overrides
from stages import data_prep
from stages.batches import load_split
from stages.encoder import load_bert, pool
from stages.multitask_model import (MultitaskModel, load_multitask, make_batch, predict,
                                    save_multitask)



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
    cfg = apply_overrides(PipelineConfig(), {
        "device": "cpu", "data.dir": str(shared_data_dir), "model.dir": str(tiny_model_dir),
        "data.max_rows": 48, "data.max_length": 32, "data.on_bad_rows": "drop"})
    out = tmp_path_factory.mktemp("data_prep")
    data_prep.run(cfg, {}, out, lambda *a, **k: None)
    return out


def _model(tiny_model_dir, pooling="cls", seed=0):
    torch.manual_seed(seed)
    return MultitaskModel(load_bert(tiny_model_dir), pooling=pooling, dropout=0.1).eval()


# ---------------------------------------------------------------- heads and losses


def test_loss_hand_values(tiny_model_dir):
    model = _model(tiny_model_dir)
    # sst: uniform logits -> ln 5; logits [1, 0, 0, 0, 0] with gold 0 -> ln(e + 4) - 1
    sst = model.loss("sst", torch.tensor([[0.0] * 5, [1.0, 0, 0, 0, 0]]), torch.tensor([2, 0]))
    assert sst.item() == pytest.approx((math.log(5) + math.log(math.e + 4) - 1) / 2, rel=1e-6)
    # para: logit 0, gold 1 -> ln 2; logit 2, gold 0 -> ln(1 + e^2)
    para = model.loss("para", torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert para.item() == pytest.approx((math.log(2) + math.log(1 + math.e ** 2)) / 2, rel=1e-6)
    # sts: squared errors 1 and 0 -> 0.5
    sts = model.loss("sts", torch.tensor([1.0, 3.0]), torch.tensor([2.0, 3.0]))
    assert sts.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown task"):
        model.loss("nli", torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_forward_is_the_heads_on_separately_pooled_sentences(tiny_model_dir, pooling):
    model = _model(tiny_model_dir, pooling)
    ids_1 = torch.tensor([[101, 2023, 2003, 102, 0], [101, 7592, 102, 0, 0]])
    mask_1 = (ids_1 != 0).long()
    ids_2 = torch.tensor([[101, 2204, 102], [101, 2919, 102]])
    mask_2 = torch.ones_like(ids_2)
    with torch.no_grad():
        u = pool(model.encoder(ids_1, mask_1), mask_1, pooling)
        v = pool(model.encoder(ids_2, mask_2), mask_2, pooling)
        sst = model("sst", {"input_ids": ids_1, "attention_mask": mask_1})
        para = model("para", {"input_ids_1": ids_1, "attention_mask_1": mask_1,
                              "input_ids_2": ids_2, "attention_mask_2": mask_2})
        sts = model("sts", {"input_ids_1": ids_1, "attention_mask_1": mask_1,
                            "input_ids_2": ids_2, "attention_mask_2": mask_2})
    H = model.encoder.config.hidden_size
    assert sst.shape == (2, 5) and para.shape == (2,) and sts.shape == (2,)
    torch.testing.assert_close(sst, u @ model.heads["sst"].weight.T + model.heads["sst"].bias)
    w = model.heads["para"].weight[0]
    torch.testing.assert_close(para, u @ w[:H] + v @ w[H:] + model.heads["para"].bias)
    w = model.heads["sts"].weight[0]
    torch.testing.assert_close(sts, u @ w[:H] + v @ w[H:] + model.heads["sts"].bias)


def test_dropout_only_in_train_mode(tiny_model_dir):
    model = _model(tiny_model_dir)
    ids = torch.tensor([[101, 2023, 2003, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, b = model.embed(ids, mask), model.embed(ids, mask)
        torch.testing.assert_close(a, b)
        model.train()
        c = model.embed(ids, mask)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip_gives_identical_outputs(tiny_model_dir, tmp_path, prepared):
    model = _model(tiny_model_dir, pooling="mean")
    with torch.no_grad():
        model.heads["sts"].bias.fill_(2.5)
    save_multitask(model, tmp_path / "model", tokenizer_from=tiny_model_dir)
    assert {"config.json", "model.safetensors", "heads.safetensors", "multitask.json",
            "tokenizer.json"} <= {p.name for p in (tmp_path / "model").iterdir()}
    meta = json.loads((tmp_path / "model" / "multitask.json").read_text())
    assert meta["pooling"] == "mean" and set(meta["heads"]) == {"sst", "para", "sts"}

    loaded = load_multitask(tmp_path / "model")
    assert loaded.pooling == "mean" and not loaded.training
    for task in ("sst", "para", "sts"):
        split = load_split(prepared / f"{task}-dev.arrow")
        batch = make_batch(task, split, np.arange(8), "cpu")
        with torch.no_grad():
            assert torch.equal(model(task, batch), loaded(task, batch))


def test_load_multitask_names_the_missing_file(tiny_model_dir, tmp_path):
    save_multitask(_model(tiny_model_dir), tmp_path / "m")
    (tmp_path / "m" / "heads.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="heads.safetensors"):
        load_multitask(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_multitask(tmp_path / "nowhere")


# ---------------------------------------------------------------- batches and predictions


def test_make_batch_columns_and_labels(prepared):
    split = load_split(prepared / "sts-dev.arrow")
    idx = np.array([3, 0, 5])
    batch = make_batch("sts", split, idx, "cpu")
    assert set(batch) == {"input_ids_1", "attention_mask_1", "input_ids_2", "attention_mask_2", "labels"}
    lengths = split.lengths("input_ids_1")[idx]
    assert batch["input_ids_1"].shape == (3, lengths.max())
    assert batch["attention_mask_1"].sum(1).tolist() == lengths.tolist()
    assert batch["labels"].dtype == torch.float32
    np.testing.assert_array_equal(batch["labels"].numpy(), split.labels[idx])
    test_split = load_split(prepared / "sst-test.arrow")
    assert "labels" not in make_batch("sst", test_split, idx, "cpu")


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_predict_returns_the_split_row_order(tiny_model_dir, prepared, task):
    model = _model(tiny_model_dir, pooling="mean")
    split = load_split(prepared / f"{task}-dev.arrow")
    with torch.no_grad():  # spread the random model's scores around 2.5, so they differ row to row
        model.heads["sts"].weight.mul_(10)
        scores = model("sts", make_batch("sts", load_split(prepared / "sts-dev.arrow"), np.arange(48), "cpu"))
        model.heads["sts"].bias.add_(2.5 - scores.mean())
    model.train()  # predict must switch to eval itself, and switch back
    lengths = split.lengths("input_ids" if task == "sst" else "input_ids_1")
    assert len(set(lengths.tolist())) > 3  # bucketing really reorders rows

    preds = predict(model, task, split, batch_size=5, device="cpu")
    assert model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for i in range(len(split)):  # one row at a time: no padding, no reordering
            outputs.append(model(task, make_batch(task, split, np.array([i]), "cpu"))[0])
    outputs = torch.stack(outputs)
    assert preds.shape == (len(split),)
    if task == "sst":
        assert preds.dtype == np.int64
        np.testing.assert_array_equal(preds, outputs.argmax(-1).numpy())
    elif task == "para":
        assert preds.dtype == np.int64 and set(preds.tolist()) <= {0, 1}
        np.testing.assert_array_equal(preds, (torch.sigmoid(outputs) > 0.5).long().numpy())
    else:
        expected = outputs.clamp(0, 5).numpy()
        assert len(np.unique(np.round(expected, 3))) > len(split) // 2
        np.testing.assert_allclose(preds, expected, atol=1e-5)
        assert preds.min() >= 0 and preds.max() <= 5
