"""`python -m pipeline submit`: the job it builds, and a real `--smoke` run through the Ray Jobs API
on a local cluster this test starts (on 127.0.0.1, its own temp dir and ports) and stops (only
its own processes: `ray stop` would stop every Ray on the machine); the same on a cluster with
token authentication, with the token found locally, missing, or wrong."""

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.submit import EXCLUDES, SubmitError, job_spec, local_token, parse_args, requirement_lines
from tests.conftest import REPO, mlflow_runs, write_experiment

pytestmark = pytest.mark.integration  # every test here runs a CLI subprocess, Ray or a server


# ---------------------------------------------------------------- the job, without a cluster


def test_arguments_split_at_the_verb():
    args, verb = parse_args(["exp.yaml", "--address", "http://h:8265", "tune", "--space", "s.yaml", "--set", "a=b"])
    assert (args.config, args.address, verb) == ("exp.yaml", "http://h:8265", ["tune", "--space", "s.yaml", "--set", "a=b"])
    args, verb = parse_args(["--address", "http://h:8265"])
    assert (args.config, verb) == ("pipeline.yaml", ["run"])  # run by default
    args, verb = parse_args(["--address", "http://h:8265", "--no-wait", "--", "leaderboard", "--smoke"])
    assert args.no_wait and verb == ["leaderboard", "--smoke"]
    with pytest.raises(ConfigError, match="'schedule' is not a verb that can run on a cluster"):
        parse_args(["--address", "http://h:8265", "--", "schedule", "install"])


