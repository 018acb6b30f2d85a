"""The multitask model: BERT encoder(s) and three small heads (CS224N minBERT), with switches.

Baseline (every switch at its default): one shared encoder; every sentence is encoded on its
own and pooled to a vector (u for the first sentence of a pair, v for the second):
- sst:  Linear(H, 5) on u -> 5 sentiment logits, cross-entropy loss;
- para: Linear(2H, 1) on [u; v] -> one paraphrase logit, BCE-with-logits loss;
- sts:  Linear(2H, 1) on [u; v] -> the 0..5 similarity score itself, MSE loss.

The switches (pipeline/config.py's model.para.*, model.sts.*, model.*, loss.para, loss.sts),
chosen per pair task:
- encoding concat: the task encodes "[CLS] a [SEP] b [SEP]" once, token types 0/1
  (stages.batches.pair_batch), and its head reads that pooled vector (H inputs).
- head sbert: the head reads [u; v; |u - v|] (3H inputs, Reimers & Gurevych 2019).
- sts head cosine: the sts output is 5 * cos(u, v), MSE against the 0..5 label. This is
  SBERT's CosineSimilarityLoss (cosine regressed on label / 5) times 25: unlike 5 * relu(cos)
  its gradient is never zero, and unlike 2.5 * (cos + 1) it asks unrelated sentences (label
  0) to be orthogonal, not opposite. Predictions clip it to [0, 5]; Pearson correlation, the
  metric, does not see the scale.
- sts head dot: u . v, the raw dot product of the pooled vectors (report D's baseline).
- sts head cosine_linear: a * cos(u, v) + b, one Linear(1, 1) on the cosine (report A's "cosine
  head -> Linear -> MSE"). It starts at a = 5, b = 0, i.e. as head cosine: from a default
  random init (|a| < 1) the head's lr, the encoder's, would take most of a run to reach the
  0..5 scale.
- sts head hybrid: w * 5 * cos(u, v) + (1 - w) * NN (report C), cos from the two sentences
  encoded separately, NN the linear head on the task's encoding (concat: on the pair). w is
  fixed (sts_cosine_weight) or learned as sigmoid(theta), theta starting at 0: the report blends
  the two by a "split", so w stays in (0, 1) and the weights add up to 1.
- sts bound tanh: the head's number x becomes 2.5 * (tanh(x) + 1), in (0, 5) (report D: "bounded
  by tanh and scaled to 0..5"; tanh's (-1, 1) mapped onto 0..5). For hybrid, its NN part.
- para loss mse: the head's number regressed on the 0/1 label (report A), > 0.5 is a
  paraphrase; bce (default): a logit, > 0 is a paraphrase.
- loss cosine_embedding (para with head cosine, sts with head cosine): torch's
  CosineEmbeddingLoss (margin 0) on (u, v), target +1 for a paraphrase / a similarity >= 2.5,
  else -1. The para output is cos(u, v) (predicted paraphrase when > 0), the sts output
  5 * cos(u, v) as above; the loss depends on (u, v) only through their cosine, so it is
  computed from the output.
- head_layers 3: Linear-BatchNorm-GELU-Dropout twice (width H), then Linear.
- shared_encoder false: one encoder per task, each a copy of the same starting weights.
- freeze_encoder true: the encoder weights get no gradient; heads and PALs train (without PALs, a
  pair task whose head has no parameters, cosine or dot, trains nothing: stages.finetune). The frozen
  encoder also stays in eval mode (no dropout inside it): it is a fixed feature extractor, its
  features are those it was pretrained to give, and the dropout on the pooled vectors still
  regularises the heads.
- pals: projected attention layers per task inside the encoder (stages.encoder.ProjectedAttention).

Cosine and dot outputs use the pooled vectors without the dropout the heads get: they have no
weights for dropout to regularise, and zeroed coordinates would only add noise to them (as in
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
SWITCHES = ("para_encoding", "para_head", "para_loss", "sts_encoding", "sts_head", "sts_loss", "sts_bound",
            "sts_cosine_weight", "head_layers", "shared_encoder", "freeze_encoder", "pals_size", "pals_heads")
CHOICES = {"para_encoding": ("separate", "concat"), "sts_encoding": ("separate", "concat"),
           "para_head": ("linear", "sbert", "cosine"),
           "sts_head": ("linear", "sbert", "cosine", "dot", "cosine_linear", "hybrid"),
           "para_loss": ("bce", "mse", "cosine_embedding"), "sts_loss": ("mse", "cosine_embedding"),
           "sts_bound": ("none", "tanh"), "head_layers": (1, 3)}
# Heads that compare the two sentence embeddings u and v, so need encoding separate.
SIAMESE_HEADS = {"para": ("sbert", "cosine"), "sts": ("sbert", "cosine", "dot", "cosine_linear")}
PARA_MSE_THRESHOLD = 0.5  # para loss mse regresses the 0/1 label: above half is a paraphrase
# Models written before the switches were per task recorded these instead (load_multitask converts them).
LEGACY_SWITCHES = ("pair_encoding", "pair_head", "pair_loss")


class MultitaskModel(nn.Module):
    def __init__(self, encoder, pooling: str = "cls", dropout: float = 0.1, *,
                 para_encoding: str = "separate", para_head: str = "linear", para_loss: str = "bce",
                 sts_encoding: str = "separate", sts_head: str = "linear", sts_loss: str = "mse",
                 sts_bound: str = "none", sts_cosine_weight: float | None = None, head_layers: int = 1,
                 shared_encoder: bool = True, freeze_encoder: bool = False, pals_size: int = 0, pals_heads: int = 12):
        """`encoder`: a BertEncoder (copied per task when shared_encoder is false), or with
        shared_encoder false a {task: BertEncoder} dict. pals_size 0: no PALs.
        sts_cosine_weight: hybrid's fixed w; None: learned."""
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        _check_switches(para_encoding=para_encoding, para_head=para_head, para_loss=para_loss,
                        sts_encoding=sts_encoding, sts_head=sts_head, sts_loss=sts_loss, sts_bound=sts_bound,
                        sts_cosine_weight=sts_cosine_weight, head_layers=head_layers)
        self.pooling = pooling
        self.para_encoding, self.para_head, self.para_loss = para_encoding, para_head, para_loss
        self.sts_encoding, self.sts_head, self.sts_loss, self.sts_bound = sts_encoding, sts_head, sts_loss, sts_bound
        self.sts_cosine_weight = None if sts_cosine_weight is None else float(sts_cosine_weight)
        self.head_layers = head_layers
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
        self.heads = nn.ModuleDict({"sst": _head(hidden, SST_CLASSES, head_layers, hidden, dropout)})
        for task in PAIR_TASKS:
            head = self.head_kind(task)
            if head in ("linear", "sbert", "hybrid"):  # hybrid's NN part is the linear head
                features = "sbert" if head == "sbert" else "linear"
                width = hidden if self.encoding(task) == "concat" else (3 if features == "sbert" else 2) * hidden
                self.heads[task] = _head(width, 1, head_layers, hidden, dropout)
            elif head == "cosine_linear":
                self.heads[task] = nn.Linear(1, 1)
                with torch.no_grad():  # start as head cosine, 5 * cos (module docstring)
                    self.heads[task].weight.fill_(STS_MAX)
                    self.heads[task].bias.zero_()
        if sts_head == "hybrid" and self.sts_cosine_weight is None:
            self.heads["sts_cosine_weight"] = _LearnedWeight()
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

    def encoding(self, task: str) -> str:
        """How the task's pair is encoded for its head: separate (u, v) or concat; sst: separate."""
        return {"para": self.para_encoding, "sts": self.sts_encoding}.get(task, "separate")

    def head_kind(self, task: str) -> str:
        return {"sst": "linear", "para": self.para_head, "sts": self.sts_head}[task]

    def batch_encoding(self, task: str) -> str:
        """What make_batch must build for the task: separate, concat, or both (a hybrid sts head on
        concatenated pairs reads the pair as one sequence and its sentences one by one)."""
        if task == "sts" and self.sts_head == "hybrid" and self.sts_encoding == "concat":
            return "both"
        return self.encoding(task)

    def regression_output(self, task: str) -> bool:
        """Whether the task's output is a number compared by squared error (sts; para with loss mse
        or a cosine), not logits."""
        return task == "sts" or (task == "para" and self.para_loss != "bce")

    def para_threshold(self) -> float:
        """The para output above which a pair is predicted a paraphrase: a logit's or a cosine's 0,
        a 0/1 regression's 0.5."""
        return PARA_MSE_THRESHOLD if self.para_loss == "mse" else 0.0

    def para_probability(self, output: torch.Tensor) -> torch.Tensor:
        """The para output as P(paraphrase) in [0, 1], above 1/2 exactly where it is above
        para_threshold(): a logit's sigmoid, a cosine's (1 + cos) / 2, a 0/1 regression clipped."""
        if self.para_loss == "bce":
            return torch.sigmoid(output)
        if self.para_loss == "mse":
            return output.clamp(0.0, 1.0)
        return (output.clamp(-1.0, 1.0) + 1) / 2

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
        if "input_ids_1" not in batch:
            raise ValueError(f"pair_embeddings: the {task} batch holds each pair as one sequence (encoding concat), "
                             f"not its two sentences")
        ids, mask = stack_padded([batch["input_ids_1"], batch["input_ids_2"]],
                                 [batch["attention_mask_1"], batch["attention_mask_2"]])
        vectors = self.sentence_vectors(ids, mask, task)
        n = batch["input_ids_1"].shape[0]
        return vectors[:n], vectors[n:]

    def forward(self, task: str, batch: dict) -> torch.Tensor:
        """sst: logits [B, 5]. para: [B], a logit (> 0: paraphrase), a 0/1 regression (> 0.5) or
        cos(u, v) (> 0). sts: the predicted score [B] (module docstring)."""
        if task == "sst":
            return self.heads["sst"](self.embed(batch["input_ids"], batch["attention_mask"], task))
        if task not in PAIR_TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
        head = self.head_kind(task)
        if head in ("linear", "sbert", "hybrid"):
            if self.encoding(task) == "concat":
                if "token_type_ids" not in batch:
                    raise ValueError(f"{task} encoding concat needs the pair as one sequence: build the batch with "
                                     f"make_batch(..., encoding=model.batch_encoding('{task}'))")
                features = self.embed(batch["input_ids"], batch["attention_mask"], task, batch["token_type_ids"])
                u = v = None
            else:
                u, v = self.pair_embeddings(task, batch)
                features = pair_features(self.dropout(u), self.dropout(v), "sbert" if head == "sbert" else "linear")
            score = self.heads[task](features).squeeze(-1)
            if task == "para":
                return score
            score = self._bounded(score)
            if head != "hybrid":
                return score
            if u is None:
                u, v = self.pair_embeddings(task, batch)
            w = self.heads["sts_cosine_weight"]() if self.sts_cosine_weight is None else self.sts_cosine_weight
            return w * STS_MAX * _cosine(u, v) + (1 - w) * score
        u, v = self.pair_embeddings(task, batch)
        if head == "cosine":
            return _cosine(u, v) if task == "para" else STS_MAX * _cosine(u, v)
        if head == "dot":
            return self._bounded((u.float() * v.float()).sum(-1))
        if head == "cosine_linear":
            return self._bounded(self.heads[task](_cosine(u, v).unsqueeze(-1)).squeeze(-1))
        raise ValueError(f"{task}: unknown head {head!r}")

    def _bounded(self, score: torch.Tensor) -> torch.Tensor:
        """sts bound tanh: 2.5 * (tanh(x) + 1), in (0, 5); none: x."""
        return STS_MAX / 2 * (torch.tanh(score) + 1) if self.sts_bound == "tanh" else score

    def loss(self, task: str, output: torch.Tensor, labels: torch.Tensor,
             sst_label_smoothing: float = 0.0) -> torch.Tensor:
        # The loss is computed in fp32 even when the forward pass ran under bf16 autocast.
        # sst_label_smoothing is a training choice, not the model's: finetune passes it.
        output, labels = output.float(), labels.float()
        if task == "sst":
            return F.cross_entropy(output, labels.long(), label_smoothing=sst_label_smoothing)
        if task == "para":
            if self.para_loss == "cosine_embedding":
                return cosine_embedding_loss(output, torch.where(labels >= 0.5, 1.0, -1.0))
            if self.para_loss == "mse":
                return F.mse_loss(output, labels)
            return F.binary_cross_entropy_with_logits(output, labels)
        if task == "sts":
            if self.sts_loss == "cosine_embedding":
                return cosine_embedding_loss(output / STS_MAX, torch.where(labels >= STS_SIMILAR, 1.0, -1.0))
            return F.mse_loss(output, labels)
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")

    def switches(self) -> dict:
        """The constructor's keyword arguments (what multitask.json records)."""
        return {name: getattr(self, name) for name in SWITCHES}


