"""Checking a CS224N submission zip against the data it answers; pure (files in, a report out).

Every test file the config names must be there (a test file the config does not name, like
the Quora test file that does not exist here, is reported as not writable, never invented),
with the starter's exact header and " , "-separated lines, one row per id of the test file
(with data.max_rows: of data_prep's capped split), every id once, every value in range:
sst an integer 0..4, para 0.0 or 1.0, sts a 4-decimal number in [0, 5]. Dev files the same,
against data_prep's dev splits (bad rows dropped, Quora dev carved).
"""

from __future__ import annotations

import json
import math
import zipfile
from collections import Counter
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.constants import TASKS

TEST_KEYS = {"sst": "sst_test", "para": "quora_test", "sts": "sts_test"}
DEV_KEYS = {"sst": "sst_dev", "para": "quora_dev", "sts": "sts_dev"}
SHOWN = 5  # ids listed per kind of problem; the counts are always complete


def validate_submission(zip_path: Path, cfg: PipelineConfig, data_dir: Path) -> dict:
    """Check a submission zip against the data it answers.

    Every test file the config names must be there (a test file the config does not name, like
    the Quora test file that does not exist here, is reported as not writable, never invented),
    with the starter's exact header and " , "-separated lines, one row per id of the test file
    (with data.max_rows: of data_prep's capped split), every id once, every value in range:
    sst an integer 0..4, para 0.0 or 1.0, sts a 4-decimal number in [0, 5]. Dev files the same,
    against data_prep's dev splits (bad rows dropped, Quora dev carved). Returns a report:
    {"ok", "problems", "notes", "files": {file name: {...}}}.
    """
    from stages.evaluate import HEADERS

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    report = {"ok": False, "zip": str(zip_path), "problems": [], "notes": [], "files": {}}
    problems, notes = report["problems"], report["notes"]
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        problems.append(f"{zip_path}: not a readable zip ({e})")
        return report
    with archive:
        broken = archive.testzip()
        if broken:
            problems.append(f"{zip_path}: {broken} is corrupt")
        members = set(archive.namelist())
        expected_members = set()
        if cfg.data.max_rows is not None:
            notes.append(f"data.max_rows = {cfg.data.max_rows} caps every split: a smoke-sized submission "
                         f"(the first rows of each file), not a full one")
        for task in TASKS:
            for split in ("dev", "test"):
                name = f"{task}-{split}-output.csv"
                member = f"predictions/{name}"
                expected, source, reason = _expected_ids(cfg, task, split, manifest, Path(data_dir))
                if expected is None:
                    report["files"][name] = {"status": "not written", "reason": reason}
                    notes.append(f"{name}: not written: {reason}")
                    if member in members:
                        problems.append(f"{name}: in the zip, but {reason}: its rows cannot be real")
                    continue
                expected_members.add(member)
                if member not in members:
                    report["files"][name] = {"status": "missing", "expected_rows": len(expected), "source": source}
                    problems.append(f"{name}: missing from the zip ({len(expected)} rows expected for {source})")
                    continue
                info = _check_file(name, task, archive.read(member), expected, source, HEADERS[task])
                report["files"][name] = info
                problems.extend(f"{name}: {p}" for p in info["problems"])
        not_written = {f"predictions/{n}" for n, info in report["files"].items() if info["status"] == "not written"}
        for extra in sorted(members - expected_members - not_written):  # not_written ones are reported above
            problems.append(f"{extra}: unexpected file in the zip")
    report["ok"] = not problems
    return report


