"""The run lifecycle every verb shares: the override order, where runs are logged, how every
run ends, and stale runs of a killed driver. One test per way the verbs could drift apart.

The unit tests use a real sqlite MLflow store and real (dead and living) processes; the CLI
tests run `python -m pipeline VERB` for each verb and look at what it left in MLflow.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import lifecycle, tracking
from pipeline.config import SMOKE_OVERRIDES, TrackingConfig, load_config
from pipeline.constants import DRIVER_HOST_TAG, DRIVER_PID_TAG, DRIVER_START_TAG, ERROR_TAG
from pipeline.prepare import prepare
from tests.conftest import REPO, mlflow_runs, run_pipeline, write_experiment

SPACE = REPO / "search_spaces" / "loss_and_sampling.yaml"
GRID = "# a one-variant grid\nvariants:\n  baseline: {}\n"


def closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def verb_args(verb: str, work: Path) -> list[str]:
    """The shortest real command line of each verb that logs runs, on `work/exp.yaml`."""
    (work / "grid.yaml").write_text(GRID)
    return {"run": ["run", "exp.yaml", "--smoke"],
            "ablate": ["ablate", "exp.yaml", "--grid", "grid.yaml", "--smoke"],
            "tune": ["tune", "exp.yaml", "--space", str(SPACE), "--smoke", "--trials", "1", "--name", "t"],
            "leaderboard": ["leaderboard", "exp.yaml", "--smoke"]}[verb]


# ---------------------------------------------------------------- the override order


def test_set_has_the_last_word_over_the_variant_and_smoke(tmp_path):
    """variant -> --set -> smoke -> --set -> paths, in every verb: smoke must not win over --set."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("variants:\n  baseline: {}\n  fast: {train.lr: 0.5, train.epochs: 7}\n")
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  lr: 0.25\ndata:\n  dir: data\n")
    prepared = prepare(config, ["train.epochs=3", "train.batch_size=4"], smoke=True, variant=f"{grid}:fast")
    cfg = prepared.cfg
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 4  # --set over the variant and over smoke
    assert cfg.train.lr == SMOKE_OVERRIDES["train.lr"]  # smoke over the variant (no --set for it)
    assert cfg.data.max_rows == SMOKE_OVERRIDES["data.max_rows"]
    assert cfg.data.dir == str(tmp_path / "data")  # paths last, relative to the config
    assert prepared.ablation == "fast" and prepared.store_location == str(tmp_path / "artifacts")
    plain = prepare(config, [], smoke=False, variant=f"{grid}:fast").cfg
    assert plain.train.lr == 0.5 and plain.train.epochs == 7  # the variant over the file
    assert load_config(config).train.lr == 0.25


# ---------------------------------------------------------------- how runs end


def test_leaving_the_block_ends_every_open_run(tmp_path):
    uri = tracking.local_uri(tmp_path)
    with lifecycle.opened_runs(uri, TrackingConfig(experiment="ends"), tmp_path) as runs:
        parent = runs.start("parent", {"stage": "pipeline"})
        child = runs.start("child", {"stage": "finetune"}, parent=parent)
    with pytest.raises(RuntimeError, match="boom"):
        with lifecycle.opened_runs(uri, TrackingConfig(experiment="ends"), tmp_path) as runs:
            failed_parent = runs.start("parent", {"stage": "pipeline"})
            tagged = runs.start("child", {"stage": "finetune"}, parent=failed_parent)
            tracking.set_tags(uri, tagged, {ERROR_TAG: "the stage's own traceback"})
            runs.start("child2", {"stage": "evaluate"}, parent=failed_parent)
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with lifecycle.opened_runs(uri, TrackingConfig(experiment="ends"), tmp_path) as runs:
            killed = runs.start("parent", {"stage": "pipeline"})
            raise KeyboardInterrupt
    client, all_runs = mlflow_runs(uri, "ends")
    by_id = {r.info.run_id: r for r in all_runs}
    assert by_id[parent].info.status == by_id[child].info.status == "FINISHED"
    assert by_id[failed_parent].info.status == "FAILED"
    assert by_id[failed_parent].data.tags[ERROR_TAG] == "RuntimeError: boom"
    assert by_id[tagged].data.tags[ERROR_TAG] == "the stage's own traceback"  # not overwritten
    assert by_id[killed].info.status == "KILLED" and "interrupted" in by_id[killed].data.tags[ERROR_TAG]
    assert {r.data.tags[DRIVER_PID_TAG] for r in all_runs} == {str(os.getpid())}
    assert "RUNNING" not in {r.info.status for r in all_runs}