def build_model(cfg, encoder_dir) -> MultitaskModel:
    """The model cfg.model and cfg.loss describe: encoder(s) from encoder_dir, fresh heads (on CPU)."""
    m = cfg.model
    encoder = load_bert(encoder_dir, dropout=m.dropout if m.encoder_dropout is None else m.encoder_dropout)
    return MultitaskModel(encoder, m.pooling, m.dropout,
                          para_encoding=m.para.encoding, para_head=m.para.head, para_loss=cfg.loss.para,
                          sts_encoding=m.sts.encoding, sts_head=m.sts.head, sts_loss=cfg.loss.sts,
                          sts_bound=m.sts.bound, sts_cosine_weight=m.sts.cosine_weight, head_layers=m.head_layers,
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


def mnr_loss(u: torch.Tensor, v: torch.Tensor, scale: float = 20.0, similarity: str = "cosine") -> torch.Tensor:
    """Multiple-negatives ranking loss (Henderson et al. 2017; SBERT's MultipleNegativesRankingLoss).

    Row i's positive is v_i, every other v_j of the batch a negative: cross entropy over the
    logits scale * sim(u_i, v_j) with target i; sim is cos(u_i, v_j), or with similarity "dot"
    the dot product u_i . v_j (logits u v^T at scale 1).
    """
    if u.shape != v.shape or u.ndim != 2:
        raise ValueError(f"mnr_loss: u and v must both be [B, H], got {tuple(u.shape)} and {tuple(v.shape)}")
    if similarity == "cosine":
        u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"mnr_loss: similarity must be 'cosine' or 'dot', got {similarity!r}")
    return F.cross_entropy(scale * u @ v.T, torch.arange(len(u), device=u.device))


