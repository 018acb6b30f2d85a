import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import PipelineConfig, apply_overrides
from stages.batches import load_split
from stages.encoder import load_bert, pool
from stages.multitask_model import (MultitaskModel, _per_task_switches, batch_lengths, build_model, load_multitask,
                                    make_batch, mnr_loss, pair_features, predict, save_multitask)






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


def test_sst_label_smoothing_puts_eps_over_5_on_every_class(tiny_model_dir):
    model = _model(tiny_model_dir)
    # logits [1, 0, 0, 0, 0], gold 0, eps 0.1: the target is 0.92 on class 0 and 0.02 on the others, so
    # the loss is 0.92 * (ln(e + 4) - 1) + 4 * 0.02 * ln(e + 4)
    logits, gold = torch.tensor([[1.0, 0, 0, 0, 0]]), torch.tensor([0])
    smoothed = model.loss("sst", logits, gold, sst_label_smoothing=0.1)
    log_z = math.log(math.e + 4)
    assert smoothed.item() == pytest.approx(0.92 * (log_z - 1) + 0.08 * log_z, rel=1e-6)
    assert model.loss("sst", logits, gold).item() == pytest.approx(log_z - 1, rel=1e-6)  # 0: plain


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


# ---------------------------------------------------------------- the technique switches


def _switched(tiny_model_dir, seed=0, pooling="mean", **switches):
    torch.manual_seed(seed)
    return MultitaskModel(load_bert(tiny_model_dir), pooling=pooling, dropout=0.1, **switches).eval()


def _pair(ids_1, ids_2):
    return {"input_ids_1": ids_1, "attention_mask_1": (ids_1 != 0).long(),
            "input_ids_2": ids_2, "attention_mask_2": (ids_2 != 0).long()}


PAIR = _pair(torch.tensor([[101, 2023, 2003, 102, 0], [101, 7592, 102, 0, 0], [101, 2129, 2079, 1045, 102]]),
             torch.tensor([[101, 2204, 102], [101, 2919, 102], [101, 7592, 102]]))


def test_concat_encodes_the_pair_once_with_token_types(tiny_model_dir, prepared):
    model = _switched(tiny_model_dir, para_encoding="concat", sts_encoding="concat", pooling="cls")
    assert model.heads["para"].in_features == model.heads["sts"].in_features == 32
    split = load_split(prepared / "para-dev.arrow")
    idx = np.array([4, 1])
    batch = make_batch("para", split, idx, "cpu", encoding="concat")
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    a, b = split.lengths("input_ids_1")[idx], split.lengths("input_ids_2")[idx]
    np.testing.assert_array_equal(batch["attention_mask"].sum(1).numpy(), a + b - 1)
    np.testing.assert_array_equal(batch["token_type_ids"].sum(1).numpy(), b - 1)  # second sentence, no [CLS]
    assert (batch["input_ids"] == 102).sum(1).tolist() == [2, 2]  # "[CLS] a [SEP] b [SEP]"
    np.testing.assert_array_equal(batch_lengths("para", split, "concat")[idx], a + b - 1)
    with torch.no_grad():
        hidden = model.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        expected = hidden[:, 0] @ model.heads["para"].weight[0] + model.heads["para"].bias
        torch.testing.assert_close(model("para", batch), expected)
        without_types = model.encoder(batch["input_ids"], batch["attention_mask"])[:, 0]
    assert not torch.allclose(hidden[:, 0], without_types)  # the token types reach the encoder
    with pytest.raises(ValueError, match="encoding=model.batch_encoding"):
        model("para", make_batch("para", split, idx, "cpu"))
    with pytest.raises(ValueError, match="one sequence"):
        MultitaskModel(load_bert(tiny_model_dir), sts_encoding="concat", sts_head="cosine")


def test_pair_features_and_sbert_heads():
    u, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    torch.testing.assert_close(pair_features(u, v, "sbert"), torch.tensor([[1.0, -2.0, 3.0, 1.0, 2.0, 3.0]]))
    torch.testing.assert_close(pair_features(u, v), torch.tensor([[1.0, -2.0, 3.0, 1.0]]))