def _expected_ids(cfg, task: str, split: str, manifest: dict, data_dir: Path):
    """(expected ids, where they come from, None) or (None, None, why the file cannot exist)."""
    key = (TEST_KEYS if split == "test" else DEV_KEYS)[task]
    file_name = getattr(cfg.data, key)
    if file_name is None:
        what = "Quora" if task == "para" else task
        return None, None, f"data.{key} is null (no {what} {split} file), so there is nothing to predict"
    entry = manifest.get("splits", {}).get(f"{task}-{split}")
    prepared = _split_ids(data_dir / entry.get("file", f"{task}-{split}.arrow")) if entry else None
    if split == "dev" or cfg.data.max_rows is not None:
        if prepared is None:
            return None, None, f"data_prep wrote no {task}-{split} split ({data_dir / 'manifest.json'})"
        source = f"data_prep's {task}-{split} split ({entry.get('source', '?')})"
        if split == "test":  # capped: data_prep's rows, each of which must be a real test id
            raw = {i for i, _ in read_ids(Path(cfg.data.dir) / file_name)}
            unknown = [i for i in prepared if i not in raw]
            if unknown:
                raise ValueError(f"data_prep's {task}-test split has ids not in {file_name}: {unknown[:SHOWN]}")
        return prepared, source, None
    path = Path(cfg.data.dir) / file_name
    return [i for i, _ in read_ids(path)], str(path), None


def _check_file(name: str, task: str, raw: bytes, expected: list[str], source: str, header: str) -> dict:
    from stages.evaluate import format_prediction

    problems = []
    info = {"status": "ok", "source": source, "expected_rows": len(expected), "problems": problems}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(f"not UTF-8 ({e})")
        info["status"] = "invalid"
        return info
    if "\r" in text:
        problems.append("has \\r line ends; the starter writes \\n")
    if not text.endswith("\n"):
        problems.append("does not end with a newline")
    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    first = lines[0] + "\n" if lines else ""
    if first != header:
        problems.append(f"line 1: header {first!r}, the starter's is {header!r}")
    ids, bad_lines, bad_values = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split(" , ")
        if len(parts) != 2 or not line.endswith(" ") or not parts[0]:
            bad_lines.append(number)
            continue
        row_id, value = parts[0], parts[1][:-1]
        ids.append(row_id)
        if _bad_value(task, value, format_prediction):
            bad_values.append(f"line {number}: {value!r}")
    info["rows"] = len(lines) - 1
    if bad_lines:
        problems.append(f"{len(bad_lines)} lines not in the form 'id , value ' (lines {bad_lines[:SHOWN]})")
    if bad_values:
        problems.append(f"{len(bad_values)} values out of range for {task} ({'; '.join(bad_values[:SHOWN])})")
    counts = Counter(ids)
    duplicates = [i for i, n in counts.items() if n > 1]
    wanted = set(expected)
    missing = [i for i in expected if i not in counts]
    unknown = [i for i in counts if i not in wanted]
    if duplicates:
        problems.append(f"{len(duplicates)} ids appear more than once ({duplicates[:SHOWN]})")
    if missing:
        problems.append(f"{len(missing)} ids of {source} have no prediction ({missing[:SHOWN]})")
    if unknown:
        problems.append(f"{len(unknown)} ids are not in {source} ({unknown[:SHOWN]})")
    if info["rows"] != len(expected):
        problems.append(f"{info['rows']} rows, {source} has {len(expected)} ids")
    if problems:
        info["status"] = "invalid"
    return info


def _bad_value(task: str, value: str, format_prediction) -> bool:
    """True unless `value` is exactly how the starter prints a prediction in range."""
    try:
        if task == "sst":
            return not (value.isdigit() and 0 <= int(value) <= 4 and format_prediction(task, int(value)) == value)
        if task == "para":
            return value not in ("0.0", "1.0")
        number = float(value)
        return not (math.isfinite(number) and 0.0 <= number <= 5.0 and format_prediction(task, number) == value)
    except ValueError:
        return True


def read_ids(path: Path) -> list[tuple[str, int]]:
    """(id, line number) of every record of a CS224N tab-separated file, found by the `id` header
    column, read the way data_prep reads (one physical line a record, no quoting)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    lines = path.read_text(encoding="utf-8").split("\n")
    columns = [c.strip() for c in lines[0].rstrip("\r").split("\t")]
    if "id" not in columns:
        raise ValueError(f"{path}:1: no 'id' column in the header (columns: {columns})")
    at = columns.index("id")
    out = []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if at >= len(fields) or not fields[at].strip():
            raise ValueError(f"{path}:{number}: no id")
        out.append((fields[at].strip(), number))
    return out


def _split_ids(path: Path) -> list[str]:
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        return [str(i) for i in pa.ipc.open_file(source).read_all().column("id").to_pylist()]
