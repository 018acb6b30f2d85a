"""`python -m pipeline submit`: run a pipeline verb on a Ray cluster as a Ray job (Jobs API).

    python -m pipeline submit [CONFIG] --address http://HEAD:8265 [--requirements] [--no-wait] [VERB ARGS...]

VERB (default `run`) is `run`, `tune`, `ablate` or `leaderboard` with its own arguments,
exactly as it would be typed locally. The job's runtime_env carries this checkout as its
working_dir (without .venv, artifacts, mlruns, .git) and, with --requirements, the pinned
requirements as a pip environment. The job runs `python -m pipeline VERB CONFIG ARGS` on the
head node; its stages become Ray tasks on the cluster's nodes.

Paths: on the cluster the config's folder is the job's temporary working_dir, so a relative
`data.dir`, `artifacts`, `model.dir` or the default tracking store would land there and be
lost. The job gets them as absolute `--set` overrides resolved on this machine, ahead of the
verb's own --set (which still win). On a local cluster these are the same disk; on a remote
one they must name storage every node reaches (a shared mount, or s3:// / gs:// for
`artifacts`, an MLflow server for `tracking.uri`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, apply_overrides, load_config, resolve_path
from pipeline.constants import REPO

REMOTE_VERBS = ("run", "tune", "ablate", "leaderboard")
FILE_OPTIONS = ("--space", "--grid")  # verb options naming a file the job must find in its working_dir
# Never uploaded with the working_dir: the local environment, outputs, the MLflow store, git.
EXCLUDES = [".venv", "artifacts", "mlruns", "mlartifacts", ".git", ".pytest_cache", "**/__pycache__", "*.pyc"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobSpec:
    """What is sent to the Jobs API; built without contacting the cluster, so it can be shown and tested."""
    entrypoint: str
    runtime_env: dict
    entrypoint_num_cpus: float
    entrypoint_num_gpus: float
    notes: list[str]


def main(argv: list[str]) -> int:
    """The `submit` verb: argv is everything after `submit`. Returns the exit status."""
    args, verb_args = parse_args(argv)
    if not args.address:
        raise ConfigError("submit: --address is required (the cluster's dashboard, e.g. http://HEAD:8265; "
                          "or set RAY_ADDRESS)")
    spec = job_spec(Path(args.config), verb_args, requirements=args.requirements,
                    entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus)
    for note in spec.notes:
        print(f"submit: {note}")
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    submission_id = client.submit_job(
        entrypoint=spec.entrypoint, runtime_env=spec.runtime_env, submission_id=args.submission_id,
        entrypoint_num_cpus=spec.entrypoint_num_cpus, entrypoint_num_gpus=spec.entrypoint_num_gpus,
        metadata={"pipeline_verb": verb_args[0], "config": str(Path(args.config).resolve())})
    print(f"submitted job {submission_id} to {args.address}")
    print(f"  entrypoint: {spec.entrypoint}")
    print(f"  logs:       ray job logs --address {args.address} --follow {submission_id}")
    print(f"  stop:       ray job stop --address {args.address} {submission_id}")
    if args.no_wait:
        return 0
    try:
        status = follow(client, submission_id)
    except KeyboardInterrupt:
        print(f"\nsubmit: stopped following; job {submission_id} keeps running on the cluster", file=sys.stderr)
        return 130
    print(f"job {submission_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split `[CONFIG] [submit options] [VERB ARGS...]` at the verb: what follows it is the
    remote verb's, verbatim (its --set, --smoke... are not submit's)."""
    split = next((i for i, a in enumerate(argv) if a in REMOTE_VERBS or a == "--"), len(argv))
    own, verb_args = argv[:split], argv[split:]
    if verb_args[:1] == ["--"]:
        verb_args = verb_args[1:]
    if not verb_args:
        verb_args = ["run"]
    if verb_args[0] not in REMOTE_VERBS:
        raise ConfigError(f"submit: '{verb_args[0]}' is not a verb that can run on a cluster; "
                          f"one of {', '.join(REMOTE_VERBS)}")
    parser = argparse.ArgumentParser(prog="python -m pipeline submit",
                                     usage="%(prog)s [CONFIG] --address URL [options] [VERB [ARGS ...]]",
                                     description="run a pipeline verb on a Ray cluster as a Ray job")
    parser.add_argument("config", nargs="?", default="pipeline.yaml", help="experiment YAML (default: pipeline.yaml)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") if "://" in os.environ.get("RAY_ADDRESS", "") else None,
                        help="the cluster's Jobs API, e.g. http://HEAD:8265 (default: RAY_ADDRESS when it is a URL)")
    parser.add_argument("--requirements", action="store_true",
                        help="install requirements.txt into the job's environment (runtime_env pip; downloads "
                             "on the cluster). Off: the cluster's nodes already have the project's packages")
    parser.add_argument("--no-wait", action="store_true", help="print the submission id and return; do not follow the logs")
    parser.add_argument("--submission-id", help="the job's id (default: one Ray makes up)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=0,
                        help="CPUs reserved for the driver itself (default 0; its stages reserve their own)")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=0,
                        help="GPUs reserved for the driver, e.g. 1 for `leaderboard`, which predicts in the driver")
    parser.epilog = f"VERB is one of {', '.join(REMOTE_VERBS)} (default run), followed by its own arguments."
    return parser.parse_args(own), verb_args


