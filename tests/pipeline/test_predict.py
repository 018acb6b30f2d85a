"""End to end: `python -m pipeline predict` on a smoke run's model reproduces evaluate's dev
predictions row for row; bad input is one line naming the file and line, exit status 2."""

from pathlib import Path

import pytest

from tests.conftest import run_pipeline

pytestmark = pytest.mark.integration  # every test here runs a CLI subprocess, Ray or a server


@pytest.fixture(scope="module")
def workdir(smoke_run):
    return smoke_run[0]  # the smoke run test_cli.py checks: its model, its evaluate's predictions


def rows(path: Path) -> list[tuple[str, str]]:
    """(id, value) of each line after the header of a starter-format prediction file."""
    return [tuple(line.removesuffix(" ").split(" , ")) for line in path.read_text().splitlines()[1:]]


def predict(work, model, task, file, out):
    return run_pipeline(work, "predict", str(model), "--task", task, str(file), "--out", str(out),
                        "--config", "exp.yaml", "--smoke")


def test_predict_reproduces_evaluates_dev_predictions(workdir, shared_data_dir):
    evaluated = next((workdir / "artifacts" / "evaluate").glob("*/predictions"))
    finetune = next((workdir / "artifacts" / "finetune").glob("*/model")).parent  # a folder holding model/
    # The whole STS dev file (the smoke run evaluated its first 64 rows): every row, in order.
    proc = predict(workdir, finetune, "sts", shared_data_dir / "sts-dev.csv", workdir / "sts.csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "predict: 863 rows in" in proc.stdout and "rows/s" in proc.stdout
    predicted = rows(workdir / "sts.csv")
    assert len(predicted) == 863
    assert (workdir / "sts.csv").read_text().splitlines()[0] == (evaluated / "sts-dev-output.csv").read_text().splitlines()[0]
    source_ids = [line.split("\t")[1] for line in (shared_data_dir / "sts-dev.csv").read_text().splitlines()[1:]]
    assert [i for i, _ in predicted] == source_ids
    by_id = dict(predicted)
    expected = rows(evaluated / "sts-dev-output.csv")
    assert len(expected) == 64 and len({v for _, v in expected}) > 1
    for id_, value in expected:  # batches of other rows: float rounding may move the 4th decimal
        assert float(by_id[id_]) == pytest.approx(float(value), abs=1.01e-4)

    # sst and para (Quora's dev rows that data_prep carved into para-dev): the same classes.
    quora = (shared_data_dir / "quora-dev.csv").read_text().splitlines()
    para_ids = {i for i, _ in rows(evaluated / "para-dev-output.csv")}
    (workdir / "para-dev.csv").write_text("\n".join([quora[0]] + [l for l in quora[1:] if l.split("\t")[1] in para_ids]) + "\n")
    for task, file in (("sst", shared_data_dir / "ids-sst-dev.csv"), ("para", workdir / "para-dev.csv")):
        proc = predict(workdir, finetune / "model", task, file, workdir / f"{task}.csv")
        assert proc.returncode == 0, proc.stderr[-2000:]
        by_id = dict(rows(workdir / f"{task}.csv"))
        assert [(i, by_id[i]) for i, _ in rows(evaluated / f"{task}-dev-output.csv")] == rows(evaluated / f"{task}-dev-output.csv")


def test_bad_input_is_one_line_naming_file_and_line(workdir, tmp_path):
    model = next((workdir / "artifacts" / "finetune").glob("*/model"))
    (tmp_path / "no-column.csv").write_text("id\tsentence1\nab\tone sentence\n")
    proc = predict(workdir, model, "sts", tmp_path / "no-column.csv", tmp_path / "out.csv")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'no-column.csv'}:1: missing required column 'sentence2' (header: ['id', 'sentence1'])"]
    (tmp_path / "latin1.csv").write_bytes(b"id\tsentence\nab\tfine\ncd\tna\xefve\n")
    proc = predict(workdir, model, "sst", tmp_path / "latin1.csv", tmp_path / "out.csv")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'latin1.csv'}:3: not valid UTF-8 (byte 0xef)"
    assert not (tmp_path / "out.csv").exists()
