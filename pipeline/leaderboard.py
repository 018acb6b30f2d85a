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
import math
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline import dag, tracking
from pipeline.config import ConfigError, PipelineConfig, apply_overrides, flatten, load_config
from pipeline.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
CHAMPION = "champion"
METRIC = "dev/overall"
TASKS = ("sst", "para", "sts")
TEST_KEYS = {"sst": "sst_test", "para": "quora_test", "sts": "sts_test"}
DEV_KEYS = {"sst": "sst_dev", "para": "quora_dev", "sts": "sts_dev"}
SHOWN = 5  # ids listed per kind of problem; the counts are always complete


@dataclass
class ModelChoice:
    folder: Path  # holds multitask.json, config.json, model.safetensors, the tokenizer
    uri: str  # where it was found: models:/..., runs:/..., a store path or a folder
    how: str  # "--model", "champion alias", "best finished run"
    run_id: str | None = None  # the MLflow run that trained it, when known
    score: float | None = None  # its dev/overall, when known


# ---------------------------------------------------------------- the command


def cmd_leaderboard(args) -> int:
    """The `leaderboard` verb. Returns the exit status."""
    from pipeline import cli

    config_path = Path(args.config).resolve()
    config_dir = config_path.parent
    cfg = apply_overrides(load_config(config_path), args.overrides)
    store_location = cli.artifacts_location(cfg, config_dir)
    if args.smoke:
        cfg = apply_overrides(cli.smoke_config(cfg, store_location), args.overrides)
    cfg = cli.resolve_paths(cfg, config_dir)
    if not cfg.stages.data_prep.enabled:
        raise ConfigError(f"{config_path}: leaderboard needs stages.data_prep enabled (it tokenizes the test files)")
    store = ArtifactStore(store_location)
    uri = tracking.tracking_uri(cfg.tracking.uri, config_dir)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)

    with tempfile.TemporaryDirectory(prefix="leaderboard-") as tmp:
        try:
            choice = choose_model(uri, cfg.tracking.experiment, experiment_id, args.model, args.smoke, store, Path(tmp))
        except LookupError as e:
            if not args.smoke or args.model:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print("leaderboard: no smoke model yet; making one with a smoke run first")
            status = cli.main(["run", str(config_path), "--smoke", *[a for o in args.overrides for a in ("--set", o)]])
            if status:
                return status
            choice = choose_model(uri, cfg.tracking.experiment, experiment_id, None, True, store, Path(tmp))
        return make_submission(cfg, store, uri, experiment_id, choice, config_path, smoke=args.smoke,
                               force=args.force)


