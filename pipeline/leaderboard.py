"""`python -m pipeline leaderboard`: a validated CS224N submission from the best model, logged to MLflow.

    python -m pipeline leaderboard [CONFIG] [--model MODEL_URI] [--smoke] [--set KEY=VALUE ...] [--force]

Which model:
  1. --model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a model folder
     (finetune's `model/`: a HuggingFace BERT folder plus heads and multitask.json);
  2. else the better by dev/overall of: the version of the registered model named
     `tracking.experiment` under the alias `champion` (tune moves the alias to a search's best
     model when it beats the current one; a champion without a dev/overall tag was set by hand
     and always wins), and the best FINISHED pipeline run, ablation variant or tune trial whose
     model can still be found (a run's finetune output in the artifact store, a trial's logged
     `model/`). Plain runs are never registered, so without this a search's winner on a small
     budget would displace a better full run.
With --smoke only smoke runs qualify (never the registry), and a smoke run is made first when
there is none; without it, smoke runs never do.

What it does: data_prep for the config's data (the stage cache; run in this process when not
cached), then stages.evaluate on the model, which writes the starter-format prediction file of
every dev and test split and submission.zip; then `validate_submission` checks the zip against
the data files; then everything is logged to an MLflow run tagged stage=leaderboard and
leaderboard=true. The output is kept in the artifact store under leaderboard/<key>, the key
being the model's content hash and data_prep's cache key: re-running for the same model and
data finds that run and only points at it (--force predicts again).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import dag, lifecycle, tracking
from pipeline.config import ConfigError, PipelineConfig, flatten
from pipeline.constants import METRIC, REPO, error_text
from pipeline.prepare import prepare
from pipeline.registry import ModelChoice, choose_model
from pipeline.store import ArtifactStore
from pipeline.submission import validate_submission


def main(args) -> int:
    """The `leaderboard` verb. Returns the exit status."""
    prepared = prepare(args.config, args.overrides, args.smoke)
    cfg = prepared.cfg
    if not cfg.stages.data_prep.enabled:
        raise ConfigError(f"{prepared.config_path}: leaderboard needs stages.data_prep enabled (it tokenizes the test files)")
    store = ArtifactStore(prepared.store_location)
    uri = lifecycle.tracking_uri_for(cfg, prepared.config_dir)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)

    with tempfile.TemporaryDirectory(prefix="leaderboard-") as tmp:
        try:
            choice = choose_model(uri, cfg.tracking.experiment, experiment_id, args.model, args.smoke, store, Path(tmp))
        except LookupError as e:
            if not args.smoke or args.model:
                print(f"error: {e}", file=sys.stderr)
                return 1
            status = _smoke_run(prepared.config_path, args.overrides)
            if status:
                return status
            choice = choose_model(uri, cfg.tracking.experiment, experiment_id, None, True, store, Path(tmp))
        return make_submission(cfg, store, uri, choice, prepared.config_path, smoke=args.smoke, force=args.force)


def make_submission(cfg: PipelineConfig, store: ArtifactStore, uri: str, choice: ModelChoice,
                    config_path: Path, smoke: bool = False, force: bool = False) -> int:
    """Predict, validate, keep and log one submission (or point at the earlier identical one)."""
    data_prep = next(p for p in dag.plan(cfg, store) if p.stage.name == "data_prep")
    fingerprint = model_fingerprint(choice.folder)
    key = submission_key(fingerprint, data_prep.key)
    print(f"leaderboard: model {choice.uri} ({choice.how}"
          f"{f', {METRIC} {choice.score:.4f}' if choice.score is not None else ''}); submission key {key}")
    with lifecycle.opened_runs(uri, cfg.tracking, config_path.parent) as runs:
        earlier = None if force else earlier_submission(uri, runs.experiment_id, key)
        if earlier is not None:
            tags = earlier.data.tags
            print(f"leaderboard: already submitted for this model and data: nothing to do (--force predicts again)\n"
                  f"  MLflow run:  {earlier.info.run_id} ({_when(earlier.info.start_time)}) at {uri}\n"
                  f"  submission:  {tags.get('submission_zip', '?')}\n"
                  f"  in MLflow:   {earlier.info.artifact_uri}/submission.zip")
            return 0
        params = flatten(cfg)
        run_id = runs.start("leaderboard", {
            "stage": "leaderboard", "leaderboard": "true", "submission_key": key, "smoke": smoke,
            "config_file": str(config_path), "model_uri": choice.uri, "model_choice": choice.how,
            "model_run_id": choice.run_id or "", "model_fingerprint": fingerprint, "data_prep_key": data_prep.key,
            "submission_zip": f"{store.path('leaderboard', key)}/submission.zip"}, params=params)
        if not data_prep.cached:  # one small CPU stage: here, without Ray, with its own child run
            print("leaderboard: data_prep is not cached for this config; running it here")
            prep_run = runs.start("data_prep", lifecycle.stage_tags(data_prep, "none"), parent=run_id, params=params)
            ctx = dag.RunContext(cfg, store.location, uri)
            try:
                result = dag.run_stage("data_prep", data_prep.key, {}, ctx, prep_run, in_driver=True)
            except Exception as e:  # as a stage failing in a Ray task ends a verb: one line, exit status 1
                raise dag.StageFailed(f"stage data_prep failed: {error_text(e)}", "data_prep", {}) from e
            lifecycle.record_stage(uri, prep_run, result)
            runs.end(prep_run)
        data_dir = store.local_dir("data_prep", data_prep.key)
        check_tokenizer(choice.folder, data_dir)
        reused = store.is_finished("leaderboard", key) and not force
        if reused:
            out, result = store.local_dir("leaderboard", key), store.read_result("leaderboard", key)
            print(f"leaderboard: predictions for this key are already in {out}; validating and logging them")
        else:
            out = store.scratch_dir("leaderboard", key)
            try:
                result = predict(cfg, choice.folder, data_dir, out, tracking.StageLogger(uri, run_id))
            except BaseException:
                store.discard(out)
                raise
        report = validate_submission(out / "submission.zip", cfg, data_dir)
        tracking.log_text(uri, run_id, json.dumps(report, indent=2), "validation.json")
        if not report["ok"]:
            tracking.log_artifacts(uri, run_id, out, "invalid_submission")  # kept for a look, never as a valid one
            runs.end(run_id, "FAILED", "invalid submission: " + "; ".join(report["problems"]))
            if not reused:
                store.discard(out)
            print_report(report, choice, None, uri, run_id)
            print("\nerror: the submission is invalid (above); nothing was kept", file=sys.stderr)
            return 1
        if not reused:
            (out / "validation.json").write_text(json.dumps(report, indent=2))
            store.publish("leaderboard", key, out, {**result, "validation": report})
            out = store.local_dir("leaderboard", key)
        tracking.log_artifacts(uri, run_id, out / "predictions", "predictions")
        tracking.log_artifact(uri, run_id, out / "submission.zip")
        rows = {f"submission/{name.removesuffix('-output.csv').replace('-', '_')}_rows": info["rows"]
                for name, info in report["files"].items() if "rows" in info}
        tracking.log_metrics(uri, run_id, {**result.get("metrics", {}), **rows})
        runs.end(run_id)
    print_report(report, choice, out, uri, run_id)
    return 0


def _smoke_run(config_path: Path, overrides: list[str]) -> int:
    """`python -m pipeline run CONFIG --smoke`, as its own process: another verb, not a call into it."""
    print("leaderboard: no smoke model yet; making one with a smoke run first", flush=True)
    argv = [sys.executable, "-m", "pipeline", "run", str(config_path), "--smoke",
            *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(argv, cwd=config_path.parent, env=env).returncode


# ---------------------------------------------------------------- predicting


def predict(cfg: PipelineConfig, model: Path, data_dir: Path, out: Path, log) -> dict:
    """stages.evaluate on this model: out/predictions/*.csv and out/submission.zip."""
    import torch

    from stages import evaluate

    torch.set_num_threads(max(1, int(cfg.stages.evaluate.num_cpus)))
    if model.name == "model":
        parent = model.parent
    else:  # evaluate reads inputs["finetune"]/model
        parent = out.parent / f".{out.name}-model"
        parent.mkdir(exist_ok=True)
        link = parent / "model"
        if not link.exists():
            link.symlink_to(model.resolve(), target_is_directory=True)
    try:
        result = evaluate.run(cfg, {"data_prep": data_dir, "finetune": parent}, out, log)
        return {**result, "predictions": "predictions", "submission": "submission.zip"}  # relative to out
    finally:
        if parent != model.parent:
            (parent / "model").unlink(missing_ok=True)
            parent.rmdir()


def check_tokenizer(model: Path, data_dir: Path) -> None:
    """The test files were tokenized by data_prep with the config's model.dir tokenizer; a model
    trained with another vocabulary would read those ids as different words."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    source = Path(manifest.get("tokenizer", {}).get("source", ""))
    if not source.is_file():
        print(f"leaderboard: warning: the tokenizer data_prep used ({source}) is not on this machine; "
              f"not checking that the model shares it")
        return
    if _vocab(model) != _vocab(source):
        raise ValueError(f"{model}: the model's vocabulary differs from the tokenizer data_prep used ({source}, "
                         f"from model.dir); set model.dir (--set model.dir=...) to the model's base model")


def _vocab(path: Path) -> dict[str, int]:
    if path.is_dir():
        path = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path / "vocab.txt"
    if path.name == "tokenizer.json":
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    if path.is_file():
        return {line.rstrip("\n"): i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(True))}
    raise FileNotFoundError(f"{path.parent}: no tokenizer.json or vocab.txt")

# ---------------------------------------------------------------- bookkeeping


def model_fingerprint(folder: Path) -> str:
    """sha256 over every file of the model folder (relative name and content)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def submission_key(fingerprint: str, data_prep_key: str) -> str:
    """Same model bytes and same prepared data (files, tokenizer, max_length, rows, code): same key."""
    return hashlib.sha256(json.dumps({"model": fingerprint, "data_prep": data_prep_key}).encode()).hexdigest()[:16]


def earlier_submission(uri: str, experiment_id: str, key: str):
    """The first FINISHED leaderboard run with this key, or None."""
    runs = tracking.MlflowClient(uri).search_runs(
        [experiment_id], filter_string=f"tags.stage = 'leaderboard' and tags.submission_key = '{key}' "
                                       f"and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0] if runs else None


def print_report(report: dict, choice: ModelChoice, out: Path | None, uri: str, run_id: str) -> None:
    print(f"\nsubmission {'valid' if report['ok'] else 'INVALID'}: {report['zip'] if out is None else out / 'submission.zip'}")
    for name, info in report["files"].items():
        if "rows" in info:
            state = "ok" if info["status"] == "ok" else "INVALID"
            print(f"  {name:<22} {info['rows']:>6} rows  {state}")
        else:
            print(f"  {name:<22} {info['status']}: {info.get('reason', '')}")
    for problem in report["problems"]:
        print(f"  problem: {problem}")
    for note in report["notes"]:
        if not note.split(":")[0].endswith(".csv"):
            print(f"  note: {note}")
    print(f"model:      {choice.uri} ({choice.how})")
    print(f"MLflow:     run {run_id} (tag leaderboard=true) at {uri}")



def _when(millis: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(millis / 1000))
