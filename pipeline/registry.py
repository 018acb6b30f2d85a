"""Models: registering them, the `champion` alias, and finding one to use.

A finetune output (finetune's `model/`: a HuggingFace BERT folder plus the heads and
multitask.json) is not an MLflow flavor, so it is registered as a plain artifact folder
(source runs:/<run>/model) and loaded with stages.multitask_model.load_multitask after
download. A MODEL argument (leaderboard --model, and whatever takes a model) is one of
models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model folder.

Which model when none is named: the better by dev/overall of the version under the alias
`champion` (tune moves it to a search's best model when that beats the current one; a
champion without a dev/overall tag was set by hand and always wins) and the best FINISHED
pipeline run, ablation variant or tune trial whose model can still be found. Plain runs are
never registered, so without this a search's winner on a small budget would displace a
better full run.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking
from pipeline.constants import METRIC, is_remote
from pipeline.store import ArtifactStore, damaged_folder

CHAMPION = "champion"


@dataclass
class ModelChoice:
    folder: Path  # holds multitask.json, config.json, model.safetensors, the tokenizer
    uri: str  # where it was found: models:/..., runs:/..., a store path or a folder
    how: str  # "--model", "champion alias", "best finished run"
    run_id: str | None = None  # the MLflow run that trained it, when known
    score: float | None = None  # its dev/overall, when known


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
    if not given.startswith(("models:/", "runs:/")) and not is_remote(given):
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
    for candidate in stores_of(run, store):
        if candidate.is_finished("finetune", key):
            folder = candidate.local_dir("finetune", key) / "model"
            if (folder / "multitask.json").is_file():
                return _intact(folder, f"run {run.info.run_id}'s model")
    return None


def stores_of(run, default: ArtifactStore | None = None) -> list[ArtifactStore]:
    """The store the run's config named (its `artifacts` param beside its config file), then ours."""
    stores = []
    location = run.data.params.get("artifacts")
    config_file = run.data.tags.get("config_file")
    if location and (is_remote(location) or Path(location).is_absolute()):
        stores.append(ArtifactStore(location))
    elif location and config_file:
        stores.append(ArtifactStore(str((Path(config_file).parent / location).resolve())))
    if default is not None and not any(s.location == default.location for s in stores):
        stores.append(default)
    return stores


def model_folder(path: Path, label: str) -> Path:
    """The folder holding multitask.json: `path` itself, or its `model/` (a finetune output)."""
    for candidate in (path, path / "model"):
        if (candidate / "multitask.json").is_file():
            return _intact(candidate, label)
    raise LookupError(f"{label}: no multitask.json in {path} or {path / 'model'}: not a finetune model folder")


def _intact(folder: Path, label: str) -> Path:
    """`folder`, after checking it against the manifest of the published output it is in."""
    damage = damaged_folder(folder)
    if damage:
        raise LookupError(f"{label}: the model is damaged: {damage}; `run` of its config finds this too "
                          f"and trains it again")
    return folder


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


def register_model(uri: str, name: str, run_id: str, artifact_path: str, tags: dict, description: str) -> str:
    """A new version of registered model `name` from a run's artifacts; its version number.

    The finetune output is a HuggingFace BERT folder plus heads, not an MLflow flavor, so it is
    registered as the plain artifact folder (source runs:/<run>/model), loadable with
    stages.multitask_model.load_multitask after `mlflow artifacts download`.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        client.create_registered_model(name, description="multitask BERT (sst, para, sts) from pipeline tune")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    version = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()}, description=description)
    return str(version.version)


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
