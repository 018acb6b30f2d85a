"""data_prep stage: the CS224N tab-separated files -> tokenized Arrow IPC files + manifest.json.

Input files (named in `cfg.data`, relative to `cfg.data.dir`; None = not used):

    sst:  id, sentence, sentiment              (sentiment: int 0..4)
    para: id, sentence1, sentence2, is_duplicate  (0/1; "0.0"/"1.0" accepted)   <- quora_*
    sts:  id, sentence1, sentence2, similarity    (a number in [0, 5])

Every physical line is one record, split on tab with no CSV quoting (some fields hold
unbalanced double quotes that a quoting reader would run across lines). Columns are found by
header name; unnamed columns (the leading index columns) are ignored. A field wrapped CSV-style
in quotes (starting and ending with a quote) is unwrapped, and its doubled quotes undoubled,
only when every inner quote is doubled; otherwise the field is kept verbatim.

Bad rows (an unparsable or out-of-range label, an empty sentence or id, a duplicate id, a wrong
number of fields) raise "<file>:<line>: <problem>" with `data.on_bad_rows: error`, or are
skipped and counted per split with `drop`. Structural problems (missing file or column, empty
file, not UTF-8, not tab-separated, a label column in a test file or none in a train/dev file)
always raise. Line numbers are 1-based physical lines; the header is line 1.

Quora carve: only quora-dev.csv is distributed, so with `data.quora_train: null` the rows of
`data.quora_dev` are split deterministically by id: a row goes to para-dev when
int(sha1(id).hexdigest()[:8], 16) / 16**8 < data.quora_dev_fraction, else to para-train.
With `data.quora_train` set, it is para-train and `data.quora_dev` is para-dev.

The user's own files (pipeline.config.DatasetFile, paths already absolute): each
`data.extra_eval` entry is read as its task's file and written as eval-<name>.arrow, listed in
the manifest's `extra_eval`; a `data.train_files.<task>` entry replaces that task's train file
(para: and ends the carve). Their layout: `columns` maps our fields (id, sentence or sentence1
and sentence2, label) to the file's header names (null: the CS224N names), `scale` [lo, hi]
maps an sts score x onto 0..5 as (x - lo) / (hi - lo) * 5 (outside [lo, hi]: a bad row), and
`delimiter` comma reads each line as one CSV record. The same checks apply, by the same rules.

`data.max_rows` keeps the first N valid rows of each split (after the carve). Each sentence is
tokenized on its own as [CLS] ... [SEP], truncated to `data.max_length` tokens; "truncated"
counts the sentences that were cut. Output: out/{task}-{split}.arrow (see
docs/architecture.md for the columns) and out/manifest.json.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa

# (task, split, cfg.data field naming the file). para-train/para-dev may be carved from quora_dev.
SPLIT_FILES = [
    ("sst", "train", "sst_train"), ("sst", "dev", "sst_dev"), ("sst", "test", "sst_test"),
    ("para", "train", "quora_train"), ("para", "dev", "quora_dev"), ("para", "test", "quora_test"),
    ("sts", "train", "sts_train"), ("sts", "dev", "sts_dev"), ("sts", "test", "sts_test"),
]
SENTENCE_COLUMNS = {"sst": ("sentence",), "para": ("sentence1", "sentence2"), "sts": ("sentence1", "sentence2")}
LABEL_COLUMN = {"sst": "sentiment", "para": "is_duplicate", "sts": "similarity"}
SPECIAL_TOKENS = {"pad_id": "[PAD]", "cls_id": "[CLS]", "sep_id": "[SEP]", "mask_id": "[MASK]", "unk_id": "[UNK]"}
MAX_DROPPED_EXAMPLES = 5


def run(cfg, inputs: dict[str, Path], out: Path, log) -> dict:
    data_dir = Path(cfg.data.dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_info = load_tokenizer(Path(cfg.model.dir), cfg.data.max_length)
    drop = cfg.data.on_bad_rows == "drop"

    # Read and validate every named file; each split gets its rows, dropped count and examples.
    # A task's data.train_files entry (the user's own file, its own layout) replaces its _train.
    splits: dict[str, dict] = {}
    carve_quora = cfg.data.quora_train is None and cfg.data.train_files.para is None and cfg.data.quora_dev is not None
    for task, split, key in SPLIT_FILES:
        own = getattr(cfg.data.train_files, task) if split == "train" else None
        if own is not None:
            path = Path(own.file)
            rows, bad = read_file(path, task, is_test=False, drop=drop, config_key=f"data.train_files.{task}",
                                  **_layout(own))
        elif getattr(cfg.data, key) is not None:
            path = _resolve(data_dir, getattr(cfg.data, key))
            rows, bad = read_file(path, task, is_test=(split == "test"), drop=drop, config_key=f"data.{key}")
        else:
            continue
        if task == "para" and split == "dev" and carve_quora:
            dev_fraction = cfg.data.quora_dev_fraction
            for part in ("train", "dev"):
                wanted = part == "dev"
                splits[f"para-{part}"] = {
                    "source": path,
                    "rows": [r for r in rows if (_hash_unit(r[1]) < dev_fraction) == wanted],
                    "bad": [b for b in bad if (_hash_unit(b[1]) < dev_fraction) == wanted],
                }
        else:
            splits[f"{task}-{split}"] = {"source": path, "rows": rows, "bad": bad}
    # Extra evaluation sets: validated like every split, written as eval-<name>.arrow.
    extra: dict[str, dict] = {}
    for i, spec in enumerate(cfg.data.extra_eval):
        path = Path(spec.file)
        rows, bad = read_file(path, spec.task, is_test=False, drop=drop, config_key=f"data.extra_eval[{i}]",
                              **_layout(spec))
        extra[spec.name] = {"source": path, "rows": rows, "bad": bad, "task": spec.task, "scale": spec.scale}

    metrics: dict[str, float] = {}
    manifest_splits, manifest_extra = {}, {}
    todo = [(name, splits[name], None) for name in _ordered(splits)]
    todo += [(f"eval-{name}", entry, name) for name, entry in extra.items()]
    for split_name, entry, extra_name in todo:
        task, split = (entry["task"], "eval") if extra_name else split_name.split("-")
        rows = entry["rows"]
        if cfg.data.max_rows is not None:
            rows = rows[: cfg.data.max_rows]
        if not rows:
            raise ValueError(f"{entry['source']}: no valid rows left for {split_name}"
                             f" ({len(entry['bad'])} dropped)")
        file_name = f"{split_name}.arrow"
        truncated = _write_split(out / file_name, tokenizer, task, rows, with_labels=split != "test")
        dropped = len(entry["bad"])
        counts = {"file": file_name, "rows": len(rows), "dropped": dropped, "truncated": truncated,
                  "source": str(entry["source"])}
        if extra_name is None:
            manifest_splits[split_name] = counts
            prefix = f"data/{task}_{split}"
        else:
            manifest_extra[extra_name] = {"task": task, **counts, "scale": entry["scale"]}
            prefix = f"data/eval_{extra_name}"
        metrics[f"{prefix}_rows"] = float(len(rows))
        metrics[f"{prefix}_dropped"] = float(dropped)
        metrics[f"{prefix}_truncated"] = float(truncated)
    every = [splits[name] for name in _ordered(splits)] + list(extra.values())
    metrics["data/dropped_rows"] = float(sum(len(s["bad"]) for s in every))
    _print_summary(manifest_splits, manifest_extra, [(s["source"], *bad) for s in every for bad in s["bad"]],
                   cfg.data.max_length)

    manifest = {"max_length": cfg.data.max_length, "tokenizer": tokenizer_info, "splits": manifest_splits,
                "extra_eval": manifest_extra}
    manifest_path = out / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(metrics)
    return {"metrics": metrics, "manifest": str(manifest_path)}


def _layout(spec) -> dict:
    """read_file's layout arguments from a DatasetFile (data.extra_eval, data.train_files)."""
    columns = None if spec.columns is None else {f: v for f, v in vars(spec.columns).items() if v is not None}
    return {"columns": columns, "scale": tuple(spec.scale) if spec.scale else None, "delimiter": spec.delimiter}