def test_stale_runs_are_those_whose_driver_on_this_host_is_gone(tmp_path):
    uri = tracking.local_uri(tmp_path)
    experiment_id = tracking.ensure_experiment(uri, "stale")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a real process that has ended: its pid names nobody (or somebody started later)
    me = lifecycle.driver_tags()
    cases = {
        "dead driver": {**me, DRIVER_PID_TAG: str(dead.pid)},
        "pid reused by a later process": {**me, DRIVER_START_TAG: str(int(me[DRIVER_START_TAG]) - 1)},
        "living driver": me,
        "another host": {**me, DRIVER_PID_TAG: str(dead.pid), DRIVER_HOST_TAG: "some-other-host"},
        "no driver tags (older runs)": {},
    }
    ids = {name: tracking.start_run(uri, experiment_id, name, tags) for name, tags in cases.items()}
    stale = lifecycle.mark_stale_runs(uri, experiment_id)
    assert sorted(stale) == sorted([ids["dead driver"], ids["pid reused by a later process"]])
    client, all_runs = mlflow_runs(uri, "stale")
    status = {r.info.run_name: r.info.status for r in all_runs}
    assert status == {"dead driver": "KILLED", "pid reused by a later process": "KILLED", "living driver": "RUNNING",
                      "another host": "RUNNING", "no driver tags (older runs)": "RUNNING"}
    killed = client.get_run(ids["dead driver"])
    assert killed.data.tags["stale"] == "true" and f"pid {dead.pid}" in killed.data.tags[ERROR_TAG]
    assert lifecycle.mark_stale_runs(uri, experiment_id) == []  # once is enough


# ---------------------------------------------------------------- every verb, the same way


@pytest.mark.integration
@pytest.mark.parametrize("verb", ["run", "ablate", "tune", "leaderboard"])
def test_every_verb_stops_before_anything_when_mlflow_is_unreachable(verb, tmp_path, shared_data_dir):
    """Every verb that logs honours tracking.on_unreachable, tune and leaderboard included."""
    port = closed_port()
    write_experiment(tmp_path, "down", f"  uri: http://127.0.0.1:{port}\n", shared_data_dir)
    proc = run_pipeline(tmp_path, *verb_args(verb, tmp_path), timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"MLflow tracking server at http://127.0.0.1:{port} is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    made = {p.name for p in (tmp_path / "artifacts").iterdir()} if (tmp_path / "artifacts").exists() else set()
    assert made <= {"smoke-tiny-bert"}  # no stage output, no search folder


@pytest.mark.integration
def test_with_on_unreachable_local_the_leaderboard_logs_locally(tmp_path, shared_data_dir):
    write_experiment(tmp_path, "down", f"  uri: http://127.0.0.1:{closed_port()}\n  on_unreachable: local\n",
                     shared_data_dir)
    proc = run_pipeline(tmp_path, "leaderboard", "exp.yaml", "--model", str(tmp_path / "no-such-model"))
    assert proc.returncode == 1 and "not a folder, and not an MLflow URI" in proc.stderr
    assert "so this run logs to sqlite:///" in proc.stderr
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()


@pytest.mark.integration
@pytest.mark.parametrize("verb", ["run", "ablate", "tune"])
def test_a_failure_after_the_runs_open_leaves_none_running(verb, tmp_path, shared_data_dir):
    """Ray cannot start (its temp dir is a file) once the parent run is open: an error no verb
    expects. Its parent run must not stay RUNNING: tune starts Ray inside the block that ends it."""
    write_experiment(tmp_path, "noray", data_dir=shared_data_dir)
    (tmp_path / "not-a-dir").write_text("")
    proc = run_pipeline(tmp_path, *verb_args(verb, tmp_path), timeout=300, RAY_TMPDIR=str(tmp_path / "not-a-dir"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "NotADirectoryError" in proc.stderr
    _, all_runs = mlflow_runs(tmp_path, "noray")
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert parents[0].data.tags[ERROR_TAG].startswith("NotADirectoryError: ")
    assert len(all_runs) > 1 and "RUNNING" not in {r.info.status for r in all_runs}
