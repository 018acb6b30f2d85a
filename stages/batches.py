"""Batches from data_prep's Arrow files: memory-mapped columns, length bucketing, padding.

A split is kept as flat numpy arrays (token values + row offsets, straight from the Arrow
buffers), so building a batch is a few vectorised numpy gathers, with no Python work per row.
Batches are padded to their own longest row; `bucketed_batches` groups rows of similar length
so that padding stays small while training order stays random.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch


@dataclass
class Split:
    ids: Sequence[str]  # a numpy str array from load_split (no per-row Python objects); a list also works
    # column name -> (flat int32 token values, int64 offsets of len rows + 1): row i is
    # values[offsets[i]:offsets[i + 1]].
    columns: dict[str, tuple[np.ndarray, np.ndarray]]
    labels: np.ndarray | None  # int64 (sst) or float32 (para, sts); None for a test split
    name: str = ""  # where it came from, for error messages

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self, column: str) -> np.ndarray:
        """Token count of each row of a column ([CLS] and [SEP] included), int64."""
        if column not in self.columns:
            raise KeyError(f"{self.name or 'split'}: no column '{column}' (has {sorted(self.columns)})")
        return np.diff(self.columns[column][1])


def load_split(path: str | Path) -> Split:
    """Read one data_prep .arrow file, memory-mapped: token arrays are views of the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Arrow file not found")
    with pa.memory_map(str(path), "r") as source:
        table = pa.ipc.open_file(source).read_all()
    if "id" not in table.column_names:
        raise ValueError(f"{path}: no 'id' column (columns: {table.column_names})")
    columns = {}
    for name in table.column_names:
        if not name.startswith("input_ids"):
            continue
        column = table.column(name)
        array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        if not pa.types.is_list(array.type) or array.type.value_type != pa.int32():
            raise ValueError(f"{path}: column '{name}' is {array.type}, expected list<int32>")
        if array.null_count:
            raise ValueError(f"{path}: column '{name}' has {array.null_count} null rows")
        # Offsets index the whole child buffer, so a sliced array needs no copy.
        values = array.values.to_numpy(zero_copy_only=True)
        offsets = array.offsets.to_numpy().astype(np.int64)
        columns[name] = (values, offsets)
    labels = None
    if "label" in table.column_names:
        labels = table.column("label").to_numpy()
        if labels.dtype not in (np.int64, np.float32):
            raise ValueError(f"{path}: column 'label' is {labels.dtype}, expected int64 or float32")
    # ids as one fixed-width numpy string array, not a list of Python str objects (Quora has ~16k)
    ids = table.column("id").to_numpy(zero_copy_only=False).astype(str)
    return Split(ids=ids, columns=columns, labels=labels, name=str(path))


def bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None,
                     chunk_batches: int = 50) -> list[np.ndarray]:
    """Row indices cut into batches; every index appears exactly once.

    Training (rng given): shuffle, cut into chunks of chunk_batches * batch_size rows, sort each
    chunk by length, cut it into batches, then shuffle the batch order. Batches stay random
    but hold rows of similar length. Evaluation (rng None): longest rows first, consecutive
    batches (the biggest batch comes first, so an out-of-memory shows at once).
    """
    if batch_size <= 0 or chunk_batches <= 0:
        raise ValueError(f"batch_size and chunk_batches must be > 0, got {batch_size}, {chunk_batches}")
    lengths = np.asarray(lengths)
    if rng is None:
        order = np.argsort(-lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    shuffled = rng.permutation(len(lengths))
    chunk = chunk_batches * batch_size
    batches = []
    for start in range(0, len(shuffled), chunk):
        part = shuffled[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_batch(split: Split, column: str, idx: np.ndarray, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) int64, T = the longest row in this batch."""
    values, offsets = split.columns[column]
    idx = np.asarray(idx, dtype=np.int64)
    starts = offsets[idx]
    lens = offsets[idx + 1] - starts
    width = int(lens.max()) if len(idx) else 0
    positions = np.arange(width)
    mask = positions[None, :] < lens[:, None]
    input_ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    input_ids[mask] = values[(starts[:, None] + positions[None, :])[mask]]
    return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))


def pair_batch(split: Split, idx: np.ndarray, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sentence pair as one sequence, "[CLS] a [SEP] b [SEP]", padded to the batch's longest.

    The input_ids_1 row, then the input_ids_2 row without its leading [CLS]. Returns
    (input_ids, attention_mask, token_type_ids), int64 [B, T]; token type 0 for the first
    part (and padding), 1 for the second. A pair can be up to 2 * max_length - 1 tokens.
    """
    values_1, offsets_1 = split.columns["input_ids_1"]
    values_2, offsets_2 = split.columns["input_ids_2"]
    idx = np.asarray(idx, dtype=np.int64)
    starts_1 = offsets_1[idx]
    lens_1 = offsets_1[idx + 1] - starts_1
    starts_2 = offsets_2[idx] + 1  # skip the second sentence's [CLS]
    lens_2 = offsets_2[idx + 1] - starts_2
    width = int((lens_1 + lens_2).max()) if len(idx) else 0
    positions = np.arange(width)[None, :]
    first = positions < lens_1[:, None]
    second = ~first & (positions < (lens_1 + lens_2)[:, None])
    input_ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    input_ids[first] = values_1[(starts_1[:, None] + positions)[first]]
    input_ids[second] = values_2[(starts_2[:, None] + positions - lens_1[:, None])[second]]
    attention_mask = (first | second).astype(np.int64)
    token_type_ids = second.astype(np.int64)
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask), torch.from_numpy(token_type_ids)


def labels_tensor(split: Split, idx: np.ndarray) -> torch.Tensor:
    """The labels of rows idx: int64 for sst, float32 for para and sts."""
    if split.labels is None:
        raise ValueError(f"{split.name or 'split'}: has no labels (a test split)")
    return torch.from_numpy(np.ascontiguousarray(split.labels[np.asarray(idx, dtype=np.int64)]))
