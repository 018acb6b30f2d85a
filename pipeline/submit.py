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

Token authentication (Ray 2.60 turns it on for a `ray start --head` that finds a token): when
the cluster answers 401/403 and a token is found here, the way Ray's own clients find one
(RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token), submit sends it as
`Authorization: Bearer ...`; with none, or a rejected one, it says what to set in one line.
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
from pipeline.constants import REPO, is_remote

REMOTE_VERBS = ("run", "tune", "ablate", "leaderboard")
FILE_OPTIONS = ("--space", "--grid")  # verb options naming a file the job must find in its working_dir
# Never uploaded with the working_dir: the local environment, outputs, the MLflow store, git.
EXCLUDES = [".venv", "artifacts", "mlruns", "mlartifacts", ".git", ".pytest_cache", "**/__pycache__", "*.pyc"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_TOKEN_PATH_TEXT = "~/.ray/auth_token"  # where Ray saves a token; named so in messages


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
    try:
        client = connect(args.address)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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


class SubmitError(Exception):
    """The cluster cannot be used as asked; its message is the one line `submit` prints."""


def connect(address: str):
    """A JobSubmissionClient for `address`, with a local token when the cluster wants one.

    The first try sends what Ray itself would (nothing, unless RAY_AUTH_MODE=token here), so a
    local token only goes to a cluster that asked for one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        pass  # 401 (no token sent) or 403 (Ray sent one the cluster does not accept)
    except ConnectionError as e:
        raise SubmitError(f"no Ray cluster answers at {address} ({e}); is its dashboard up, and is "
                          f"--address its dashboard URL (http://HEAD:8265)?") from None
    token, source = local_token()
    if token is None:
        raise SubmitError(f"the Ray cluster at {address} requires token authentication and no token was found in "
                          f"RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or {DEFAULT_TOKEN_PATH_TEXT}; set RAY_AUTH_TOKEN to "
                          f"the cluster's token (`ray get-auth-token` on its head node prints it) or save it "
                          f"in {DEFAULT_TOKEN_PATH_TEXT}")
    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    except AuthenticationError:
        raise SubmitError(f"the Ray cluster at {address} requires token authentication and rejected the token "
                          f"from {source}; set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on its "
                          f"head node prints it)") from None


def local_token() -> tuple[str | None, str]:
    """(token, where it came from), in Ray's order: RAY_AUTH_TOKEN, else the file named by
    RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; (None, "") when there is none. As in Ray, a
    RAY_AUTH_TOKEN_PATH that cannot be read is an error, not a reason to look further."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        path = Path(named).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={named}: cannot read the token ({e.strerror})") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={named}: the file is empty")
        return token, f"RAY_AUTH_TOKEN_PATH={named}"
    path = Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError:
        return None, ""
    return (token, str(path)) if token else (None, "")


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
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") if is_remote(os.environ.get("RAY_ADDRESS", "")) else None,
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
    if uri.startswith(("sqlite:", "file:")) or not is_remote(uri):
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
    if not is_remote(cfg.artifacts):
        out.append(f"artifacts={resolve_path(config_dir, cfg.artifacts)}")
    if cfg.model.dir and not is_remote(cfg.model.dir):
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
