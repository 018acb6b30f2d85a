"""End to end: an extra evaluation set and a replacement STS train file of the user's own, in
another layout (named columns in another order, similarity on 1..5), through the real smoke DAG
(`run --smoke`, then `ablate --smoke` from the cache) on a local Ray and a sqlite MLflow store;
their metrics are found in MLflow and as a column of `report`."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from tests.conftest import children_of, mlflow_runs, run_pipeline, write_experiment

pytestmark = pytest.mark.integration  # every test here runs a CLI subprocess, Ray or a server

SICK_HEADER = "relatedness_score\tsentence_B\tpair_ID\tsentence_A\n"
DATA = """  extra_eval:
    - name: sick
      file: sick-dev.tsv              # relative to exp.yaml's folder
      task: sts
      columns: {id: pair_ID, sentence1: sentence_A, sentence2: sentence_B, label: relatedness_score}
      scale: [1, 5]
  train_files:
    sts:
      file: my-sts-train.tsv
      columns: {id: pair_ID, sentence1: sentence_A, sentence2: sentence_B, label: relatedness_score}
      scale: [1, 5]
"""


def sick_style(source: Path, target: Path) -> dict[str, float]:
    """source (CS224N sts) as a SICK-style TSV: named columns in another order, each score x as
    x * 0.8 + 1 (0..5 -> 1..5). Returns {id: the original 0..5 score}."""
    scores, lines = {}, [SICK_HEADER]
    for line in source.read_text().splitlines()[1:]:
        _, row_id, sentence1, sentence2, score = line.split("\t")
        scores[row_id] = float(score)
        lines.append(f"{float(score) * 0.8 + 1:.2f}\t{sentence2}\t{row_id}\t{sentence1}\n")
    target.write_text("".join(lines))
    return scores


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared_data_dir):
    work = tmp_path_factory.mktemp("extra-datasets")
    dev_scores = sick_style(shared_data_dir / "sts-dev.csv", work / "sick-dev.tsv")
    train_scores = sick_style(shared_data_dir / "sts-train.csv", work / "my-sts-train.tsv")
    write_experiment(work, "extra-datasets", data_dir=shared_data_dir, data=DATA)
    (work / "grid.yaml").write_text("# one variant: the table's row\nvariants:\n  baseline: {}\n")
    proc = run_pipeline(work, "run", "exp.yaml", "--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc, dev_scores, train_scores


def test_data_prep_reads_both_files_in_their_layout_onto_0_to_5(workdir):
    work, _, dev_scores, train_scores = workdir
    (manifest_path,) = (work / "artifacts" / "data_prep").glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["extra_eval"]["sick"]["source"] == str(work / "sick-dev.tsv")
    assert manifest["extra_eval"]["sick"]["rows"] == 64  # the smoke run's data.max_rows
    assert manifest["splits"]["sts-train"]["source"] == str(work / "my-sts-train.tsv")
    for name, scores in (("eval-sick", dev_scores), ("sts-train", train_scores)):
        with pa.memory_map(str(manifest_path.parent / f"{name}.arrow")) as source:
            table = pa.ipc.open_file(source).read_all()
        labels = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
        assert len(labels) == 64
        for row_id, label in labels.items():  # (x * 0.8 + 1 - 1) / 4 * 5 = x, to the file's 2 decimals
            assert label == pytest.approx(scores[row_id], abs=0.01)


def test_the_extra_sets_metrics_are_in_mlflow(workdir):
    work, proc, _, _ = workdir
    _, runs = mlflow_runs(work, "extra-datasets")
    parent = next(r for r in runs if r.data.tags.get("stage") == "pipeline")
    stages = children_of(runs, parent)
    evaluate = stages["evaluate"].data.metrics
    assert -1 <= evaluate["eval/sick/pearson"] <= 1 and -1 <= evaluate["eval/sick/spearman"] <= 1
    assert parent.data.metrics["eval/sick/pearson"] == evaluate["eval/sick/pearson"]
    # The set is sts-dev's first rows in another layout and scale: scored as sts-dev is.
    assert evaluate["eval/sick/pearson"] == pytest.approx(evaluate["dev/sts_corr"], abs=1e-3)
    assert stages["data_prep"].data.metrics["data/eval_sick_rows"] == 64
    assert f"eval/sick/pearson {evaluate['eval/sick/pearson']:.4f}" in proc.stdout
    (predictions,) = (work / "artifacts" / "evaluate").glob("*/extra_eval/sick-output.csv")
    assert len(predictions.read_text().splitlines()) == 1 + 64


def test_report_has_a_column_for_the_extra_set(workdir):
    work, _, _, _ = workdir
    proc = run_pipeline(work, "ablate", "exp.yaml", "--grid", "grid.yaml", "--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = mlflow_runs(work, "extra-datasets")
    ablation = next(r for r in runs if r.data.tags.get("stage") == "ablation")
    variant = next(r for r in runs if r.data.tags.get("stage") == "variant")
    pearson = variant.data.metrics["eval/sick/pearson"]

    report = run_pipeline(work, "report", ablation.info.run_id, "exp.yaml")
    assert report.returncode == 0, report.stderr[-3000:]
    lines = [line for line in report.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    column = header.index("sick/pearson")
    cells = {line.strip("|").split("|")[0].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert cells["baseline"][column] == f"{pearson:.4f}"
    untrained = next(r for r in runs if r.data.tags.get("stage") == "reference").data.metrics["eval/sick/pearson"]
    assert cells["untrained"][column] == f"{untrained:.4f}"  # the backbone's cosine, untrained
