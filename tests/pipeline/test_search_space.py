"""Search-space YAML -> Tune / Optuna spaces, its errors, and the search's small decisions."""

import json
import math

import numpy as np
import optuna.distributions as od
import pytest
from ray.tune.search import sample

from pipeline.config import ConfigError, PipelineConfig, apply_overrides, load_config
from pipeline.search_space import load_space
from pipeline.tuning import best_record, max_concurrent, optuna_searcher, startup_trials, trial_records, trial_resources
from tests.conftest import REPO


def space_file(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_default_space_searches_what_users_ask_for():
    space = load_space(REPO / "search_spaces" / "default.yaml", load_config(REPO / "pipeline.yaml"))
    asked = {"loss.weights.sst", "loss.weights.para", "loss.weights.sts", "train.alpha_start", "train.alpha_end",
             "train.lr", "train.batch_size"}
    assert asked <= set(space.params)
    assert set(space.params) - asked & {"model.dropout", "train.weight_decay", "train.warmup_ratio"}
    assert space.fixed == {"train.sampling": "annealed"}  # alpha means something only when annealed


def test_each_distribution_becomes_the_right_tune_and_optuna_space(tmp_path):
    space = load_space(space_file(tmp_path, (
        "train.lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-3}\n"
        "loss.weights.sst: {distribution: uniform, low: 0.5, high: 2}\n"
        "model.dropout: {distribution: quniform, low: 0.0, high: 0.3, q: 0.1}\n"
        "train.epochs: {distribution: int, low: 1, high: 3}\n"
        "train.batch_size: {distribution: choice, values: [8, 16]}\n")))
    tune_space, optuna_space = space.tune_domains(), space.optuna_distributions()

    lr = tune_space["train.lr"]
    assert isinstance(lr, sample.Float) and isinstance(lr.get_sampler(), sample.LogUniform)
    assert (lr.lower, lr.upper) == (1e-5, 1e-3)
    assert optuna_space["train.lr"] == od.FloatDistribution(1e-5, 1e-3, log=True)

    weight = tune_space["loss.weights.sst"]
    assert isinstance(weight.get_sampler(), sample.Uniform) and (weight.lower, weight.upper) == (0.5, 2)
    assert optuna_space["loss.weights.sst"] == od.FloatDistribution(0.5, 2.0)

    dropout = tune_space["model.dropout"]
    assert isinstance(dropout.get_sampler(), sample.Quantized) and dropout.get_sampler().q == 0.1
    assert optuna_space["model.dropout"] == od.FloatDistribution(0.0, 0.3, step=0.1)

    # int bounds are both inclusive: Tune's randint excludes its upper bound, so it gets high + 1
    epochs = tune_space["train.epochs"]
    assert isinstance(epochs, sample.Integer) and (epochs.lower, epochs.upper) == (1, 4)
    assert optuna_space["train.epochs"] == od.IntDistribution(1, 3)
    drawn = set(epochs.sample(size=200, random_state=np.random.default_rng(0)))
    assert drawn == {1, 2, 3}

    batch = tune_space["train.batch_size"]
    assert isinstance(batch, sample.Categorical) and batch.categories == [8, 16]
    assert optuna_space["train.batch_size"] == od.CategoricalDistribution([8, 16])


def test_sampled_values_become_plain_config_values(tmp_path):
    space = load_space(space_file(tmp_path, (
        "model.dropout: {distribution: quniform, low: 0.0, high: 0.3, q: 0.05}\n"
        "train.epochs: {distribution: int, low: 1, high: 3}\n")))
    values = space.normalize({"model.dropout": 0.15000000000000002, "train.epochs": np.int64(2)})
    assert values == {"model.dropout": 0.15, "train.epochs": 2}
    assert type(values["train.epochs"]) is int
    cfg = apply_overrides(PipelineConfig(), values)  # the config accepts them as they are
    assert (cfg.model.dropout, cfg.train.epochs) == (0.15, 2)


@pytest.mark.parametrize("text, expected", [
    ("train.lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-3}\ntrain.lrr: 0.1\n",
     "space.yaml:2: train.lrr: unknown config key (did you mean 'train.lr'?)"),
    ("train.lr: {distribution: uniform, low: 0.01, high: 0.001}\n",
     "space.yaml:1: train.lr: low (0.01) must be below high (0.001)"),
    ("train.lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}\ntrain.batch_size: {distribution: choice, values: []}\n",
     "space.yaml:2: train.batch_size: choice needs a non-empty list of values"),
    ("train.lr: {distribution: normal, low: 0, high: 1}\n",
     "space.yaml:1: train.lr: distribution must be one of loguniform, uniform, quniform, int, choice, got 'normal'"),
    ("train.lr: {distribution: uniform, low: 0.1}\n", "space.yaml:1: train.lr: uniform needs high"),
    ("train.lr: {distribution: uniform, low: 0.1, high: 1, q: 0.1}\n", "space.yaml:1: train.lr: unknown field 'q'"),
    ("train.lr: {distribution: loguniform, low: 0, high: 1}\n", "space.yaml:1: train.lr: loguniform needs low > 0"),
    ("model.dropout: {distribution: quniform, low: 0, high: 0.3, q: 0.07}\n",
     "space.yaml:1: model.dropout: quniform needs q > 0 dividing high - low"),
    ("train.batch_size: {distribution: uniform, low: 8, high: 32}\n",
     "space.yaml:1: train.batch_size: a uniform gives real numbers but the key holds integers; use int or choice"),
    ("train.epochs: {distribution: int, low: 1.5, high: 3}\n", "space.yaml:1: train.epochs: int needs integer bounds"),
    ("train.sampling: {distribution: choice, values: [annealed, bogus]}\n",
     "space.yaml:1: train.sampling: value 'bogus' is not valid"),
    ("model.dropout: {distribution: uniform, low: 0.0, high: 1.0}\n",
     "space.yaml:1: model.dropout: value 1.0 is not valid"),  # dropout must stay below 1
    ("data.max_length: {distribution: choice, values: [32, 64]}\n",
     "space.yaml:1: data.max_length: cannot be searched: trials run finetune + evaluate only"),
    ("train.lr: {distribution: uniform, low: 0.1, high: 1}\ntrain.epochs: two\n",
     "space.yaml:2: train.epochs: expected an integer, got 'two'"),
    ("train.lr: {distribution: uniform, low: 0.1, high: 1}\ntrain.lr: 0.5\n",
     "space.yaml:2: duplicate key 'train.lr' (first at line 1)"),
    ("train.batch_size: [8, 16]\n", "space.yaml:1: train.batch_size: a list is not a distribution"),
    ("train.sampling: annealed\n", "space.yaml: nothing to search"),
    ("train.pcgrad: true\ntrain.lr: {distribution: uniform, low: 0.1, high: 1}\n",
     "space.yaml: its fixed values do not go together"),
    ("", "space.yaml: a search space is a non-empty mapping"),
])
def test_a_bad_space_is_a_clear_error_naming_file_line_and_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_space(space_file(tmp_path, text))
    assert expected in str(e.value)
    assert str(tmp_path / "space.yaml") in str(e.value)


def test_missing_space_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="search space file not found"):
        load_space(tmp_path / "nope.yaml")


