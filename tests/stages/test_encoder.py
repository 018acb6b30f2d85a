"""The BERT encoder: parity with transformers.BertModel, pooling, loading/saving, the tiny BERT."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.encoder import (
    TOKENIZER_FILES,
    BertConfig,
    BertEncoder,
    WeightsError,
    default_model_dir,
    load_bert,
    pool,
    save_bert,
)
from stages.tiny_bert import write_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must read the local folders only

SENTENCES = [
    "The movie was surprisingly good, with a moving performance by the lead.",
    "Boring.",
    "How do I learn to play the guitar quickly?",
]


def _batch(encodings, pad_id=0):
    """Right-pads a list of tokenizers.Encoding into ids, mask and type ids [B, T]."""
    T = max(len(e.ids) for e in encodings)
    ids = torch.full((len(encodings), T), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encodings):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        types[i, :n] = torch.tensor(e.type_ids)
        mask[i, :n] = 1
    return ids, mask, types


@pytest.fixture(scope="module")
def minilm_pair():
    """(ours, transformers') all-MiniLM-L6-v2 encoders in eval mode, and its tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    model_dir = default_model_dir()
    ref = transformers.BertModel.from_pretrained(
        str(model_dir), add_pooling_layer=False, attn_implementation="eager"
    ).eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()  # MiniLM's tokenizer.json pads to 128; _batch pads to the longest instead
    return load_bert(model_dir), ref, tok


def _max_diff_on_real_tokens(ours, ref, ids, mask, types):
    with torch.no_grad():
        a = ours(ids, mask, types)
        b = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


def test_minilm_matches_transformers_on_a_padded_batch(minilm_pair):
    ours, ref, tok = minilm_pair
    ids, mask, types = _batch(tok.encode_batch(SENTENCES))
    assert mask.sum(1).unique().numel() == 3  # three lengths, so two rows carry padding
    assert (types == 0).all()
    assert _max_diff_on_real_tokens(ours, ref, ids, mask, types) < 1e-4


def test_minilm_matches_transformers_with_sentence_pairs(minilm_pair):
    ours, ref, tok = minilm_pair
    ids, mask, types = _batch(tok.encode_batch([(SENTENCES[0], SENTENCES[2]), (SENTENCES[1], SENTENCES[2])]))
    assert types.sum() > 0  # the second segment really has token type 1
    assert _max_diff_on_real_tokens(ours, ref, ids, mask, types) < 1e-4


def test_padding_does_not_change_real_token_states(minilm_pair):
    ours, _, tok = minilm_pair
    ids, mask, _ = _batch(tok.encode_batch(SENTENCES))
    with torch.no_grad():
        padded = ours(ids, mask)
        n = int(mask[1].sum())
        alone = ours(ids[1:2, :n], mask[1:2, :n])
    torch.testing.assert_close(padded[1, :n], alone[0], atol=1e-5, rtol=0)


def test_transformers_reads_what_save_bert_writes(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    ours = load_bert(tiny_model_dir)
    ref = transformers.BertModel.from_pretrained(
        str(tiny_model_dir), add_pooling_layer=False, attn_implementation="eager"
    ).eval()
    ids = torch.tensor([[101, 7592, 2088, 102, 2129, 102], [101, 2204, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    types = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert _max_diff_on_real_tokens(ours, ref, ids, mask, types) < 1e-5


# ---------------------------------------------------------------- pooling


def test_mean_pool_averages_only_real_tokens():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, 6.0], [-7.0, 8.0], [9.0, -10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = torch.tensor([[2.0, 3.0], [7.0 / 3, 4.0 / 3]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), expected)


def test_cls_pool_takes_position_zero():
    hidden = torch.arange(12.0).view(2, 3, 2)
    torch.testing.assert_close(pool(hidden, torch.ones(2, 3), "cls"), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))


def test_pool_rejects_unknown_mode():
    with pytest.raises(ValueError, match="max"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "max")


# ---------------------------------------------------------------- model behaviour


def _tiny_config(**overrides):
    return BertConfig(**{"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "intermediate_size": 16, **overrides})


def test_init_is_huggingface_style():
    torch.manual_seed(0)
    m = BertEncoder(_tiny_config(vocab_size=2000, hidden_size=64))
    w = m.embeddings.word_embeddings.weight
    assert (w[0] == 0).all()  # pad row
    assert abs(w[1:].std().item() - 0.02) < 0.001
    q = m.encoder.layer[0].attention.self.query
    assert abs(q.weight.std().item() - 0.02) < 0.002 and (q.bias == 0).all()
    ln = m.encoder.layer[0].output.LayerNorm
    assert (ln.weight == 1).all() and (ln.bias == 0).all()


def test_fully_masked_row_is_finite_and_dropout_only_in_training():
    torch.manual_seed(0)
    m = BertEncoder(_tiny_config(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5))
    ids, mask = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 1, 0], [0, 0, 0]])
    m.eval()
    assert torch.isfinite(m(ids, mask)).all()
    assert torch.equal(m(ids, mask), m(ids, mask))
    m.train()
    assert not torch.equal(m(ids, mask), m(ids, mask))


def test_task_without_pals_is_plain_bert():
    """forward(task=...) only picks PALs (tests/stages/test_pals.py); an encoder without any ignores it."""
    torch.manual_seed(0)
    m = BertEncoder(_tiny_config()).eval()
    ids, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3)
    assert m.pals is None
    assert torch.equal(m(ids, mask, task="sst"), m(ids, mask))
    assert not any(name.startswith("pals.") for name in m.state_dict())


def test_too_long_input_is_a_clear_error():
    m = BertEncoder(_tiny_config(max_position_embeddings=4))
    with pytest.raises(ValueError, match="max_position_embeddings 4"):
        m(torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5))


def test_config_from_dict_ignores_hf_keys_and_rejects_other_activations():
    d = {**_tiny_config().to_dict(), "transformers_version": "4.8.2", "use_cache": True}
    assert BertConfig.from_dict(d) == _tiny_config()
    assert d["model_type"] == "bert" and d["architectures"] == ["BertModel"] and d["hidden_act"] == "gelu"
    with pytest.raises(ValueError, match="hidden_act.*relu"):
        BertConfig.from_dict({**d, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="'vocab_size' is missing"):
        BertConfig.from_dict({k: v for k, v in d.items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="hidden_size"):
        BertConfig.from_dict({**d, "hidden_size": "8"})


# ---------------------------------------------------------------- save / load


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    m = BertEncoder(_tiny_config())
    out = save_bert(m, tmp_path / "m", tokenizer_from=default_model_dir())
    assert out == tmp_path / "m"
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        assert (out / name).is_file(), name
    assert "embeddings.word_embeddings.weight" in load_file(out / "model.safetensors")
    loaded = load_bert(out)
    assert loaded.config == m.config and not loaded.training
    _assert_same_weights(m, loaded)


def test_dropout_override(tiny_model_dir):
    c = load_bert(tiny_model_dir, dropout=0.25).config
    assert c.hidden_dropout_prob == c.attention_probs_dropout_prob == 0.25
    assert load_bert(tiny_model_dir).config.hidden_dropout_prob == 0.1


def test_bert_prefix_gamma_beta_and_extra_tensors_load(tmp_path, tiny_model_dir):
    tensors = load_file(tiny_model_dir / "model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        name = "bert." + name
        if name.endswith("LayerNorm.weight"):
            name = name.removesuffix("weight") + "gamma"
        renamed[name] = t
    renamed["bert.pooler.dense.weight"] = torch.zeros(32, 32)
    renamed["cls.predictions.bias"] = torch.zeros(30522)
    renamed["bert.embeddings.position_ids"] = torch.arange(512)[None]
    d = tmp_path / "prefixed"
    d.mkdir()
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    save_file(renamed, str(d / "model.safetensors"))
    _assert_same_weights(load_bert(d), load_bert(tiny_model_dir))


def test_pytorch_model_bin_loads(tmp_path, tiny_model_dir):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save(load_file(tiny_model_dir / "model.safetensors"), d / "pytorch_model.bin")
    _assert_same_weights(load_bert(d), load_bert(tiny_model_dir))


def _copy_model(src, dst):
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="nope"):
        load_bert(tmp_path / "nope")


def test_missing_config_is_an_error(tmp_path, tiny_model_dir):
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"config\.json"):
        load_bert(d)


def test_bad_config_names_the_file(tmp_path, tiny_model_dir):
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "hidden_act": "relu"}))
    with pytest.raises(WeightsError, match=r"config\.json.*relu"):
        load_bert(d)