def make_batch(task: str, split, idx, device, encoding: str = "separate") -> dict:
    """The tensors forward() needs for rows `idx` of a split, on `device` (plus labels if the split has them).

    A pair task's `encoding` (model.batch_encoding(task)): separate: each sentence on its own,
    keys input_ids_1, attention_mask_1, input_ids_2, attention_mask_2; concat: a pair is one
    sequence, keys input_ids, attention_mask, token_type_ids; both: all of them.
    """
    if encoding not in ("separate", "concat", "both"):
        raise ValueError(f"make_batch: encoding must be separate, concat or both, got {encoding!r}")
    idx = np.asarray(idx)
    batch = {}
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if task in PAIR_TASKS and encoding in ("concat", "both"):
        for key, tensor in zip(("input_ids", "attention_mask", "token_type_ids"), pair_batch(split, idx)):
            batch[key] = tensor.to(device, non_blocking=True)
    if task == "sst" or encoding in ("separate", "both"):
        columns = {"": "input_ids"} if task == "sst" else {"_1": "input_ids_1", "_2": "input_ids_2"}
        for suffix, column in columns.items():
            input_ids, attention_mask = pad_batch(split, column, idx)
            batch["input_ids" + suffix] = input_ids.to(device, non_blocking=True)
            batch["attention_mask" + suffix] = attention_mask.to(device, non_blocking=True)
    if split.labels is not None:
        batch["labels"] = labels_tensor(split, idx).to(device, non_blocking=True)
    return batch