def make_submission(cfg: PipelineConfig, store: ArtifactStore, uri: str, experiment_id: str, choice: ModelChoice,
                    config_path: Path, smoke: bool = False, force: bool = False) -> int:
    """Predict, validate, keep and log one submission (or point at the earlier identical one)."""
    data_prep = next(p for p in dag.plan(cfg, store) if p.stage.name == "data_prep")
    fingerprint = model_fingerprint(choice.folder)
    key = submission_key(fingerprint, data_prep.key)
    print(f"leaderboard: model {choice.uri} ({choice.how}"
          f"{f', {METRIC} {choice.score:.4f}' if choice.score is not None else ''}); submission key {key}")
    earlier = None if force else earlier_submission(uri, experiment_id, key)
    if earlier is not None:
        tags = earlier.data.tags
        print(f"leaderboard: already submitted for this model and data: nothing to do (--force predicts again)\n"
              f"  MLflow run:  {earlier.info.run_id} ({_when(earlier.info.start_time)}) at {uri}\n"
              f"  submission:  {tags.get('submission_zip', '?')}\n"
              f"  in MLflow:   {earlier.info.artifact_uri}/submission.zip")
        return 0

    commit = tracking.git_commit(REPO)
    run_id = tracking.start_run(uri, experiment_id, "leaderboard", {
        "stage": "leaderboard", "leaderboard": "true", "submission_key": key, "git_commit": commit,
        "smoke": smoke, "config_file": str(config_path), "model_uri": choice.uri, "model_choice": choice.how,
        "model_run_id": choice.run_id or "", "model_fingerprint": fingerprint, "data_prep_key": data_prep.key,
        "submission_zip": f"{store.path('leaderboard', key)}/submission.zip"}, params=flatten(cfg))
    scratch = None
    try:
        if not data_prep.cached:
            _run_data_prep(cfg, store, uri, experiment_id, run_id, data_prep, commit)
        data_dir = store.local_dir("data_prep", data_prep.key)
        check_tokenizer(choice.folder, data_dir)
        reused = store.is_finished("leaderboard", key) and not force
        if reused:
            out, result = store.local_dir("leaderboard", key), store.read_result("leaderboard", key)
            print(f"leaderboard: predictions for this key are already in {out}; validating and logging them")
        else:
            scratch = out = store.scratch_dir("leaderboard", key)
            result = predict(cfg, choice.folder, data_dir, out, tracking.StageLogger(uri, run_id))
        report = validate_submission(out / "submission.zip", cfg, data_dir)
        tracking.log_text(uri, run_id, json.dumps(report, indent=2), "validation.json")
        if not report["ok"]:
            tracking.log_artifacts(uri, run_id, out, "invalid_submission")  # kept for a look, never as a valid one
            tracking.set_tags(uri, run_id, {"error": "invalid submission: " + "; ".join(report["problems"])[:3900]})
            tracking.end_run(uri, run_id, "FAILED")
            print_report(report, choice, None, uri, run_id)
            print("\nerror: the submission is invalid (above); nothing was kept", file=sys.stderr)
            return 1
        if not reused:
            (out / "validation.json").write_text(json.dumps(report, indent=2))
            store.publish("leaderboard", key, out, {**result, "validation": report})
            scratch, out = None, store.local_dir("leaderboard", key)
        tracking.log_artifacts(uri, run_id, out / "predictions", "predictions")
        tracking.log_artifact(uri, run_id, out / "submission.zip")
        rows = {f"submission/{name.removesuffix('-output.csv').replace('-', '_')}_rows": info["rows"]
                for name, info in report["files"].items() if "rows" in info}
        tracking.log_metrics(uri, run_id, {**result.get("metrics", {}), **rows})
        tracking.end_run(uri, run_id)
    except BaseException as e:
        tracking.set_tags(uri, run_id, {"error": f"{type(e).__name__}: {e}"[-4000:]})
        tracking.end_run(uri, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if scratch is not None:
            store.discard(scratch)
        raise
    print_report(report, choice, out, uri, run_id)
    return 0


# ---------------------------------------------------------------- choosing the model


def choose_model(uri: str, registered_name: str, experiment_id: str, given: str | None, smoke: bool,
                 store: ArtifactStore, tmp: Path) -> ModelChoice:
    """--model, else the better of the champion alias (not with smoke) and the best finished run;
    LookupError if none."""
    if given:
        return given_model(uri, given, tmp)
    champion = None if smoke else _champion_version(uri, registered_name)
    floor = _float(champion.tags.get(METRIC)) if champion is not None else None
    if champion is not None and floor is None:
        return champion_model(uri, registered_name, tmp)  # no score: a champion chosen by hand
    # Only a run that beats the champion is looked for (and downloaded); a tie keeps the champion.
    best = best_run_model(uri, experiment_id, smoke, store, tmp, better_than=floor)
    if best is not None:
        return best
    if champion is not None:
        return champion_model(uri, registered_name, tmp)
    kind = "smoke " if smoke else ""
    raise LookupError(f"no model to submit: no registered model '{registered_name}' with alias '{CHAMPION}', and no "
                      f"finished {kind}pipeline run or tune trial with {METRIC} whose model can be found in the "
                      f"experiment at {uri}; run `python -m pipeline run{' --smoke' if smoke else ''}` (or tune) "
                      f"first, or pass --model")


def given_model(uri: str, given: str, tmp: Path) -> ModelChoice:
    """A model folder, or an MLflow models:/ or runs:/ URI downloaded into tmp."""
    path = Path(given).expanduser()
    if path.is_dir():
        return ModelChoice(model_folder(path, given), str(path.resolve()), "--model")
    if not given.startswith(("models:/", "runs:/")) and "://" not in given:
        raise LookupError(f"--model {given}: not a folder, and not an MLflow URI (models:/NAME@ALIAS, "
                          f"models:/NAME/VERSION, runs:/RUN_ID/model)")
    run_id, score = _source_run(uri, given)
    return ModelChoice(_download(uri, given, tmp), given, "--model", run_id, score)


def _champion_version(uri: str, name: str):
    """The registered model version under the `champion` alias; None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking.MlflowClient(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_model(uri: str, name: str, tmp: Path) -> ModelChoice | None:
    """The registered model version under the `champion` alias, downloaded; None when there is none."""
    version = _champion_version(uri, name)
    if version is None:
        return None
    model_uri = f"models:/{name}@{CHAMPION}"
    score = _float(version.tags.get(METRIC))
    return ModelChoice(_download(uri, model_uri, tmp), f"models:/{name}/{version.version}", "champion alias",
                       version.run_id, score)


def best_run_model(uri: str, experiment_id: str, smoke: bool, store: ArtifactStore, tmp: Path,
                   better_than: float | None = None) -> ModelChoice | None:
    """The FINISHED pipeline run, ablation variant or tune trial with the highest dev/overall whose
    model still exists (and whose dev/overall is above `better_than`, when given)."""
    client = tracking.MlflowClient(uri)
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=[f"metrics.`{METRIC}` DESC"], max_results=5000)
    for run in runs:
        tags, score = run.data.tags, run.data.metrics.get(METRIC)
        if tags.get("stage") not in ("pipeline", "variant", "trial") or score is None or not math.isfinite(score):
            continue
        if better_than is not None and score <= better_than:
            break  # ordered best first: none of the rest beats it either
        if (tags.get("smoke") == "True") != smoke:
            continue
        if tags["stage"] == "trial":
            if client.list_artifacts(run.info.run_id, "model"):
                model_uri = f"runs:/{run.info.run_id}/model"
                return ModelChoice(_download(uri, model_uri, tmp), model_uri, "best finished run", run.info.run_id, score)
            continue
        folder = _pipeline_run_model(client, experiment_id, run, store)
        if folder is not None:
            return ModelChoice(folder, str(folder), "best finished run", run.info.run_id, score)
    return None


def _pipeline_run_model(client, experiment_id: str, run, store: ArtifactStore) -> Path | None:
    """The finetune output a pipeline run used, from its finetune child run's cache key."""
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.stage = 'finetune'",
        max_results=1)
    if not children or not children[0].data.tags.get("cache_key"):
        return None
    key = children[0].data.tags["cache_key"]
    for candidate in _stores_of(run, store):
        if candidate.is_finished("finetune", key):
            folder = candidate.local_dir("finetune", key) / "model"
            if (folder / "multitask.json").is_file():
                return folder
    return None


