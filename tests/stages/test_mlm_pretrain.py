"""mlm_pretrain: BERT masking statistics, the tied MLM head against HuggingFace's, a tiny run."""

import math
import re

import pytest
import torch

from pipeline.config import PipelineConfig, apply_overrides
from stages import mlm_pretrain
from stages.batches import load_split
from stages.encoder import load_bert
from stages.mlm_pretrain import BertForMlm, mask_tokens, pretraining_text

PAD, CLS, SEP, MASK, UNK = 0, 101, 102, 103, 100
SPECIAL = [PAD, CLS, SEP, MASK, UNK]
VOCAB = 30522


def _batch(rows=4000, width=64, seed=0):
    """[CLS] w ... w [SEP] [PAD] ...: random lengths, ordinary word ids, a few [UNK] inside."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (rows,), generator=g)
    ids = torch.randint(1000, VOCAB, (rows, width), generator=g)
    ids[torch.rand(rows, width, generator=g) < 0.02] = UNK
    positions = torch.arange(width)[None, :]
    attention_mask = (positions < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[attention_mask == 0] = PAD
    return ids, attention_mask


def test_mask_tokens_statistics():
    ids, attention_mask = _batch()
    masked, labels = mask_tokens(ids, attention_mask, SPECIAL, MASK, VOCAB, 0.15,
                                 torch.Generator().manual_seed(1))
    eligible = (attention_mask == 1) & ~torch.isin(ids, torch.tensor(SPECIAL))
    chosen = labels != -100
    n_eligible, n_chosen = int(eligible.sum()), int(chosen.sum())
    assert n_eligible > 100_000

    # Only real, non-special tokens are chosen; labels are the original ids there, -100 elsewhere.
    assert not (chosen & ~eligible).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert (labels[~chosen] == -100).all()
    # Binomial(n, 0.15): std of the share is ~0.0008; 0.005 is > 6 std.
    assert abs(n_chosen / n_eligible - 0.15) < 0.005

    # Positions not chosen are untouched (specials and pads included).
    assert torch.equal(masked[~chosen], ids[~chosen])
    to_mask = chosen & (masked == MASK)
    unchanged = chosen & (masked == ids)
    replaced = chosen & (masked != MASK) & (masked != ids)
    # A random replacement equals the original or [MASK] with probability ~2/30522: negligible.
    assert abs(int(to_mask.sum()) / n_chosen - 0.8) < 0.015
    assert abs(int(replaced.sum()) / n_chosen - 0.1) < 0.01
    assert abs(int(unchanged.sum()) / n_chosen - 0.1) < 0.01
    assert int(masked.min()) >= 0 and int(masked.max()) < VOCAB
    # Random replacements are spread over the vocabulary, not one id.
    assert len(torch.unique(masked[replaced])) > 0.9 * int(replaced.sum())


def test_mask_tokens_is_deterministic_and_covers_every_eligible_token_at_prob_near_one():
    ids, attention_mask = _batch(rows=50, width=16)
    a = mask_tokens(ids, attention_mask, SPECIAL, MASK, VOCAB, 0.15, torch.Generator().manual_seed(7))
    b = mask_tokens(ids, attention_mask, SPECIAL, MASK, VOCAB, 0.15, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    _, labels = mask_tokens(ids, attention_mask, SPECIAL, MASK, VOCAB, 1 - 1e-9, torch.Generator().manual_seed(7))
    eligible = (attention_mask == 1) & ~torch.isin(ids, torch.tensor(SPECIAL))
    assert torch.equal(labels != -100, eligible)


def test_mask_tokens_hand_example():
    # One row: [CLS] 2000 2001 [SEP] [PAD]; at prob ~1 exactly the two words are labelled.
    ids = torch.tensor([[CLS, 2000, 2001, SEP, PAD]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0]])
    masked, labels = mask_tokens(ids, attention_mask, SPECIAL, MASK, VOCAB, 1 - 1e-9, torch.Generator().manual_seed(0))
    assert labels.tolist() == [[-100, 2000, 2001, -100, -100]]
    assert masked[0, 0] == CLS and masked[0, 3] == SEP and masked[0, 4] == PAD


def test_decoder_is_tied_to_word_embeddings(tiny_model_dir):
    model = BertForMlm(load_bert(tiny_model_dir))
    word = model.encoder.embeddings.word_embeddings.weight
    assert model.head.decoder.weight is word
    assert model.head.decoder.weight.data_ptr() == word.data_ptr()
    # One parameter, counted once by the optimizer; a step on the head moves the embedding.
    assert sum(p is word for p in model.parameters()) == 1
    with torch.no_grad():
        model.head.decoder.weight[5, 0] += 1.0
    assert word[5, 0] == model.head.decoder.weight[5, 0]


def test_mlm_loss_matches_huggingface_bert_for_masked_lm(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = BertForMlm(load_bert(tiny_model_dir)).eval()
    with torch.no_grad():  # non-trivial head weights (GELU inputs O(1)), so each piece is checked
        for p in (model.head.dense.weight, model.head.layer_norm.weight, model.head.layer_norm.bias, model.head.bias):
            p.normal_()
    hf = transformers.BertForMaskedLM.from_pretrained(str(tiny_model_dir)).eval()
    pred = hf.cls.predictions
    with torch.no_grad():
        pred.transform.dense.weight.copy_(model.head.dense.weight)
        pred.transform.dense.bias.copy_(model.head.dense.bias)
        pred.transform.LayerNorm.weight.copy_(model.head.layer_norm.weight)
        pred.transform.LayerNorm.bias.copy_(model.head.layer_norm.bias)
        pred.bias.copy_(model.head.bias)
    ids, attention_mask = _batch(rows=6, width=12, seed=3)
    masked, labels = mask_tokens(ids, attention_mask, SPECIAL, MASK, VOCAB, 0.5, torch.Generator().manual_seed(0))
    chosen = labels != -100
    with torch.no_grad():
        ours = model.loss(masked, attention_mask, labels, torch.device("cpu"))
        theirs = hf(input_ids=masked, attention_mask=attention_mask, labels=labels)
        our_logits = model.head(model.encoder(masked, attention_mask)[chosen])
    torch.testing.assert_close(our_logits, theirs.logits[chosen], atol=1e-5, rtol=1e-5)
    assert ours.item() == pytest.approx(theirs.loss.item(), rel=1e-5)


# ---------------------------------------------------------------- a tiny run on the real data




def _cfg(data_dir, model_dir, **overrides):
    return apply_overrides(PipelineConfig(), {
        "device": "cpu", "data.dir": str(data_dir), "model.dir": str(model_dir),
        "data.max_rows": 48, "data.max_length": 32, "data.on_bad_rows": "drop", **overrides})


def test_heldout_text_is_a_subset_of_the_train_sentences(prepared):
    train, heldout = pretraining_text(prepared, 0.2, seed=11711)
    key = lambda s: tuple(int(t) for t in s)  # noqa: E731
    train_split_sentences, other_sentences = set(), set()
    for name in ("sst", "para", "sts"):
        for split in ("train", "dev", "test"):
            path = prepared / f"{name}-{split}.arrow"
            if not path.exists():
                continue
            s = load_split(path)
            for column in ([c for c in ("input_ids", "input_ids_1", "input_ids_2") if c in s.columns]):
                values, offsets = s.columns[column]
                sents = {key(values[a:b]) for a, b in zip(offsets[:-1], offsets[1:])}
                (train_split_sentences if split == "train" else other_sentences).update(sents)
    held, trained = {key(s) for s in heldout}, {key(s) for s in train}
    assert len(held) == len(heldout) and len(trained) == len(train)  # distinct sentences
    assert held <= train_split_sentences and trained <= train_split_sentences
    assert held | trained == train_split_sentences
    assert not held & trained
    assert not held & (other_sentences - train_split_sentences)  # no dev/test-only text
    assert other_sentences - train_split_sentences  # ... and there is such text to avoid
    assert len(heldout) == round(0.2 * len(train_split_sentences))
    # Deterministic in the seed, different for another seed.
    assert [key(s) for s in pretraining_text(prepared, 0.2, seed=11711)[1]] == [key(s) for s in heldout]
    assert {key(s) for s in pretraining_text(prepared, 0.2, seed=1)[1]} != held


def test_tiny_run_lowers_heldout_perplexity_and_saves_a_loadable_encoder(prepared, tiny_model_dir, tmp_path):
    cfg = _cfg(prepared, tiny_model_dir, **{"mlm.epochs": 3, "mlm.batch_size": 16, "mlm.lr": 1e-3,
                                            "mlm.heldout_fraction": 0.2, "model.dropout": 0.0})
    logged = []
    result = mlm_pretrain.run(cfg, {"data_prep": prepared}, tmp_path, lambda m, step=None: logged.append((m, step)))

    metrics = result["metrics"]
    before, after = metrics["mlm/heldout_perplexity_before"], metrics["mlm/heldout_perplexity"]
    # A random tiny BERT sits near uniform over 30522 tokens; unigram statistics alone cut that a lot.
    assert before > 5000
    assert after < 0.5 * before

    heldout = [(m, s) for m, s in logged if "mlm/heldout_perplexity" in m]
    assert [s for _, s in heldout] == [0, 1, 2, 3]
    assert heldout[0][0]["mlm/heldout_perplexity"] == pytest.approx(before)
    assert heldout[-1][0]["mlm/heldout_perplexity"] == pytest.approx(after)
    for m, _ in heldout:
        assert m["mlm/heldout_perplexity"] == pytest.approx(math.exp(m["mlm/heldout_loss"]))
    train_steps = [s for m, s in logged if "mlm/train_loss" in m]
    assert train_steps == sorted(train_steps) and train_steps[-1] == metrics["mlm/steps"]

    model_dir = tmp_path / "model"
    assert result["model"] == str(model_dir)
    assert (model_dir / "tokenizer.json").is_file()
    trained = load_bert(model_dir)
    start = load_bert(tiny_model_dir)
    assert not torch.equal(trained.embeddings.word_embeddings.weight, start.embeddings.word_embeddings.weight)


def test_max_steps_stops_early(prepared, tiny_model_dir, tmp_path, capsys):
    cfg = _cfg(prepared, tiny_model_dir, **{"mlm.epochs": 5, "mlm.batch_size": 16, "mlm.max_steps": 3})
    logged = []
    result = mlm_pretrain.run(cfg, {"data_prep": prepared}, tmp_path, lambda m, step=None: logged.append((m, step)))
    assert result["metrics"]["mlm/steps"] == 3
    # Stopped inside epoch 1: held-out measured before training and after that one partial epoch.
    assert [s for m, s in logged if "mlm/heldout_loss" in m] == [0, 1]
    # Progress over the 3 steps of the run (not a TTY: plain lines), then the epoch's perplexity.
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mlm_pretrain: ")]
    assert printed[0].startswith("mlm_pretrain: precision: auto, ")
    assert [line.split(", ")[:2] for line in printed[3:6]] == [
        ["mlm_pretrain: 33% (1/3 steps)", "epoch 1/5"], ["mlm_pretrain: 66% (2/3 steps)", "epoch 1/5"],
        ["mlm_pretrain: 100% (3/3 steps)", "epoch 1/5"]]
    assert all(re.fullmatch(r".*, \d+ tok/s, loss \d+\.\d{3}", line) for line in printed[3:6]), printed
    assert printed[6].startswith("mlm_pretrain: epoch 1: held-out perplexity ") and len(printed) == 7