def test_relative_locations_become_absolute_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "exp.yaml").write_text("data:\n  dir: data\nartifacts: out\n")
    spec = job_spec(tmp_path / "exp.yaml", ["run", "--smoke", "--set", "train.lr=0.1"])
    assert shlex.split(spec.entrypoint) == [
        "python", "-m", "pipeline", "run", str(tmp_path / "exp.yaml"),
        "--set", f"data.dir={tmp_path / 'data'}", "--set", f"artifacts={tmp_path / 'out'}",
        "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        "--smoke", "--set", "train.lr=0.1"]  # the verb's own --set last: it wins
    assert spec.runtime_env["working_dir"] == str(REPO)
    assert {".venv", "artifacts", "mlruns", ".git"} <= set(spec.runtime_env["excludes"])
    assert "pip" not in spec.runtime_env
    assert any("outside the uploaded folder" in n for n in spec.notes)  # read at its absolute path


def test_a_config_in_the_checkout_travels_with_it_and_a_server_uri_is_passed_on(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    spec = job_spec(REPO / "pipeline.yaml", ["leaderboard"], requirements=True, entrypoint_num_gpus=1)
    words = shlex.split(spec.entrypoint)
    assert words[:5] == ["python", "-m", "pipeline", "leaderboard", "pipeline.yaml"]
    assert f"data.dir={(REPO / '../shared/data/cs224n').resolve()}" in words
    assert not any(w.startswith("tracking.uri=") for w in words)  # the server, via the environment
    assert spec.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert spec.runtime_env["pip"]["packages"] == requirement_lines(REPO / "requirements.txt")
    assert "mlflow==3.17.2" in spec.runtime_env["pip"]["packages"]
    assert not any("#" in p for p in spec.runtime_env["pip"]["packages"])
    assert spec.entrypoint_num_gpus == 1 and spec.notes == []
    assert EXCLUDES[0] == ".venv"


def test_grid_and_space_files_are_found_from_the_jobs_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO / "search_spaces")  # named relative to here, read from the checkout's root
    spec = job_spec(REPO / "pipeline.yaml", ["ablate", "--grid", "ablations/sampling.yaml", "--smoke"])
    words = shlex.split(spec.entrypoint)
    assert words[:4] == ["python", "-m", "pipeline", "ablate"]
    assert words[-3:] == ["--grid", "search_spaces/ablations/sampling.yaml", "--smoke"]
    (tmp_path / "space.yaml").write_text("train.lr: 0.1\n")
    spec = job_spec(REPO / "pipeline.yaml", ["tune", "--space", str(tmp_path / "space.yaml")])
    assert shlex.split(spec.entrypoint)[-2:] == ["--space", str(tmp_path / "space.yaml")]
    assert any("space.yaml is outside the uploaded folder" in n for n in spec.notes)


def test_a_local_token_is_found_where_ray_looks_in_rays_order(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert local_token() == (None, "")
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text("from-home\n")
    assert local_token() == ("from-home", str(tmp_path / "home" / ".ray" / "auth_token"))
    (tmp_path / "token").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert local_token() == ("from-path", f"RAY_AUTH_TOKEN_PATH={tmp_path / 'token'}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert local_token() == ("from-env", "RAY_AUTH_TOKEN")
    # As in Ray, a RAY_AUTH_TOKEN_PATH naming nothing readable is an error, not a fall-through.
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH=.*missing: cannot read the token"):
        local_token()


# ---------------------------------------------------------------- a real local cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`ray start --head --block` on loopback in its own session; `stop` ends only its processes."""

    def __init__(self, num_cpus: int = 2, env: dict | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Unix socket paths are limited
        self.dashboard_port = free_port()
        ports = {"port": free_port(), "dashboard-port": self.dashboard_port, "ray-client-server-port": free_port(),
                 "node-manager-port": free_port(), "object-manager-port": free_port(),
                 "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
                 "metrics-export-port": free_port(), "runtime-env-agent-port": free_port()}
        self.env = env or cluster_env()
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                   "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--temp-dir={self.temp_dir}",
                   f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats", "--include-dashboard=true",
                   *[f"--{k}={v}" for k, v in ports.items()]]
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def wait_until_up(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(self.temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # it answered: 401 from a cluster with token authentication
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"the local Ray's dashboard did not answer at {self.address} in {timeout} s")

    def stop(self) -> None:
        """SIGTERM to our `ray start` (it stops its node), then SIGKILL to what is left of our
        process group, then to any process of our session found by its temp dir (job drivers
        run in sessions of their own)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for pid in self._our_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _our_pids(self) -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if self.temp_dir in cmdline or cwd.startswith(self.temp_dir):
                pids.append(int(proc.name))
        return pids


def cluster_env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",  # the same on the cluster and the client
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job's `python`
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH"):
        env.pop(name, None)
    return env


def test_a_token_cluster_takes_the_local_token_and_without_one_submit_says_what_to_set(tmp_path, shared_data_dir):
    """A cluster with RAY_AUTH_MODE=token whose token is in its ~/.ray/auth_token, as after
    `ray start --head` on a machine with a token; submit from the same HOME finds it there.
    Before the module's other cluster starts, so that two never run at once."""
    home, empty_home = tmp_path / "home", tmp_path / "empty-home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("pipeline-test-" + os.urandom(16).hex())
    empty_home.mkdir()
    write_experiment(tmp_path, "token-cluster", data_dir=shared_data_dir)
    env = {**cluster_env(), "RAY_AUTH_MODE": "token", "HOME": str(home)}
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    local = LocalCluster(num_cpus=2, env=env)
    try:
        local.wait_until_up()

        def submit(home_dir, *verb, **extra):
            client_env = {**env, "HOME": str(home_dir), "PYTHONPATH": str(REPO), **extra}
            client_env.pop("RAY_AUTH_MODE")  # the submitting shell's default: Ray sends no token itself
            proc = subprocess.run([sys.executable, "-m", "pipeline", "submit", "exp.yaml", "--address", local.address,
                                   *verb], cwd=tmp_path, env=client_env, capture_output=True, text=True, timeout=900)
            print(proc.stdout[-4000:], proc.stderr[-3000:])
            return proc

        missing = submit(empty_home, "run", "--smoke")
        assert missing.returncode == 1 and "Traceback" not in missing.stderr
        errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: the Ray cluster at {local.address} requires token authentication and no token "
                          f"was found in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; set RAY_AUTH_TOKEN "
                          f"to the cluster's token (`ray get-auth-token` on its head node prints it) or save it in "
                          f"~/.ray/auth_token"], missing.stderr

        wrong = submit(empty_home, "run", "--smoke", RAY_AUTH_TOKEN="not-the-token")
        assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
        assert (f"error: the Ray cluster at {local.address} requires token authentication and rejected the token "
                f"from RAY_AUTH_TOKEN;") in wrong.stderr

        found = submit(home, "run", "--smoke")
        assert found.returncode == 0, found.stderr[-3000:]
        assert "submitted job raysubmit_" in found.stdout and "dev/overall" in found.stdout  # followed to the end
        assert len(list((tmp_path / "artifacts" / "evaluate").glob("*/submission.zip"))) == 1
    finally:
        local.stop()


@pytest.fixture(scope="module")
def cluster():
    local = LocalCluster(num_cpus=2)
    try:
        local.wait_until_up()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_data_dir):
    """A config outside the checkout with relative paths: submit must make them absolute."""
    work = tmp_path_factory.mktemp("cluster-work")
    write_experiment(work, "cluster", data_dir=Path(os.path.relpath(shared_data_dir, work)))
    return work


@pytest.fixture(scope="module")
def submitted(cluster, work):
    env = {**cluster_env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "submit", "exp.yaml", "--address", cluster.address,
                           "run", "--smoke"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:], proc.stderr[-3000:])
    return proc


def test_smoke_run_through_the_jobs_api_succeeds_and_logs_to_mlflow(cluster, work, submitted):
    from ray.job_submission import JobSubmissionClient

    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = next(w for w in submitted.stdout.split() if w.startswith("raysubmit_"))
    client = JobSubmissionClient(cluster.address)
    info = client.get_job_info(job_id)
    assert info.status.value == "SUCCEEDED"
    assert f"--set artifacts={work / 'artifacts'}" in info.entrypoint
    assert "dev/overall" in submitted.stdout  # the job's own summary, followed from its logs

    _, runs = mlflow_runs(work, "cluster")  # the submitting side's store
    parent = next(r for r in runs if r.data.tags.get("stage") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["smoke"] == "True"
    assert sorted(r.data.tags["stage"] for r in children) == ["data_prep", "evaluate", "finetune"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert 0 <= parent.data.metrics["dev/overall"] <= 1
    # The outputs are on the submitting side's disk, not in the job's temporary working_dir.
    assert len(list((work / "artifacts" / "evaluate").glob("*/submission.zip"))) == 1


def test_leaderboard_smoke_submits_the_clusters_smoke_model(work, submitted):
    assert submitted.returncode == 0
    env = {**cluster_env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "leaderboard", "exp.yaml", "--smoke"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submission valid" in proc.stdout and "best finished run" in proc.stdout
    mlflow, runs = mlflow_runs(work, "cluster")
    boards = [r for r in runs if r.data.tags.get("leaderboard") == "true"]
    assert len(boards) == 1 and boards[0].info.status == "FINISHED"
    pipeline_run = next(r for r in runs if r.data.tags.get("stage") == "pipeline")
    assert boards[0].data.tags["model_run_id"] == pipeline_run.info.run_id
    # Same model, same data: the same dev scores as the run that trained it.
    assert boards[0].data.metrics["dev/overall"] == pytest.approx(pipeline_run.data.metrics["dev/overall"], abs=1e-6)
    assert "submission.zip" in [a.path for a in mlflow.list_artifacts(boards[0].info.run_id)]
