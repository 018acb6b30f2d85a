"""Faults in the middle of a run, with real processes: a tracking server killed (its whole
process group) mid-stage, outputs damaged in the cache, a disk that fills up mid-finetune.

Nothing here is mocked: `python -m pipeline run --smoke` in a subprocess on a local Ray, a real
`mlflow server`, files truncated or deleted on disk, a real tmpfs filled to the last byte.
"""

import json
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.lifecycle import UNSENT_STATUS
from tests.conftest import MlflowServer, children_of, mlflow_runs
from tests.pipeline.test_reliability import finish, make_workdir, start_cli, wait_for

pytestmark = pytest.mark.integration  # every test here runs a CLI subprocess, Ray or a server

# finetune long enough (3 epochs of 60 steps on the tiny model) that a kill lands inside it
LONG_FINETUNE = ["--set", "train.epochs=3", "--set", "train.steps_per_epoch=60", "--set", "train.checkpoint_every=20"]
STAGES = ("data_prep", "finetune", "evaluate")


def _finished_output(work: Path, stage: str) -> Path:
    done = list((work / "artifacts" / stage).glob("*/_SUCCESS"))
    assert len(done) == 1, done
    return done[0].parent


# ---------------------------------------------------------------- a tracking server that dies


@pytest.mark.parametrize("killed_in", ["finetune", "evaluate"])
def test_tracking_server_killed_mid_stage_the_work_finishes_and_the_next_run_records_it(
        killed_in, tmp_path, shared_data_dir):
    server = MlflowServer(tmp_path / "server").start()
    work = make_workdir(tmp_path, "work", shared_data_dir, f"  uri: {server.url}\n  retry_seconds: 5\n")
    try:
        proc = start_cli(work, *LONG_FINETUNE)
        # Kill it once the stage is under way: a finetune checkpoint, or evaluate's scratch folder.
        wait_for("finetune/.*.partial/checkpoint/*" if killed_in == "finetune" else "evaluate/.*.partial",
                 work / "artifacts", proc)
        server.kill()
        done = finish(proc, timeout=400)
        ended = time.time()

        # The work is done and published; only the record is pending, said in one line, exit 4.
        assert done.returncode == UNSENT_STATUS, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        for stage in STAGES:
            _finished_output(work, stage)
        last_stage_done = (_finished_output(work, "evaluate") / "_SUCCESS").stat().st_mtime
        assert ended - last_stage_done < 60, f"{ended - last_stage_done:.0f} s from the last stage to the exit"
        line = next(x for x in done.stderr.splitlines() if x.startswith("MLflow did not answer from "))
        assert "not recorded, kept in " in line and line.endswith("or now: python -m pipeline sync")
        kept = list((work / "mlruns" / "unsent").glob("*.jsonl"))
        assert len(kept) == 1 and kept[0].read_text().count("\n") > 0

        # Back up: the next run of the same config sends what was kept, then records its own.
        server.start()
        again = finish(start_cli(work, *LONG_FINETUNE))
        assert again.returncode == 0, again.stderr[-3000:]
        assert "MLflow: sent " in again.stderr and "kept by an earlier command" in again.stderr
        assert not list((work / "mlruns" / "unsent").glob("*.jsonl"))
        client, runs = mlflow_runs(server.url, "reliability")
        parents = sorted((r for r in runs if r.data.tags.get("stage") == "pipeline"), key=lambda r: r.info.start_time)
        first_finetune = children_of(runs, parents[0])["finetune"]
        epochs = client.get_metric_history(first_finetune.info.run_id, "train/loss_sst")
    finally:
        server.kill()
    metrics = json.loads((_finished_output(work, "evaluate") / "result.json").read_text())["metrics"]
    assert len(parents) == 2
    for parent in parents:  # the first run, completed from what it kept, and the cached re-run
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["dev/overall"] == metrics["dev/overall"]
        stages = children_of(runs, parent)
        assert sorted(stages) == sorted(STAGES)
        assert all(r.info.status == "FINISHED" for r in stages.values())
        for name in ("dev/sst_acc", "dev/para_acc", "dev/sts_corr", "dev/overall"):
            assert stages["evaluate"].data.metrics[name] == metrics[name]
    # Every finetune epoch of the first run reached its run: logged before the kill, or kept and sent.
    assert sorted(m.step for m in epochs) == [1, 2, 3]
    assert children_of(runs, parents[1])["finetune"].data.tags["cache_hit"] == "True"


