"""Crashes lose nothing, concurrent runs do not collide, failures are recorded, results repeat.

The store's lock and publish are tested directly; the rest runs the real CLI (`run --smoke`,
a local Ray, an MLflow sqlite store) in subprocesses, killed with SIGKILL where a test says so.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store import ArtifactStore, StageLock
from tests.conftest import children_of, mlflow_runs, pipeline_env, write_experiment

# finetune long enough (2 epochs of 120 steps on the tiny model, a few seconds) that a kill
# lands mid-epoch, with a checkpoint every 20 steps; in bf16 on any host (what `auto` takes where
# the CPU has it), so the kill -9 and resume below check the bf16 path.
LONG_FINETUNE = ["--set", "train.steps_per_epoch=120", "--set", "train.checkpoint_every=20", "--set", "precision=bf16"]
STAGES = ("data_prep", "finetune", "evaluate")


# ---------------------------------------------------------------- helpers


def make_workdir(root: Path, name: str, data_dir: Path, extra: str = "") -> Path:
    write_experiment(root / name, "reliability", extra, data_dir)
    return root / name


def start_cli(work: Path, *args, verb: str = "run") -> subprocess.Popen:
    """`python -m pipeline VERB exp.yaml --smoke ARGS` in its own process group."""
    env = pipeline_env()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", verb, "exp.yaml", "--smoke", *args],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    proc.ray_tmp = env["RAY_TMPDIR"]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        shutil.rmtree(proc.ray_tmp, ignore_errors=True)
    print(out[-3000:], err[-3000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(work: Path, *args) -> subprocess.CompletedProcess:
    return finish(start_cli(work, *args))


def stage_result(work: Path, stage: str) -> dict:
    """The result.json of the one finished output of `stage` in the workdir's store."""
    done = list((work / "artifacts" / stage).glob("*/_SUCCESS"))
    assert len(done) == 1, done
    result = json.loads((done[0].parent / "result.json").read_text())
    # stage/* (peak memory) measures the machine, not the model: not compared between runs.
    result["metrics"] = {k: v for k, v in result["metrics"].items() if not k.startswith("stage/")}
    return result


def dev_metrics(work: Path) -> dict:
    return stage_result(work, "evaluate")["metrics"]


def wait_for(path_glob, root: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(root.glob(path_glob))
        if found:
            return found[0]
        assert proc.poll() is None, f"the run ended before {path_glob} appeared: {finish(proc).stderr[-2000:]}"
        time.sleep(0.05)
    raise AssertionError(f"{path_glob} never appeared under {root}")


def closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(work: Path) -> list[str]:
    """Scratch folders, locks and temp files left in the store."""
    return sorted(str(p.relative_to(work)) for p in (work / "artifacts").rglob(".*"))


# ---------------------------------------------------------------- the store's lock and publish


def _hold_lock_then_die(scratch: str) -> None:
    lock = StageLock(Path(scratch))
    lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)  # no release, no cleanup: like kill -9 mid-stage


