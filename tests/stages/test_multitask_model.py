import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import PipelineConfig, apply_overrides
from stages.batches import load_split
from stages.encoder import load_bert, pool
from stages.multitask_model import (MultitaskModel, batch_lengths, build_model, load_multitask, make_batch,
                                    mnr_loss, pair_features, predict, save_multitask)






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
    model = _switched(tiny_model_dir, pair_encoding="concat", pooling="cls")
    assert model.heads["para"].in_features == model.heads["sts"].in_features == 32
    split = load_split(prepared / "para-dev.arrow")
    idx = np.array([4, 1])
    batch = make_batch("para", split, idx, "cpu", pair_encoding="concat")
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
    with pytest.raises(ValueError, match="pair_encoding='concat'"):
        model("para", make_batch("para", split, idx, "cpu"))
    with pytest.raises(ValueError, match="one sequence"):
        MultitaskModel(load_bert(tiny_model_dir), pair_encoding="concat", sts_head="cosine")


def test_pair_features_and_sbert_heads():
    u, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    torch.testing.assert_close(pair_features(u, v, "sbert"), torch.tensor([[1.0, -2.0, 3.0, 1.0, 2.0, 3.0]]))
    torch.testing.assert_close(pair_features(u, v), torch.tensor([[1.0, -2.0, 3.0, 1.0]]))


def test_sbert_head_reads_u_v_and_their_absolute_difference(tiny_model_dir):
    model = _switched(tiny_model_dir, pair_head="sbert")
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


def test_cosine_embedding_loss_targets_match_torch(tiny_model_dir, prepared):
    model = _switched(tiny_model_dir, pair_loss="cosine_embedding")
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
    with pytest.raises(ValueError, match="never be used"):
        MultitaskModel(load_bert(tiny_model_dir), pair_loss="cosine_embedding", pair_head="sbert")


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


@pytest.mark.parametrize("switches", [{}, {"pair_head": "sbert"}, {"sts_head": "cosine"}, {"pooling": "cls"},
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
        if model.cosine_output(task):
            ref = F.cosine_similarity(u2, v2, dim=-1) * (1.0 if task == "para" else 5.0)
        else:
            ref = model.heads[task](pair_features(u2, v2, model.pair_head)).squeeze(-1)
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
    "concat": {"pair_encoding": "concat"},
    "sbert": {"pair_head": "sbert"},
    "cosine_sts": {"sts_head": "cosine"},
    "cosine_embedding": {"pair_loss": "cosine_embedding"},
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
        model("sts", make_batch("sts", load_split(prepared / "sts-dev.arrow"), np.arange(16), "cpu",
                                model.pair_encoding))
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
        batch = make_batch(task, split, np.arange(8), "cpu", model.pair_encoding)
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
        "model.dir": str(tiny_model_dir), "model.pair_head": "sbert", "model.sts_head": "cosine",
        "model.head_layers": 3, "model.pals.enabled": True, "model.pals.size": 8, "model.pals.heads": 2,
        "model.dropout": 0.2, "model.pooling": "mean"})
    model = build_model(cfg, tiny_model_dir)
    assert model.switches() == {"pair_encoding": "separate", "pair_head": "sbert", "sts_head": "cosine",
                                "pair_loss": "default", "head_layers": 3, "shared_encoder": True,
                                "freeze_encoder": False, "pals_size": 8, "pals_heads": 2}
    assert model.pooling == "mean" and model.encoder.config.hidden_dropout_prob == 0.2
    baseline = build_model(apply_overrides(PipelineConfig(), {"model.dir": str(tiny_model_dir)}), tiny_model_dir)
    assert baseline.pals_size == 0 and baseline.encoder.pals is None and isinstance(baseline.heads["sts"], torch.nn.Linear)


def test_load_multitask_rejects_unknown_switches(tiny_model_dir, tmp_path):
    save_multitask(_switched(tiny_model_dir), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "multitask.json").read_text())
    meta["switches"]["pair_magic"] = True
    (tmp_path / "m" / "multitask.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="multitask.json.*pair_magic"):
        load_multitask(tmp_path / "m")
    meta["switches"] = {"sts_head": "dot"}
    (tmp_path / "m" / "multitask.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="multitask.json: sts_head must be one of"):
        load_multitask(tmp_path / "m")
