"""Masked-LM domain pretraining: continue BERT's MLM objective on the tasks' training text.

The text is every distinct sentence of the train splits (sst-train input_ids, para-train and
sts-train input_ids_1 and input_ids_2), never dev or test. A seeded share of those sentences
is held out to measure masked-LM perplexity before training and after every epoch.

Step convention of the logged metrics:
  mlm/train_loss                                 step = optimizer step (1, 2, ...)
  mlm/heldout_loss, mlm/heldout_perplexity       step = epochs finished (0 = before training)

The held-out perplexity uses one masking, drawn once from a generator seeded with cfg.seed,
so the numbers are comparable across epochs. It is exp of the mean cross-entropy per masked
token (token-weighted over the whole held-out set, not a mean of batch means).

Every mlm.checkpoint_every steps and at each epoch end the training state goes to
out/checkpoint/ (stages/checkpoint.py); a run whose `out` holds a checkpoint of the same config
and data continues from it, drawing the same batches and masks as an uninterrupted run.

The MLM head is HuggingFace BERT's (dense H->H, GELU, LayerNorm, then a decoder whose weight is
the encoder's word-embedding matrix plus a per-token bias). Only the encoder is saved: finetune
starts from it and has no use for the head.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages import checkpoint
from stages.batches import Split, bucketed_batches, load_split, pad_batch
from stages.device import autocast, pick_device, pick_precision
from stages.encoder import load_bert, save_bert
from stages.progress import Progress

# (task, column) pairs whose sentences are the pretraining text: train splits only.
TRAIN_TEXT = (("sst", "input_ids"), ("para", "input_ids_1"), ("para", "input_ids_2"),
              ("sts", "input_ids_1"), ("sts", "input_ids_2"))
LOG_EVERY = 50


def run(cfg, inputs: dict, out: Path, log) -> dict:
    out = Path(out)
    data_dir = Path(inputs["data_prep"])
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device, "mlm_pretrain")
    torch.manual_seed(cfg.seed)
    tok = _read_tokenizer_ids(data_dir / "manifest.json")
    # As HF's special-tokens mask: [UNK] is not a word to predict either.
    special_ids = sorted({tok[k] for k in ("pad_id", "cls_id", "sep_id", "mask_id", "unk_id") if k in tok})

    train_sents, heldout_sents = pretraining_text(data_dir, cfg.mlm.heldout_fraction, cfg.seed)
    print(f"mlm_pretrain: {len(train_sents) + len(heldout_sents)} distinct train-split sentences "
          f"({len(train_sents)} for training, {len(heldout_sents)} held out)")
    train_text, heldout_text = _as_split(train_sents, "mlm-train"), _as_split(heldout_sents, "mlm-heldout")

    m = cfg.model
    encoder = load_bert(m.dir, dropout=m.dropout if m.encoder_dropout is None else m.encoder_dropout)
    if encoder.config.vocab_size != tok["vocab_size"]:
        raise ValueError(f"{data_dir / 'manifest.json'}: tokenizer.vocab_size {tok['vocab_size']} does not match "
                         f"the model's vocab_size {encoder.config.vocab_size} ({cfg.model.dir})")
    model = BertForMlm(encoder, precision).to(device)

    # The held-out batches are masked once, so every evaluation scores the same positions.
    heldout_generator = torch.Generator().manual_seed(cfg.seed)
    heldout_batches = []
    for idx in bucketed_batches(heldout_text.lengths("input_ids"), cfg.mlm.batch_size, None):
        input_ids, attention_mask = pad_batch(heldout_text, "input_ids", idx, tok["pad_id"])
        masked_ids, labels = mask_tokens(input_ids, attention_mask, special_ids, tok["mask_id"],
                                         tok["vocab_size"], cfg.mlm.mask_prob, heldout_generator)
        heldout_batches.append((masked_ids, attention_mask, labels))

    optimizer = torch.optim.AdamW(_param_groups(model, cfg.mlm.weight_decay), lr=cfg.mlm.lr)
    batch_rng = np.random.default_rng(cfg.seed)
    mask_generator = torch.Generator().manual_seed(cfg.seed + 1)  # not the held-out masking stream
    train_lengths = train_text.lengths("input_ids")
    batches_per_epoch = len(bucketed_batches(train_lengths, cfg.mlm.batch_size, None))
    total_steps = cfg.mlm.epochs * batches_per_epoch
    if cfg.mlm.max_steps is not None:
        total_steps = min(total_steps, cfg.mlm.max_steps)

    # A checkpoint names a position: `epoch` epochs finished, then `batch` batches of the next
    # one, whose batches are drawn from batch_rng in the state `epoch_rng` (its start).
    mlm_cfg = {k: v for k, v in dataclasses.asdict(cfg.mlm).items() if k != "checkpoint_every"}
    fingerprint = checkpoint.fingerprint(cfg.seed, precision, dataclasses.asdict(cfg.model), mlm_cfg,
                                         (data_dir / "manifest.json").read_text())
    step, epoch, resume_batch = 0, 0, 0
    window_loss, window_steps, tokens_seen = 0.0, 0, 0
    saved = checkpoint.load(out, fingerprint, "mlm_pretrain")
    if saved is None:
        heldout_before = _heldout_loss(model, heldout_batches, device)
        log({"mlm/heldout_loss": heldout_before, "mlm/heldout_perplexity": math.exp(heldout_before)}, step=0)
        print(f"mlm_pretrain: held-out perplexity before training {math.exp(heldout_before):.3f}")
        heldout = heldout_before
    else:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        checkpoint.restore_rng(saved["rng"], {"batches": batch_rng}, {"masks": mask_generator})
        batch_rng.bit_generator.state = saved["epoch_rng"]
        step, epoch, resume_batch = saved["step"], saved["epoch"], saved["batch"]
        heldout_before, heldout = saved["heldout_before"], saved["heldout"]
        window_loss, window_steps, tokens_seen = saved["window_loss"], saved["window_steps"], saved["tokens_seen"]
        print(f"mlm_pretrain: resuming from {out / checkpoint.DIR} at step {step} "
              f"(epoch {epoch + 1}, batch {resume_batch})")

    def save_checkpoint(epochs_done: int, batch: int, epoch_rng: dict) -> None:
        checkpoint.save(out, {
            "fingerprint": fingerprint, "step": step, "epoch": epochs_done, "batch": batch,
            "epoch_rng": epoch_rng, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": checkpoint.rng_state({"batches": batch_rng}, {"masks": mask_generator}),
            "heldout_before": heldout_before, "heldout": heldout, "window_loss": window_loss,
            "window_steps": window_steps, "tokens_seen": tokens_seen})

    started = time.perf_counter()
    tokens_before = tokens_seen  # a resumed run's earlier tokens were not seen in this attempt's time
    progress = Progress("mlm_pretrain", total=total_steps, initial=step)
    while epoch < cfg.mlm.epochs and step < total_steps:
        epoch += 1
        model.train()
        epoch_rng = batch_rng.bit_generator.state
        first_batch, resume_batch = resume_batch, 0
        for batch_index, idx in enumerate(bucketed_batches(train_lengths, cfg.mlm.batch_size, batch_rng)):
            if batch_index < first_batch:
                continue  # done before the checkpoint this run resumed from
            if step >= total_steps:
                break
            input_ids, attention_mask = pad_batch(train_text, "input_ids", idx, tok["pad_id"])
            masked_ids, labels = mask_tokens(input_ids, attention_mask, special_ids, tok["mask_id"],
                                             tok["vocab_size"], cfg.mlm.mask_prob, mask_generator)
            if not (labels != -100).any():
                continue  # nothing was masked (tiny batch of short sentences): no loss to learn from
            loss = model.loss(masked_ids.to(device), attention_mask.to(device), labels.to(device), device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            step += 1
            loss_value = loss.item()
            tokens_seen += int(attention_mask.sum())
            window_loss += loss_value
            window_steps += 1
            elapsed = time.perf_counter() - started
            # The loss since the last logged mlm/train_loss: a window, less noisy than one step's.
            progress.update(step, f"epoch {epoch}/{cfg.mlm.epochs}",
                            f"{(tokens_seen - tokens_before) / elapsed:.0f} tok/s" if elapsed > 0 else "",
                            f"loss {window_loss / window_steps:.3f}")
            if step % LOG_EVERY == 0:
                log({"mlm/train_loss": window_loss / window_steps}, step=step)
                window_loss, window_steps = 0.0, 0
            if cfg.mlm.checkpoint_every and step % cfg.mlm.checkpoint_every == 0:
                save_checkpoint(epoch - 1, batch_index + 1, epoch_rng)

        if window_steps:
            log({"mlm/train_loss": window_loss / window_steps}, step=step)
            window_loss, window_steps = 0.0, 0
        heldout = _heldout_loss(model, heldout_batches, device)
        log({"mlm/heldout_loss": heldout, "mlm/heldout_perplexity": math.exp(heldout)}, step=epoch)
        progress.write(f"mlm_pretrain: epoch {epoch}: held-out perplexity {math.exp(heldout):.3f} (step {step})")
        save_checkpoint(epoch, 0, batch_rng.bit_generator.state)
    progress.close()

    model_dir = save_bert(model.encoder.cpu(), out / "model", tokenizer_from=cfg.model.dir)
    metrics = {"mlm/heldout_perplexity": math.exp(heldout),
               "mlm/heldout_perplexity_before": math.exp(heldout_before),
               "mlm/heldout_loss": heldout,
               "mlm/steps": float(step)}
    checkpoint.remove(out)  # finished: the output needs no optimizer state
    return {"metrics": metrics, "model": str(model_dir), "params": {"resolved.precision": precision}}


def pretraining_text(data_dir: Path, heldout_fraction: float, seed: int) -> tuple[list, list]:
    """(training sentences, held-out sentences): the distinct sentences of the train splits,
    each an int64 array of token ids, split by a permutation seeded with `seed`."""
    sentences = _train_sentences(Path(data_dir))
    if len(sentences) < 2:
        raise ValueError(f"{data_dir}: needs at least 2 distinct train sentences to hold some out, "
                         f"got {len(sentences)}")
    order = np.random.default_rng(seed).permutation(len(sentences))
    n_heldout = min(len(sentences) - 1, max(1, round(heldout_fraction * len(sentences))))
    heldout, train = np.sort(order[:n_heldout]), np.sort(order[n_heldout:])
    return [sentences[i] for i in train], [sentences[i] for i in heldout]


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids, mask_id: int,
                vocab_size: int, prob: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: choose `prob` of the real, non-special tokens; of those 80% become
    mask_id, 10% a random token id, 10% stay as they are. Returns (masked_ids, labels) with
    labels = the original id at chosen positions and -100 (ignored by cross-entropy) elsewhere.

    `generator` must live on input_ids' device; the same generator state gives the same masking.
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"mask_tokens: input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} differ in shape")
    device = input_ids.device
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=device)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)
    chosen = eligible & (torch.rand(input_ids.shape, generator=generator, device=device) < prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))

    roll = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = chosen & (roll < 0.8)
    to_random = chosen & (roll >= 0.8) & (roll < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device,
                               dtype=input_ids.dtype)
    masked_ids = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked_ids = torch.where(to_random, random_ids, masked_ids)
    return masked_ids, labels


class MlmHead(nn.Module):
    """HuggingFace BertOnlyMLMHead: transform (dense, GELU, LayerNorm), then a decoder that
    shares its weight with the word embeddings (tied, one Parameter) plus its own bias."""

    def __init__(self, encoder):
        super().__init__()
        config = encoder.config
        hidden = config.hidden_size
        self.dense = nn.Linear(hidden, hidden)
        self.act = nn.GELU()  # HF "gelu": the exact erf form
        self.layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        word_embeddings = encoder.embeddings.word_embeddings
        self.decoder = nn.Linear(hidden, word_embeddings.num_embeddings, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        # HF's initialisation for a new head: N(0, initializer_range) dense, identity LayerNorm.
        nn.init.normal_(self.dense.weight, std=getattr(config, "initializer_range", 0.02))
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.act(self.dense(hidden_states)))) + self.bias


class BertForMlm(nn.Module):
    """The encoder plus the MLM head; the vocabulary projection runs only at masked positions."""

    def __init__(self, encoder, precision: str = "fp32"):
        super().__init__()
        self.encoder = encoder
        self.precision = precision  # stages.device: the forward pass's autocast
        self.head = MlmHead(encoder)

    def loss(self, input_ids, attention_mask, labels, device, reduction="mean") -> torch.Tensor:
        with autocast(device, self.precision):
            hidden = self.encoder(input_ids, attention_mask)
            chosen = labels != -100
            logits = self.head(hidden[chosen])
        return F.cross_entropy(logits.float(), labels[chosen], reduction=reduction)


# ---------------------------------------------------------------- helpers


def _read_tokenizer_ids(manifest_path: Path) -> dict:
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: data_prep manifest not found")
    tokenizer = json.loads(manifest_path.read_text()).get("tokenizer")
    if not isinstance(tokenizer, dict):
        raise KeyError(f"{manifest_path}: no 'tokenizer' entry")
    for key in ("pad_id", "cls_id", "sep_id", "mask_id", "vocab_size"):
        if key not in tokenizer:
            raise KeyError(f"{manifest_path}: tokenizer.{key} is missing")
    return tokenizer


def _train_sentences(data_dir: Path) -> list[np.ndarray]:
    """Every distinct tokenized sentence of the train splits, in first-seen order.

    Duplicates (Quora repeats questions across pairs; sts reuses sentences) are dropped so that
    a held-out sentence never also appears in the training text.
    """
    seen: set[bytes] = set()
    sentences = []
    found = False
    for task, column in TRAIN_TEXT:
        path = data_dir / f"{task}-train.arrow"
        if not path.is_file():
            continue
        found = True
        split = load_split(path)
        if column not in split.columns:
            raise KeyError(f"{path}: column '{column}' is missing")
        values, offsets = split.columns[column]
        for start, end in zip(offsets[:-1], offsets[1:]):
            sentence = np.asarray(values[start:end], dtype=np.int64)
            key = sentence.tobytes()
            if key not in seen:
                seen.add(key)
                sentences.append(sentence)
    if not found:
        raise FileNotFoundError(f"{data_dir}: no sst-train, para-train or sts-train .arrow file to pretrain on")
    return sentences


def _as_split(sentences: list, name: str) -> Split:
    """Sentences as a one-column Split, so batches.pad_batch can pad them."""
    lengths = np.array([len(x) for x in sentences], dtype=np.int64)
    offsets = np.zeros(len(sentences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(sentences).astype(np.int32) if sentences else np.zeros(0, np.int32)
    return Split(ids=[str(i) for i in range(len(sentences))], columns={"input_ids": (values, offsets)},
                 labels=None, name=name)


@torch.no_grad()
def _heldout_loss(model: BertForMlm, batches: list, device: torch.device) -> float:
    """Mean cross-entropy per masked token over the whole held-out set."""
    model.eval()
    total, count = 0.0, 0
    for masked_ids, attention_mask, labels in batches:
        n = int((labels != -100).sum())
        if n == 0:
            continue
        total += model.loss(masked_ids.to(device), attention_mask.to(device), labels.to(device), device,
                            reduction="sum").item()
        count += n
    if count == 0:
        raise ValueError("mlm_pretrain: the held-out masking chose no token; raise mlm.heldout_fraction or mlm.mask_prob")
    return total / count


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # BERT's recipe: no weight decay on biases and LayerNorm scales (the 1-D parameters).
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
