"""Faults in the middle of a run, with real processes: a tracking server killed (its whole
process group) mid-stage, outputs damaged in the cache, a disk that fills up mid-finetune.

Nothing here is mocked: `python -m pipeline run --smoke` in a subprocess on a local Ray, a real
`mlflow server`, files truncated or deleted on disk, a real tmpfs filled to the last byte.
"""

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipeline.lifecycle import UNSENT_STATUS
from tests.conftest import MlflowServer, children_of, mlflow_runs
from tests.pipeline.test_reliability import finish, make_workdir, start_cli, wait_for

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
