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


def test_encoder_dropout_null_or_in_range(tmp_path):
    assert load_config(write(tmp_path, "model:\n  dropout: 0.3\n")).model.encoder_dropout is None
    with pytest.raises(ConfigError, match=r"exp\.yaml:3: model\.encoder_dropout must be in \[0, 1\), got 1\.5"):
        load_config(write(tmp_path, "model:\n  dropout: 0.3\n  encoder_dropout: 1.5\n"))


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
    assert all("." in k or k in ("seed", "device", "precision", "artifacts") for k in flat)


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


# ---------------------------------------------------------------- the published recipes' switches


def test_each_pair_task_chooses_its_encoding_and_head(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  para: {encoding: concat}\n  sts: {head: cosine}\n"))
    assert (cfg.model.para.encoding, cfg.model.para.head) == ("concat", "linear")
    assert (cfg.model.sts.encoding, cfg.model.sts.head) == ("separate", "cosine")
    cfg = apply_overrides(PipelineConfig(), ["model.sts.encoding=concat", "model.sts.head=hybrid",
                                             "model.sts.cosine_weight=0.5", "model.sts.bound=tanh"])
    assert (cfg.model.sts.head, cfg.model.sts.cosine_weight, cfg.model.sts.bound) == ("hybrid", 0.5, "tanh")
    assert flatten(cfg)["model.sts.head"] == "hybrid" and flatten(cfg)["model.para.encoding"] == "separate"
    # the dataclass defaults are the CS224N starter's: both separate, linear heads, BCE / MSE
    d = PipelineConfig()
    assert (d.model.para.encoding, d.model.para.head, d.model.sts.encoding, d.model.sts.head, d.model.sts.bound,
            d.loss.para, d.loss.sts) == ("separate", "linear", "separate", "linear", "none", "bce", "mse")


def test_the_old_global_pair_keys_are_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml:2: unknown key 'model\.pair_encoding'.*renamed: use "
                                          r"model\.para\.encoding and model\.sts\.encoding"):
        load_config(write(tmp_path, "model:\n  pair_encoding: concat\n"))
    with pytest.raises(ConfigError, match="unknown key 'model.sts_head'"):
        apply_overrides(PipelineConfig(), ["model.sts_head=cosine"])
    with pytest.raises(ConfigError, match="unknown key 'loss.pair_loss'"):
        apply_overrides(PipelineConfig(), ["loss.pair_loss=cosine_embedding"])


@pytest.mark.parametrize("overrides,message", [
    (["model.sts.encoding=concat", "model.sts.head=cosine"],
     r"model\.sts\.head: cosine needs two sentence embeddings, but model\.sts\.encoding: concat"),
    (["model.sts.encoding=concat", "model.sts.head=dot"], r"model\.sts\.head: dot needs two sentence embeddings"),
    (["model.sts.encoding=concat", "model.sts.head=cosine_linear"], r"model\.sts\.head: cosine_linear needs two"),
    (["model.para.encoding=concat", "model.para.head=sbert"], r"model\.para\.head: sbert needs two sentence"),
    (["model.para.head=cosine"], r"model\.para\.head: cosine and loss\.para: cosine_embedding go together"),
    (["loss.para=cosine_embedding"], r"model\.para\.head: cosine and loss\.para: cosine_embedding go together"),
    (["loss.sts=cosine_embedding", "model.sts.head=dot"], r"loss\.sts: cosine_embedding .* needs model\.sts\.head: cosine"),
    (["model.sts.cosine_weight=0.5"], r"model\.sts\.cosine_weight .* hybrid; with head linear it would do nothing"),
    (["model.sts.head=hybrid", "model.sts.cosine_weight=1.0"], r"model\.sts\.cosine_weight must be in \(0, 1\)"),
    (["model.sts.head=cosine", "model.sts.bound=tanh"], r"model\.sts\.bound: tanh .* model\.sts\.head: cosine"),
    (["loss.sts_mnr_epochs=1"], r"loss\.sts_mnr_epochs needs model\.sts\.head: cosine or dot .*, got linear"),
    (["model.sts.head=dot", "loss.sts_mnr_epochs=1", "train.epochs=3", "train.task_epochs.sts=1"],
     r"loss\.sts_mnr_epochs \(1\) must be below sts's epochs \(train\.epochs / train\.task_epochs\.sts: 1\)"),
    (["loss.mnr_similarity=dot"], r"loss\.mnr_similarity: dot only acts with loss\.sts_mnr_epochs > 0"),
    (["loss.mnr_scale=5"], r"loss\.mnr_scale: 5\.0 only acts with loss\.sts_mnr_epochs > 0"),
    (["loss.sst_label_smoothing=1"], r"loss\.sst_label_smoothing must be in \[0, 1\), got 1\.0"),
    (["loss.sst_label_smoothing=-0.1"], r"loss\.sst_label_smoothing must be in \[0, 1\)"),
    (["loss.sst_rdrop=-1"], r"loss\.sst_rdrop must be >= 0 \(0: off\), got -1\.0"),
    (["train.ema_decay=1"], r"train\.ema_decay must be in \[0, 1\), got 1\.0"),
    (["train.weighted_clip=true", "train.sampling=summed"],
     r"train\.weighted_clip .* needs train\.grad_clip > 0 and a sampling with one task per step, not grad_clip 1\.0, sampling summed"),
    (["train.weighted_clip=true", "train.grad_clip=0"], r"train\.weighted_clip .* not grad_clip 0\.0, sampling proportional"),
    (["train.lr_schedule=step"], r"train\.lr_schedule: expected one of \['constant', 'linear', 'cosine'\]"),
    (["train.task_epochs.para=3"], r"train\.task_epochs\.para must be in 1\.\.train\.epochs \(2\), got 3"),
    (["train.task_epochs.para=0"], r"train\.task_epochs\.para must be in 1\.\.train\.epochs"),
    (["train.data_fraction.para=0"], r"train\.data_fraction\.para must be in \(0, 1\], got 0"),
    (["train.data_fraction.sts=1.5"], r"train\.data_fraction\.sts must be in \(0, 1\]"),
    (["train.task_epochs.sts=1", "loss.weights.sts=0"], r"train\.task_epochs\.sts is set but loss\.weights\.sts is 0"),
    (["train.epochs=5", "train.task_epochs={sst: 2, para: 1, sts: 3}"],
     r"every trained task stops before train\.epochs \(5\) .* set train\.epochs to 3"),
    (["train.smart.enabled=true", "precision=bf16"],
     r"train\.smart\.enabled with precision: bf16: SMART's perturbation \(train\.smart\.epsilon 1e-05\) is below bf16's"),
    (["precision=fp16"], r"precision: expected one of \['auto', 'fp32', 'bf16'\]"),
])
def test_recipe_switches_that_cannot_mean_anything_are_errors_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(PipelineConfig(), overrides)