def test_sbert_head_reads_u_v_and_their_absolute_difference(tiny_model_dir):
    model = _switched(tiny_model_dir, para_head="sbert", sts_head="sbert")
    H = 32
    assert model.heads["para"].in_features == model.heads["sts"].in_features == 3 * H
    with torch.no_grad():
        u, v = model.pair_embeddings("sts", PAIR)
        w = model.heads["sts"].weight[0]
        expected = u @ w[:H] + v @ w[H:2 * H] + (u - v).abs() @ w[2 * H:] + model.heads["sts"].bias
        torch.testing.assert_close(model("sts", PAIR), expected)


def test_cosine_sts_is_five_times_the_cosine(tiny_model_dir, prepared):
    model = _switched(tiny_model_dir, sts_head="cosine")
    assert set(model.heads) == {"sst", "para"}
    with torch.no_grad():
        u, v = model.pair_embeddings("sts", PAIR)
        cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
        torch.testing.assert_close(model("sts", PAIR), 5 * cos)
    # hand vectors: cos([1, 0], [1, 1]) = 1 / sqrt(2); opposite vectors give -5, clipped to 0 by predict
    hand = torch.nn.functional.cosine_similarity(torch.tensor([[1.0, 0.0], [1.0, 2.0]]),
                                                 torch.tensor([[1.0, 1.0], [-1.0, -2.0]]))
    torch.testing.assert_close(5 * hand, torch.tensor([5 / math.sqrt(2), -5.0]))
    assert model.loss("sts", torch.tensor([5 / math.sqrt(2), -5.0]), torch.tensor([3.0, 0.0])).item() == \
        pytest.approx(((5 / math.sqrt(2) - 3) ** 2 + 25) / 2)
    preds = predict(model, "sts", load_split(prepared / "sts-dev.arrow"), 16, "cpu")
    assert preds.dtype == np.float32 and preds.min() >= 0 and preds.max() <= 5


COSINE_EMBEDDING = {"para_head": "cosine", "para_loss": "cosine_embedding", "sts_head": "cosine",
                    "sts_loss": "cosine_embedding"}


def test_cosine_embedding_loss_targets_match_torch(tiny_model_dir, prepared):
    model = _switched(tiny_model_dir, **COSINE_EMBEDDING)
    assert set(model.heads) == {"sst"}
    torch.manual_seed(3)
    u, v = torch.randn(6, 4), torch.randn(6, 4)
    cos = torch.nn.functional.cosine_similarity(u, v)
    reference = torch.nn.CosineEmbeddingLoss()
    para_labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    assert model.loss("para", cos, para_labels).item() == pytest.approx(
        reference(u, v, torch.tensor([1, -1, 1, -1, -1, 1])).item(), abs=1e-6)
    sts_labels = torch.tensor([2.5, 2.4, 5.0, 0.0, 3.1, 1.0])  # >= 2.5 is similar (+1)
    assert model.loss("sts", 5 * cos, sts_labels).item() == pytest.approx(
        reference(u, v, torch.tensor([1, -1, 1, -1, 1, -1])).item(), abs=1e-6)
    # by hand: target +1 costs 1 - cos, target -1 costs max(0, cos)
    assert model.loss("para", torch.tensor([0.5, 0.5, -0.2]), torch.tensor([1.0, 0.0, 0.0])).item() == \
        pytest.approx((0.5 + 0.5 + 0.0) / 3)
    with torch.no_grad():
        a, b = model.pair_embeddings("para", PAIR)
        out = model("para", PAIR)
    torch.testing.assert_close(out, torch.nn.functional.cosine_similarity(a, b))
    split = load_split(prepared / "para-dev.arrow")
    preds = predict(model, "para", split, 16, "cpu")
    with torch.no_grad():
        cosines = model("para", make_batch("para", split, np.arange(len(split)), "cpu"))
    np.testing.assert_array_equal(preds, (cosines > 0).long().numpy())  # cos > 0 -> paraphrase
    with pytest.raises(ValueError, match="go together"):
        MultitaskModel(load_bert(tiny_model_dir), para_loss="cosine_embedding", para_head="sbert")
    with pytest.raises(ValueError, match="needs sts_head cosine"):
        MultitaskModel(load_bert(tiny_model_dir), sts_loss="cosine_embedding", sts_head="dot")


