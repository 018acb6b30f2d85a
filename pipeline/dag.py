"""The stage DAG: declared as data here, planned against the cache, run as Ray tasks.

A stage's cache key = its name + the config sections it reads + the code version (a hash of
stages/*.py) + the fingerprints of what it reads from disk + its upstream stages' keys.
Same key and a finished output in the store: the stage is skipped. Cache hits are decided
before Ray starts, so a fully cached re-run never starts Ray at all.

A stage's Ray task holds the store's lock of its key while it runs (ArtifactStore.claim) and
works in that key's stable scratch folder; a stage killed half-way (kill -9, a dead worker,
which Ray retries up to `stages.<name>.max_retries` times) resumes there from its checkpoint.
Each attempt is tagged on the stage's MLflow run (`attempt` = 1, 2, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking
from pipeline.config import ConfigError, PipelineConfig, get
from pipeline.constants import ERROR_TAG, REFERENCE_STAGE, REPO, error_text
from pipeline.store import ArtifactStore, disk_full, file_sha256


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # its `run(cfg, inputs, out, log)` lives here
    needs: tuple[str, ...] = ()
    optional_needs: tuple[str, ...] = ()  # used when enabled, skipped when not
    config_keys: tuple[str, ...] = ()  # the config it reads: a change re-runs it


# The DAG, in a valid running order.
STAGES = (
    Stage("data_prep", "stages.data_prep",
          config_keys=("data", "model.dir")),
    Stage("mlm_pretrain", "stages.mlm_pretrain", needs=("data_prep",),
          config_keys=("seed", "device", "precision", "model", "mlm")),
    Stage("finetune", "stages.finetune", needs=("data_prep",), optional_needs=("mlm_pretrain",),
          config_keys=("seed", "device", "precision", "model", "train", "loss")),
    Stage("evaluate", "stages.evaluate", needs=("data_prep", "finetune"),
          config_keys=("device", "precision", "train.eval_batch_size")),
    # The untrained backbone's scores (a comparison's `untrained` row): data and backbone only,
    # so every variant and seed of an ablation shares one key. Not random: no seed in its key.
    Stage(REFERENCE_STAGE, "stages.reference", needs=("data_prep",),
          config_keys=("device", "precision", "model.dir", "train.eval_batch_size")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
# Config a stage reads that cannot change its output: not part of the cache key.
NOT_IN_KEY = ("train.checkpoint_every", "mlm.checkpoint_every")
CHECKPOINT_DIR = "checkpoint"  # a stage that can resume keeps its checkpoint in out/checkpoint/
UNSENT = "unsent_records"  # a stage task's tracking records its server did not take, for the driver to keep


@dataclass
class PlannedStage:
    stage: Stage
    key: str
    inputs: tuple[str, ...]  # upstream stages whose outputs it receives
    cached: bool
    forced: bool = False  # re-run by --force (or downstream of one): starts over, replaces the output


class StageFailed(RuntimeError):
    def __init__(self, message: str, stage: str | None = None, results: dict | None = None):
        super().__init__(message)
        self.stage = stage  # the stage that failed
        self.results = results  # every stage that finished (cached or run) before it failed


# ---------------------------------------------------------------- planning


def plan(cfg: PipelineConfig, store: ArtifactStore, force: list[str] = ()) -> list[PlannedStage]:
    """The enabled stages in order, each with its cache key and whether it can be skipped."""
    unknown = [f for f in force if f != "all" and f not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"--force {unknown[0]}: unknown stage; stages are {', '.join(STAGE_NAMES)} or all")
    code = code_version()
    keys: dict[str, str] = {}
    planned, rerun, forced_names = [], set(), set()
    for stage in STAGES:
        if not getattr(cfg.stages, stage.name).enabled:  # stages.reference's null too (prepare.with_reference)
            continue
        inputs = stage.needs + tuple(n for n in stage.optional_needs if n in keys)
        key_material = {
            "stage": stage.name,
            "config": {k: _key_config(cfg, k) for k in stage.config_keys},
            "files": _fingerprints(cfg, stage),
            "code": code,
            "upstream": {n: keys[n] for n in inputs},
        }
        keys[stage.name] = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:16]
        # A forced stage re-runs, and so does everything downstream of a re-run.
        forced = "all" in force or stage.name in force or any(n in forced_names for n in inputs)
        cached = not forced and not any(n in rerun for n in inputs) and store.is_finished(stage.name, keys[stage.name])
        damage = store.damaged(stage.name, keys[stage.name]) if cached else None
        if damage:  # a file changed on disk after publishing: never handed out, the stage runs again
            print(f"cache: {damage}; {stage.name} and the stages after it run again", flush=True)
            cached, forced = False, True
        if not cached:
            rerun.add(stage.name)
        if forced:
            forced_names.add(stage.name)
        planned.append(PlannedStage(stage, keys[stage.name], inputs, cached, forced=forced))
    return planned


def _key_config(cfg: PipelineConfig, key: str):
    value = _jsonable(get(cfg, key))
    if isinstance(value, dict):
        for skip in NOT_IN_KEY:
            section, _, leaf = skip.partition(".")
            if section == key:
                value.pop(leaf, None)
    return value


def code_version() -> str:
    """Hash of the stage code: any edit to stages/ invalidates cached outputs."""
    h = hashlib.sha256()
    for path in sorted((REPO / "stages").glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


def _fingerprints(cfg: PipelineConfig, stage: Stage) -> dict:
    """Content hashes of the files a stage reads that the config names only by path."""
    out = {}
    if stage.name == "data_prep":
        for f in dataclasses.fields(cfg.data):
            value = getattr(cfg.data, f.name)
            if f.name.endswith(("_train", "_dev", "_test")) and value:
                out[f.name] = _file_hash(Path(cfg.data.dir) / value)
        # The user's own files (their specs are in the key through the `data` section).
        for spec in cfg.data.extra_eval:
            out[f"extra_eval/{spec.name}"] = _file_hash(Path(spec.file))
        for task in ("sst", "para", "sts"):
            spec = getattr(cfg.data.train_files, task)
            if spec is not None:
                out[f"train_files/{task}"] = _file_hash(Path(spec.file))
    if any(k == "model" or k.startswith("model.") for k in stage.config_keys):
        model_dir = Path(cfg.model.dir)
        for name in ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.txt"):
            if (model_dir / name).exists():
                out[f"model/{name}"] = _file_hash(model_dir / name)
    return out


def _file_hash(path: Path) -> str:
    if not path.exists():
        return "missing"  # data_prep reports the missing file with a proper message
    return file_sha256(path)[:16]


def _jsonable(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# ---------------------------------------------------------------- execution


@dataclass
class RunContext:
    """What the driver hands each stage task: where to log and where outputs go."""
    cfg: PipelineConfig
    store_location: str
    tracking_uri: str
    resume: bool = True  # a stage whose scratch holds a checkpoint of its key continues from it
    label: str = ""  # which plan this is (an ablation's variant): shown in the Ray task's log prefix


def execute(planned: list[PlannedStage], ctx: RunContext, stage_runs: dict[str, str],
            ray_address: str | None, ray_num_cpus: int | None) -> dict[str, dict]:
    """Run the stages that are not cached as Ray tasks; return every stage's result, or raise
    StageFailed for the first stage that failed."""
    outcome = execute_many([(planned, ctx, stage_runs)], ray_address, ray_num_cpus)[0]
    if isinstance(outcome, StageFailed):
        raise outcome
    return outcome


def execute_many(runs: list[tuple[list[PlannedStage], RunContext, dict[str, str]]],
                 ray_address: str | None, ray_num_cpus: int | None) -> list[dict | StageFailed]:
    """Several planned DAGs (an ablation's variants) side by side on one Ray.

    A stage with the same key in several plans (a shared data_prep) is one Ray task whose
    result they all receive; Ray runs the rest as resources allow. Each plan gets its stages'
    results, or the StageFailed of its first failed stage: one variant failing does not stop
    the others. The first plan that holds a stage names the MLflow run it logs to.
    """
    outcomes: list[dict | StageFailed] = []
    todo: dict[tuple[str, str], tuple[PlannedStage, RunContext, str, dict[str, str]]] = {}
    users: dict[tuple[str, str], int] = {}
    for planned, ctx, stage_runs in runs:
        store = ArtifactStore(ctx.store_location)
        outcomes.append({p.stage.name: store.read_result(p.stage.name, p.key) for p in planned if p.cached})
        keys = {p.stage.name: p.key for p in planned}
        for p in planned:
            if not p.cached:
                users[(p.stage.name, p.key)] = users.get((p.stage.name, p.key), 0) + 1
                todo.setdefault((p.stage.name, p.key), (p, ctx, stage_runs[p.stage.name],
                                                        {n: keys[n] for n in p.inputs}))
    if not todo:
        print("all stages cached; Ray not started")
        return outcomes

    ray = init_ray(ray_address, ray_num_cpus)  # only when something has to run: a cached re-run never starts Ray
    _check_resources(ray, [(p, ctx.cfg) for p, ctx, _, _ in todo.values()], local=ray_address is None)

    remote = ray.remote(run_stage)
    refs: dict[tuple[str, str], object] = {}
    for (name, key), (p, ctx, run_id, input_keys) in todo.items():  # upstream first: plans are in DAG order
        opts = getattr(ctx.cfg.stages, name)
        upstream = [refs[(n, k)] for n, k in input_keys.items() if (n, k) in refs]  # Ray waits for these first
        # Ray prefixes a task's output with its name: "(finetune[pcgrad] pid=...)" tells variants apart.
        label = f"{name}[{ctx.label}]" if ctx.label and users[(name, key)] == 1 else name
        refs[(name, key)] = remote.options(
            name=label, num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, max_retries=opts.max_retries,
        ).remote(name, key, input_keys, ctx, run_id, p.forced, *upstream)

    kept_from: set[tuple[str, str]] = set()
    for i, (planned, ctx, _) in enumerate(runs):
        results = outcomes[i]
        for p in planned:
            if p.cached:
                continue
            if isinstance(outcomes[i], StageFailed):  # downstream of the failed stage: failed with it
                _wait_quietly(ray, refs[(p.stage.name, p.key)])
                continue
            retries = getattr(ctx.cfg.stages, p.stage.name).max_retries
            try:
                results[p.stage.name] = ray.get(refs[(p.stage.name, p.key)])
                unsent = results[p.stage.name].pop(UNSENT, [])
                if (p.stage.name, p.key) not in kept_from:  # a task shared by plans hands its records over once
                    tracking.keep_all(unsent)
                    kept_from.add((p.stage.name, p.key))
            except ray.exceptions.RayTaskError as e:
                # The cause on the first line: a verb's one console line is this message's first line.
                outcomes[i] = StageFailed(f"stage {p.stage.name} failed: {_cause(e)}", p.stage.name, results)
            except ray.exceptions.RayError as e:  # the worker died (killed, out of memory) on every attempt
                outcomes[i] = StageFailed(
                    f"stage {p.stage.name} failed: its Ray worker died on each of {retries + 1} attempt(s) "
                    f"(stages.{p.stage.name}.max_retries = {retries}): "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", p.stage.name, results)
    return outcomes


def ray_address(cfg: PipelineConfig) -> str | None:
    """The cluster to run on: RAY_ADDRESS, else ray.address; None is a local Ray in-process."""
    return os.environ.get("RAY_ADDRESS") or cfg.ray.address


def init_ray(address: str | None, num_cpus: int | None):
    """Start (or join) Ray once per process; returns the ray module."""
    import ray

    if not sys.stdout.isatty():  # a log file: worker lines without ANSI colour codes around their prefix
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not ray.is_initialized():
        local = address is None
        # A local Ray's workers import stages/ from this checkout; a cluster job brings its
        # own working_dir (see `pipeline submit`), so it keeps the job's runtime_env.
        env = {"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}} if local else None
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, num_cpus=num_cpus if local else None, include_dashboard=False,
                     logging_level="WARNING", log_to_driver=True, runtime_env=env)
        except ConnectionError as e:  # no cluster at that address: say which setting named it
            raise ConfigError(f"ray.address (or RAY_ADDRESS) {address}: {e}") from None
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)  # ray.init's own calls sys.exit: keep the CLI's (runs end KILLED)
    return ray


def stop_ray() -> None:
    """Shut down this process's Ray, if it started one: the workers' last forwarded lines (their
    final scores) reach the console before the verb's summary, not after it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _wait_quietly(ray, ref) -> None:
    """Collect a task that fails because its upstream did: an error nobody gets is printed by
    Ray as 'Unhandled error' when the reference goes away."""
    try:
        ray.get(ref)
    except ray.exceptions.RayError:
        pass


def run_stage(name: str, key: str, input_keys: dict[str, str], ctx: RunContext, run_id: str,
              forced: bool = False, *_upstream, in_driver: bool = False) -> dict:
    """One stage, here: the body of its Ray task, and what runs a small stage in the driver
    (leaderboard's data_prep). Under its key's lock, the stable scratch folder in (resumed
    from its checkpoint or emptied), the published output and result out."""
    stage = next(s for s in STAGES if s.name == name)
    _use_reserved_cpus(getattr(ctx.cfg.stages, name).num_cpus)
    if not in_driver:  # a Ray worker: what its server does not take goes back with the result
        tracking.configure(ctx.cfg.tracking.retry_seconds)
    store = ArtifactStore(ctx.store_location)
    attempt = tracking.next_attempt(ctx.tracking_uri, run_id)
    if attempt > 1:
        print(f"{name}: attempt {attempt} (the previous attempt's worker died)")
    lock = store.claim(name, key)
    if not lock.acquire(blocking=False):
        print(f"{name}: another run is computing key {key}; waiting for its lock {lock.path}")
        lock.acquire()
    try:
        if not forced and store.is_finished(name, key):
            # A concurrent run published this key while we waited: theirs is our cache hit.
            tracking.set_tags(ctx.tracking_uri, run_id, {"cache_hit": True, "published_by": "a concurrent run"})
            return store.read_result(name, key)
        inputs = {n: store.local_dir(n, k) for n, k in input_keys.items()}
        scratch = lock.scratch
        # A retry always continues its own checkpoint; a new run does unless forced or --no-resume.
        resume = (scratch / CHECKPOINT_DIR).is_dir() and (attempt > 1 or (ctx.resume and not forced))
        if not resume:
            shutil.rmtree(scratch, ignore_errors=True)  # a dead attempt's files: start clean
        scratch.mkdir(parents=True, exist_ok=True)
        if resume:
            print(f"{name}: resuming from the checkpoint in {scratch / CHECKPOINT_DIR}")
            tracking.set_tags(ctx.tracking_uri, run_id, {"resumed_from_checkpoint": True})
        log = tracking.StageLogger(ctx.tracking_uri, run_id)
        _reset_peak_memory()
        start = time.time()
        try:
            result = importlib.import_module(stage.module).run(ctx.cfg, inputs, scratch, log)
            result = _relative_paths(dict(result or {}), scratch)
            result["seconds"] = round(time.time() - start, 2)
            result.setdefault("metrics", {}).update(_peak_memory())
            store.publish(name, key, scratch, result, replace=forced)
        except BaseException as e:
            full = disk_full(e, scratch) if isinstance(e, Exception) else None
            tracking.set_tags(ctx.tracking_uri, run_id, {ERROR_TAG: error_text(full or traceback.format_exc())})
            if full or not (scratch / CHECKPOINT_DIR).is_dir():
                # Nothing to resume from, or a full disk: the half-written folder goes, freeing its space
                # (a checkpoint written as the disk filled may be half-written too).
                store.discard(scratch)
            if full:
                raise full from None
            raise
        return {**result, UNSENT: tracking.take_kept()} if not in_driver else result
    finally:
        lock.release()


def _use_reserved_cpus(num_cpus: float) -> None:
    """As many torch threads as CPUs Ray reserved: a reused worker keeps the thread count of
    its first task, and more threads than cores makes CPU training many times slower."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def _reset_peak_memory() -> None:
    """Start this stage's peak-memory count afresh: a reused Ray worker remembers the peak of
    the task before (Linux: writing 5 to clear_refs resets VmHWM; CUDA: torch's own counter)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: ru_maxrss below is the process's lifetime peak, an upper bound
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> dict[str, float]:
    """Peak resident memory of this stage's process since _reset_peak_memory, in MiB (and the
    peak CUDA memory torch allocated, when on a GPU)."""
    try:
        status = Path("/proc/self/status").read_text()
        peak_mb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"stage/peak_rss_mb": round(peak_mb, 1)}
    import torch

    if torch.cuda.is_available():
        out["stage/peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _relative_paths(result: dict, root: Path) -> dict:
    """Paths a stage returns point into its scratch folder; store them relative to the output."""
    out = {}
    for k, v in result.items():
        if isinstance(v, str) and v.startswith(str(root)):
            v = os.path.relpath(v, root)
        elif isinstance(v, dict):
            v = _relative_paths(v, root)
        out[k] = v
    return out


def _key_of(planned: list[PlannedStage], name: str) -> str:
    return next(p.key for p in planned if p.stage.name == name)


def _check_resources(ray, todo: list[tuple[PlannedStage, PipelineConfig]], local: bool) -> None:
    """A local Ray never grows: a stage asking for more than it has would wait forever."""
    if not local:
        return
    have = ray.cluster_resources()
    for p, cfg in todo:
        opts = getattr(cfg.stages, p.stage.name)
        for resource, want in (("CPU", opts.num_cpus), ("GPU", opts.num_gpus)):
            if want > have.get(resource, 0):
                raise ConfigError(
                    f"stages.{p.stage.name}.num_{resource.lower()}s = {want}, but the local Ray has "
                    f"{have.get(resource, 0):g} {resource}s; lower it with --set stages.{p.stage.name}."
                    f"num_{resource.lower()}s=... or run on a cluster (ray.address)")


def _cause(error) -> str:
    """The stage's own exception text, without Ray's wrapping."""
    cause = getattr(error, "cause", None)
    if cause is not None:
        return "".join(traceback.format_exception_only(type(cause), cause)).strip()
    return str(error)