def test_lock_is_exclusive_and_a_killed_holder_does_not_block(tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    first = store.claim("finetune", "k1")
    assert first.scratch == tmp_path / "a" / "finetune" / ".k1.partial"
    assert first.acquire(blocking=False)
    assert first.path.read_text() == f"{os.getpid()}\n"
    second = store.claim("finetune", "k1")
    assert not second.acquire(blocking=False)  # held (flock is per open file, so this holds in-process too)
    assert store.claim("finetune", "k2").acquire(blocking=False)  # another key: its own lock
    first.release()
    assert not first.path.exists()  # the holder removes the lock file: nothing left behind
    assert second.acquire(blocking=False)
    second.release()

    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_hold_lock_then_die, args=(str(first.scratch),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert first.path.exists()  # the dead holder's file is still there ...
    third = store.claim("finetune", "k1")
    assert third.acquire(blocking=False)  # ... but the kernel dropped its lock
    third.release()


def test_waiter_on_a_deleted_lock_file_relocks_the_current_one(tmp_path):
    import threading

    holder = StageLock(tmp_path / ".k.partial")
    holder.acquire()
    waiter = StageLock(tmp_path / ".k.partial")
    got = threading.Event()
    thread = threading.Thread(target=lambda: (waiter.acquire(), got.set()))
    thread.start()
    time.sleep(0.3)  # the waiter has opened the lock file and blocks on it
    assert not got.is_set()
    holder.release()  # unlinks that file: the waiter wakes up holding a deleted inode ...
    thread.join(10)
    assert got.is_set()
    # ... sees it, and locks the file now at the path, so a third claimant is kept out.
    assert waiter.path.exists()
    assert os.fstat(waiter._fd).st_ino == os.stat(waiter.path).st_ino
    assert not StageLock(tmp_path / ".k.partial").acquire(blocking=False)
    waiter.release()


def test_forced_publish_replaces_and_a_dead_runs_leftovers_are_not_a_hit(tmp_path):
    store = ArtifactStore(str(tmp_path / "a"))
    old = store.scratch_dir("s", "k")
    (old / "x").write_text("old")
    store.publish("s", "k", old, {"who": "old"})
    new = store.claim("s", "k").scratch
    new.mkdir(parents=True)
    (new / "x").write_text("new")
    store.publish("s", "k", new, {"who": "new"}, replace=True)
    assert store.read_result("s", "k") == {"who": "new"}
    assert (tmp_path / "a" / "s" / "k" / "x").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "a" / "s").iterdir()) == ["k"]  # no .old or .partial left

    dead = tmp_path / "a" / "s" / "k2"
    dead.mkdir()
    (dead / "result.json").write_text("{}")  # a half-published output: no _SUCCESS
    assert not store.is_finished("s", "k2")
    again = store.claim("s", "k2").scratch
    again.mkdir(parents=True)
    store.publish("s", "k2", again, {"who": "finished"})
    assert store.is_finished("s", "k2") and store.read_result("s", "k2") == {"who": "finished"}


# ---------------------------------------------------------------- the real CLI


