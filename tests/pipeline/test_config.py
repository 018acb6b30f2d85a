"""Config loading: strict keys and types, errors that name the file, line and key; overrides."""

import pytest

from pipeline.config import (ConfigError, PipelineConfig, apply_overrides, dump_yaml, flatten,
                             load_config)
from tests.conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_shipped_pipeline_yaml_loads_and_starts_with_a_comment():
    text = (REPO / "pipeline.yaml").read_text()
    assert text.startswith("#")
    cfg = load_config(REPO / "pipeline.yaml")
    assert cfg.data.on_bad_rows == "drop"  # the shipped config drops the 2 bad Quora rows
    assert cfg.stages.mlm_pretrain.enabled is False


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == PipelineConfig()


def test_unknown_key_names_file_line_and_path(tmp_path):
    path = write(tmp_path, "seed: 1\ntrain:\n  epochs: 1\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml:4: unknown key 'train\.lrr' \(did you mean 'lr'\?\)"):
        load_config(path)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml:1: unknown key 'trian'"):
        load_config(write(tmp_path, "trian:\n  lr: 1\n"))


def test_wrong_type_names_key_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml:3: train\.epochs: expected an integer, got 'two'"):
        load_config(write(tmp_path, "seed: 1\ntrain:\n  epochs: two\n"))


def test_learning_rate_not_a_number(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'fast'"):
        load_config(write(tmp_path, "train:\n  lr: fast\n"))


def test_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads 5e-5 as a string; a learning rate written that way must still work.
    assert load_config(write(tmp_path, "train:\n  lr: 5e-5\n")).train.lr == 5e-5


@pytest.mark.parametrize("key", ["train.batch_size", "mlm.batch_size", "train.epochs"])
def test_zero_or_negative_sizes_rejected(tmp_path, key):
    section, leaf = key.split(".")
    for bad in (0, -4):
        with pytest.raises(ConfigError, match=rf"{key} must be > 0, got {bad}"):
            load_config(write(tmp_path, f"{section}:\n  {leaf}: {bad}\n"))


def test_choice_outside_literal(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml:2: model\.pooling: expected one of \['cls', 'mean'\], got 'max'"):
        load_config(write(tmp_path, "model:\n  pooling: max\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml: not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n"))


def test_duplicate_key(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml:3: duplicate key 'train\.lr'"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n"))


def test_stage_depending_on_disabled_stage(tmp_path):
    text = "stages:\n  finetune: {enabled: false}\n"
    with pytest.raises(ConfigError, match="stages.evaluate is enabled but depends on stages.finetune, which is disabled"):
        load_config(write(tmp_path, text))


def test_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n")
    cfg = load_config(path, ["train.lr=1e-4", "loss.weights.sts=2", "model.dir=/x", "data.max_rows=null"])
    assert cfg.train.lr == 1e-4 and cfg.loss.weights.sts == 2.0 and cfg.model.dir == "/x"
    assert cfg.data.max_rows is None
    with pytest.raises(ConfigError, match=r"--set train\.nope: unknown key 'train\.nope'"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match=r"--set: train\.batch_size: expected an integer, got 'big'"):
        load_config(path, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="train.batch_size must be > 0"):
        load_config(path, ["train.batch_size=0"])


def test_overrides_do_not_touch_the_original():
    cfg = PipelineConfig()
    apply_overrides(cfg, {"train.lr": 0.5})
    assert cfg.train.lr == PipelineConfig().train.lr


def test_flatten_uses_mlflow_param_names():
    flat = flatten(PipelineConfig())
    assert flat["train.lr"] == 5e-5
    assert flat["loss.weights.sst"] == 1.0
    assert flat["stages.finetune.num_cpus"] == 1
    assert all("." in k or k in ("seed", "device", "artifacts") for k in flat)


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = load_config(REPO / "pipeline.yaml", ["train.lr=3e-5", "loss.weights.para=0.5"])
    path = write(tmp_path, dump_yaml(cfg))
    assert load_config(path) == cfg


# ---------------------------------------------------------------- range errors name the file and line


@pytest.mark.parametrize("text,message", [
    ("seed: 1\ntrain:\n  batch_size: 0\n", r"exp\.yaml:3: train\.batch_size must be > 0, got 0"),
    ("mlm:\n  batch_size: -8\n", r"exp\.yaml:2: mlm\.batch_size must be > 0, got -8"),
    ("train:\n  lr: -1e-4\n", r"exp\.yaml:2: train\.lr must be > 0, got -0\.0001"),
    ("train:\n  lr: .nan\n", r"exp\.yaml:2: train\.lr: expected a finite number, got nan"),
    ("train:\n  lr: nan\n", r"exp\.yaml:2: train\.lr: expected a finite number, got 'nan'"),
    ("loss:\n  weights:\n    sts: .inf\n", r"exp\.yaml:3: loss\.weights\.sts: expected a finite number, got inf"),
    ("train:\n  epochs: 2\n  checkpoint_every: -1\n", r"exp\.yaml:3: train\.checkpoint_every must be >= 0"),
    ("stages:\n  finetune:\n    enabled: false\n",
     r"exp\.yaml:2: stages\.evaluate is enabled but depends on stages\.finetune, which is disabled"),
])
def test_range_errors_name_file_line_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_learning_rate_not_a_number_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml:3: train\.lr: expected a number, got '1e-4x'"):
        load_config(write(tmp_path, "train:\n  epochs: 1\n  lr: 1e-4x\n"))


def test_reliability_keys(tmp_path):
    cfg = load_config(write(tmp_path, "tracking:\n  on_unreachable: local\ntrain:\n  checkpoint_every: 0\n"))
    assert cfg.tracking.on_unreachable == "local" and cfg.train.checkpoint_every == 0
    assert PipelineConfig().tracking.on_unreachable == "error" and PipelineConfig().train.checkpoint_every == 200
    with pytest.raises(ConfigError, match=r"exp\.yaml:2: tracking\.on_unreachable: expected one of \['error', 'local'\], got 'ignore'"):
        load_config(write(tmp_path, "tracking:\n  on_unreachable: ignore\n"))


def test_an_override_can_fix_a_bad_file_value(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: 0\n")
    assert load_config(path, ["train.batch_size=8"]).train.batch_size == 8
    with pytest.raises(ConfigError, match=r"after overrides: train\.batch_size must be > 0, got 0"):
        load_config(path, ["train.lr=1e-4"])


def test_a_partly_given_section_keeps_its_parents_defaults(tmp_path):
    # mlm_pretrain is disabled by default; setting only its CPUs must not switch it on.
    cfg = load_config(write(tmp_path, "stages:\n  mlm_pretrain: {num_cpus: 1}\n"))
    assert cfg.stages.mlm_pretrain.enabled is False and cfg.stages.mlm_pretrain.num_cpus == 1
    cfg = apply_overrides(PipelineConfig(), ["stages.mlm_pretrain={num_cpus: 1}", "train.smart={enabled: true}"])
    assert cfg.stages.mlm_pretrain.enabled is False and cfg.train.smart.enabled is True
    assert cfg.train.smart.weight == PipelineConfig().train.smart.weight