def test_config_point_seeds_the_search_only_from_inside_the_space(tmp_path):
    path = space_file(tmp_path, ("train.lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-3}\n"
                                 "train.batch_size: {distribution: choice, values: [16, 32]}\n"))
    space = load_space(path)
    assert space.config_point(PipelineConfig()) == {"train.lr": 5e-5, "train.batch_size": 32}
    with pytest.raises(ConfigError, match=r"space.yaml:2: train.batch_size: --include-config: the config's value 64"):
        space.config_point(apply_overrides(PipelineConfig(), {"train.batch_size": 64}))
    with pytest.raises(ConfigError, match=r"space.yaml:1: train.lr: .* value 0.01 is outside the space \[1e-05, 0.001\]"):
        space.config_point(apply_overrides(PipelineConfig(), {"train.lr": 0.01}))


def test_concurrency_is_how_many_trials_the_resources_fit():
    assert max_concurrent({"CPU": 2}, {"cpu": 1, "gpu": 0}, trials=4) == 2
    assert max_concurrent({"CPU": 2}, {"cpu": 2, "gpu": 0}, trials=4) == 1
    assert max_concurrent({"CPU": 3}, {"cpu": 2, "gpu": 0}, trials=4) == 1  # floor(3 / 2)
    # four quarter-GPU trials share one GPU, if the CPUs allow it
    assert max_concurrent({"CPU": 16, "GPU": 1}, {"cpu": 1, "gpu": 0.25}, trials=8) == 4
    assert max_concurrent({"CPU": 3, "GPU": 1}, {"cpu": 1, "gpu": 0.25}, trials=8) == 3
    assert max_concurrent({"CPU": 16}, {"cpu": 1, "gpu": 0}, trials=3) == 3  # never more than the trials
    assert max_concurrent({"CPU": 16}, {"cpu": 0, "gpu": 0}, trials=5) == 5