def test_mnr_loss_is_cross_entropy_over_in_batch_cosines():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    v = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    s = 1 / math.sqrt(2)
    cos = [[1.0, s, 0.0], [0.0, s, -1.0], [s, 1.0, -s]]  # cos(u_i, v_j) by hand
    scale = 3.0
    expected = sum(-(scale * cos[i][i]) + math.log(sum(math.exp(scale * c) for c in cos[i])) for i in range(3)) / 3
    assert mnr_loss(u, v, scale).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="mnr_loss"):
        mnr_loss(u, v[:2], scale)


def test_pair_embeddings_are_the_undropped_sentence_vectors(tiny_model_dir):
    # A frozen encoder runs in eval mode even in train(), so any randomness would be the heads' dropout.
    model = _switched(tiny_model_dir, pooling="cls", freeze_encoder=True).train()
    u, v = model.pair_embeddings("sts", PAIR)
    with torch.no_grad():
        u_eval = model.encoder(PAIR["input_ids_1"], PAIR["attention_mask_1"])[:, 0]
        v_eval = model.encoder(PAIR["input_ids_2"], PAIR["attention_mask_2"])[:, 0]
        torch.testing.assert_close(u, u_eval)
        torch.testing.assert_close(v, v_eval)
        assert not torch.allclose(model.embed(PAIR["input_ids_1"], PAIR["attention_mask_1"]), u_eval)


def test_deep_heads_layout_and_one_row_batches(tiny_model_dir):
    model = _switched(tiny_model_dir, head_layers=3)
    head = model.heads["para"]
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "_BatchNorm1d", "GELU", "Dropout", "Linear", "_BatchNorm1d", "GELU", "Dropout", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[-1].out_features) == (64, 32, 1)
    assert model.heads["sst"][-1].out_features == 5
    model.train()
    one = {k: t[:1] for k, t in PAIR.items()}
    before = head[1].running_mean.clone()
    assert model("para", one).shape == (1,)  # running statistics, not a batch-of-one error
    torch.testing.assert_close(head[1].running_mean, before)
    model("para", PAIR)
    assert not torch.allclose(head[1].running_mean, before)  # a real batch updates them


def test_separate_encoders_share_no_parameters(tiny_model_dir):
    model = _switched(tiny_model_dir, shared_encoder=False)
    encoders = model.encoders()
    assert len(encoders) == 3 and len({id(e) for e in encoders}) == 3
    pointers = [{p.data_ptr() for p in e.parameters()} for e in encoders]
    assert not (pointers[0] & pointers[1]) and not (pointers[1] & pointers[2]) and not (pointers[0] & pointers[2])
    with torch.no_grad():
        para = model("para", PAIR)
        model.encoder_for("sst").embeddings.word_embeddings.weight.mul_(2)
        assert torch.equal(model("para", PAIR), para)  # para reads its own encoder
        model.encoder_for("para").encoder.layer[0].output.dense.weight.mul_(2)
        assert not torch.allclose(model("para", PAIR), para)
    with pytest.raises(ValueError, match="separate encoders"):
        model.embed(PAIR["input_ids_1"], PAIR["attention_mask_1"])


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval_mode(tiny_model_dir):
    model = _switched(tiny_model_dir, freeze_encoder=True).train()
    assert model.training and model.heads.training and not model.encoder.training
    assert all(not p.requires_grad for _, p in model.encoder_parameters())
    assert all(p.requires_grad for _, p in model.head_parameters())
    model.loss("sts", model("sts", PAIR), torch.tensor([1.0, 2.0, 3.0])).backward()
    assert all(p.grad is None for _, p in model.encoder_parameters())
    assert model.heads["sts"].weight.grad.abs().sum() > 0


def test_encoder_and_head_parameters_partition_the_model(tiny_model_dir):
    for switches in ({}, {"shared_encoder": False, "pals_size": 4, "pals_heads": 2}):
        model = _switched(tiny_model_dir, **switches)
        enc, head = model.encoder_parameters(), model.head_parameters()
        assert {id(p) for _, p in enc} | {id(p) for _, p in head} == {id(p) for p in model.parameters()}
        assert not {id(p) for _, p in enc} & {id(p) for _, p in head}
        assert all(".embeddings." in n or ".encoder.layer." in n for n, _ in enc)
        assert all(n.startswith("heads.") or ".pals." in n for n, _ in head)