# ---------------------------------------------------------------- a cache damaged on disk


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_data_dir):
    """A workdir holding one finished smoke run (local sqlite MLflow store)."""
    work = make_workdir(tmp_path_factory.mktemp("damaged"), "work", shared_data_dir)
    done = finish(start_cli(work))
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def _plan(work: Path) -> dict:
    """{stage: (cached, forced)} of the plan a `run exp.yaml --smoke` would make now."""
    from pipeline import dag
    from pipeline.prepare import prepare
    from pipeline.store import ArtifactStore

    prepared = prepare(work / "exp.yaml", [], smoke=True)
    return {p.stage.name: (p.cached, p.forced) for p in dag.plan(prepared.cfg, ArtifactStore(prepared.store_location))}


@pytest.mark.parametrize("damage, file, rerun", [
    ("truncated", "data_prep/*/sst-train.arrow", STAGES),
    ("truncated", "finetune/*/model/model.safetensors", ("finetune", "evaluate")),
    ("deleted", "evaluate/*/predictions/sts-dev-output.csv", ("evaluate",)),
    ("same size, other bytes", "finetune/*/model/heads.safetensors", ("finetune", "evaluate")),
])
def test_a_damaged_cached_output_is_named_and_its_stage_runs_again(finished, damage, file, rerun, capsys):
    path = next((finished / "artifacts").glob(file))
    original = path.read_bytes()
    assert all(cached for cached, _ in _plan(finished).values())
    try:
        if damage == "truncated":
            path.write_bytes(original[:100])
        elif damage == "deleted":
            path.unlink()
        else:
            path.write_bytes(original[:-8] + bytes(255 - b for b in original[-8:]))
        plan = _plan(finished)
        printed = capsys.readouterr().out
    finally:
        path.write_bytes(original)
    assert {name for name, (cached, _) in plan.items() if not cached} == set(rerun)
    assert all(forced for name, (_, forced) in plan.items() if name in rerun)  # replaces the damaged output
    expected = {"truncated": f"{path}: 100 bytes, published with {len(original)}",
                "deleted": f"{path}: missing (published with {len(original)} bytes)",
                "same size, other bytes": f"{path}: its content changed after it was published (sha256 differs)"}[damage]
    assert printed == f"cache: {expected}; {rerun[0]} and the stages after it run again\n"


def test_a_run_after_damaged_weights_trains_again_and_predict_refuses_them(finished):
    from pipeline.registry import given_model

    weights = next((finished / "artifacts").glob("finetune/*/model/model.safetensors"))
    scores = json.loads(next((finished / "artifacts").glob("evaluate/*/result.json")).read_text())["metrics"]
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LookupError, match=f"the model is damaged: {weights}: 1000 bytes, published with "):
        given_model("", str(weights.parent), Path("/nonexistent"))

    again = finish(start_cli(finished))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"cache: {weights}: 1000 bytes, published with " in again.stdout
    assert "finetune and the stages after it run again" in again.stdout
    assert weights.stat().st_size > 1000 and given_model("", str(weights.parent), Path("/nonexistent"))
    rerun = json.loads(next((finished / "artifacts").glob("evaluate/*/result.json")).read_text())["metrics"]
    assert all(rerun[k] == scores[k] for k in scores if k.startswith("dev/"))  # same config and seed, same scores
    assert _plan(finished) == {name: (True, False) for name in STAGES}
    assert not list((finished / "artifacts").rglob(".*.partial"))


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs, mounted for the test (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_disk_that_fills_mid_finetune_says_so_and_leaves_no_partial_folder(small_disk, tmp_path, shared_data_dir):
    work = make_workdir(tmp_path, "work", shared_data_dir)
    config = work / "exp.yaml"
    config.write_text(config.read_text() + f"artifacts: {small_disk / 'artifacts'}\n")
    done = finish(start_cli(work, *LONG_FINETUNE))
    assert done.returncode == 1, done.stderr[-3000:]
    line = next(x for x in done.stderr.splitlines() if "no space left on" in x)
    assert line.startswith(f"error: stage finetune failed: pipeline.store.DiskFull: no space left on {small_disk} (tmpfs) writing "
                           f"{small_disk / 'artifacts' / 'finetune'}/")
    assert " free)" in line and "Traceback" not in done.stderr
    assert not list((small_disk / "artifacts").rglob(".*.partial"))  # the half-written folder is gone
    assert list((small_disk / "artifacts").glob("data_prep/*/_SUCCESS"))  # what finished stays
    _, runs = mlflow_runs(work, "reliability")
    status = {r.data.tags["stage"]: r.info.status for r in runs}
    assert status["pipeline"] == status["finetune"] == status["evaluate"] == "FAILED"
    assert status["data_prep"] == "FINISHED"
    assert "no space left on" in next(r for r in runs if r.data.tags["stage"] == "finetune").data.tags["error"]
