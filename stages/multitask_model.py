"""The multitask model: BERT encoder(s) and three small heads (CS224N minBERT), with switches.

Baseline (every switch at its default): one shared encoder; every sentence is encoded on its
own and pooled to a vector (u for the first sentence of a pair, v for the second):
- sst:  Linear(H, 5) on u -> 5 sentiment logits, cross-entropy loss;
- para: Linear(2H, 1) on [u; v] -> one paraphrase logit, BCE-with-logits loss;
- sts:  Linear(2H, 1) on [u; v] -> the 0..5 similarity score itself, MSE loss.

The switches (pipeline/config.py's model.* and loss.pair_loss):
- pair_encoding concat: para/sts encode "[CLS] a [SEP] b [SEP]" once, token types 0/1
  (stages.batches.pair_batch), and the head reads its pooled vector (H inputs).
- pair_head sbert: para/sts heads read [u; v; |u - v|] (3H inputs, Reimers & Gurevych 2019).
- sts_head cosine: the sts output is 5 * cos(u, v), MSE against the 0..5 label. This is
  SBERT's CosineSimilarityLoss (cosine regressed on label / 5) times 25: unlike 5 * relu(cos)
  its gradient is never zero, and unlike 2.5 * (cos + 1) it asks unrelated sentences (label
  0) to be orthogonal, not opposite. Predictions clip it to [0, 5]; Pearson correlation, the
  metric, does not see the scale.
- pair_loss cosine_embedding: torch's CosineEmbeddingLoss (margin 0) on (u, v), target +1
  for a paraphrase / a similarity >= 2.5, else -1. The para output is cos(u, v) (predicted
  paraphrase when > 0), the sts output 5 * cos(u, v) as above; the loss depends on (u, v)
  only through their cosine, so it is computed from the output.
- head_layers 3: Linear-BatchNorm-GELU-Dropout twice (width H), then Linear.
- shared_encoder false: one encoder per task, each a copy of the same starting weights.
- freeze_encoder true: the encoder weights get no gradient; heads and PALs train. The frozen
  encoder also stays in eval mode (no dropout inside it): it is a fixed feature extractor, its
  features are those it was pretrained to give, and the dropout on the pooled vectors still
  regularises the heads.
- pals: projected attention layers per task inside the encoder (stages.encoder.ProjectedAttention).

Cosine outputs use the pooled vectors without the dropout the heads get: a cosine has no
weights for dropout to regularise, and zeroed coordinates would only add noise to it (as in
SBERT). `mnr_loss` with `pair_embeddings` is the multiple-negatives ranking loss finetune
trains sts with first when loss.sts_mnr_epochs > 0.

On disk the model is a HuggingFace-format BERT folder (stages.encoder.save_bert) plus
heads.safetensors (the heads' weights and BatchNorm statistics), pals.safetensors (when PALs
are on) and multitask.json (pooling, dropout, the switches, head shapes). With separate
encoders the folder itself holds the sst encoder, and encoder-para/ and encoder-sts/ the
others, each a HuggingFace BERT folder too.
"""

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stages.batches import bucketed_batches, labels_tensor, pad_batch, pair_batch
from stages.device import autocast
from stages.encoder import BertEncoder, load_bert, pool, save_bert

TASKS = ("sst", "para", "sts")
SST_CLASSES = 5
STS_MAX = 5.0
STS_SIMILAR = 2.5  # cosine_embedding: sts pairs at least this similar are the +1 targets
PAIR_TASKS = ("para", "sts")
HEADS_FILE = "heads.safetensors"
PALS_FILE = "pals.safetensors"
META_FILE = "multitask.json"
# The constructor's keyword arguments; multitask.json records them.
SWITCHES = ("pair_encoding", "pair_head", "sts_head", "pair_loss", "head_layers", "shared_encoder",
            "freeze_encoder", "pals_size", "pals_heads")
