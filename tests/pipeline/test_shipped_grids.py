"""Every shipped ablation grid and search space, on the shipped pipeline.yaml at the smoke settings.

Each grid variant is resolved as `ablate --smoke` resolves it (pipeline/prepare.py's one override
order) and its stages run here, in this process, without Ray or MLflow: data_prep, mlm_pretrain
when the variant enables it, finetune, evaluate, each its module's `run(cfg, inputs, out, log)`.
It must finish with finite dev scores, every trained task's loss logged. test_grids.py checks the
grids as config only and test_ablate.py runs the report grids on a test config, so a variant that
cannot train with pipeline.yaml's own heads (a frozen encoder under its parameter-free sts cosine)
fails here.

Each search space is read as `tune --smoke` reads it (load_space on the prepared config, its fixed
values applied: tune's checks before anything starts); configs sampled as tune samples them, with
every choice of every categorical drawn at least once, each valid and fine-tuned for a few steps.

Budget: the smoke data (64 rows a split, 32 tokens) and the tiny random-weight BERT; one smoke
epoch (every task's batches once), two where the second does something the first does not; and a
stage whose cache key several variants share (the baselines, identical across grids) runs once, as
`ablate` runs it once.
"""

import functools
import importlib
import json
import math
import shutil

import pytest
import torch

from pipeline import dag
from pipeline.config import apply_overrides, load_config
from pipeline.constants import DEV_METRICS, REFERENCE_STAGE, TASKS
from pipeline.grids import load_grid
from pipeline.prepare import prepare, prepared_config
from pipeline.search_space import load_space
from pipeline.store import ArtifactStore
from tests.conftest import REPO

PIPELINE_YAML = REPO / "pipeline.yaml"
ABLATIONS = REPO / "search_spaces" / "ablations"
GRIDS = sorted(ABLATIONS.glob("*.yaml")) + sorted((ABLATIONS / "reports").glob("*.yaml"))
SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))
# A sampled config's finetune steps: round robin trains each task once; the dev scores come after.
SPACE_STEPS = 3


@functools.cache
def shipped():
    return load_config(PIPELINE_YAML)


@functools.cache
def grid(path) -> tuple[dict, dict]:
    return load_grid(path, shipped())


def grid_variants() -> list:
    return [pytest.param(path, name, id=f"{path.relative_to(ABLATIONS).with_suffix('')}:{name}")
            for path in GRIDS for name in grid(path)[1]]


def quiet(*_args, **_kwargs):
    pass


class Stages:
    """Stage outputs by cache key under one folder: a key is run once, in this process."""

    def __init__(self, root):
        self.root, self.results = root, {}

    def sets(self, epochs: int) -> list[str]:
        """The --set overrides every config here gets: this folder as the store (the smoke BERT is
        written there), and the epochs."""
        return [f"artifacts={self.root}", f"train.epochs={epochs}"]

    def run(self, cfg, through: str = "evaluate") -> dict[str, tuple[dict, object]]:
        """{stage: (its result, its output folder)} of the config's DAG up to `through`."""
        planned = [p for p in dag.plan(cfg, ArtifactStore(str(self.root))) if p.stage.name != REFERENCE_STAGE]
        planned = planned[:[p.stage.name for p in planned].index(through) + 1]
        keys = {p.stage.name: p.key for p in planned}
        done = {}
        for p in planned:
            out = self.root / p.stage.name / p.key
            if (p.stage.name, p.key) not in self.results:
                inputs = {name: self.root / name / keys[name] for name in p.inputs}
                stage = importlib.import_module(p.stage.module)
                self.results[(p.stage.name, p.key)] = stage.run(cfg, inputs, out, quiet)
            done[p.stage.name] = (self.results[(p.stage.name, p.key)], out)
        return done


@pytest.fixture(scope="module")
def stages(tmp_path_factory, shared_data_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spin-waits on a busy machine
    root = tmp_path_factory.mktemp("shipped-grids")
    yield Stages(root)
    torch.set_num_threads(threads)
    shutil.rmtree(root, ignore_errors=True)  # a model per variant: hundreds of MB


def epochs_needed(cfg) -> int:
    """1, or 2 where epoch 2 trains otherwise: sts's own loss after its MNR epoch, the tasks left
    after one's train.task_epochs."""
    return 2 if cfg.loss.sts_mnr_epochs or any(getattr(cfg.train.task_epochs, t) for t in TASKS) else 1


def logged_losses(finetune_out) -> set[str]:
    history = json.loads((finetune_out / "history.json").read_text())
    return {key for row in history for key in row if key.startswith("train/loss_")}


@pytest.mark.parametrize("path,variant", grid_variants())
def test_every_grid_variant_runs_its_stages_on_the_shipped_config_to_finite_dev_scores(path, variant, stages):
    base, variants = grid(path)
    overrides = {**base, **variants[variant]}
    epochs = epochs_needed(apply_overrides(shipped(), overrides))
    cfg, _ = prepared_config(shipped(), overrides, stages.sets(epochs), smoke=True, config_dir=PIPELINE_YAML.parent)
    done = stages.run(cfg)

    assert ("mlm_pretrain" in done) == cfg.stages.mlm_pretrain.enabled
    trained = {f"train/loss_{t}" for t in TASKS if getattr(cfg.loss.weights, t) > 0}
    if cfg.loss.sts_mnr_epochs and cfg.loss.weights.sts > 0:
        trained.add("train/loss_sts_mnr")
    assert logged_losses(done["finetune"][1]) == trained  # each trained task took a step, its head's loss
    metrics = done["evaluate"][0]["metrics"]
    assert {key: math.isfinite(metrics.get(key, math.nan)) for key in DEV_METRICS} == dict.fromkeys(DEV_METRICS, True)


def sampled_points(space, seed: int) -> list[dict]:
    """Configs' values as tune draws them (Optuna on the space's distributions, then normalised as a
    trial normalises them): as many as the longest choice list, the i-th with each categorical's
    i-th value (cycling), so every choice is drawn; the other quantities at random."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    choices = {key: p.values for key, p in space.params.items() if p.distribution == "choice"}
    distributions = space.optuna_distributions()
    points = []
    for i in range(max((len(values) for values in choices.values()), default=1)):
        study.enqueue_trial({key: values[i % len(values)] for key, values in choices.items()})
        points.append(space.normalize(study.ask(distributions).params))
    return points


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_search_space_samples_valid_configs_that_finetune_on_the_shipped_config(path, stages):
    prepared = prepare(PIPELINE_YAML, stages.sets(1) + [f"train.steps_per_epoch={SPACE_STEPS}"], smoke=True)
    space = load_space(path, prepared.cfg)
    cfg = apply_overrides(prepared.cfg, space.fixed)
    assert cfg.stages.finetune.enabled and cfg.stages.evaluate.enabled  # what tune needs
    points = sampled_points(space, cfg.seed)
    for key, p in space.params.items():
        if p.distribution == "choice":
            assert [point[key] for point in points[:len(p.values)]] == p.values, key

    for values in points:
        trial_cfg = apply_overrides(cfg, values)  # a trial's config (pipeline/tuning.py): a bad combination raises
        done = stages.run(trial_cfg, through="finetune")
        history = json.loads((done["finetune"][1] / "history.json").read_text())
        assert len(history) == 1 and math.isfinite(history[0]["dev/overall"]), values