def _stores_of(run, default: ArtifactStore) -> list[ArtifactStore]:
    """The store the run's config named (its `artifacts` param beside its config file), then ours."""
    stores = []
    location = run.data.params.get("artifacts")
    config_file = run.data.tags.get("config_file")
    if location and ("://" in location or Path(location).is_absolute()):
        stores.append(ArtifactStore(location))
    elif location and config_file:
        stores.append(ArtifactStore(str((Path(config_file).parent / location).resolve())))
    if not any(s.location == default.location for s in stores):
        stores.append(default)
    return stores


def model_folder(path: Path, label: str) -> Path:
    """The folder holding multitask.json: `path` itself, or its `model/` (a finetune output)."""
    for candidate in (path, path / "model"):
        if (candidate / "multitask.json").is_file():
            return candidate
    raise LookupError(f"{label}: no multitask.json in {path} or {path / 'model'}: not a finetune model folder")


def promote_champion(uri: str, name: str, version: str, score: float) -> bool:
    """Point registered model `name`'s `champion` alias at `version` when its dev/overall beats
    the current champion's (tag dev/overall on the version). A champion without that tag was
    chosen by hand and is left alone. Returns whether the alias moved."""
    from mlflow.exceptions import MlflowException

    client = tracking.MlflowClient(uri)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is not None:
        if str(current.version) == str(version):
            return False
        best = _float(current.tags.get(METRIC))
        if best is None or score <= best:
            return False
    client.set_model_version_tag(name, str(version), METRIC, f"{score:.6f}")
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return True


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


def _run_data_prep(cfg, store, uri, experiment_id, parent_id, planned, commit) -> None:
    """data_prep in this process (one small CPU stage; no Ray), with its own child run."""
    run_id = tracking.start_run(uri, experiment_id, "data_prep",
                                {"stage": "data_prep", "git_commit": commit, "cache_key": planned.key,
                                 "cache_hit": False, "ablation": "none"}, parent_id=parent_id, params=flatten(cfg))
    print("leaderboard: data_prep is not cached for this config; running it here")
    try:
        result = dag._run_stage("data_prep", planned.key, {}, dag.RunContext(cfg, store.location, uri), run_id)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.log_metrics(uri, run_id, {**result.get("metrics", {}), "stage/seconds": result.get("seconds", 0)})
    tracking.end_run(uri, run_id)


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


# ---------------------------------------------------------------- validating