@pytest.mark.parametrize("shared", [True, False])
def test_a_word_embedding_hook_sees_every_encoder_call(tiny_model_dir, shared):
    model = _switched(tiny_model_dir, shared_encoder=shared)
    calls = []
    handles = [e.embeddings.word_embeddings.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
               for k, e in enumerate(model.encoders())]
    with torch.no_grad():
        model("sst", {"input_ids": PAIR["input_ids_1"], "attention_mask": PAIR["attention_mask_1"]})
        model("para", PAIR)
        model("sts", PAIR)
    for h in handles:
        h.remove()
    # A pair's two sentences go through the encoder in one call (pair_embeddings stacks them).
    assert calls == ([0] * 3 if shared else [0, 1, 2])


@pytest.mark.parametrize("switches", [{}, {"para_head": "sbert", "sts_head": "sbert"}, {"sts_head": "cosine"},
                                      {"sts_head": "hybrid"}, {"pooling": "cls"},
                                      {"shared_encoder": False, "pals_size": 4, "pals_heads": 2}])
def test_one_encoder_call_for_both_sentences_gives_the_outputs_of_two(tiny_model_dir, switches):
    """The stacked [2B, max(T1, T2)] call of pair_embeddings against encoding u and v separately,
    each padded only to its own longest; outputs and gradients agree up to float rounding."""
    model = _switched(tiny_model_dir, **switches).eval()
    batch = {"input_ids_1": torch.tensor([[101, 2023, 2003, 102, 0], [101, 7592, 2088, 2015, 102]]),
             "attention_mask_1": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
             "input_ids_2": torch.tensor([[101, 2009, 102], [101, 2748, 102]]),
             "attention_mask_2": torch.tensor([[1, 1, 1], [1, 1, 1]])}
    for task in ("para", "sts"):
        u, v = model.pair_embeddings(task, batch)
        u2 = model.sentence_vectors(batch["input_ids_1"], batch["attention_mask_1"], task)
        v2 = model.sentence_vectors(batch["input_ids_2"], batch["attention_mask_2"], task)
        torch.testing.assert_close(u, u2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-5)
        out = model(task, batch)
        head = model.head_kind(task)
        cos = F.cosine_similarity(u2, v2, dim=-1)
        if head == "cosine":
            ref = cos * (1.0 if task == "para" else 5.0)
        else:
            ref = model.heads[task](pair_features(u2, v2, "sbert" if head == "sbert" else "linear")).squeeze(-1)
            if head == "hybrid":  # learned w starts at sigmoid(0) = 0.5
                ref = 0.5 * 5 * cos + 0.5 * ref
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        model.zero_grad()
        out.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        ref.sum().backward()
        for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


