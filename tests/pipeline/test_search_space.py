"""Search-space YAML -> Tune / Optuna spaces, and its errors (pipeline/search_space.py)."""

import itertools

import numpy as np
import optuna.distributions as od
import pytest
from ray.tune.search import sample

from pipeline.config import ConfigError, PipelineConfig, apply_overrides, get, load_config
from pipeline.search_space import load_space
from tests.conftest import REPO


def space_file(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_default_space_searches_what_moves_the_result_and_holds_the_shipped_recipe():
    cfg = load_config(REPO / "pipeline.yaml")
    space = load_space(REPO / "search_spaces" / "default.yaml", cfg)
    assert {"model.pooling", "model.para.encoding", "model.sts.head", "train.lr", "train.lr_schedule",
            "loss.sst_label_smoothing", "loss.sst_rdrop"} <= set(space.params)
    # not the loss weights: pipeline.yaml clips one-task steps without keeping the weight (README)
    assert not cfg.train.weighted_clip and not [key for key in space.params if key.startswith("loss.weights")]
    assert space.fixed == {}
    # --include-config starts from pipeline.yaml's recipe: it must be a point of the space
    assert space.config_point(cfg) == {key: get(cfg, key) for key in space.params}
    # every combination of the choices is a valid config (the config rules reject e.g. concat + cosine)
    choices = [[(key, v) for v in p.values] for key, p in space.params.items() if p.distribution == "choice"]
    for combo in itertools.product(*choices):
        apply_overrides(cfg, dict(combo))


def test_sst_refine_space_holds_the_shipped_recipe_and_every_choice_is_valid():
    cfg = load_config(REPO / "pipeline.yaml")
    space = load_space(REPO / "search_spaces" / "sst_refine.yaml", cfg)
    assert {"train.lr", "loss.weights.sst", "train.layerwise_lr_decay", "model.dropout"} <= set(space.params)
    assert space.config_point(cfg) == {key: get(cfg, key) for key in space.params}  # --include-config
    for value in space.params["train.data_fraction.para"].values:
        apply_overrides(cfg, {"train.data_fraction.para": value})


def test_loss_and_sampling_space_searches_what_users_ask_for():
    space = load_space(REPO / "search_spaces" / "loss_and_sampling.yaml", load_config(REPO / "pipeline.yaml"))
    asked = {"loss.weights.sst", "loss.weights.para", "loss.weights.sts", "train.alpha_start", "train.alpha_end",
             "train.lr", "train.batch_size"}
    assert asked <= set(space.params)
    assert set(space.params) - asked & {"model.dropout", "train.weight_decay", "train.warmup_ratio"}
    # alpha means something only when annealed; the weights only when clipping keeps them
    assert space.fixed == {"train.sampling": "annealed", "train.weighted_clip": True}


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