@pytest.mark.integration
def test_unreachable_tracking_server_stops_before_any_stage(tmp_path, shared_data_dir):
    port = closed_port()
    work = make_workdir(tmp_path, "down", shared_data_dir, f"  uri: http://127.0.0.1:{port}\n")
    start = time.time()
    proc = run_cli(work)
    assert proc.returncode == 3
    assert (f"error: MLflow tracking server at http://127.0.0.1:{port} is unreachable: "
            f"ConnectionRefusedError") in proc.stderr
    assert "set tracking.on_unreachable: local to log to a local store and continue" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (work / "artifacts" / "data_prep").exists()  # no stage ran
    assert time.time() - start < 60  # no long retry loop


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_data_dir):
    """An uninterrupted LONG_FINETUNE smoke run, configured for an unreachable tracking server
    with tracking.on_unreachable: local."""
    work = make_workdir(tmp_path_factory.mktemp("reference"), "ref", shared_data_dir)
    port = closed_port()
    proc = run_cli(work, *LONG_FINETUNE, "--set", f"tracking.uri=http://127.0.0.1:{port}",
                   "--set", "tracking.on_unreachable=local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc, port


@pytest.mark.integration
def test_unreachable_tracking_server_with_local_fallback_keeps_going(reference):
    work, proc, port = reference
    assert "MLflow tracking server unreachable" in proc.stderr
    assert f"so this run logs to sqlite:///{work / 'mlruns' / 'mlflow.db'}" in proc.stderr
    _, runs = mlflow_runs(work, "reliability")
    parent = next(r for r in runs if r.data.tags["stage"] == "pipeline")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tracking.uri"] == f"http://127.0.0.1:{port}"  # what was asked for
    assert parent.data.metrics["dev/overall"] == dev_metrics(work)["dev/overall"]


@pytest.mark.integration
def test_same_config_and_seed_give_identical_dev_metrics(reference):
    work, _, _ = reference
    first = dev_metrics(work)
    history = json.loads((next((work / "artifacts" / "finetune").glob("*/history.json"))).read_text())
    assert len(history) == 2
    proc = run_cli(work, *LONG_FINETUNE, "--force", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("to run") == len(STAGES)
    second = dev_metrics(work)  # the forced re-run replaced every output
    assert set(first) >= {"dev/sst_acc", "dev/para_acc", "dev/sts_corr", "dev/overall"}
    assert second == first
    rerun = json.loads((next((work / "artifacts" / "finetune").glob("*/history.json"))).read_text())
    drop_speed = lambda h: [{k: v for k, v in row.items() if k != "train/examples_per_s"} for row in h]
    assert drop_speed(rerun) == drop_speed(history)


@pytest.mark.integration
def test_kill_9_mid_epoch_then_rerun_resumes_to_the_uninterrupted_metrics(reference, tmp_path, shared_data_dir):
    ref_work, _, _ = reference
    work = make_workdir(tmp_path, "killed", shared_data_dir)
    proc = start_cli(work, *LONG_FINETUNE)
    state = wait_for("artifacts/finetune/.*.partial/checkpoint/state.pt", work, proc)
    worker = int((state.parent.parent.with_name(state.parent.parent.name.replace(".partial", ".lock"))).read_text())
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the local Ray it started
    try:
        os.kill(worker, signal.SIGKILL)  # the stage's Ray worker, if it outlived its raylet
    except ProcessLookupError:
        pass
    proc.wait()
    shutil.rmtree(proc.ray_tmp, ignore_errors=True)
    assert not list((work / "artifacts" / "finetune").glob("*/_SUCCESS"))
    _, runs = mlflow_runs(work, "reliability")
    killed = {r.info.run_id for r in runs}
    assert {r.info.status for r in runs} == {"RUNNING"}  # the driver records its stage runs when all are done
    time.sleep(0.5)

    proc = run_cli(work, *LONG_FINETUNE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The re-run's first act: the dead driver's RUNNING runs are marked KILLED, with why.
    _, runs = mlflow_runs(work, "reliability")
    stale = [r for r in runs if r.info.run_id in killed and r.info.status != "FINISHED"]
    assert stale and all(r.info.status == "KILLED" and r.data.tags["stale"] == "true" for r in stale)
    assert {r.data.tags["stage"] for r in stale} == {"pipeline", "data_prep", "finetune", "evaluate"}
    assert "ended without closing this run" in stale[0].data.tags["error"]
    assert f"marked {len(stale)} run(s) KILLED whose driver process is gone" in proc.stderr
    assert "RUNNING" not in {r.info.status for r in runs}
    assert "finetune: resuming from the checkpoint in" in proc.stdout + proc.stderr
    resumed_at = [line for line in (proc.stdout + proc.stderr).splitlines() if "finetune: resuming from " in line
                  and "at epoch" in line]
    assert resumed_at and "at epoch 1," in resumed_at[0]  # killed mid-epoch 1
    assert "after 0 of its steps" not in resumed_at[0]
    assert dev_metrics(work) == dev_metrics(ref_work)
    ft, ref_ft = stage_result(work, "finetune")["metrics"], stage_result(ref_work, "finetune")["metrics"]
    ft.pop("train/examples_per_s"), ref_ft.pop("train/examples_per_s")
    assert ft == ref_ft
    assert leftovers(work) == []  # the resumed output was published, the checkpoint gone with it
    assert not list((work / "artifacts" / "finetune").glob("*/checkpoint"))


@pytest.mark.integration
def test_sigterm_mid_finetune_ends_the_runs_killed_as_ctrl_c_does(tmp_path, shared_data_dir):
    # kill, `ray job stop` and schedulers send SIGTERM; Ray's own handler would end the runs FAILED
    work = make_workdir(tmp_path, "sigterm", shared_data_dir)
    proc = start_cli(work, *LONG_FINETUNE)
    wait_for("artifacts/finetune/.*.partial/checkpoint/state.pt", work, proc)
    proc.send_signal(signal.SIGTERM)  # the CLI only, as `kill PID` does
    done = finish(proc)
    assert done.returncode == 143, done.stderr[-3000:]
    assert "terminated (SIGTERM); finished stages stay cached" in done.stderr
    _, runs = mlflow_runs(work, "reliability")
    parent = next(r for r in runs if r.data.tags["stage"] == "pipeline")
    children = children_of(runs, parent)
    assert parent.info.status == "KILLED" and parent.data.tags["error"] == "terminated (SIGTERM)"
    assert children["finetune"].info.status == "KILLED" and children["evaluate"].info.status == "KILLED"
    assert children["data_prep"].info.status == "FINISHED"
    assert list((work / "artifacts" / "data_prep").glob("*/_SUCCESS"))
    assert not list((work / "artifacts" / "finetune").glob("*/_SUCCESS"))


@pytest.mark.integration
def test_killed_ray_worker_is_retried_with_the_attempt_recorded(reference, tmp_path, shared_data_dir):
    ref_work, _, _ = reference
    work = make_workdir(tmp_path, "retry", shared_data_dir)
    proc = start_cli(work, *LONG_FINETUNE, "--set", "stages.finetune.max_retries=1")
    state = wait_for("artifacts/finetune/.*.partial/checkpoint/state.pt", work, proc)
    lock = state.parent.parent.with_name(state.parent.parent.name.replace(".partial", ".lock"))
    worker = int(lock.read_text())
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)  # the worker only: Ray sees it die and retries the task
    done = finish(proc)
    assert done.returncode == 0, done.stderr[-3000:]
    _, runs = mlflow_runs(work, "reliability")
    parent = next(r for r in runs if r.data.tags["stage"] == "pipeline")
    finetune = children_of(runs, parent)["finetune"]
    assert finetune.data.tags["attempt"] == "2"
    assert finetune.data.tags["resumed_from_checkpoint"] == "True"
    assert finetune.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert children_of(runs, parent)["data_prep"].data.tags["attempt"] == "1"
    assert dev_metrics(work) == dev_metrics(ref_work)  # resumed, not restarted with other randomness


@pytest.mark.integration
def test_failing_stage_marks_its_run_and_the_parent_failed(tmp_path, shared_data_dir):
    work = make_workdir(tmp_path, "fail", shared_data_dir)
    # Valid config, but nothing to train: finetune raises inside its Ray task.
    proc = run_cli(work, "--set", "loss.weights.sst=0", "--set", "loss.weights.para=0",
                   "--set", "loss.weights.sts=0")
    assert proc.returncode == 1
    assert re.search(r"^error: stage finetune failed: ValueError: \S+: no train split with rows and a non-zero "
                     r"loss weight", proc.stderr, re.M), proc.stderr[-3000:]
    _, runs = mlflow_runs(work, "reliability")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parent = next(r for r in runs if r.data.tags["stage"] == "pipeline")
    children = children_of(runs, parent)
    assert parent.info.status == "FAILED" and "stage finetune failed" in parent.data.tags["error"]
    assert children["finetune"].info.status == "FAILED"
    assert "no train split with rows" in children["finetune"].data.tags["error"]
    assert children["data_prep"].info.status == "FINISHED"
    assert children["evaluate"].info.status == "FAILED"
    assert leftovers(work) == []  # no checkpoint was written: nothing kept to resume


@pytest.mark.integration
def test_two_runs_at_once_on_one_store_both_succeed_with_one_output_per_key(tmp_path, shared_data_dir):
    work = make_workdir(tmp_path, "both", shared_data_dir)
    procs = [start_cli(work), start_cli(work)]
    done = [finish(p) for p in procs]
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    for stage in STAGES:
        assert len(list((work / "artifacts" / stage).glob("*/_SUCCESS"))) == 1, stage
        assert len([p for p in (work / "artifacts" / stage).iterdir()]) == 1, stage
    assert leftovers(work) == []
    assert "dev/overall" in dev_metrics(work)
    _, runs = mlflow_runs(work, "reliability")
    parents = [r for r in runs if r.data.tags["stage"] == "pipeline"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in runs)
    # Both report the same dev scores: per stage, one run computed it and the other, having
    # planned it too, waited for its lock and took the published output.
    assert parents[0].data.metrics["dev/overall"] == parents[1].data.metrics["dev/overall"]
    for stage in STAGES:
        runs_of_stage = [children_of(runs, parent)[stage] for parent in parents]
        assert sorted(r.data.tags.get("published_by", "") for r in runs_of_stage) == ["", "a concurrent run"], stage
        assert sorted(r.data.tags["cache_hit"] for r in runs_of_stage) == ["False", "True"], stage