def validate_submission(zip_path: Path, cfg: PipelineConfig, data_dir: Path) -> dict:
    """Check a submission zip against the data it answers.

    Every test file the config names must be there (a test file the config does not name, like
    the Quora test file that does not exist here, is reported as not writable, never invented),
    with the starter's exact header and " , "-separated lines, one row per id of the test file
    (with data.max_rows: of data_prep's capped split), every id once, every value in range:
    sst an integer 0..4, para 0.0 or 1.0, sts a 4-decimal number in [0, 5]. Dev files the same,
    against data_prep's dev splits (bad rows dropped, Quora dev carved). Returns a report:
    {"ok", "problems", "notes", "files": {file name: {...}}}.
    """
    from stages.evaluate import HEADERS

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    report = {"ok": False, "zip": str(zip_path), "problems": [], "notes": [], "files": {}}
    problems, notes = report["problems"], report["notes"]
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        problems.append(f"{zip_path}: not a readable zip ({e})")
        return report
    with archive:
        broken = archive.testzip()
        if broken:
            problems.append(f"{zip_path}: {broken} is corrupt")
        members = set(archive.namelist())
        expected_members = set()
        if cfg.data.max_rows is not None:
            notes.append(f"data.max_rows = {cfg.data.max_rows} caps every split: a smoke-sized submission "
                         f"(the first rows of each file), not a full one")
        for task in TASKS:
            for split in ("dev", "test"):
                name = f"{task}-{split}-output.csv"
                member = f"predictions/{name}"
                expected, source, reason = _expected_ids(cfg, task, split, manifest, Path(data_dir))
                if expected is None:
                    report["files"][name] = {"status": "not written", "reason": reason}
                    notes.append(f"{name}: not written: {reason}")
                    if member in members:
                        problems.append(f"{name}: in the zip, but {reason}: its rows cannot be real")
                    continue
                expected_members.add(member)
                if member not in members:
                    report["files"][name] = {"status": "missing", "expected_rows": len(expected), "source": source}
                    problems.append(f"{name}: missing from the zip ({len(expected)} rows expected for {source})")
                    continue
                info = _check_file(name, task, archive.read(member), expected, source, HEADERS[task])
                report["files"][name] = info
                problems.extend(f"{name}: {p}" for p in info["problems"])
        not_written = {f"predictions/{n}" for n, info in report["files"].items() if info["status"] == "not written"}
        for extra in sorted(members - expected_members - not_written):  # not_written ones are reported above
            problems.append(f"{extra}: unexpected file in the zip")
    report["ok"] = not problems
    return report


def _expected_ids(cfg, task: str, split: str, manifest: dict, data_dir: Path):
    """(expected ids, where they come from, None) or (None, None, why the file cannot exist)."""
    key = (TEST_KEYS if split == "test" else DEV_KEYS)[task]
    file_name = getattr(cfg.data, key)
    if file_name is None:
        what = "Quora" if task == "para" else task
        return None, None, f"data.{key} is null (no {what} {split} file), so there is nothing to predict"
    entry = manifest.get("splits", {}).get(f"{task}-{split}")
    prepared = _split_ids(data_dir / entry.get("file", f"{task}-{split}.arrow")) if entry else None
    if split == "dev" or cfg.data.max_rows is not None:
        if prepared is None:
            return None, None, f"data_prep wrote no {task}-{split} split ({data_dir / 'manifest.json'})"
        source = f"data_prep's {task}-{split} split ({entry.get('source', '?')})"
        if split == "test":  # capped: data_prep's rows, each of which must be a real test id
            raw = {i for i, _ in read_ids(Path(cfg.data.dir) / file_name)}
            unknown = [i for i in prepared if i not in raw]
            if unknown:
                raise ValueError(f"data_prep's {task}-test split has ids not in {file_name}: {unknown[:SHOWN]}")
        return prepared, source, None
    path = Path(cfg.data.dir) / file_name
    return [i for i, _ in read_ids(path)], str(path), None