CHOICES = {"pair_encoding": ("separate", "concat"), "pair_head": ("linear", "sbert"),
           "sts_head": ("linear", "cosine"), "pair_loss": ("default", "cosine_embedding"),
           "head_layers": (1, 3)}


class MultitaskModel(nn.Module):
    def __init__(self, encoder, pooling: str = "cls", dropout: float = 0.1, *,
                 pair_encoding: str = "separate", pair_head: str = "linear", sts_head: str = "linear",
                 pair_loss: str = "default", head_layers: int = 1, shared_encoder: bool = True,
                 freeze_encoder: bool = False, pals_size: int = 0, pals_heads: int = 12):
        """`encoder`: a BertEncoder (copied per task when shared_encoder is false), or with
        shared_encoder false a {task: BertEncoder} dict. pals_size 0: no PALs."""
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        switches = {"pair_encoding": pair_encoding, "pair_head": pair_head, "sts_head": sts_head,
                    "pair_loss": pair_loss, "head_layers": head_layers}
        for name, value in switches.items():
            if value not in CHOICES[name]:
                raise ValueError(f"{name} must be one of {list(CHOICES[name])}, got {value!r}")
        if pair_encoding == "concat" and (pair_head, sts_head, pair_loss) != ("linear", "linear", "default"):
            raise ValueError("pair_encoding concat encodes a pair as one sequence; pair_head sbert, sts_head "
                             "cosine and pair_loss cosine_embedding need two sentence embeddings")
        if pair_loss == "cosine_embedding" and pair_head == "sbert":
            raise ValueError("pair_loss cosine_embedding makes para and sts outputs cosines; "
                             "a pair_head sbert head would never be used")
        self.pooling, self.pair_encoding, self.pair_head, self.sts_head = pooling, pair_encoding, pair_head, sts_head
        self.pair_loss, self.head_layers = pair_loss, head_layers
        self.shared_encoder, self.freeze_encoder = bool(shared_encoder), bool(freeze_encoder)
        self.pals_size, self.pals_heads = int(pals_size), int(pals_heads)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout)

        if shared_encoder:
            if not isinstance(encoder, BertEncoder):
                raise ValueError("shared_encoder needs one BertEncoder")
            self.encoder = encoder
        else:
            if isinstance(encoder, BertEncoder):
                encoder = {task: encoder if i == 0 else copy.deepcopy(encoder) for i, task in enumerate(TASKS)}
            if set(encoder) != set(TASKS) or len({id(e) for e in encoder.values()}) != len(TASKS):
                raise ValueError(f"separate encoders: need three distinct encoders for {list(TASKS)}, got {list(encoder)}")
            self.task_encoders = nn.ModuleDict({task: encoder[task] for task in TASKS})
        if self.pals_size:
            for enc in self.encoders():
                enc.add_pals([t for t in TASKS if self.encoder_for(t) is enc], self.pals_size, self.pals_heads)

        # Created in this order (sst, para, sts) so the baseline's heads draw the same random
        # numbers as before the switches existed.
        hidden = self.encoders()[0].config.hidden_size
        pair_in = hidden if pair_encoding == "concat" else (3 if pair_head == "sbert" else 2) * hidden
        self.heads = nn.ModuleDict({"sst": _head(hidden, SST_CLASSES, head_layers, hidden, dropout)})
        for task in PAIR_TASKS:
            if not self.cosine_output(task):
                self.heads[task] = _head(pair_in, 1, head_layers, hidden, dropout)
        if self.freeze_encoder:
            for _, p in self.encoder_parameters():
                p.requires_grad_(False)

    # ---- the encoders

    def encoders(self) -> list[BertEncoder]:
        """The encoder modules: one when shared, else sst's, para's, sts's."""
        return [self.encoder] if self.shared_encoder else [self.task_encoders[t] for t in TASKS]

    def encoder_for(self, task: str | None) -> BertEncoder:
        if self.shared_encoder:
            return self.encoder
        if task not in TASKS:
            raise ValueError(f"separate encoders: task must be one of {list(TASKS)}, got {task!r}")
        return self.task_encoders[task]

    def encoder_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the BERT weights (PALs excluded), names as in named_parameters()."""
        ids = self._encoder_parameter_ids()
        return [(n, p) for n, p in self.named_parameters() if id(p) in ids]

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything else: the heads and the PALs."""
        ids = self._encoder_parameter_ids()
        return [(n, p) for n, p in self.named_parameters() if id(p) not in ids]

    def _encoder_parameter_ids(self) -> set[int]:
        ids = {id(p) for enc in self.encoders() for p in enc.parameters()}
        return ids - {id(p) for enc in self.encoders() if enc.pals is not None for p in enc.pals.parameters()}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:  # a frozen encoder stays in eval mode; its PALs train
            for enc in self.encoders():
                enc.train(False)
                if enc.pals is not None:
                    enc.pals.train(mode)
        return self

    # ---- forward and loss

    def cosine_output(self, task: str) -> bool:
        """Whether the task's output is built from cos(u, v) (no head) rather than a head."""
        if task == "para":
            return self.pair_loss == "cosine_embedding"
        if task == "sts":
            return self.pair_loss == "cosine_embedding" or self.sts_head == "cosine"
        return False

    def sentence_vectors(self, input_ids, attention_mask, task=None, token_type_ids=None) -> torch.Tensor:
        """One pooled vector per sequence, [B, H], no dropout; `task` picks the encoder and PALs."""
        hidden = self.encoder_for(task)(input_ids, attention_mask, token_type_ids, task=task)
        return pool(hidden, attention_mask, self.pooling)

    def embed(self, input_ids, attention_mask, task=None, token_type_ids=None) -> torch.Tensor:
        """The pooled vectors with dropout (active in train mode): what the heads read."""
        return self.dropout(self.sentence_vectors(input_ids, attention_mask, task, token_type_ids))

    def pair_embeddings(self, task: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v): the pooled vectors of each pair's two sentences, [B, H] each, no dropout.

        Both sentences of every pair go through the encoder in one call: the two [B, T1] and
        [B, T2] batches are stacked into one [2B, max(T1, T2)] batch (the extra positions are
        padding, masked out), which gives the same vectors as two calls up to float rounding and
        runs bigger, faster matrix products (bench/README.md, "levers").
        """
        if self.pair_encoding == "concat":
            raise ValueError("pair_embeddings: pair_encoding concat has no separate sentence embeddings")
        ids, mask = stack_padded([batch["input_ids_1"], batch["input_ids_2"]],
                                 [batch["attention_mask_1"], batch["attention_mask_2"]])
        vectors = self.sentence_vectors(ids, mask, task)
        n = batch["input_ids_1"].shape[0]
        return vectors[:n], vectors[n:]

    def forward(self, task: str, batch: dict) -> torch.Tensor:
        """sst: logits [B, 5]. para: logit [B], or cos(u, v) [B]; > 0 means paraphrase either way.
        sts: predicted score [B], a head's or 5 * cos(u, v)."""
        if task == "sst":
            return self.heads["sst"](self.embed(batch["input_ids"], batch["attention_mask"], task))
        if task not in PAIR_TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
        if self.pair_encoding == "concat":
            if "token_type_ids" not in batch:
                raise ValueError("pair_encoding concat needs the pair as one sequence: build the batch with "
                                 "make_batch(..., pair_encoding='concat')")
            joint = self.embed(batch["input_ids"], batch["attention_mask"], task, batch["token_type_ids"])
            return self.heads[task](joint).squeeze(-1)
        if self.cosine_output(task):
            u, v = self.pair_embeddings(task, batch)
            cos = F.cosine_similarity(u.float(), v.float(), dim=-1)
            return cos if task == "para" else STS_MAX * cos
        u, v = (self.dropout(x) for x in self.pair_embeddings(task, batch))  # embed() of each sentence
        return self.heads[task](pair_features(u, v, self.pair_head)).squeeze(-1)

    def loss(self, task: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The loss is computed in fp32 even when the forward pass ran under bf16 autocast.
        output, labels = output.float(), labels.float()
        if task == "sst":
            return F.cross_entropy(output, labels.long())
        if task == "para":
            if self.pair_loss == "cosine_embedding":
                return cosine_embedding_loss(output, torch.where(labels >= 0.5, 1.0, -1.0))
            return F.binary_cross_entropy_with_logits(output, labels)
        if task == "sts":
            if self.pair_loss == "cosine_embedding":
                return cosine_embedding_loss(output / STS_MAX, torch.where(labels >= STS_SIMILAR, 1.0, -1.0))
            return F.mse_loss(output, labels)
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")

    def switches(self) -> dict:
        """The constructor's keyword arguments (what multitask.json records)."""
        return {name: getattr(self, name) for name in SWITCHES}


def build_model(cfg, encoder_dir) -> MultitaskModel:
    """The model cfg.model and cfg.loss describe: encoder(s) from encoder_dir, fresh heads (on CPU)."""
    m = cfg.model
    encoder = load_bert(encoder_dir, dropout=m.dropout)
    return MultitaskModel(encoder, m.pooling, m.dropout, pair_encoding=m.pair_encoding, pair_head=m.pair_head,
                          sts_head=m.sts_head, pair_loss=cfg.loss.pair_loss, head_layers=m.head_layers,
                          shared_encoder=m.shared_encoder, freeze_encoder=m.freeze_encoder,
                          pals_size=m.pals.size if m.pals.enabled else 0, pals_heads=m.pals.heads)


def stack_padded(input_ids: list, attention_masks: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches [B_i, T_i] stacked into one [sum B_i, max T_i] batch, right-padded with id 0 and mask 0."""
    width = max(t.shape[1] for t in input_ids)
    ids = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in input_ids])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in attention_masks])
    return ids, mask


def pair_features(u: torch.Tensor, v: torch.Tensor, pair_head: str = "linear") -> torch.Tensor:
    """What a pair head reads: [u; v] (linear) or [u; v; |u - v|] (sbert)."""
    if pair_head == "sbert":
        return torch.cat([u, v, (u - v).abs()], dim=-1)
    return torch.cat([u, v], dim=-1)


def cosine_embedding_loss(cos: torch.Tensor, target: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """torch.nn.CosineEmbeddingLoss from the cosines: mean of 1 - cos (target +1) and
    max(0, cos - margin) (target -1)."""
    return torch.where(target > 0, 1.0 - cos, (cos - margin).clamp(min=0.0)).mean()


def mnr_loss(u: torch.Tensor, v: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Multiple-negatives ranking loss (Henderson et al. 2017; SBERT's MultipleNegativesRankingLoss).

    Row i's positive is v_i, every other v_j of the batch a negative: cross entropy over the
    logits scale * cos(u_i, v_j) with target i.
    """
    if u.shape != v.shape or u.ndim != 2:
        raise ValueError(f"mnr_loss: u and v must both be [B, H], got {tuple(u.shape)} and {tuple(v.shape)}")
    similarity = scale * F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T
    return F.cross_entropy(similarity, torch.arange(len(u), device=u.device))


def make_batch(task: str, split, idx, device, pair_encoding: str = "separate") -> dict:
    """The tensors forward() needs for rows `idx` of a split, on `device` (plus labels if the split has them).

    pair_encoding concat: a pair is one sequence, keys input_ids, attention_mask, token_type_ids.
    """
    idx = np.asarray(idx)
    batch = {}
    if task in PAIR_TASKS and pair_encoding == "concat":
        for key, tensor in zip(("input_ids", "attention_mask", "token_type_ids"), pair_batch(split, idx)):
            batch[key] = tensor.to(device, non_blocking=True)
    elif task in TASKS:
        columns = {"": "input_ids"} if task == "sst" else {"_1": "input_ids_1", "_2": "input_ids_2"}
        for suffix, column in columns.items():
            input_ids, attention_mask = pad_batch(split, column, idx)
            batch["input_ids" + suffix] = input_ids.to(device, non_blocking=True)
            batch["attention_mask" + suffix] = attention_mask.to(device, non_blocking=True)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if split.labels is not None:
        batch["labels"] = labels_tensor(split, idx).to(device, non_blocking=True)
    return batch


def batch_lengths(task: str, split, pair_encoding: str = "separate") -> np.ndarray:
    """Per-row length to bucket by: the sentence's; for a pair the longer of the two, or with
    concat the joined sequence's (the second [CLS] dropped)."""
    if task == "sst":
        return np.asarray(split.lengths("input_ids"))
    a, b = np.asarray(split.lengths("input_ids_1")), np.asarray(split.lengths("input_ids_2"))
    return a + b - 1 if pair_encoding == "concat" else np.maximum(a, b)


@torch.no_grad()
def predict(model: MultitaskModel, task: str, split, batch_size: int, device) -> np.ndarray:
    """Predictions for every row, in the split's row order.

    sst: class 0..4 (int64); para: 0/1 (int64, logit > 0, i.e. sigmoid > 0.5, or cosine > 0);
    sts: score clipped to [0, 5] (float32).
    """
    was_training = model.training
    model.eval()
    n = len(split)
    out = np.zeros(n, dtype=np.float32 if task == "sts" else np.int64)
    try:
        for idx in bucketed_batches(batch_lengths(task, split, model.pair_encoding), batch_size, None):
            batch = make_batch(task, split, idx, device, model.pair_encoding)
            with autocast(torch.device(device)):
                output = model(task, batch)
            output = output.float()
            if task == "sst":
                values = output.argmax(dim=-1)
            elif task == "para":
                values = (output > 0).long()
            else:
                values = output.clamp(0.0, STS_MAX)
            out[np.asarray(idx)] = values.cpu().numpy()
    finally:
        model.train(was_training)
    return out


def save_multitask(model: MultitaskModel, out_dir, tokenizer_from=None) -> Path:
    """Encoder(s) as HuggingFace BERT folders, plus heads.safetensors, pals.safetensors and multitask.json."""
    out_dir = Path(out_dir)
    folders = _encoder_folders(model.shared_encoder)
    for task in TASKS:
        if task == TASKS[0] or not model.shared_encoder:
            save_bert(model.encoder_for(task), out_dir / folders[task], tokenizer_from=tokenizer_from)
    heads = {name: t.detach().cpu().contiguous() for name, t in model.heads.state_dict().items()}
    save_file(heads, str(out_dir / HEADS_FILE))
    if model.pals_size:
        save_file(_pals_tensors(model), str(out_dir / PALS_FILE))
    hidden = model.encoders()[0].config.hidden_size
    meta = {
        "pooling": model.pooling,
        "dropout": model.dropout_p,
        "hidden_size": hidden,
        "switches": model.switches(),
        "encoders": folders,
        "heads": {task: _head_description(model, task) for task in TASKS},
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def load_multitask(model_dir, device="cpu") -> MultitaskModel:
    """Inverse of save_multitask."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: multitask model folder not found")
    for name in (META_FILE, HEADS_FILE, "config.json"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(
                f"{model_dir / name}: missing; a multitask model folder (written by finetune) needs "
                f"config.json, the encoder weights, {HEADS_FILE} and {META_FILE}")
    meta_path = model_dir / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON: {e}") from None
    for key in ("pooling", "heads"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing key '{key}'")
    switches = meta.get("switches", {})  # absent: a baseline model written before the switches
    unknown = set(switches) - set(SWITCHES)
    if unknown:
        raise ValueError(f"{meta_path}: unknown switches {sorted(unknown)} (known: {list(SWITCHES)})")
    shared = switches.get("shared_encoder", True)
    if shared:
        encoder = load_bert(model_dir)
    else:
        folders = meta.get("encoders", {})
        if set(folders) != set(TASKS):
            raise ValueError(f"{meta_path}: 'encoders' must name a folder for each of {list(TASKS)}, got {folders!r}")
        encoder = {task: load_bert(model_dir / folders[task]) for task in TASKS}
    try:
        model = MultitaskModel(encoder, pooling=meta["pooling"], dropout=meta.get("dropout", 0.1), **switches)
    except ValueError as e:
        raise ValueError(f"{meta_path}: {e}") from None
    _load_checked(model.heads, model_dir / HEADS_FILE, f"the heads (hidden size {model.encoders()[0].config.hidden_size})")
    if model.pals_size:
        if not (model_dir / PALS_FILE).is_file():
            raise FileNotFoundError(f"{model_dir / PALS_FILE}: missing; {META_FILE} says the model has PALs")
        pals = load_file(str(model_dir / PALS_FILE))
        _check_tensors(_pals_tensors(model), pals, model_dir / PALS_FILE, f"PALs of size {model.pals_size}")
        for enc in model.encoders():
            enc.pals.load_state_dict({name: pals[name] for name in enc.pals.state_dict()})
    return model.to(device).eval()


# ---------------------------------------------------------------- helpers

class _BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that normalises a one-row training batch with its running statistics:
    batch statistics of a single row do not exist (the last batch of a bucket can be one row)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def _head(in_features: int, out_features: int, layers: int, hidden: int, dropout: float) -> nn.Module:
    if layers == 1:
        return nn.Linear(in_features, out_features)
    return nn.Sequential(
        nn.Linear(in_features, hidden), _BatchNorm1d(hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), _BatchNorm1d(hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, out_features))


def _head_description(model: MultitaskModel, task: str) -> dict:
    if model.cosine_output(task):
        if task == "para":
            return {"input": "cos(u, v)", "output": "cosine (> 0: paraphrase)", "loss": "cosine_embedding"}
        loss = "cosine_embedding" if model.pair_loss == "cosine_embedding" else "mse"
        return {"input": "cos(u, v)", "output": "score 5 * cos(u, v)", "loss": loss}
    head = model.heads[task]
    first, last = (head, head) if isinstance(head, nn.Linear) else (head[0], head[-1])
    inputs = {"sst": "u", "para": None, "sts": None}[task] or (
        "pooled [CLS] a [SEP] b [SEP]" if model.pair_encoding == "concat"
        else "[u; v; |u - v|]" if model.pair_head == "sbert" else "[u; v]")
    output, loss = {"sst": ("logits", "cross_entropy"), "para": ("logit", "bce_with_logits"),
                    "sts": ("score 0..5", "mse")}[task]
    return {"input": inputs, "in_features": first.in_features, "out_features": last.out_features,
            "layers": model.head_layers, "output": output, "loss": loss}


def _encoder_folders(shared: bool) -> dict:
    """Where each task's encoder lives inside the model folder: the folder itself, or a subfolder."""
    return {task: "." if shared or task == TASKS[0] else f"encoder-{task}" for task in TASKS}


def _pals_tensors(model: MultitaskModel) -> dict:
    """{"{task}.{name}": tensor} over every encoder's PALs (each task's are in exactly one encoder)."""
    return {f"{task}.{name}": t.detach().cpu().contiguous()
            for enc in model.encoders() for task, pal in enc.pals.items() for name, t in pal.state_dict().items()}


def _check_tensors(expected: dict, found: dict, path: Path, what: str) -> None:
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {sorted(missing)}, unexpected tensors {sorted(unexpected)}")
    for name, tensor in found.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                             f"{what} need {tuple(expected[name].shape)}")


def _load_checked(module: nn.Module, path: Path, what: str) -> None:
    tensors = load_file(str(path))
    _check_tensors(module.state_dict(), tensors, path, what)
    module.load_state_dict(tensors)
