"""`python -m pipeline leaderboard`: the model it picks, the zip it writes, what validation
catches, and that a second run for the same model and data is a no-op.

Data: the first 20 rows of each real CS224N file (60 of quora-dev, carved); model: a tiny
random-weight BERT fine-tuned for one epoch in this process (no Ray)."""

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli, tracking
from pipeline.config import PipelineConfig, apply_overrides, load_config
from pipeline.leaderboard import check_tokenizer
from pipeline.registry import best_run_model, choose_model, promote_champion
from pipeline.submission import read_ids, validate_submission
from pipeline.store import ArtifactStore
from stages import data_prep, finetune
from tests.conftest import mlflow_runs

ROWS = {"ids-sst-train.csv": 20, "ids-sst-dev.csv": 20, "ids-sst-test-student.csv": 20, "quora-dev.csv": 60,
        "sts-train.csv": 20, "sts-dev.csv": 20, "sts-test-student.csv": 20}


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_data_dir):
    out = tmp_path_factory.mktemp("cs224n-head")
    for name, rows in ROWS.items():
        lines = (shared_data_dir / name).read_text(encoding="utf-8").split("\n")[: rows + 1]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data_dir, tiny_model_dir):
    """finetune's model/ folder, trained one short epoch on the head of the data."""
    import torch

    torch.set_num_threads(1)
    cfg = apply_overrides(PipelineConfig(), {
        "device": "cpu", "data.dir": str(data_dir), "model.dir": str(tiny_model_dir), "data.max_length": 32,
        "data.on_bad_rows": "drop", "train.epochs": 1, "train.batch_size": 8, "train.lr": 1e-3})
    work = tmp_path_factory.mktemp("trained")
    data_prep.run(cfg, {}, work / "prep", quiet)
    finetune.run(cfg, {"data_prep": work / "prep"}, work / "finetune", quiet)
    return work / "finetune" / "model"


@pytest.fixture(scope="module")
def work(tmp_path_factory, data_dir, tiny_model_dir):
    work = tmp_path_factory.mktemp("leaderboard")
    (work / "exp.yaml").write_text(
        f"device: cpu\ndata:\n  dir: {data_dir}\n  max_length: 32\n  on_bad_rows: drop\n"
        f"model:\n  dir: {tiny_model_dir}\nstages:\n  evaluate: {{num_cpus: 1}}\ntracking:\n  experiment: lb\n")
    return work


def boards(work) -> list:
    _, runs = mlflow_runs(work, "lb")
    return [r for r in runs if r.data.tags.get("leaderboard") == "true"]


@pytest.fixture(scope="module")
def submission(work, model_dir):
    status = cli.main(["leaderboard", str(work / "exp.yaml"), "--model", str(model_dir)])
    assert status == 0
    (folder,) = [p for p in (work / "artifacts" / "leaderboard").iterdir() if not p.name.startswith(".")]
    return folder


def test_writes_the_starter_files_zips_validates_and_logs(work, data_dir, submission):
    with zipfile.ZipFile(submission / "submission.zip") as zf:
        names = sorted(zf.namelist())
        sst_test = zf.read("predictions/sst-test-output.csv").decode()
    assert names == [f"predictions/{t}-{s}-output.csv" for t, s in
                     [("para", "dev"), ("sst", "dev"), ("sst", "test"), ("sts", "dev"), ("sts", "test")]]
    lines = sst_test.split("\n")
    assert lines[0] == "id \t Predicted_Sentiment "
    # The test file's ids (third column: that file has two leading unnamed columns), in its order.
    ids = [line.split("\t")[2] for line in (data_dir / "ids-sst-test-student.csv").read_text().split("\n")[1:21]]
    assert [line.split(" , ")[0] for line in lines[1:-1]] == ids and lines[-1] == ""
    assert ids[0] == "b7573736a6ddf7be102b7fee0"
    report = json.loads((submission / "validation.json").read_text())
    assert report["ok"] and report["problems"] == []
    assert report["files"]["para-test-output.csv"]["status"] == "not written"
    assert "data.quora_test is null" in report["files"]["para-test-output.csv"]["reason"]
    assert report["files"]["sts-test-output.csv"]["rows"] == 20

    (run,) = boards(work)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "leaderboard"
    assert run.data.metrics["submission/sst_test_rows"] == 20 and "dev/overall" in run.data.metrics
    client, _ = mlflow_runs(work, "lb")
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"submission.zip", "validation.json", "predictions"} <= logged
    assert run.data.tags["submission_zip"] == str(submission / "submission.zip")