def test_recipe_switch_combinations_that_do_mean_something_load():
    for overrides in (
            ["model.para.encoding=concat", "model.sts.head=cosine"],  # report D's CoSim
            ["model.para.encoding=concat", "model.sts.encoding=concat", "model.sts.head=hybrid"],  # report C row E
            ["model.sts.head=cosine", "loss.sts_mnr_epochs=1", "loss.mnr_similarity=dot"],  # report D's MNR
            ["model.sts.head=dot", "model.sts.bound=tanh", "loss.sts_mnr_epochs=1", "loss.mnr_scale=2"],
            ["model.shared_encoder=false", "model.para.encoding=concat", "model.sts.encoding=concat", "loss.para=mse",
             "train.epochs=5", "train.task_epochs.para=1", "train.sampling=sequential", "model.dropout=0.0"],  # report A
            ["train.task_epochs={sst: 1, para: 1}", "loss.weights.sts=1"],  # sts trains all of train.epochs
            ["train.task_epochs.sst=1", "loss.weights.para=0", "loss.weights.sts=0", "train.epochs=1"],
            ["train.data_fraction.para=0.1", "train.lr_schedule=constant", "train.warmup_ratio=0"]):
        apply_overrides(PipelineConfig(), overrides)


FROZEN_PARAMETER_FREE = ["model.freeze_encoder=true", "model.para.head=cosine", "loss.para=cosine_embedding",
                         "model.sts.head=dot", "loss.weights.sst=0"]


def test_a_frozen_encoder_whose_trained_tasks_all_have_parameter_free_heads_is_an_error_naming_the_keys():
    with pytest.raises(ConfigError) as error:
        apply_overrides(PipelineConfig(), FROZEN_PARAMETER_FREE)
    assert str(error.value) == (
        "after overrides: model.freeze_encoder: true (no PALs) with model.para.head: cosine and model.sts.head: dot "
        "and loss.weights.sst 0: no trained task has a parameter to train; give a task a head with parameters, "
        "train sst, enable model.pals or unfreeze the encoder")
    # One task with something to train is enough: finetune logs the others' losses untrained.
    for fix in (["model.sts.head=cosine_linear"], ["loss.weights.sst=1"], ["model.pals.enabled=true"],
                ["model.freeze_encoder=false"], ["model.para.head=linear", "loss.para=bce"]):
        apply_overrides(PipelineConfig(), FROZEN_PARAMETER_FREE + fix)
    apply_overrides(PipelineConfig(), ["model.freeze_encoder=true", "model.sts.head=cosine"])  # techniques.yaml's


def test_the_shipped_config_is_the_searched_recipe_and_the_dataclass_defaults_the_starters():
    cfg = load_config(REPO / "pipeline.yaml")
    # pipeline.yaml: the recipe tune found: Quora a cross-encoder, STS siamese cosine
    assert (cfg.model.pooling, cfg.model.para.encoding, cfg.model.para.head, cfg.model.sts.encoding,
            cfg.model.sts.head) == ("mean", "concat", "linear", "separate", "cosine")
    assert (cfg.train.lr_schedule, cfg.train.sampling, cfg.loss.para, cfg.loss.sts) == ("linear", "annealed", "bce", "mse")
    # a key the file leaves out falls back to the starter-like dataclass default
    plain = PipelineConfig()
    assert (plain.model.pooling, plain.model.para.encoding, plain.model.sts.head) == ("cls", "separate", "linear")
    assert cfg.train.task_epochs == plain.train.task_epochs
    assert cfg.train.data_fraction == plain.train.data_fraction