VARIANTS = {
    "baseline": {},
    "concat": {"para_encoding": "concat", "sts_encoding": "concat"},
    "concat_para_cosine_sts": {"para_encoding": "concat", "sts_head": "cosine"},
    "sbert": {"para_head": "sbert", "sts_head": "sbert"},
    "cosine_sts": {"sts_head": "cosine"},
    "cosine_embedding": COSINE_EMBEDDING,
    "dot_sts_tanh": {"sts_head": "dot", "sts_bound": "tanh"},
    "cosine_linear_sts": {"sts_head": "cosine_linear"},
    "hybrid_concat_learned": {"para_encoding": "concat", "sts_encoding": "concat", "sts_head": "hybrid"},
    "hybrid_fixed": {"sts_head": "hybrid", "sts_cosine_weight": 0.3, "sts_bound": "tanh"},
    "para_mse": {"para_loss": "mse"},
    "deep_heads": {"head_layers": 3},
    "separate": {"shared_encoder": False},
    "frozen": {"freeze_encoder": True},
    "pals": {"pals_size": 8, "pals_heads": 4},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_round_trips_through_save_and_load(tiny_model_dir, tmp_path, prepared, variant):
    model = _switched(tiny_model_dir, **VARIANTS[variant]).train()
    with torch.no_grad():  # train a little so that BatchNorm statistics and PALs are not at init
        if model.pals_size:
            for pal in model.encoder.pals.values():
                torch.nn.init.normal_(pal.decode.weight, std=0.2)
        if "sts_cosine_weight" in model.heads:  # a learned hybrid weight away from its start
            model.heads["sts_cosine_weight"].theta.fill_(0.7)
        model("sts", make_batch("sts", load_split(prepared / "sts-dev.arrow"), np.arange(16), "cpu",
                                model.batch_encoding("sts")))
    model.eval()
    save_multitask(model, tmp_path / "m", tokenizer_from=tiny_model_dir)
    meta = json.loads((tmp_path / "m" / "multitask.json").read_text())
    assert meta["switches"] == model.switches() and set(meta["heads"]) == {"sst", "para", "sts"}
    loaded = load_multitask(tmp_path / "m")
    assert loaded.switches() == model.switches() and not loaded.training
    if not model.shared_encoder:
        assert (tmp_path / "m" / "encoder-para" / "model.safetensors").is_file()
        assert not any(e1 is e2 for e1, e2 in zip(loaded.encoders(), loaded.encoders()[1:]))
    for task in ("sst", "para", "sts"):
        split = load_split(prepared / f"{task}-dev.arrow")
        batch = make_batch(task, split, np.arange(8), "cpu", model.batch_encoding(task))
        with torch.no_grad():
            assert torch.equal(model(task, batch), loaded(task, batch)), task
        preds = predict(loaded, task, split, 16, "cpu")
        np.testing.assert_array_equal(preds, predict(model, task, split, 16, "cpu"))
        if task == "sts":
            assert preds.dtype == np.float32 and 0 <= preds.min() and preds.max() <= 5
        else:
            assert preds.dtype == np.int64 and set(preds.tolist()) <= set(range(5 if task == "sst" else 2))


def test_build_model_maps_the_config_switches(tiny_model_dir):
    cfg = apply_overrides(PipelineConfig(), {
        "model.dir": str(tiny_model_dir), "model.para.head": "sbert", "model.sts.head": "cosine",
        "model.head_layers": 3, "model.pals.enabled": True, "model.pals.size": 8, "model.pals.heads": 2,
        "model.dropout": 0.2, "model.pooling": "mean"})
    model = build_model(cfg, tiny_model_dir)
    assert model.switches() == {"para_encoding": "separate", "para_head": "sbert", "para_loss": "bce",
                                "sts_encoding": "separate", "sts_head": "cosine", "sts_loss": "mse",
                                "sts_bound": "none", "sts_cosine_weight": None, "head_layers": 3, "shared_encoder": True,
                                "freeze_encoder": False, "pals_size": 8, "pals_heads": 2}
    assert model.pooling == "mean" and model.encoder.config.hidden_dropout_prob == 0.2
    baseline = build_model(apply_overrides(PipelineConfig(), {"model.dir": str(tiny_model_dir)}), tiny_model_dir)
    assert baseline.pals_size == 0 and baseline.encoder.pals is None and isinstance(baseline.heads["sts"], torch.nn.Linear)
    starter = build_model(apply_overrides(PipelineConfig(), {"model.dir": str(tiny_model_dir), "model.dropout": 0.3,
                                                             "model.encoder_dropout": 0.1}), tiny_model_dir)
    assert starter.dropout_p == 0.3 and starter.dropout.p == 0.3  # the heads' dropout, on the pooled vectors
    assert starter.encoder.config.hidden_dropout_prob == 0.1 and starter.encoder.config.attention_probs_dropout_prob == 0.1


def test_load_multitask_rejects_unknown_switches(tiny_model_dir, tmp_path):
    save_multitask(_switched(tiny_model_dir), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "multitask.json").read_text())
    meta["switches"]["pair_magic"] = True
    (tmp_path / "m" / "multitask.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="multitask.json.*pair_magic"):
        load_multitask(tmp_path / "m")
    meta["switches"] = {"sts_head": "dotty"}
    (tmp_path / "m" / "multitask.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="multitask.json: sts_head must be one of"):
        load_multitask(tmp_path / "m")


# ---------------------------------------------------------------- the published recipes' heads


def _hand_pair(model, u, v):
    """Make the model's pair_embeddings return hand-made (u, v), so the head math can be checked by hand."""
    model.pair_embeddings = lambda task, batch: (u, v)
    return model


# u_0 = [1, 0, ...], v_0 = [1, 1, 0, ...]: cos = 1/sqrt(2), u.v = 1; u_1 = [2, 0, ...], v_1 = [-1, 0, ...]: cos = -1, u.v = -2
U = torch.zeros(2, 32)
V = torch.zeros(2, 32)
U[0, 0], V[0, 0], V[0, 1] = 1.0, 1.0, 1.0
U[1, 0], V[1, 0] = 2.0, -1.0
COS = torch.tensor([1 / math.sqrt(2), -1.0])
DOT = torch.tensor([1.0, -2.0])


def _set_linear_head(head, column: int, weight: float, bias: float):
    """A [u; v] head reading one coordinate: nn = weight * features[column] + bias."""
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, column] = weight
        head.bias.fill_(bias)


def test_hybrid_head_is_w_times_five_cosines_plus_one_minus_w_times_the_head(tiny_model_dir):
    # the head reads u_0 (column 0 of [u; v]) times 2, plus 0.5: nn = [2.5, 4.5]
    nn_out = torch.tensor([2.5, 4.5])
    fixed = _hand_pair(_switched(tiny_model_dir, sts_head="hybrid", sts_cosine_weight=0.3), U, V)
    _set_linear_head(fixed.heads["sts"], 0, 2.0, 0.5)
    assert "sts_cosine_weight" not in fixed.heads  # a fixed weight has no parameter
    with torch.no_grad():
        torch.testing.assert_close(fixed("sts", {}), 0.3 * 5 * COS + 0.7 * nn_out)
    # by hand, row 0: 0.3 * 5 / sqrt(2) + 0.7 * 2.5 = 2.8107; row 1: 0.3 * -5 + 0.7 * 4.5 = 1.65
    torch.testing.assert_close(fixed("sts", {}).detach(), torch.tensor([1.5 / math.sqrt(2) + 1.75, 1.65]))

    learned = _hand_pair(_switched(tiny_model_dir, sts_head="hybrid"), U, V)
    _set_linear_head(learned.heads["sts"], 0, 2.0, 0.5)
    # theta starts at 0: w = 0.5, the report's fixed split
    torch.testing.assert_close(learned("sts", {}).detach(), 0.5 * 5 * COS + 0.5 * nn_out)
    with torch.no_grad():
        learned.heads["sts_cosine_weight"].theta.fill_(math.log(3))  # sigmoid(ln 3) = 3/4
    out = learned("sts", {})
    torch.testing.assert_close(out.detach(), 0.75 * 5 * COS + 0.25 * nn_out)
    # the weight learns: d out_0 / d theta = w (1 - w) (5 cos_0 - nn_0) = 3/16 (5/sqrt(2) - 2.5)
    out[0].backward()
    assert learned.heads["sts_cosine_weight"].theta.grad.item() == pytest.approx(3 / 16 * (5 / math.sqrt(2) - 2.5))


def test_hybrid_on_concatenated_pairs_reads_the_pair_for_its_head_and_the_sentences_for_its_cosine(
        tiny_model_dir, prepared):
    model = _switched(tiny_model_dir, pooling="cls", sts_encoding="concat", sts_head="hybrid", sts_cosine_weight=0.4)
    assert model.batch_encoding("sts") == "both" and model.heads["sts"].in_features == 32
    split = load_split(prepared / "sts-dev.arrow")
    batch = make_batch("sts", split, np.array([2, 7, 5]), "cpu", "both")
    assert {"input_ids", "token_type_ids", "input_ids_1", "input_ids_2"} <= set(batch)
    with torch.no_grad():
        joint = model.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[:, 0]
        nn_out = model.heads["sts"](joint).squeeze(-1)
        u = model.encoder(batch["input_ids_1"], batch["attention_mask_1"])[:, 0]
        v = model.encoder(batch["input_ids_2"], batch["attention_mask_2"])[:, 0]
        expected = 0.4 * 5 * F.cosine_similarity(u, v) + 0.6 * nn_out
        torch.testing.assert_close(model("sts", batch), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batch_lengths("sts", split, "both"), batch_lengths("sts", split, "concat"))


def test_dot_head_is_u_dot_v_and_tanh_bounds_it_to_2_5_times_tanh_plus_1(tiny_model_dir):
    dot = _hand_pair(_switched(tiny_model_dir, sts_head="dot"), U, V)
    assert set(dot.heads) == {"sst", "para"}
    torch.testing.assert_close(dot("sts", {}), DOT)
    bounded = _hand_pair(_switched(tiny_model_dir, sts_head="dot", sts_bound="tanh"), U, V)
    # 2.5 (tanh(1) + 1) = 2.5 * 1.761594 = 4.403985; 2.5 (tanh(-2) + 1) = 2.5 * 0.035972 = 0.089930
    torch.testing.assert_close(bounded("sts", {}), torch.tensor([4.403985, 0.089930]), atol=1e-5, rtol=0)
    # a linear head's number bounded the same way, and never outside (0, 5) however large
    linear = _hand_pair(_switched(tiny_model_dir, sts_bound="tanh"), U, V)
    _set_linear_head(linear.heads["sts"], 0, 100.0, -1.0)  # x = 100 u_0 - 1 = [99, 199]
    with torch.no_grad():
        torch.testing.assert_close(linear("sts", {}), 2.5 * (torch.tanh(torch.tensor([99.0, 199.0])) + 1))
        x = torch.linspace(-50, 50, 101)
        bounded_x = linear._bounded(x)
    assert bounded_x.min() >= 0 and bounded_x.max() <= 5
    torch.testing.assert_close(bounded_x, 2.5 * (torch.tanh(x) + 1))
    assert linear._bounded(torch.tensor(0.0)).item() == 2.5


def test_cosine_linear_is_a_times_cos_plus_b_starting_as_five_cos(tiny_model_dir):
    model = _hand_pair(_switched(tiny_model_dir, sts_head="cosine_linear"), U, V)
    head = model.heads["sts"]
    assert (head.in_features, head.out_features, head.weight.item(), head.bias.item()) == (1, 1, 5.0, 0.0)
    torch.testing.assert_close(model("sts", {}).detach(), 5 * COS)
    with torch.no_grad():
        head.weight.fill_(2.0)
        head.bias.fill_(1.0)
    torch.testing.assert_close(model("sts", {}).detach(), 2 * COS + 1)  # [1 + sqrt 2, -1]
    # MSE against the label, and the head's gradient: d/da mean((a cos + b - y)^2) = mean(2 (out - y) cos)
    labels = torch.tensor([3.0, 0.0])
    out = model("sts", {})
    loss = model.loss("sts", out, labels)
    assert loss.item() == pytest.approx(((1 + math.sqrt(2) - 3) ** 2 + 1) / 2, rel=1e-6)
    loss.backward()
    assert head.weight.grad.item() == pytest.approx((2 * (1 + math.sqrt(2) - 3) / math.sqrt(2) + 2 * (-1) * (-1)) / 2,
                                                    rel=1e-5)


def test_para_mse_regresses_the_0_1_label_and_predicts_above_one_half(tiny_model_dir, prepared):
    model = _switched(tiny_model_dir, para_loss="mse")
    assert model.regression_output("para") and model.para_threshold() == 0.5
    # squared errors (0.8 - 1)^2 = 0.04 and (0.3 - 0)^2 = 0.09 -> 0.065
    assert model.loss("para", torch.tensor([0.8, 0.3]), torch.tensor([1.0, 0.0])).item() == pytest.approx(0.065)
    split = load_split(prepared / "para-dev.arrow")
    batch = make_batch("para", split, np.arange(len(split)), "cpu")
    with torch.no_grad():  # centre the random head's outputs on 0.5, so both sides occur
        model.heads["para"].weight.mul_(20)
        model.heads["para"].bias.add_(0.5 - model("para", batch).median())
        outputs = model("para", batch)
    preds = predict(model, "para", split, 16, "cpu")
    np.testing.assert_array_equal(preds, (outputs > 0.5).long().numpy())
    assert 0 < preds.sum() < len(preds)
    assert not np.array_equal(preds, (outputs > 0).long().numpy())  # not the logit threshold
    bce = _switched(tiny_model_dir)
    assert not bce.regression_output("para") and bce.para_threshold() == 0.0


def test_mnr_with_dot_product_scores_is_cross_entropy_over_u_v_transposed():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    v = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    dots = [[2.0, 1.0, 0.0], [0.0, 2.0, -2.0], [6.0, 6.0, -3.0]]  # u_i . v_j by hand
    expected = sum(-dots[i][i] + math.log(sum(math.exp(d) for d in dots[i])) for i in range(3)) / 3
    assert mnr_loss(u, v, 1.0, "dot").item() == pytest.approx(expected, rel=1e-6)
    assert mnr_loss(u, v, 0.5, "dot").item() == pytest.approx(
        sum(-0.5 * dots[i][i] + math.log(sum(math.exp(0.5 * d) for d in dots[i])) for i in range(3)) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="similarity"):
        mnr_loss(u, v, 1.0, "euclid")


def test_concat_para_with_cosine_sts_encodes_each_task_its_own_way(tiny_model_dir, prepared):
    model = _switched(tiny_model_dir, pooling="cls", para_encoding="concat", sts_head="cosine")
    assert (model.batch_encoding("para"), model.batch_encoding("sts")) == ("concat", "separate")
    assert model.heads["para"].in_features == 32 and "sts" not in model.heads
    para = make_batch("para", load_split(prepared / "para-dev.arrow"), np.arange(4), "cpu", "concat")
    sts = make_batch("sts", load_split(prepared / "sts-dev.arrow"), np.arange(4), "cpu", "separate")
    with torch.no_grad():
        joint = model.encoder(para["input_ids"], para["attention_mask"], para["token_type_ids"])[:, 0]
        torch.testing.assert_close(model("para", para), model.heads["para"](joint).squeeze(-1))
        u, v = model.pair_embeddings("sts", sts)
        torch.testing.assert_close(model("sts", sts), 5 * F.cosine_similarity(u, v))
    with pytest.raises(ValueError, match="one sequence"):
        model.pair_embeddings("para", para)


@pytest.mark.parametrize("switches,message", [
    ({"para_encoding": "concat", "para_head": "sbert"}, "para_encoding concat"),
    ({"sts_encoding": "concat", "sts_head": "dot"}, "sts_encoding concat"),
    ({"sts_encoding": "concat", "sts_head": "cosine_linear"}, "sts_encoding concat"),
    ({"para_head": "cosine"}, "go together"),
    ({"sts_cosine_weight": 0.5}, "hybrid"),
    ({"sts_head": "hybrid", "sts_cosine_weight": 1.0}, r"\(0, 1\)"),
    ({"sts_head": "cosine", "sts_bound": "tanh"}, "already"),
    ({"sts_bound": "sigmoid"}, "sts_bound must be one of"),
])
def test_switch_combinations_that_mean_nothing_are_refused(tiny_model_dir, switches, message):
    with pytest.raises(ValueError, match=message):
        MultitaskModel(load_bert(tiny_model_dir), **switches)


def test_a_model_saved_with_the_old_global_pair_switches_still_loads(tiny_model_dir, tmp_path, prepared):
    model = _switched(tiny_model_dir, para_encoding="concat", sts_encoding="concat")
    save_multitask(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "multitask.json").read_text())
    meta["switches"] = {"pair_encoding": "concat", "pair_head": "linear", "sts_head": "linear", "pair_loss": "default",
                        "head_layers": 1, "shared_encoder": True, "freeze_encoder": False, "pals_size": 0,
                        "pals_heads": 12}
    (tmp_path / "m" / "multitask.json").write_text(json.dumps(meta))
    loaded = load_multitask(tmp_path / "m")
    assert loaded.switches() == model.switches()
    batch = make_batch("sts", load_split(prepared / "sts-dev.arrow"), np.arange(6), "cpu", "concat")
    with torch.no_grad():
        assert torch.equal(loaded("sts", batch), model("sts", batch))
    # the other old settings, mapped by hand
    old = {"pair_encoding": "separate", "pair_head": "sbert", "sts_head": "cosine", "pair_loss": "default"}
    assert _per_task_switches(old) == {"para_encoding": "separate", "sts_encoding": "separate",
                                       "para_head": "sbert", "sts_head": "cosine"}
    old = {"pair_encoding": "separate", "pair_head": "linear", "sts_head": "linear", "pair_loss": "cosine_embedding"}
    assert _per_task_switches(old) == {"para_encoding": "separate", "sts_encoding": "separate", **COSINE_EMBEDDING}
    assert _per_task_switches({"sts_head": "dot"}) == {"sts_head": "dot"}  # a new-style file stays as it is
