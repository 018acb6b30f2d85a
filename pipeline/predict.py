"""`python -m pipeline predict MODEL --task sst|para|sts FILE [--out OUT.csv]`: a model's predictions
for any file in the CS224N layout.

    python -m pipeline predict runs:/RUN_ID/model --task sts ../shared/data/cs224n/sts-dev.csv --out sts.csv

MODEL is what `leaderboard --model` takes (models:/NAME@ALIAS, models:/NAME/VERSION,
runs:/RUN_ID/model or a finetune model folder; pipeline/registry.py finds and downloads it). FILE
is read and checked by data_prep's reader (tab-separated, columns by header name: id and the
task's sentence columns; a label column, when there, is not read): a missing file or column, a
file that is not UTF-8, an empty file or a bad row (an empty id or sentence, a duplicate id, a
wrong number of fields) is one line naming the file and line, exit status 2, before anything is
predicted; `--skip-bad-rows` leaves bad rows out instead, and says how many. The rows are then tokenized as data_prep does
(`data.max_length` of the config, the model folder's own tokenizer) and predicted CHUNK_ROWS at a
time, each chunk in length-sorted batches of `train.eval_batch_size` (the batches evaluate runs),
so memory stays that of one chunk however long the file is. OUT gets one line per row, in the
file's order, in evaluate's exact starter format (`id , prediction`), so it can be diffed against
a run's predictions/<task>-dev-output.csv; a progress line as it goes and the throughput at the end.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import registry, tracking
from pipeline.prepare import prepare
from stages.batches import Split
from stages.data_prep import SENTENCE_COLUMNS, load_tokenizer, read_file
from stages.device import pick_device, resolve_precision
from stages.evaluate import HEADERS, format_prediction
from stages.multitask_model import load_multitask, predict_with_scores
from stages.progress import Progress

CHUNK_ROWS = 4096  # rows tokenized and predicted at a time


def main(args) -> int:
    prepared = prepare(args.config, args.overrides, args.smoke)
    cfg, task, path = prepared.cfg, args.task, Path(args.file)
    try:
        rows, bad = _read_rows(path, task, drop=args.skip_bad_rows)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The MLflow store matters only for models:/ and runs:/ URIs (a folder is read as it is).
    uri = args.tracking_uri or (tracking.tracking_uri(cfg.tracking.uri, prepared.config_dir)
                                if args.model.startswith(("models:/", "runs:/")) else "")
    with tempfile.TemporaryDirectory(prefix="predict-") as tmp:
        try:
            choice = registry.given_model(uri, args.model, Path(tmp))
        except LookupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        device = pick_device(cfg.device)
        precision, why = resolve_precision(cfg.precision, device)
        model = load_multitask(choice.folder, device=device)
        has_tokenizer = any((choice.folder / n).is_file() for n in ("tokenizer.json", "vocab.txt"))
        tokenizer, _ = load_tokenizer(choice.folder if has_tokenizer else Path(cfg.model.dir), cfg.data.max_length)
        out_path = Path(args.out or f"{path.stem}-predicted.csv")
        skipped = f"; skipped {len(bad)} bad row(s), the first {path}:{bad[0][0]}: {bad[0][2]}" if bad else ""
        print(f"predict: {len(rows)} {task} rows of {path} with {choice.uri}, on {device} ({why}){skipped}")
        progress = Progress(f"predict {task}", total=len(rows), unit="row")
        start = time.time()
        with open(out_path, "w", encoding="utf-8", newline="") as f:
            f.write(HEADERS[task])
            for first in range(0, len(rows), CHUNK_ROWS):
                chunk = rows[first:first + CHUNK_ROWS]
                columns = {}
                for i, column in enumerate(SENTENCE_COLUMNS[task]):
                    encodings = tokenizer.encode_batch([r[2][i] for r in chunk])
                    columns["input_ids" if task == "sst" else f"input_ids_{i + 1}"] = _flat(encodings)
                split = Split(np.array([r[1] for r in chunk]), columns, None, str(path))
                # evaluate's batches: length-sorted, longest first, train.eval_batch_size rows each
                preds, _ = predict_with_scores(model, task, split, cfg.train.eval_batch_size, device, precision)
                f.writelines(f"{r[1]} , {format_prediction(task, p)} \n" for r, p in zip(chunk, preds))
                done = first + len(chunk)
                progress.update(done, f"{done / max(time.time() - start, 1e-9):.0f} rows/s")
        progress.close()
    seconds = time.time() - start
    print(f"predict: {len(rows)} rows in {seconds:.1f} s ({len(rows) / max(seconds, 1e-9):.0f} rows/s) -> {out_path}")
    return 0


def _read_rows(path: Path, task: str, drop: bool) -> tuple[list, list]:
    """data_prep's (rows, bad rows) of FILE: rows (line, id, sentences, label), bad (line, id, why);
    without `drop` a bad row is an error naming its line. A label column, if any, is not read."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return read_file(path, task, is_test=True, drop=drop, config_key="FILE", ignore_labels=True)


def _flat(encodings) -> tuple:
    """Token ids of each encoding as (flat int32 values, int64 row offsets): a Split column."""
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    offsets = np.zeros(len(encodings) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(offsets[-1]))
    return values, offsets