def batch_lengths(task: str, split, encoding: str = "separate") -> np.ndarray:
    """Per-row length to bucket by: the sentence's; for a pair the longer of the two, or with
    concat (and both) the joined sequence's (the second [CLS] dropped)."""
    if task == "sst":
        return np.asarray(split.lengths("input_ids"))
    a, b = np.asarray(split.lengths("input_ids_1")), np.asarray(split.lengths("input_ids_2"))
    return a + b - 1 if encoding in ("concat", "both") else np.maximum(a, b)


def predict(model: MultitaskModel, task: str, split, batch_size: int, device, precision: str = "fp32") -> np.ndarray:
    """Predictions for every row, in the split's row order.

    sst: class 0..4 (int64); para: 0/1 (int64, output above model.para_threshold(): a logit > 0,
    i.e. sigmoid > 0.5, a cosine > 0, a 0/1 regression > 0.5); sts: score clipped to [0, 5] (float32).
    """
    return predict_with_scores(model, task, split, batch_size, device, precision)[0]


@torch.no_grad()
def predict_with_scores(model: MultitaskModel, task: str, split, batch_size: int, device,
                        precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(predictions as `predict` gives them, scores): sst the five class probabilities [n, 5]
    (softmax of the logits); para P(paraphrase) [n] (para_probability); sts the score itself.
    `precision` "bf16": the forward passes under bf16 autocast (stages.device); scores are fp32 either way."""
    was_training = model.training
    model.eval()
    n = len(split)
    out = np.zeros(n, dtype=np.float32 if task == "sts" else np.int64)
    scores = np.zeros((n, 5) if task == "sst" else n, dtype=np.float32)
    encoding = model.batch_encoding(task)
    try:
        for idx in bucketed_batches(batch_lengths(task, split, encoding), batch_size, None):
            batch = make_batch(task, split, idx, device, encoding)
            with autocast(torch.device(device), precision):
                output = model(task, batch)
            output = output.float()
            if task == "sst":
                values, score = output.argmax(dim=-1), output.softmax(dim=-1)
            elif task == "para":
                values, score = (output > model.para_threshold()).long(), model.para_probability(output)
            else:
                values = score = output.clamp(0.0, STS_MAX)
            out[np.asarray(idx)] = values.cpu().numpy()
            scores[np.asarray(idx)] = score.cpu().numpy()
    finally:
        model.train(was_training)
    return out, scores


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
    switches = _per_task_switches(meta.get("switches", {}))  # absent: a baseline model written before the switches
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


def _check_switches(**switches) -> None:
    """The combinations pipeline/config.py rejects, for a model built or loaded without a config."""
    for name, value in switches.items():
        if name in CHOICES and value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {list(CHOICES[name])}, got {value!r}")
    for task in PAIR_TASKS:
        if switches[f"{task}_encoding"] == "concat" and switches[f"{task}_head"] in SIAMESE_HEADS[task]:
            raise ValueError(f"{task}_encoding concat encodes a pair as one sequence; {task}_head "
                             f"{switches[f'{task}_head']} needs two sentence embeddings")
    if (switches["para_head"] == "cosine") != (switches["para_loss"] == "cosine_embedding"):
        raise ValueError("para_head cosine and para_loss cosine_embedding go together")
    if switches["sts_loss"] == "cosine_embedding" and switches["sts_head"] != "cosine":
        raise ValueError("sts_loss cosine_embedding needs sts_head cosine")
    weight = switches["sts_cosine_weight"]
    if weight is not None and (switches["sts_head"] != "hybrid" or not 0 < weight < 1):
        raise ValueError(f"sts_cosine_weight is hybrid's fixed weight in (0, 1); got {weight!r} "
                         f"with sts_head {switches['sts_head']}")
    if switches["sts_bound"] == "tanh" and switches["sts_head"] == "cosine":
        raise ValueError("sts_bound tanh bounds a head's number; sts_head cosine is already 5 * cos(u, v)")


def _per_task_switches(switches: dict) -> dict:
    """multitask.json switches of a model written when pair encoding, head and loss were one
    setting for both pair tasks (pair_encoding, pair_head, sts_head, pair_loss), as per-task ones."""
    if not set(LEGACY_SWITCHES) & set(switches):
        return dict(switches)
    switches = dict(switches)
    encoding = switches.pop("pair_encoding", "separate")
    pair_head = switches.pop("pair_head", "linear")
    old_sts_head = switches.pop("sts_head", "linear")
    if switches.pop("pair_loss", "default") == "cosine_embedding":
        heads = {"para_head": "cosine", "para_loss": "cosine_embedding",
                 "sts_head": "cosine", "sts_loss": "cosine_embedding"}
    else:
        heads = {"para_head": pair_head, "sts_head": "cosine" if old_sts_head == "cosine" else pair_head}
    return {"para_encoding": encoding, "sts_encoding": encoding, **heads, **switches}


class _LearnedWeight(nn.Module):
    """w = sigmoid(theta), the hybrid sts head's learned weight of 5 * cos(u, v); theta starts at 0 (w = 0.5)."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(()))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.theta)


def _cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """cos(u_i, v_i) per row, in fp32 (under bf16 autocast the vectors are bf16)."""
    return F.cosine_similarity(u.float(), v.float(), dim=-1)


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
    """What multitask.json says about a task's head: what it reads, outputs and is trained with."""
    head = model.head_kind(task)
    concat = model.encoding(task) == "concat"
    loss = {"sst": "cross_entropy", "para": {"bce": "bce_with_logits"}.get(model.para_loss, model.para_loss),
            "sts": model.sts_loss}[task]
    bound = " in 2.5 * (tanh(x) + 1)" if task == "sts" and model.sts_bound == "tanh" else ""
    if head == "cosine":
        output = "cosine (> 0: paraphrase)" if task == "para" else "score 5 * cos(u, v)"
        return {"input": "cos(u, v)", "output": output, "loss": loss}
    if head == "dot":
        return {"input": "u . v", "output": f"score u . v{bound}", "loss": loss}
    if head == "cosine_linear":
        return {"input": "cos(u, v)", "output": f"score a * cos(u, v) + b{bound}", "loss": loss}
    module = model.heads[task]
    first, last = (module, module) if isinstance(module, nn.Linear) else (module[0], module[-1])
    inputs = "u" if task == "sst" else (
        "pooled [CLS] a [SEP] b [SEP]" if concat else "[u; v; |u - v|]" if head == "sbert" else "[u; v]")
    output = {"sst": "logits", "para": "0/1 regression" if model.para_loss == "mse" else "logit",
              "sts": f"score{bound}"}[task]
    if head == "hybrid":
        w = "learned sigmoid(theta)" if model.sts_cosine_weight is None else model.sts_cosine_weight
        output = f"w * 5 * cos(u, v) + (1 - w) * head {output}, w {w}"
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