def test_same_model_and_data_again_is_a_no_op_pointing_at_the_first(work, model_dir, submission, capsys):
    first = boards(work)[0]
    assert cli.main(["leaderboard", str(work / "exp.yaml"), "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "already submitted" in out and first.info.run_id in out
    assert len(boards(work)) == 1
    # --force logs again (from the kept output), under the same key.
    assert cli.main(["leaderboard", str(work / "exp.yaml"), "--model", str(model_dir), "--force"]) == 0
    runs = boards(work)
    assert len(runs) == 2 and runs[1].data.tags["submission_key"] == first.data.tags["submission_key"]


def test_a_failing_data_prep_is_one_error_line_with_its_exception_and_exit_status_1(work, model_dir, tmp_path, capsys):
    shutil.copyfile(work / "exp.yaml", tmp_path / "exp.yaml")  # its own store and MLflow: nothing cached
    status = cli.main(["leaderboard", str(tmp_path / "exp.yaml"), "--model", str(model_dir),
                       "--set", "data.sst_test=no-such-file.csv"])
    assert status == 1
    err = capsys.readouterr().err
    assert re.search(r"^error: stage data_prep failed: FileNotFoundError: \S+/no-such-file\.csv: data file not found "
                     r"\(data\.sst_test\)$", err, re.M), err
    _, runs = mlflow_runs(tmp_path, "lb")
    prep = next(r for r in runs if r.data.tags.get("stage") == "data_prep")
    assert prep.info.status == "FAILED" and "Traceback" in prep.data.tags["error"]  # the stage's own, kept
    assert {r.info.status for r in runs} == {"FAILED"}


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of the zip with change(files: {member: text}) applied."""
    with zipfile.ZipFile(src) as zf:
        files = {n: zf.read(n).decode() for n in zf.namelist()}
    change(files)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return dst


def replace_line(files, member, index, new):
    lines = files[member].split("\n")
    lines[index] = new
    files[member] = "\n".join(lines)


@pytest.fixture(scope="module")
def checked(work, submission):
    """validate_submission on a variant of the valid zip: its problems."""
    cfg = load_config(work / "exp.yaml")
    data = next(p for p in (work / "artifacts" / "data_prep").iterdir() if not p.name.startswith("."))

    def check(tmp_path, change) -> list[str]:
        report = validate_submission(rewrite(submission / "submission.zip", tmp_path / "s.zip", change), cfg, data)
        assert report["ok"] == (not report["problems"])
        return report["problems"]

    return check


def test_valid_zip_passes(checked, tmp_path):
    assert checked(tmp_path, lambda files: None) == []


def test_a_missing_row_is_caught(checked, tmp_path):
    def drop_last(files):
        lines = files["predictions/sst-test-output.csv"].split("\n")
        files["predictions/sst-test-output.csv"] = "\n".join(lines[:-2] + [""])  # 19 rows left
    problems = checked(tmp_path, drop_last)
    assert any(p.startswith("sst-test-output.csv: 1 ids of") and "have no prediction" in p for p in problems)
    assert any(p.startswith("sst-test-output.csv: 19 rows,") and "has 20 ids" in p for p in problems)


def test_a_duplicate_id_is_caught(checked, tmp_path):
    def duplicate(files):
        member = "predictions/sts-test-output.csv"
        first_id = files[member].split("\n")[1].split(" , ")[0]
        replace_line(files, member, 2, f"{first_id} , 1.0000 ")
    problems = checked(tmp_path, duplicate)
    assert any("1 ids appear more than once" in p for p in problems)
    assert any("1 ids of" in p and "have no prediction" in p for p in problems)


@pytest.mark.parametrize("member, row", [
    ("predictions/sts-test-output.csv", " , 5.5000 "),  # above 5
    ("predictions/sts-test-output.csv", " , 2.5 "),  # not the starter's 4 decimals
    ("predictions/sst-test-output.csv", " , 5 "),  # classes are 0..4
    ("predictions/para-dev-output.csv", " , 1 "),  # the starter prints 1.0
])
def test_values_out_of_range_or_format_are_caught(checked, tmp_path, member, row):
    def change(files):
        row_id = files[member].split("\n")[1].split(" , ")[0]
        replace_line(files, member, 1, row_id + row)
    problems = checked(tmp_path, change)
    assert len(problems) == 1 and "1 values out of range" in problems[0] and "line 2" in problems[0]


def test_a_wrong_header_a_missing_file_and_an_invented_file_are_caught(checked, tmp_path):
    def change(files):
        replace_line(files, "predictions/sts-dev-output.csv", 0, "id \t Predicted_Similarity ")
        del files["predictions/sst-dev-output.csv"]
        files["predictions/para-test-output.csv"] = "id \t Predicted_Is_Paraphrase \nabc , 1.0 \n"
    problems = checked(tmp_path, change)
    assert any(p.startswith("sts-dev-output.csv: line 1: header") for p in problems)
    assert any(p.startswith("sst-dev-output.csv: missing from the zip") for p in problems)
    assert any(p.startswith("para-test-output.csv: in the zip, but data.quora_test is null") for p in problems)


def test_ids_are_read_by_the_id_column():
    path = Path(__file__).parent / "_ids.csv"
    try:
        path.write_text("0\t\tid\tsentence\n1\t0.0\tabc\t x\n\n2\t1.0\tdef\t y\n")
        assert read_ids(path) == [("abc", 2), ("def", 4)]
        path.write_text("\tident\tsentence\n0\tabc\t x\n")
        with pytest.raises(ValueError, match=r"_ids.csv:1: no 'id' column"):
            read_ids(path)
    finally:
        path.unlink()


def test_champion_alias_moves_only_to_a_better_model(tmp_path, model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment(uri, "champ")
    client = MlflowClient(uri)
    client.create_registered_model("champ")
    versions = []
    for _ in range(3):
        run_id = tracking.start_run(uri, experiment_id, "trial", {"stage": "trial"})
        tracking.log_artifacts(uri, run_id, model_dir, "model")
        versions.append(client.create_model_version("champ", f"runs:/{run_id}/model", run_id=run_id).version)
    assert promote_champion(uri, "champ", versions[0], 0.50)  # no champion yet
    assert not promote_champion(uri, "champ", versions[1], 0.40)  # worse: stays
    assert client.get_model_version_by_alias("champ", "champion").version == versions[0]
    assert promote_champion(uri, "champ", versions[2], 0.60)
    champion = client.get_model_version_by_alias("champ", "champion")
    assert champion.version == versions[2] and champion.tags["dev/overall"] == "0.600000"

    store = ArtifactStore(str(tmp_path / "artifacts"))
    choice = choose_model(uri, "champ", experiment_id, None, False, store, tmp_path / "dl")
    assert (choice.how, choice.uri, choice.score) == ("champion alias", f"models:/champ/{versions[2]}", 0.6)
    assert (choice.folder / "multitask.json").read_bytes() == (model_dir / "multitask.json").read_bytes()
    # A smoke leaderboard never takes the registry's model.
    with pytest.raises(LookupError, match="no model to submit"):
        choose_model(uri, "champ", experiment_id, None, True, store, tmp_path / "dl2")


def test_a_better_finished_run_beats_a_searched_champion_but_not_a_hand_picked_one(tmp_path, model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment(uri, "champ2")
    client = MlflowClient(uri)
    client.create_registered_model("champ2")
    trial = tracking.start_run(uri, experiment_id, "trial", {"stage": "trial"})
    tracking.log_artifacts(uri, trial, model_dir, "model")
    version = client.create_model_version("champ2", f"runs:/{trial}/model", run_id=trial).version
    assert promote_champion(uri, "champ2", version, 0.57)  # a search's winner on a small budget
    store = ArtifactStore(str(tmp_path / "artifacts"))
    # A finished ablation variant (its finetune nested under it) that scored higher.
    variant = tracking.start_run(uri, experiment_id, "concat_pairs", {"stage": "variant", "smoke": False})
    finetune = tracking.start_run(uri, experiment_id, "finetune", {"stage": "finetune", "cache_key": "key-v"},
                                  parent_id=variant)
    tracking.log_metrics(uri, variant, {"dev/overall": 0.64})
    tracking.end_run(uri, finetune)
    tracking.end_run(uri, variant)
    scratch = store.scratch_dir("finetune", "key-v")
    shutil.copytree(model_dir, scratch / "model")
    store.publish("finetune", "key-v", scratch, {})
    choice = choose_model(uri, "champ2", experiment_id, None, False, store, tmp_path / "dl")
    assert (choice.how, choice.run_id, choice.score) == ("best finished run", variant, 0.64)
    # Set by hand (no dev/overall tag on the version): the champion is taken whatever the runs scored.
    client.delete_model_version_tag("champ2", version, "dev/overall")
    choice = choose_model(uri, "champ2", experiment_id, None, False, store, tmp_path / "dl2")
    assert (choice.how, choice.uri) == ("champion alias", f"models:/champ2/{version}")


def test_best_finished_run_by_dev_overall_whose_model_still_exists(tmp_path, model_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment(uri, "best")
    store = ArtifactStore(str(tmp_path / "artifacts"))
    runs = {}
    # (name, dev/overall, smoke, status, model in the store)
    for name, score, smoke, status, kept in [("low", 0.40, False, "FINISHED", True), ("mid", 0.60, False, "FINISHED", True),
                                             ("gone", 0.70, False, "FINISHED", False), ("failed", 0.80, False, "FAILED", True),
                                             ("smoke", 0.90, True, "FINISHED", True)]:
        parent = tracking.start_run(uri, experiment_id, name, {"stage": "pipeline", "smoke": smoke})
        child = tracking.start_run(uri, experiment_id, "finetune", {"stage": "finetune", "cache_key": f"key-{name}"},
                                   parent_id=parent)
        tracking.log_metrics(uri, parent, {"dev/overall": score})
        tracking.end_run(uri, child)
        tracking.end_run(uri, parent, status)
        if kept:
            scratch = store.scratch_dir("finetune", f"key-{name}")
            shutil.copytree(model_dir, scratch / "model")
            store.publish("finetune", f"key-{name}", scratch, {})
        runs[name] = parent
    choice = best_run_model(uri, experiment_id, False, store, tmp_path / "dl")
    assert (choice.run_id, choice.score) == (runs["mid"], 0.60)  # "gone" lost its model, "failed" did not finish
    assert choice.folder == Path(store.path("finetune", "key-mid")) / "model"
    assert best_run_model(uri, experiment_id, True, store, tmp_path / "dl").run_id == runs["smoke"]


def test_a_model_with_another_vocabulary_is_refused(work, submission, model_dir, tmp_path):
    data = next(p for p in (work / "artifacts" / "data_prep").iterdir() if not p.name.startswith("."))
    check_tokenizer(model_dir, data)  # the same tokenizer: fine
    other = tmp_path / "model"
    shutil.copytree(model_dir, other)
    (other / "tokenizer.json").unlink(missing_ok=True)
    (other / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    with pytest.raises(ValueError, match="vocabulary differs"):
        check_tokenizer(other, data)


def test_no_model_anywhere_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text("tracking:\n  experiment: empty\n")
    assert cli.main(["leaderboard", str(tmp_path / "exp.yaml")]) == 1
    assert "no model to submit" in capsys.readouterr().err
    assert cli.main(["leaderboard", str(tmp_path / "exp.yaml"), "--model", str(tmp_path / "nope")]) == 1
    assert "not a folder, and not an MLflow URI" in capsys.readouterr().err
