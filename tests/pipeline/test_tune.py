"""End to end: `python -m pipeline tune --smoke` on a real local Ray, Tune, Optuna and MLflow store."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.comparison import comparison
from pipeline.config import PipelineConfig, flatten, load_config
from stages.device import resolve_precision
from tests.conftest import REPO, local_store, mlflow_runs, pipeline_env, run_pipeline, write_experiment

pytestmark = pytest.mark.integration  # every test here runs a CLI subprocess, Ray or a server

SPACE = REPO / "search_spaces" / "loss_and_sampling.yaml"
ASKED = ("loss.weights.sst", "loss.weights.para", "loss.weights.sts", "train.alpha_start", "train.alpha_end",
         "train.lr")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared_data_dir):
    work = tmp_path_factory.mktemp("tune")
    write_experiment(work, "tune-e2e", data_dir=shared_data_dir)
    return work


def run_cli(work, verb, *args):
    return run_pipeline(work, verb, *args)


@pytest.fixture(scope="module")
def search(workdir):
    # --set of a key the smoke settings also set (64): --set must win, as in every verb
    proc = run_cli(workdir, "tune", "exp.yaml", "--space", str(SPACE), "--smoke", "--trials", "2", "--name", "t1",
                   "--set", "train.eval_batch_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_search_is_a_parent_run_with_a_nested_run_per_trial(workdir, search):
    client, runs = mlflow_runs(workdir, "tune-e2e")
    parents = [r for r in runs if r.data.tags.get("stage") == "tune"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    trials = [r for r in runs if r.data.tags.get("stage") == "trial"]
    assert len(trials) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert [r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
            and r.data.tags["stage"] != "trial"] == ["data_prep", "reference"]  # once, for every trial
    # report's table (read back from MLflow as `report` does): the trials and the untrained row
    reference = next(r for r in runs if r.data.tags.get("stage") == "reference")
    _, groups = comparison(local_store(workdir), parent.info.run_id)
    untrained = next(g for g in groups if g.label == "untrained")
    assert len(groups) == 3 and [r.run_id for r in untrained.runs] == [reference.info.run_id]
    assert untrained.mean["dev/sts_corr"] == reference.data.metrics["dev/sts_corr"]
    data_prep = next(r for r in runs if r.data.tags.get("stage") == "data_prep")
    assert data_prep.data.metrics["stage/seconds"] > 0  # recorded like any verb's stage run
    assert data_prep.data.tags["driver_pid"] == parent.data.tags["driver_pid"]

    plain_names = set(flatten(PipelineConfig()))
    records = {json.loads(p.read_text())["trial_id"]: json.loads(p.read_text())
               for p in (workdir / "artifacts" / "tune" / "t1" / "trials").glob("*/trial.json")}
    for run in trials:
        assert run.info.status == "FINISHED"
        # the compare view lines trials up with plain runs; a trial that trained in full also says
        # what precision: auto resolved to
        assert set(run.data.params) - {"resolved.precision"} == plain_names
        if run.data.tags.get("early_stopped") != "true":
            assert run.data.params["resolved.precision"] == resolve_precision("auto", torch.device("cpu"))[0]
        assert run.data.params["train.sampling"] == "annealed"  # the space's fixed values
        assert run.data.params["train.weighted_clip"] == "True"
        assert run.data.params["train.eval_batch_size"] == "32"  # --set, over the smoke value
        assert run.data.tags["driver_pid"] == parent.data.tags["driver_pid"]  # opened in a worker, for the driver
        assert len(run.data.tags["git_commit"]) >= 7 and run.data.tags["ablation"] == "none"
        record = records[run.data.tags["trial_id"]]
        for key, value in record["values"].items():
            assert float(run.data.params[key]) == pytest.approx(value)  # the sampled value is what ran
        assert run.data.params["train.batch_size"] in ("8", "16", "32")
        epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/examples_per_s"))
        result_json, = (workdir / "artifacts" / "tune" / "t1").glob(f"trial_{record['trial_id']}_*/result.json")
        iterations = [json.loads(line)["training_iteration"] for line in result_json.read_text().splitlines()]
        if run.data.tags.get("early_stopped") == "true":  # ASHA cut it at a rung: never evaluated
            assert record["status"] == "early_stopped" and epochs == [1] and "metrics" not in record
            assert iterations == [1]  # cut with its 2nd (last) epoch still to train
        else:
            assert record["status"] == "finished" and epochs == [1, 2, 2]  # per epoch, then the best epoch's
            assert iterations == [1, 2]  # Tune heard epoch 1, then evaluate's score (not epoch 2 apart)
            # the latest dev/overall is evaluate's score of the kept model, logged last
            assert run.data.metrics["dev/overall"] == pytest.approx(record["metrics"]["dev/overall"])
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "dev/overall"))
            assert steps == [1, 2, 2]  # one per epoch, then evaluate's at the last epoch's step
    for key in ASKED:  # continuous draws: two trials never share a value
        assert trials[0].data.params[key] != trials[1].data.params[key], key
    assert "tune: t1: 2 trials" in search.stdout and "best trial:" in search.stdout


def test_best_config_is_ready_to_run_and_its_model_is_registered(workdir, search):
    client, runs = mlflow_runs(workdir, "tune-e2e")
    parent = next(r for r in runs if r.data.tags.get("stage") == "tune")
    best_run = client.get_run(parent.data.tags["best_run_id"])
    assert best_run.data.tags["tune_best"] == "true"
    best_path = workdir / "artifacts" / "tune" / "t1" / "best_config.yaml"
    cfg = load_config(best_path)
    for key in ASKED:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert str(node) == best_run.data.params[key]
    assert cfg.tracking.uri == f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"  # same store, wherever it is run from
    assert "config.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "best_config.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert parent.data.metrics["dev/overall"] == pytest.approx(best_run.data.metrics["dev/overall"])

    versions = client.search_model_versions("name='tune-e2e'")
    assert len(versions) == 1
    assert versions[0].run_id == best_run.info.run_id and versions[0].tags["tune_search"] == "t1"
    model_files = {a.path for a in client.list_artifacts(best_run.info.run_id, "model")}
    assert {"model/config.json", "model/heads.safetensors"} <= model_files
    # only the best trial keeps its weights on disk; the others' were removed after registering
    kept = list((workdir / "artifacts" / "tune" / "t1" / "trials").glob("*/finetune/model"))
    assert [p.parent.parent.name for p in kept] == [best_run.data.tags["trial_id"]]

    proc = run_cli(workdir, "run", str(best_path), "--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data_prep     cached, skipped" in proc.stdout


def test_report_gives_each_trial_its_delta_against_the_best_with_an_interval(workdir, search):
    _, runs = mlflow_runs(workdir, "tune-e2e")
    parent = next(r for r in runs if r.data.tags.get("stage") == "tune")
    proc = run_cli(workdir, "report", parent.info.run_id, "exp.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| trial ")]
    assert len(lines) == 2
    assert lines[0].split("|")[7].strip() == "+0.0000"  # the best (first) against itself: no interval
    records = {json.loads(p.read_text())["trial_id"]: json.loads(p.read_text())
               for p in (workdir / "artifacts" / "tune" / "t1" / "trials").glob("*/trial.json")}
    if all(r["status"] == "finished" for r in records.values()):  # both evaluated: predictions on disk
        assert " [" in lines[1].split("|")[7] and "excludes 0" in proc.stdout
    else:  # one stopped by ASHA before evaluate: said, not invented
        assert "no intervals" in proc.stdout and " [" not in lines[1].split("|")[7]


def test_resume_of_a_finished_search_reruns_no_trial(workdir, search):
    _, before = mlflow_runs(workdir, "tune-e2e")
    proc = run_cli(workdir, "tune", "exp.yaml", "--space", str(SPACE), "--smoke", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming t1" in proc.stdout and "no trial was re-run" in proc.stdout
    client, after = mlflow_runs(workdir, "tune-e2e")
    assert len([r for r in after if r.data.tags.get("stage") == "trial"]) == 2
    assert len(client.search_model_versions("name='tune-e2e'")) == 1


def test_a_bad_space_is_an_error_before_anything_starts(workdir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train.lr: {distribution: loguniform, low: 1.0e-3, high: 1.0e-4}\n")
    proc = run_cli(workdir, "tune", "exp.yaml", "--space", str(bad), "--smoke", "--name", "bad")
    assert proc.returncode == 2
    assert f"{bad}:1: train.lr: low (0.001) must be below high (0.0001)" in proc.stderr
    assert not (workdir / "artifacts" / "tune" / "bad").exists()
    if (workdir / "mlruns" / "mlflow.db").exists():
        _, runs = mlflow_runs(workdir, "tune-e2e")
        assert not [r for r in runs if r.info.run_name == "tune bad"]


def test_an_interrupted_search_resumes_without_redoing_finished_trials(workdir, search):
    # one trial at a time (a trial takes both CPUs), Ctrl-C once the first has finished
    args = ["exp.yaml", "--space", str(SPACE), "--smoke", "--trials", "3", "--name", "r",
            "--set", "stages.finetune.num_cpus=2"]
    env = pipeline_env()
    trials_dir = workdir / "artifacts" / "tune" / "r" / "trials"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "tune", *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not any('"finished"' in p.read_text() for p in trials_dir.glob("*/trial.json")):
            assert proc.poll() is None and time.time() < deadline, "the search ended before a trial finished"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    print(stdout[-3000:], stderr[-3000:])
    assert proc.returncode == 130, stderr[-3000:]
    assert "--resume --name r" in stderr
    done_before = {p.parent.name for p in trials_dir.glob("*/trial.json") if '"finished"' in p.read_text()}
    client, runs = mlflow_runs(workdir, "tune-e2e")
    parent = next(r for r in runs if r.info.run_name == "tune r")
    assert parent.info.status == "KILLED"

    resumed = run_cli(workdir, "tune", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, runs = mlflow_runs(workdir, "tune-e2e")
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.tags["stage"] == "trial"]
    completed = [r.data.tags["trial_id"] for r in children if r.info.status == "FINISHED"]
    assert len(completed) == 3 and len(set(completed)) == 3  # every trial completed exactly once
    for trial_id in done_before:  # and the ones finished before Ctrl-C were not run again
        assert [r.data.tags["trial_id"] for r in children].count(trial_id) == 1
    # a trial cut off by Ctrl-C keeps its run, marked KILLED, and ran again from the start
    assert all(r.data.tags.get("interrupted") == "true" for r in children if r.info.status == "KILLED")