def _write_split(path: Path, tokenizer, task: str, rows: list, with_labels: bool) -> int:
    """One split's Arrow file; returns how many sentences truncation cut."""
    # Tokenize column by column in one batch call each; a sentence with overflow was cut.
    columns = {}
    truncated = 0
    for i in range(len(SENTENCE_COLUMNS[task])):
        encodings = tokenizer.encode_batch([r[2][i] for r in rows])
        truncated += sum(1 for e in encodings if e.overflowing)
        columns["input_ids" if task == "sst" else f"input_ids_{i + 1}"] = _list_array(encodings)
    table_columns = {"id": pa.array([r[1] for r in rows], pa.string()), **columns}
    if with_labels:
        label_type = pa.int64() if task == "sst" else pa.float32()
        table_columns["label"] = pa.array([r[3] for r in rows], label_type)
    table = pa.table(table_columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return truncated


# ---------------------------------------------------------------- reading and validation


def read_file(path: Path, task: str, is_test: bool, drop: bool, config_key: str, ignore_labels: bool = False,
              columns: dict[str, str] | None = None, scale: tuple[float, float] | None = None,
              delimiter: str = "tab"):
    """Parse one file -> (rows, bad): rows are (line, id, sentences, label), bad are (line, id, reason).

    With drop=False the first bad row raises instead. ignore_labels (with is_test): a label column
    may be there and is not read (`pipeline predict` on a dev file). The layout of the user's own
    files (data.extra_eval, data.train_files): `columns` maps our fields (id, sentence or
    sentence1 and sentence2, label) to the file's header names (None: the CS224N names); `scale`
    (sts) is the file's score range, mapped onto 0..5; `delimiter` tab or comma (CSV quoting
    within each line).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found ({config_key})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last record
    lines = [line.removesuffix("\r") for line in lines]
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}: file is empty, expected a header row and data rows")
    split_fields = _split_tab if delimiter == "tab" else _split_comma
    header = split_fields(lines[0])
    if len(header) == 1:
        raise ValueError(f"{path}:1: expected {delimiter}-separated columns, the header has one column: {lines[0][:80]!r}")
    if len(lines) == 1:
        raise ValueError(f"{path}: has a header row but no data rows")

    names = [h.strip() for h in header]
    for name in names:
        if name and names.count(name) > 1:
            raise ValueError(f"{path}:1: column '{name}' appears more than once in the header")
    # Our field -> the file's column name.
    column_of = columns or {"id": "id", **{c: c for c in SENTENCE_COLUMNS[task]}, "label": LABEL_COLUMN[task]}
    label_column = column_of["label"]
    if is_test and label_column in names and not ignore_labels:
        raise ValueError(f"{path}:1: a test file must not have a label column, found '{label_column}'")
    required = ["id", *SENTENCE_COLUMNS[task]] + ([] if is_test else ["label"])
    for field in required:
        if column_of[field] not in names:
            what = "label column" if field == "label" else "column"
            named_by = f" ({config_key}.columns.{field})" if columns else ""
            raise ValueError(f"{path}:1: missing required {what} '{column_of[field]}'{named_by} (header: {names})")
    id_at = names.index(column_of["id"])
    sentence_at = [names.index(column_of[c]) for c in SENTENCE_COLUMNS[task]]
    label_at = None if is_test else names.index(label_column)
    parse_label = {"sst": _parse_sentiment, "para": _parse_is_duplicate,
                   "sts": lambda text: _parse_similarity(text, scale)}[task]
    unquote = _unquote if delimiter == "tab" else str  # the CSV reader has already unquoted

    rows, bad = [], []
    first_line_of_id: dict[str, int] = {}
    for line_no, line in enumerate(lines[1:], start=2):
        fields = split_fields(line)
        row_id = fields[id_at].strip() if id_at < len(fields) else ""
        problem = None
        if len(fields) != len(header):
            problem = f"expected {len(header)} {delimiter}-separated fields, got {len(fields)}"
        elif not row_id:
            problem = "empty id"
        elif row_id in first_line_of_id:
            problem = f"duplicate id '{row_id}' (first on line {first_line_of_id[row_id]})"
        else:
            sentences = tuple(unquote(fields[i]) for i in sentence_at)
            for field, sentence in zip(SENTENCE_COLUMNS[task], sentences):
                if not sentence.strip():
                    problem = f"empty {column_of[field]}"
                    break
            label = None
            if problem is None and label_at is not None:
                label, problem = parse_label(fields[label_at].strip())
        if problem is not None:
            if not drop:
                raise ValueError(f"{path}:{line_no}: {problem}")
            bad.append((line_no, row_id, problem))
            continue
        first_line_of_id[row_id] = line_no
        rows.append((line_no, row_id, sentences, label))
    return rows, bad


def _split_tab(line: str) -> list[str]:
    return line.split("\t")


def _split_comma(line: str) -> list[str]:
    """One CSV record per physical line (quoted commas allowed, embedded newlines not)."""
    return next(csv.reader([line]), [])


def _unquote(field: str) -> str:
    """'"a ""b"" c"' -> 'a "b" c'; anything else (e.g. unbalanced quotes) stays verbatim."""
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        inner = field[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return field


def _parse_sentiment(text: str):
    try:
        value = float(text)
    except ValueError:
        return None, f"sentiment {text!r} is not an integer 0..4"
    if not value.is_integer() or not 0 <= value <= 4:
        return None, f"sentiment {text!r} is not an integer 0..4"
    return int(value), None


def _parse_is_duplicate(text: str):
    if text in ("0", "0.0"):
        return 0.0, None
    if text in ("1", "1.0"):
        return 1.0, None
    return None, f"is_duplicate {text!r} is not 0 or 1"


def _parse_similarity(text: str, scale: tuple[float, float] | None = None):
    """A score in [0, 5]; with a declared scale (lo, hi), a score in [lo, hi] mapped linearly
    onto 0..5: (x - lo) / (hi - lo) * 5, so 1..5 gives 1 -> 0, 3 -> 2.5, 5 -> 5."""
    lo, hi = scale or (0.0, 5.0)
    try:
        value = float(text)
    except ValueError:
        return None, f"similarity {text!r} is not a number"
    if math.isnan(value) or not lo <= value <= hi:
        return None, f"similarity {text!r} is not in [{lo:g}, {hi:g}]" + (" (its declared scale)" if scale else "")
    return ((value - lo) / (hi - lo) * 5 if scale else value), None


def _hash_unit(row_id: str) -> float:
    """A stable number in [0, 1) from the id: the same row lands in the same carve split everywhere."""
    return int(hashlib.sha1(row_id.encode("utf-8")).hexdigest()[:8], 16) / 16**8


def _resolve(data_dir: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else data_dir / path


def _print_summary(manifest_splits: dict, manifest_extra: dict, bad: list, max_length: int) -> None:
    """One line for every split's rows, dropped and truncated counts, then the first
    MAX_DROPPED_EXAMPLES dropped rows: a run's log stays short (the per-split counts are in
    the manifest and the data/* metrics), and a dropped row can still be found by its line."""
    by_task: dict[str, list[str]] = {}
    for name, entry in manifest_splits.items():
        task, split = name.split("-")
        by_task.setdefault(task, []).append(f"{split} {entry['rows']}")
    rows = ", ".join(f"{task} {' '.join(parts)}" for task, parts in by_task.items())
    if manifest_extra:
        rows += ", extra eval " + " ".join(f"{name} ({e['task']}) {e['rows']}" for name, e in manifest_extra.items())
    everything = {**manifest_splits, **{f"eval-{name}": e for name, e in manifest_extra.items()}}
    dropped = {name: entry["dropped"] for name, entry in everything.items() if entry["dropped"]}
    dropped_text = f"{sum(dropped.values())} dropped"
    if dropped:
        dropped_text += " (" + ", ".join(f"{name} {n}" for name, n in dropped.items()) + ")"
    truncated = sum(entry["truncated"] for entry in everything.values())
    print(f"data_prep: rows {rows}; {dropped_text}; {truncated} sentences truncated to {max_length} tokens")
    for source, line, _id, reason in bad[:MAX_DROPPED_EXAMPLES]:
        print(f"data_prep:   dropped {source}:{line}: {reason}")
    if len(bad) > MAX_DROPPED_EXAMPLES:
        print(f"data_prep:   ... and {len(bad) - MAX_DROPPED_EXAMPLES} more dropped rows")


def _ordered(splits: dict) -> list[str]:
    order = [f"{task}-{split}" for task in ("sst", "para", "sts") for split in ("train", "dev", "test")]
    return [name for name in order if name in splits]


# ---------------------------------------------------------------- tokenizing


def load_tokenizer(model_dir: Path, max_length: int):
    """tokenizer.json if the folder has one, else vocab.txt; no padding, truncation to max_length."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    if (model_dir / "tokenizer.json").is_file():
        source = model_dir / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(source))
    elif (model_dir / "vocab.txt").is_file():
        source = model_dir / "vocab.txt"
        tokenizer = BertWordPieceTokenizer(str(source), lowercase=True)
    else:
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json or vocab.txt in the model folder (model.dir)")
    # The shipped tokenizer.json pads every sentence to 128: padding belongs to batch time.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    info = {"source": str(source.resolve()), "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}
    for key, token in SPECIAL_TOKENS.items():
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{source}: the tokenizer has no {token} token")
        info[key] = token_id
    return tokenizer, info


def _list_array(encodings) -> pa.ListArray:
    """The token ids of each encoding as one list<int32> column, built without per-row arrays."""
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))
    offsets = np.zeros(len(encodings) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32,
                         count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