def test_trial_resources_cover_the_bigger_stage():
    cfg = apply_overrides(PipelineConfig(), {"stages.finetune.num_cpus": 2, "stages.evaluate.num_cpus": 1,
                                             "stages.finetune.num_gpus": 0.25, "stages.evaluate.num_gpus": 0.5})
    assert trial_resources(cfg) == {"cpu": 2, "gpu": 0.5}


def test_tpe_warms_up_on_a_quarter_of_the_trials_between_2_and_10():
    assert [startup_trials(n) for n in (1, 4, 8, 12, 40, 100)] == [2, 2, 2, 3, 10, 10]


def test_best_trial_is_the_best_evaluated_one_and_records_keep_start_order(tmp_path):
    for trial_id, started, status, score in [("e5", 50.0, "finished", 0.41), ("b2", 20.0, "early_stopped", 0.90),
                                             ("a1", 10.0, "finished", 0.52), ("d3", 30.0, "failed", None),
                                             ("c4", 40.0, "finished", math.nan)]:
        (tmp_path / trial_id).mkdir()
        metrics = {} if score is None else {"dev/overall": score}
        (tmp_path / trial_id / "trial.json").write_text(json.dumps(
            {"trial_id": trial_id, "started": started, "status": status, "metrics": metrics, "values": {}}))
    records = trial_records(tmp_path)
    assert [r["trial_id"] for r in records] == ["a1", "b2", "d3", "c4", "e5"]
    # the early-stopped 0.90 was never evaluated as a finished model; NaN never wins
    assert best_record(records)["trial_id"] == "a1"
    assert best_record([r for r in records if r["status"] != "finished"]) is None


def test_the_optuna_search_is_seeded_and_can_start_from_the_config():
    cfg = apply_overrides(PipelineConfig(), {"train.sampling": "annealed"})
    space = load_space(REPO / "search_spaces" / "default.yaml", cfg)

    def suggestions(seed, points=()):
        searcher = optuna_searcher(space, seed, trials=8, points_to_evaluate=points)
        return [searcher.suggest(f"trial{i}") for i in range(3)]

    first = suggestions(seed=1)
    assert suggestions(seed=1) == first  # the same seed, the same search
    assert suggestions(seed=2) != first
    assert set(first[0]) == set(space.params)
    for point in first:
        assert 1e-5 <= point["train.lr"] <= 3e-3 and point["train.batch_size"] in (8, 16, 32)
        assert round(point["model.dropout"] / 0.05, 9) % 1 == 0  # on the quniform grid
    own = space.config_point(cfg)
    assert suggestions(seed=1, points=[own])[0] == own  # --include-config: the config's values go first
