"""End to end: the real CLI, `--smoke`, on a real local Ray and a real MLflow sqlite store."""

import json

import pytest
import torch

from stages.device import resolve_precision
from tests.conftest import local_store, mlflow_runs, run_pipeline

pytestmark = pytest.mark.integration  # every test here runs a CLI subprocess, Ray or a server

STAGES = ["data_prep", "mlm_pretrain", "finetune", "evaluate"]


@pytest.fixture(scope="module")
def workdir(smoke_run):
    return smoke_run[0]


def run_cli(work, *args):
    return run_pipeline(work, "run", "exp.yaml", "--smoke", *args)


@pytest.fixture(scope="module")
def first_run(smoke_run):
    return smoke_run[1]


def test_smoke_run_records_parent_and_stage_runs(workdir, first_run):
    client, runs = mlflow_runs(workdir, "e2e")
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STAGES)
    for run in [parent, *children]:
        assert run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == "0.001"  # the smoke override, same name everywhere
        assert run.data.params["loss.weights.sst"] == "1.0"
        assert len(run.data.tags["git_commit"]) >= 7
    by_stage = {r.data.tags["stage"]: r for r in children}
    evaluate = by_stage["evaluate"].data.metrics
    for name in ("dev/sst_acc", "dev/para_acc", "dev/sts_corr", "dev/overall"):
        assert name in evaluate and name in parent.data.metrics
    expected = (evaluate["dev/sst_acc"] + evaluate["dev/para_acc"] + (evaluate["dev/sts_corr"] + 1) / 2) / 3
    assert evaluate["dev/overall"] == pytest.approx(expected, abs=1e-6)
    history = client.get_metric_history(by_stage["finetune"].info.run_id, "dev/overall")
    assert sorted(m.step for m in history) == [1, 2]  # one point per epoch, numbered from 1
    assert "mlm/heldout_perplexity" in by_stage["mlm_pretrain"].data.metrics
    # what precision: auto resolved to on this machine, beside the setting itself
    resolved, _ = resolve_precision("auto", torch.device("cpu"))
    for stage in ("mlm_pretrain", "finetune", "evaluate"):
        assert by_stage[stage].data.params["precision"] == "auto"
        assert by_stage[stage].data.params["resolved.precision"] == resolved
    assert "finetune: precision: auto, " in first_run.stdout + first_run.stderr
    assert "data/dropped_rows" in by_stage["data_prep"].data.metrics
    artifacts = [a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "predictions")]
    assert "predictions/sst-test-output.csv" in artifacts
    assert "config.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "dev/overall" in first_run.stdout and "mlflow ui --backend-store-uri" in first_run.stdout


def test_evaluate_run_carries_the_error_analysis(workdir, first_run, monkeypatch):
    client, runs = mlflow_runs(workdir, "e2e")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_store(workdir))  # load_table searches the global store
    evaluate = next(r for r in runs if r.data.tags.get("stage") == "evaluate")
    for name in [f"dev/sst_f1_{k}" for k in range(5)] + ["dev/sst_macro_f1", "dev/para_precision", "dev/para_recall",
                                                         "dev/para_f1", "dev/sts_spearman"]:
        assert name in evaluate.data.metrics
    assert sorted(a.path for a in client.list_artifacts(evaluate.info.run_id, "analysis")) == [
        "analysis/analysis.json", "analysis/sst_confusion.png", "analysis/sts_scatter.png",
        "analysis/worst-para.json", "analysis/worst-sst.json", "analysis/worst-sts.json"]
    assert {"path": "analysis/worst-sts.json", "type": "table"} in json.loads(evaluate.data.tags["mlflow.loggedArtifacts"])
    # The worst examples as MLflow tables (the UI's artifact view, and mlflow.load_table): sentences,
    # gold and predicted values.
    table = client.load_table(evaluate.info.experiment_id, "analysis/worst-sts.json", [evaluate.info.run_id])
    assert list(table.columns[:6]) == ["id", "sentence1", "sentence2", "gold", "predicted", "abs_error"]
    assert 0 < len(table) <= 20 and table["sentence1"].str.len().min() > 0
    errors = table["abs_error"].astype(float).tolist()
    assert errors == sorted(errors, reverse=True)
    sst = client.load_table(evaluate.info.experiment_id, "analysis/worst-sst.json", [evaluate.info.run_id])
    assert (sst["gold"] != sst["predicted"]).all()


def test_smoke_run_writes_starter_format_predictions(workdir, first_run):
    predictions = list((workdir / "artifacts" / "evaluate").glob("*/predictions"))
    assert len(predictions) == 1
    headers = {"sst": "id \t Predicted_Sentiment \n", "para": "id \t Predicted_Is_Paraphrase \n",
               "sts": "id \t Predicted_Similiary \n"}
    for task, header in headers.items():
        lines = (predictions[0] / f"{task}-dev-output.csv").read_text().splitlines(keepends=True)
        assert lines[0] == header
        assert len(lines) > 1 and all(" , " in line and line.endswith(" \n") for line in lines[1:])
    assert (predictions[0].parent / "submission.zip").exists()


def test_second_identical_run_skips_every_stage(workdir, first_run):
    proc = run_cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("cached, skipped") == len(STAGES)
    assert "Ray not started" in proc.stdout
    client, runs = mlflow_runs(workdir, "e2e")
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 2
    second = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    assert all(r.data.tags["cache_hit"] == "True" for r in second)
    assert parents[1].data.metrics["dev/overall"] == parents[0].data.metrics["dev/overall"]


def test_bad_override_is_a_clear_error_and_starts_nothing(workdir):
    proc = run_cli(workdir, "--set", "train.lrr=1")
    assert proc.returncode == 2
    assert "unknown key 'train.lrr'" in proc.stderr