# ---------------------------------------------------------------- the user's own data files

SICK = ("    - name: sick\n      file: sick.tsv\n      task: sts\n      scale: [1, 5]\n"
        "      columns: {id: pair_ID, sentence1: sentence_A, sentence2: sentence_B, label: relatedness_score}\n")


def test_extra_eval_and_train_files_load_and_resolve_against_the_config_folder(tmp_path):
    from pipeline.prepare import resolve_paths

    cfg = load_config(write(tmp_path, f"data:\n  dir: elsewhere\n  extra_eval:\n{SICK}"
                                      "  train_files:\n    sts: {file: /abs/my-sts.tsv, delimiter: comma}\n"))
    (sick,) = cfg.data.extra_eval
    assert (sick.name, sick.task, sick.scale, sick.columns.label) == ("sick", "sts", [1.0, 5.0], "relatedness_score")
    assert cfg.data.train_files.sts.task is None and cfg.data.train_files.sst is None
    resolved = resolve_paths(apply_overrides(cfg, {"model.dir": "m"}), tmp_path)
    assert resolved.data.extra_eval[0].file == str(tmp_path / "sick.tsv")  # the config's folder, not data.dir
    assert resolved.data.train_files.sts.file == "/abs/my-sts.tsv"
    assert load_config(write(tmp_path, dump_yaml(resolved))) == resolved  # the logged config.yaml loads back
    assert flatten(cfg)["data.train_files.sts.delimiter"] == "comma"
    assert flatten(cfg)["data.extra_eval"][0]["name"] == "sick"


@pytest.mark.parametrize("entry, message", [
    ("{name: s, file: x.tsv, task: sst, scale: [1, 5]}", r"data\.extra_eval\[0\]\.scale rescales similarity scores: sts only"),
    ("{name: s, file: x.tsv, task: sts, scale: [5, 1]}", r"data\.extra_eval\[0\]\.scale must be \[lo, hi\] with lo < hi"),
    ("{name: s, file: x.tsv, task: sts, scale: [1, 3, 5]}", r"data\.extra_eval\[0\]\.scale must be \[lo, hi\]"),
    ("{name: s, file: x.tsv, task: nli}", r"data\.extra_eval\[0\]\.task: expected one of \['sst', 'para', 'sts'\]"),
    ("{name: s, file: x.tsv}", r"data\.extra_eval\[0\]\.task must be sst, para or sts"),
    ("{name: s/x, file: x.tsv, task: sts}", r"data\.extra_eval\[0\]\.name must be letters, digits, _ or -"),
    ("{file: x.tsv, task: sts}", r"data\.extra_eval\[0\]\.name must be"),
    ("{name: s, task: sts}", r"data\.extra_eval\[0\]\.file is missing"),
    ("{name: s, file: x.tsv, task: sts, columns: {id: a, sentence1: b, sentence2: c}}",
     r"data\.extra_eval\[0\]\.columns\.label is missing: a sts file's columns must name id, sentence1, sentence2, label"),
    ("{name: s, file: x.tsv, task: sst, columns: {id: a, sentence1: b, label: c}}", r"data\.extra_eval\[0\]\.columns\.sentence is missing"),
    ("{name: s, file: x.tsv, task: sts, colums: {}}", r"unknown key 'data\.extra_eval\[0\]\.colums' \(did you mean 'columns'\?\)"),
    ("{name: s, file: x.tsv, task: sts, delimiter: ';'}", r"data\.extra_eval\[0\]\.delimiter: expected one of \['tab', 'comma'\]"),
])
def test_a_bad_extra_eval_entry_names_the_file_line_and_key(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=r"exp\.yaml:3: " + message):
        load_config(write(tmp_path, f"seed: 1\ndata:\n  extra_eval:\n    - {entry}\n"))


def test_extra_eval_names_are_unique_and_train_files_take_their_task_from_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.extra_eval\[1\]\.name: 'sick' is also data\.extra_eval\[0\]'s name"):
        load_config(write(tmp_path, f"data:\n  extra_eval:\n{SICK}{SICK}"))
    with pytest.raises(ConfigError, match=r"data\.train_files\.sts\.task: a sts train file is scored as sts, got para"):
        apply_overrides(PipelineConfig(), ["data.train_files.sts={file: x.tsv, task: para}"])
    with pytest.raises(ConfigError, match=r"data\.train_files\.para\.name: only data\.extra_eval entries have a name"):
        apply_overrides(PipelineConfig(), ["data.train_files.para={file: x.tsv, name: q}"])
    with pytest.raises(ConfigError, match=r"data\.train_files\.sst\.scale rescales similarity scores: sts only"):
        apply_overrides(PipelineConfig(), ["data.train_files.sst={file: x.tsv, scale: [1, 5]}"])
    cfg = apply_overrides(PipelineConfig(), ["data.train_files.sts={file: x.tsv, task: sts, scale: [1, 5]}"])
    assert cfg.data.train_files.sts.scale == [1.0, 5.0]