def _check_file(name: str, task: str, raw: bytes, expected: list[str], source: str, header: str) -> dict:
    from stages.evaluate import format_prediction

    problems = []
    info = {"status": "ok", "source": source, "expected_rows": len(expected), "problems": problems}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(f"not UTF-8 ({e})")
        info["status"] = "invalid"
        return info
    if "\r" in text:
        problems.append("has \\r line ends; the starter writes \\n")
    if not text.endswith("\n"):
        problems.append("does not end with a newline")
    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    first = lines[0] + "\n" if lines else ""
    if first != header:
        problems.append(f"line 1: header {first!r}, the starter's is {header!r}")
    ids, bad_lines, bad_values = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split(" , ")
        if len(parts) != 2 or not line.endswith(" ") or not parts[0]:
            bad_lines.append(number)
            continue
        row_id, value = parts[0], parts[1][:-1]
        ids.append(row_id)
        if _bad_value(task, value, format_prediction):
            bad_values.append(f"line {number}: {value!r}")
    info["rows"] = len(lines) - 1
    if bad_lines:
        problems.append(f"{len(bad_lines)} lines not in the form 'id , value ' (lines {bad_lines[:SHOWN]})")
    if bad_values:
        problems.append(f"{len(bad_values)} values out of range for {task} ({'; '.join(bad_values[:SHOWN])})")
    counts = Counter(ids)
    duplicates = [i for i, n in counts.items() if n > 1]
    wanted = set(expected)
    missing = [i for i in expected if i not in counts]
    unknown = [i for i in counts if i not in wanted]
    if duplicates:
        problems.append(f"{len(duplicates)} ids appear more than once ({duplicates[:SHOWN]})")
    if missing:
        problems.append(f"{len(missing)} ids of {source} have no prediction ({missing[:SHOWN]})")
    if unknown:
        problems.append(f"{len(unknown)} ids are not in {source} ({unknown[:SHOWN]})")
    if info["rows"] != len(expected):
        problems.append(f"{info['rows']} rows, {source} has {len(expected)} ids")
    if problems:
        info["status"] = "invalid"
    return info


def _bad_value(task: str, value: str, format_prediction) -> bool:
    """True unless `value` is exactly how the starter prints a prediction in range."""
    try:
        if task == "sst":
            return not (value.isdigit() and 0 <= int(value) <= 4 and format_prediction(task, int(value)) == value)
        if task == "para":
            return value not in ("0.0", "1.0")
        number = float(value)
        return not (math.isfinite(number) and 0.0 <= number <= 5.0 and format_prediction(task, number) == value)
    except ValueError:
        return True


def read_ids(path: Path) -> list[tuple[str, int]]:
    """(id, line number) of every record of a CS224N tab-separated file, found by the `id` header
    column, read the way data_prep reads (one physical line a record, no quoting)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    lines = path.read_text(encoding="utf-8").split("\n")
    columns = [c.strip() for c in lines[0].rstrip("\r").split("\t")]
    if "id" not in columns:
        raise ValueError(f"{path}:1: no 'id' column in the header (columns: {columns})")
    at = columns.index("id")
    out = []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if at >= len(fields) or not fields[at].strip():
            raise ValueError(f"{path}:{number}: no id")
        out.append((fields[at].strip(), number))
    return out


def _split_ids(path: Path) -> list[str]:
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        return [str(i) for i in pa.ipc.open_file(source).read_all().column("id").to_pylist()]


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


def _source_run(uri: str, model_uri: str) -> tuple[str | None, float | None]:
    """The run (and registered dev/overall) behind a models:/ or runs:/ URI."""
    from mlflow.exceptions import MlflowException

    client = tracking.MlflowClient(uri)
    try:
        if model_uri.startswith("runs:/"):
            return model_uri[len("runs:/"):].split("/", 1)[0], None
        if model_uri.startswith("models:/"):
            name, _, rest = model_uri[len("models:/"):].partition("@")
            if rest:
                version = client.get_model_version_by_alias(name, rest.split("/")[0])
            else:
                name, _, number = name.partition("/")
                version = client.get_model_version(name, number.split("/")[0])
            return version.run_id, _float(version.tags.get(METRIC))
    except MlflowException as e:
        raise LookupError(f"--model {model_uri}: {e}") from None
    return None, None


def _download(uri: str, model_uri: str, tmp: Path) -> Path:
    import mlflow

    target = tmp / hashlib.sha256(model_uri.encode()).hexdigest()[:12]
    target.mkdir(parents=True, exist_ok=True)
    try:
        source = _version_source(uri, model_uri) if model_uri.startswith("models:/") else model_uri
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target), tracking_uri=uri)
    except Exception as e:  # noqa: BLE001 - MLflow raises several kinds; all mean "not there"
        raise LookupError(f"{model_uri}: cannot download it from {uri}: {e}") from None
    return model_folder(Path(local), model_uri)


def _version_source(uri: str, model_uri: str) -> str:
    """A models:/NAME@ALIAS or models:/NAME/VERSION URI as the version's source (runs:/RUN/model):
    download_artifacts would resolve models:/ against the global registry, not this store."""
    client = tracking.MlflowClient(uri)
    name, _, alias = model_uri[len("models:/"):].partition("@")
    if alias:
        return client.get_model_version_by_alias(name, alias).source
    name, _, number = name.partition("/")
    return client.get_model_version(name, number).source


def _float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _when(millis: int) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(millis / 1000))