def test_missing_weights_is_an_error(tmp_path, tiny_model_dir):
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="neither model.safetensors nor pytorch_model.bin"):
        load_bert(d)


def test_truncated_safetensors_names_the_file(tmp_path, tiny_model_dir):
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"m/model\.safetensors"):
        load_bert(d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"m/model\.safetensors"):
        load_bert(d)


def test_shape_mismatch_lists_tensor_and_both_shapes(tmp_path, tiny_model_dir):
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(WeightsError) as err:
        load_bert(d)
    msg = str(err.value)
    assert "model.safetensors" in msg
    assert "encoder.layer.0.intermediate.dense.weight: file (64, 32) vs config (48, 32)" in msg


def test_missing_encoder_tensors_are_listed(tmp_path, tiny_model_dir):
    d = _copy_model(tiny_model_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["encoder.layer.1.output.dense.bias"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"1 encoder tensor\(s\) missing, e.g. encoder\.layer\.1\.output\.dense\.bias"):
        load_bert(d)


# ---------------------------------------------------------------- tiny BERT


def test_tiny_bert_is_deterministic_and_loads(tmp_path, tiny_model_dir):
    state = torch.get_rng_state()
    again = write_tiny_bert(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert (again / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    other = write_tiny_bert(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()

    m = load_bert(tiny_model_dir)
    c = m.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
        30522, 32, 2, 2, 64)
    assert (tiny_model_dir / "vocab.txt").read_text().count("\n") >= 30522
    assert (tiny_model_dir / "tokenizer.json").is_file()
    with torch.no_grad():
        h = m(torch.tensor([[101, 7592, 102]]), torch.ones(1, 3))
    assert h.shape == (1, 3, 32) and torch.isfinite(h).all()