def job_spec(config: Path, verb_args: list[str], requirements: bool = False,
             entrypoint_num_cpus: float = 0, entrypoint_num_gpus: float = 0) -> JobSpec:
    """The job for `python -m pipeline VERB CONFIG ...`: entrypoint, runtime_env, notes to print."""
    from pipeline import tracking

    config = config.resolve()
    cfg = load_config(config)  # a bad config is an error here, before anything is uploaded
    verb, *rest = verb_args
    notes = []
    try:
        config_arg = str(config.relative_to(REPO))  # travels with the working_dir
    except ValueError:
        config_arg = str(config)
        notes.append(f"{config} is outside the uploaded folder {REPO}: the job reads it at that path, "
                     f"so it must exist there on the cluster's head node (shared storage), or copy it into {REPO}")
    overrides = cluster_overrides(cfg, config.parent)
    env_vars = {"MLFLOW_DISABLE_TELEMETRY": "true", "PIPELINE_GIT_COMMIT": tracking.git_commit(REPO)}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    uri = tracking.tracking_uri(cfg.tracking.uri, config.parent)
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        notes.append(f"MLflow store {uri} is a local file: fine on a local cluster; for a remote one point "
                     f"tracking.uri (or MLFLOW_TRACKING_URI) at an MLflow server")
    apply_overrides(cfg, overrides)  # the overrides themselves must be valid config
    command = ["python", "-m", "pipeline", verb, config_arg]
    for item in overrides:
        command += ["--set", item]
    rest = [*rest]
    for i, word in enumerate(rest[:-1]):
        if word in FILE_OPTIONS:  # a search space or grid, named relative to where submit was called
            rest[i + 1], note = _job_path(Path(rest[i + 1]))
            notes += [note] if note else []
    entrypoint = shlex.join(command + rest)
    runtime_env: dict = {"working_dir": str(REPO), "excludes": list(EXCLUDES), "env_vars": env_vars}
    if requirements:
        runtime_env["pip"] = {"packages": requirement_lines(REPO / "requirements.txt"), "pip_check": False}
    return JobSpec(entrypoint, runtime_env, entrypoint_num_cpus, entrypoint_num_gpus, notes)


def _job_path(path: Path) -> tuple[str, str | None]:
    """A file the job reads: relative to the uploaded checkout when inside it, else absolute
    (with a note: it must then exist at that path on the cluster)."""
    path = path.resolve()
    try:
        return str(path.relative_to(REPO)), None
    except ValueError:
        return str(path), (f"{path} is outside the uploaded folder {REPO}: the job reads it at that path, "
                           f"so it must exist there on the cluster's head node, or copy it into {REPO}")


def cluster_overrides(cfg, config_dir: Path) -> list[str]:
    """`KEY=VALUE` overrides making the config's relative locations absolute on this machine."""
    from pipeline import tracking

    out = [f"data.dir={resolve_path(config_dir, cfg.data.dir)}"]
    if "://" not in cfg.artifacts:
        out.append(f"artifacts={resolve_path(config_dir, cfg.artifacts)}")
    if cfg.model.dir and "://" not in cfg.model.dir:
        out.append(f"model.dir={resolve_path(config_dir, cfg.model.dir)}")
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        out.append(f"tracking.uri={tracking.tracking_uri(cfg.tracking.uri, config_dir)}")
    return out


def requirement_lines(path: Path) -> list[str]:
    """requirements.txt as a list for runtime_env pip: comments and blank lines dropped."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def follow(client, submission_id: str, poll_seconds: float = 2.0) -> str:
    """Print the job's logs as they come until it ends; return its final status."""
    async def tail():
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - a dropped log stream: the status below still decides
        print(f"submit: log stream ended ({type(e).__name__}: {e}); waiting for the job's status", file=sys.stderr)
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_seconds)
