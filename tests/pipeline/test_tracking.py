"""tracking: a server that stops answering costs one retry budget, and what it did not take is
kept in order, said in one line and sent later. Against a real closed port (connections refused)
and a real sqlite MLflow store; the whole run with a real `mlflow server` killed mid-stage is in
test_faults.py."""

import json
import socket
import time

import pytest

from pipeline import lifecycle, tracking
from tests.conftest import mlflow_runs


@pytest.fixture(autouse=True)
def fresh_tracking_state(monkeypatch):
    # configure() sets MLflow's HTTP retry variables for the process: undone after each test
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    yield
    tracking.configure(15.0)  # the next test's process state: nothing kept, the server not down


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_does_not_answer_costs_one_budget_then_everything_is_kept_in_order(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    tracking.configure(1.0, tmp_path / "unsent")
    start = time.monotonic()
    tracking.log_metrics(uri, "run-a", {"train/loss": 0.5, "skipped": float("nan")}, step=2)
    first = time.monotonic() - start
    start = time.monotonic()
    tracking.set_tags(uri, "run-b", {"attempt": 1})
    tracking.end_run(uri, "run-a", "FINISHED")
    later = time.monotonic() - start
    assert 1.0 <= first < 5.0  # retried for the budget, not MLflow's minutes
    assert later < 0.5  # down: kept at once
    assert tracking.get_tags(uri, "run-a") == {}  # a read it cannot answer: nothing, at once
    [kept] = (tmp_path / "unsent").glob("*.jsonl")
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    assert [(r["op"], r["run_id"]) for r in records] == [("metrics", "run-a"), ("tags", "run-b"), ("end", "run-a")]
    assert records[0]["metrics"] == {"train/loss": 0.5} and records[0]["step"] == 2
    assert records[1]["tags"] == {"attempt": "1"}
    line = tracking.unsent_line()
    assert f"3 record(s) of 2 run(s) not recorded, kept in {kept}" in line
    monkeypatch.setattr(lifecycle, "_on_unreachable", "error")
    assert lifecycle.unsent_outcome() == (line, lifecycle.UNSENT_STATUS)
    monkeypatch.setattr(lifecycle, "_on_unreachable", "local")
    assert lifecycle.unsent_outcome() == (line, 0)

    # Another command while the server is still down: nothing sent, the file kept for later.
    tracking.configure(0.5, tmp_path / "unsent")
    assert tracking.send_unsent(tmp_path / "unsent") == (0, 3, set())
    assert kept.exists() and tracking.unsent_line() is None


def test_kept_records_are_sent_in_order_into_their_runs_and_the_file_goes(tmp_path):
    store = tracking.local_uri(tmp_path)
    experiment = tracking.ensure_experiment(store, "kept")
    run_id = tracking.start_run(store, experiment, "stage", {"stage": "finetune"})
    records = [{"op": "metrics", "uri": store, "run_id": run_id, "metrics": {"train/loss": 0.5}, "step": e,
                "time_ms": 1000 + e} for e in (1, 2)]
    records += [{"op": "tags", "uri": store, "run_id": run_id, "tags": {"cache_hit": "False"}},
                {"op": "metrics", "uri": store, "run_id": "no-such-run", "metrics": {"x": 1.0}, "step": 0, "time_ms": 0},
                {"op": "end", "uri": store, "run_id": run_id, "status": "FINISHED", "time_ms": 5000}]
    folder = tmp_path / "unsent"
    folder.mkdir()
    (folder / "20261204T000000-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tracking.configure(1.0, folder)
    sent, left, runs = tracking.send_unsent(folder)
    assert (sent, left, runs) == (4, 0, {run_id})  # the record of a run the store does not hold is dropped
    assert not list(folder.glob("*.jsonl"))
    client, [run] = mlflow_runs(store, "kept")
    assert run.info.status == "FINISHED" and run.info.end_time == 5000
    assert run.data.tags["cache_hit"] == "False"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(1, 0.5), (2, 0.5)]
