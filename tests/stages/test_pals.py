"""Projected attention layers (Stickland & Murray 2019) in the encoder and the multitask model."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stages.encoder import BertConfig, BertEncoder, _attention, load_bert, save_bert
from stages.multitask_model import MultitaskModel, load_multitask, save_multitask

TASKS = ("sst", "para", "sts")




def _config(**overrides):
    return BertConfig(**{"vocab_size": 60, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "intermediate_size": 16, **overrides})


def _encoders(seed=0, size=6, heads=2, **config):
    """(plain, with PALs): the same BERT weights, PALs for every task on the second."""
    torch.manual_seed(seed)
    plain = BertEncoder(_config(**config)).eval()
    with_pals = BertEncoder(_config(**config)).eval()
    with_pals.load_state_dict(plain.state_dict())
    with_pals.add_pals(TASKS, size, heads).eval()
    return plain, with_pals


IDS = torch.tensor([[2, 7, 9, 11, 3], [2, 15, 3, 0, 0]])
MASK = (IDS != 0).long()


def test_fresh_pals_compute_exactly_plain_bert():
    plain, with_pals = _encoders()
    pal = with_pals.pals["sst"]
    assert pal.encode.weight.abs().sum() > 0 and pal.layer[1].query.weight.abs().sum() > 0
    assert (pal.decode.weight == 0).all() and (pal.decode.bias == 0).all()
    with torch.no_grad():
        reference = plain(IDS, MASK)
        for task in (*TASKS, None):
            assert torch.equal(with_pals(IDS, MASK, task=task), reference), task


def test_pals_change_only_their_own_task():
    plain, with_pals = _encoders()
    with torch.no_grad():
        torch.nn.init.normal_(with_pals.pals["sst"].decode.weight, std=0.5)
        reference = plain(IDS, MASK)
        sst = with_pals(IDS, MASK, task="sst")
        assert (sst - reference).abs().max() > 1e-3
        assert torch.equal(with_pals(IDS, MASK, task="para"), reference)
        assert torch.equal(with_pals(IDS, MASK, task="sts"), reference)
        assert torch.equal(with_pals(IDS, MASK), reference)  # no task: plain BERT
    with pytest.raises(ValueError, match="'nli' has no PALs"):
        with_pals(IDS, MASK, task="nli")


def test_pal_term_is_v_d_of_a_small_multi_head_attention_of_v_e_h():
    """TS_l(h) = V_D · MH_l(V_E · h), attention computed by hand: 2 heads of width 3, pad key masked."""
    _, with_pals = _encoders()
    pal = with_pals.pals["para"]
    torch.manual_seed(1)
    for p in pal.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(2, 5, 8)
    keep = MASK.bool()[:, None, None, :]
    small = h @ pal.encode.weight.T + pal.encode.bias  # [B, T, 6]
    q_, k_, v_ = (small @ lin.weight.T + lin.bias for lin in (pal.layer[1].query, pal.layer[1].key, pal.layer[1].value))
    heads = []
    for s in (slice(0, 3), slice(3, 6)):
        scores = q_[..., s] @ k_[..., s].transpose(1, 2) / math.sqrt(3)
        scores = scores.masked_fill(~MASK.bool()[:, None, :], float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v_[..., s])
    expected = torch.cat(heads, -1) @ pal.decode.weight.T + pal.decode.bias
    with torch.no_grad():
        torch.testing.assert_close(pal(1, h, keep), expected, atol=1e-5, rtol=1e-5)


def test_pal_joins_the_sum_before_the_last_layer_norm():
    """One layer: out = LN(a + FFN(a) + TS(h)), a = LN(h + MH(h)) (BERT-and-PALs' code)."""
    torch.manual_seed(2)
    plain, with_pals = _encoders(num_hidden_layers=1)
    pal = with_pals.pals["sts"]
    torch.nn.init.normal_(pal.decode.weight, std=0.5)
    layer = with_pals.encoder.layer[0]
    keep = MASK.bool()[:, None, None, :]
    e = with_pals.embeddings
    with torch.no_grad():
        h = e.LayerNorm(e.word_embeddings(IDS) + e.token_type_embeddings(torch.zeros_like(IDS))
                        + e.position_embeddings(torch.arange(5)))
        ts = pal(0, h, keep)
        # a and FFN(a) from the plain layer: the attention sub-layer is untouched by PALs
        attn = layer.attention
        a = attn.output.LayerNorm(h + attn.output.dense(_attention(h, attn.self, 2, keep, 0.0)))
        ffn = layer.output.dense(F.gelu(layer.intermediate.dense(a)))
        expected = layer.output.LayerNorm(a + ffn + ts)
        torch.testing.assert_close(with_pals(IDS, MASK, task="sts"), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(plain(IDS, MASK), layer.output.LayerNorm(a + ffn), atol=1e-6, rtol=1e-6)


def test_v_e_and_v_d_are_one_pair_per_task_shared_by_all_layers():
    _, with_pals = _encoders(num_hidden_layers=3, size=6, heads=3)
    H, d, L = 8, 6, 3
    for task in TASKS:
        pal = with_pals.pals[task]
        names = [n for n, _ in pal.named_parameters()]
        assert sum(n.startswith("encode.") for n in names) == 2 and sum(n.startswith("decode.") for n in names) == 2
        assert sum(p.numel() for p in pal.parameters()) == (H * d + d) + (d * H + H) + L * 3 * (d * d + d)
    # Every layer's PAL term reaches the same V_E: its gradient is the sum over the layers.
    pal = with_pals.pals["sst"]
    torch.nn.init.normal_(pal.decode.weight, std=0.5)
    keep = MASK.bool()[:, None, None, :]
    h = torch.randn(2, 5, H)
    per_layer = []
    for i in range(L):
        pal.zero_grad()
        pal(i, h, keep).sum().backward()
        per_layer.append(pal.encode.weight.grad.clone())
    pal.zero_grad()
    sum(pal(i, h, keep).sum() for i in range(L)).backward()
    torch.testing.assert_close(pal.encode.weight.grad, sum(per_layer))
    assert all(g.abs().sum() > 0 for g in per_layer)


def test_add_pals_rejects_a_size_the_heads_do_not_divide():
    with pytest.raises(ValueError, match="multiple of heads"):
        BertEncoder(_config()).add_pals(TASKS, 7, 2)


def test_save_bert_leaves_pals_out_and_the_folder_stays_loadable(tmp_path, tiny_model_dir):
    encoder = load_bert(tiny_model_dir).add_pals(TASKS, 4, 2)
    torch.nn.init.normal_(encoder.pals["sst"].decode.weight)
    save_bert(encoder, tmp_path / "m")
    names = set(load_file(tmp_path / "m" / "model.safetensors"))
    assert names and not any(n.startswith("pals.") for n in names)
    reloaded = load_bert(tmp_path / "m")
    ids = torch.tensor([[101, 7592, 102]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids, torch.ones_like(ids)), encoder(ids, torch.ones_like(ids)))
    transformers = pytest.importorskip("transformers")
    transformers.BertModel.from_pretrained(str(tmp_path / "m"), add_pooling_layer=False)


# ---------------------------------------------------------------- in the multitask model


def _pair_batch():
    ids_2 = torch.tensor([[101, 2204, 2154, 102], [101, 2919, 102, 0]])
    return {"input_ids_1": torch.tensor([[101, 7592, 2088, 102], [101, 2129, 102, 0]]),
            "attention_mask_1": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
            "input_ids_2": ids_2, "attention_mask_2": (ids_2 != 0).long()}


@pytest.mark.parametrize("shared", [True, False])
def test_multitask_pals_start_as_the_plain_model_and_round_trip(tiny_model_dir, tmp_path, shared):
    torch.manual_seed(0)
    model = MultitaskModel(load_bert(tiny_model_dir), "mean", 0.1, pals_size=8, pals_heads=2,
                           shared_encoder=shared).eval()
    plain = MultitaskModel(load_bert(tiny_model_dir), "mean", 0.1, shared_encoder=shared).eval()
    plain.heads.load_state_dict(model.heads.state_dict())
    batch = _pair_batch()
    sst_batch = {"input_ids": batch["input_ids_1"], "attention_mask": batch["attention_mask_1"]}
    with torch.no_grad():
        for task, b in (("sst", sst_batch), ("para", batch), ("sts", batch)):
            assert torch.equal(model(task, b), plain(task, b)), task
        # Each task's PALs live in the encoder that task uses: one with all three, or one each.
        for enc in model.encoders():
            assert set(enc.pals) == (set(TASKS) if shared else {t for t in TASKS if model.encoder_for(t) is enc})
            for pal in enc.pals.values():
                torch.nn.init.normal_(pal.decode.weight, std=0.3)
        moved = {task: model(task, b) for task, b in (("sst", sst_batch), ("para", batch), ("sts", batch))}
        assert not torch.allclose(moved["para"], plain("para", batch))

    save_multitask(model, tmp_path / "m", tokenizer_from=tiny_model_dir)
    pals = load_file(tmp_path / "m" / "pals.safetensors")
    assert {n.split(".")[0] for n in pals} == set(TASKS) and "sst.encode.weight" in pals
    loaded = load_multitask(tmp_path / "m")
    assert loaded.pals_size == 8 and loaded.pals_heads == 2
    with torch.no_grad():
        for task, b in (("sst", sst_batch), ("para", batch), ("sts", batch)):
            assert torch.equal(loaded(task, b), moved[task]), task

    (tmp_path / "m" / "pals.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pals.safetensors"):
        load_multitask(tmp_path / "m")


def test_pals_are_head_parameters_and_train_under_a_frozen_encoder(tiny_model_dir):
    torch.manual_seed(0)
    model = MultitaskModel(load_bert(tiny_model_dir), "cls", 0.1, pals_size=8, pals_heads=2, freeze_encoder=True)
    pal_names = {n for n, _ in model.head_parameters() if ".pals." in n}
    assert pal_names and not any(".pals." in n for n, _ in model.encoder_parameters())
    for pal in model.encoder.pals.values():
        torch.nn.init.normal_(pal.decode.weight, std=0.3)  # else V_E gets no gradient at all
    model.train()
    assert not model.encoder.training and model.encoder.pals.training
    batch = _pair_batch()
    model.loss("para", model("para", batch), torch.tensor([1.0, 0.0])).backward()
    grads = dict(model.named_parameters())
    assert all(grads[n].grad is None for n, _ in model.encoder_parameters())
    assert grads["encoder.pals.para.encode.weight"].grad.abs().sum() > 0
    assert grads["encoder.pals.para.layer.1.query.weight"].grad.abs().sum() > 0
    assert grads["encoder.pals.sst.encode.weight"].grad is None  # another task's PALs
    assert grads["heads.para.weight"].grad.abs().sum() > 0
