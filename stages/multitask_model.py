"""The multitask model: one BERT encoder, three small heads (the CS224N minBERT baseline).

Every sentence is encoded on its own and pooled to a vector (u for the first sentence of a
pair, v for the second):
- sst:  Linear(H, 5) on u -> 5 sentiment logits, cross-entropy loss;
- para: Linear(2H, 1) on [u; v] -> one paraphrase logit, BCE-with-logits loss;
- sts:  Linear(2H, 1) on [u; v] -> the 0..5 similarity score itself, MSE loss.

On disk the model is a HuggingFace-format BERT folder (stages.encoder.save_bert) plus
heads.safetensors (the heads' weights) and multitask.json (pooling, dropout, head shapes).
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stages.batches import bucketed_batches, labels_tensor, pad_batch
from stages.device import autocast
from stages.encoder import BertEncoder, load_bert, pool, save_bert

TASKS = ("sst", "para", "sts")
SST_CLASSES = 5
STS_MAX = 5.0
PAIR_TASKS = ("para", "sts")
HEADS_FILE = "heads.safetensors"
META_FILE = "multitask.json"


class MultitaskModel(nn.Module):
    def __init__(self, encoder: BertEncoder, pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout)
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({
            "sst": nn.Linear(hidden, SST_CLASSES),
            "para": nn.Linear(2 * hidden, 1),
            "sts": nn.Linear(2 * hidden, 1),
        })

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One pooled vector per sentence, [B, H], with dropout (active in train mode)."""
        hidden = self.encoder(input_ids, attention_mask)
        return self.dropout(pool(hidden, attention_mask, self.pooling))

    def forward(self, task: str, batch: dict) -> torch.Tensor:
        """sst: logits [B, 5]; para: logit [B]; sts: predicted score [B]."""
        if task == "sst":
            return self.heads["sst"](self.embed(batch["input_ids"], batch["attention_mask"]))
        if task in PAIR_TASKS:
            u = self.embed(batch["input_ids_1"], batch["attention_mask_1"])
            v = self.embed(batch["input_ids_2"], batch["attention_mask_2"])
            return self.heads[task](torch.cat([u, v], dim=-1)).squeeze(-1)
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")

    def loss(self, task: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The loss is computed in fp32 even when the forward pass ran under bf16 autocast.
        output = output.float()
        if task == "sst":
            return F.cross_entropy(output, labels.long())
        if task == "para":
            return F.binary_cross_entropy_with_logits(output, labels.float())
        if task == "sts":
            return F.mse_loss(output, labels.float())
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def make_batch(task: str, split, idx, device) -> dict:
    """The tensors forward() needs for rows `idx` of a split, on `device` (plus labels if the split has them)."""
    idx = np.asarray(idx)
    if task == "sst":
        columns = {"": "input_ids"}
    elif task in PAIR_TASKS:
        columns = {"_1": "input_ids_1", "_2": "input_ids_2"}
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    batch = {}
    for suffix, column in columns.items():
        input_ids, attention_mask = pad_batch(split, column, idx)
        batch["input_ids" + suffix] = input_ids.to(device, non_blocking=True)
        batch["attention_mask" + suffix] = attention_mask.to(device, non_blocking=True)
    if split.labels is not None:
        batch["labels"] = labels_tensor(split, idx).to(device, non_blocking=True)
    return batch


def batch_lengths(task: str, split) -> np.ndarray:
    """Per-row length to bucket by: the sentence's, or for a pair the longer of the two."""
    if task == "sst":
        return np.asarray(split.lengths("input_ids"))
    return np.maximum(np.asarray(split.lengths("input_ids_1")), np.asarray(split.lengths("input_ids_2")))


@torch.no_grad()
def predict(model: MultitaskModel, task: str, split, batch_size: int, device) -> np.ndarray:
    """Predictions for every row, in the split's row order.

    sst: class 0..4 (int64); para: 0/1 (int64, sigmoid > 0.5); sts: score clipped to [0, 5] (float32).
    """
    was_training = model.training
    model.eval()
    n = len(split)
    out = np.zeros(n, dtype=np.float32 if task == "sts" else np.int64)
    try:
        for idx in bucketed_batches(batch_lengths(task, split), batch_size, None):
            batch = make_batch(task, split, idx, device)
            with autocast(torch.device(device)):
                output = model(task, batch)
            output = output.float()
            if task == "sst":
                values = output.argmax(dim=-1)
            elif task == "para":
                values = (output > 0).long()  # sigmoid(x) > 0.5  <=>  x > 0
            else:
                values = output.clamp(0.0, STS_MAX)
            out[np.asarray(idx)] = values.cpu().numpy()
    finally:
        model.train(was_training)
    return out


def save_multitask(model: MultitaskModel, out_dir, tokenizer_from=None) -> Path:
    """Encoder as a HuggingFace BERT folder, plus heads.safetensors and multitask.json."""
    out_dir = Path(out_dir)
    save_bert(model.encoder, out_dir, tokenizer_from=tokenizer_from)
    heads = {name: t.detach().cpu().contiguous() for name, t in model.heads.state_dict().items()}
    save_file(heads, str(out_dir / HEADS_FILE))
    meta = {
        "pooling": model.pooling,
        "dropout": model.dropout_p,
        "hidden_size": model.encoder.config.hidden_size,
        "heads": {
            "sst": {"input": "u", "in_features": model.heads["sst"].in_features,
                    "out_features": SST_CLASSES, "output": "logits", "loss": "cross_entropy"},
            "para": {"input": "[u; v]", "in_features": model.heads["para"].in_features,
                     "out_features": 1, "output": "logit", "loss": "bce_with_logits"},
            "sts": {"input": "[u; v]", "in_features": model.heads["sts"].in_features,
                    "out_features": 1, "output": "score 0..5", "loss": "mse"},
        },
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
    try:
        meta = json.loads((model_dir / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{model_dir / META_FILE}: not valid JSON: {e}") from None
    for key in ("pooling", "heads"):
        if key not in meta:
            raise ValueError(f"{model_dir / META_FILE}: missing key '{key}'")
    encoder = load_bert(model_dir)
    model = MultitaskModel(encoder, pooling=meta["pooling"], dropout=meta.get("dropout", 0.1))
    heads = load_file(str(model_dir / HEADS_FILE))
    expected = model.heads.state_dict()
    missing, unexpected = set(expected) - set(heads), set(heads) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{model_dir / HEADS_FILE}: missing tensors {sorted(missing)}, "
                         f"unexpected tensors {sorted(unexpected)}")
    for name, tensor in heads.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{model_dir / HEADS_FILE}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                             f"the encoder (hidden size {encoder.config.hidden_size}) needs {tuple(expected[name].shape)}")
    model.heads.load_state_dict(heads)
    return model.to(device).eval()
