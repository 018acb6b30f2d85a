"""The rules a config must keep that its types alone do not say: ranges, and the cross-key
rules of the techniques (combinations that cannot mean anything are errors, never silent
no-ops). `config.apply_overrides` runs `validate` after every change, so a file, a --set, a
grid variant and a search space's values all meet the same rules.
"""

from __future__ import annotations

import dataclasses
import re

from pipeline.constants import TASKS
from pipeline.typed import get
from pipeline.yamlfile import ConfigError


def validate(cfg, where: str = "config") -> None:
    """Range checks and cross-key rules the types alone do not catch."""
    def positive(key: str, value: float | None, allow_none: bool = False):
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise ConfigError(f"{where}: {key} must be > 0, got {value!r}")

    for key in ("train.batch_size", "train.eval_batch_size", "train.epochs", "train.lr",
                "mlm.batch_size", "mlm.epochs", "mlm.lr", "data.max_length", "tracking.retry_seconds"):
        positive(key, get(cfg, key))
    for key in ("train.steps_per_epoch", "mlm.max_steps", "data.max_rows"):
        positive(key, get(cfg, key), allow_none=True)
    for key in ("train.checkpoint_every", "mlm.checkpoint_every"):
        if get(cfg, key) < 0:
            raise ConfigError(f"{where}: {key} must be >= 0 (0: checkpoint at epoch ends only), got {get(cfg, key)}")
    if cfg.data.max_length < 8:
        raise ConfigError(f"{where}: data.max_length must be at least 8, got {cfg.data.max_length}")
    for key in ("data.quora_dev_fraction", "mlm.mask_prob", "mlm.heldout_fraction"):
        if not 0 < get(cfg, key) < 1:
            raise ConfigError(f"{where}: {key} must be between 0 and 1, got {get(cfg, key)!r}")
    for key in ("model.dropout", "model.encoder_dropout", "train.warmup_ratio"):
        if get(cfg, key) is not None and not 0 <= get(cfg, key) < 1:
            raise ConfigError(f"{where}: {key} must be in [0, 1), got {get(cfg, key)!r}")
    for task in TASKS:
        if getattr(cfg.loss.weights, task) < 0:
            raise ConfigError(f"{where}: loss.weights.{task} must be >= 0")
    for name in ("data_prep", "mlm_pretrain", "finetune", "evaluate", "reference"):
        stage = getattr(cfg.stages, name)
        if stage.num_cpus < 0 or stage.num_gpus < 0 or stage.max_retries < 0:
            raise ConfigError(f"{where}: stages.{name}: num_cpus, num_gpus, max_retries must be >= 0")
    _check_dataset_files(cfg, where)
    _check_technique_combinations(cfg, where)
    # A stage that needs a disabled stage cannot run. (mlm_pretrain is optional for finetune.)
    needs = {"mlm_pretrain": ["data_prep"], "finetune": ["data_prep"], "evaluate": ["data_prep", "finetune"],
             "reference": ["data_prep"]}
    for stage, required in needs.items():
        if getattr(cfg.stages, stage).enabled:
            for dep in required:
                if not getattr(cfg.stages, dep).enabled:
                    raise ConfigError(
                        f"{where}: stages.{stage} is enabled but depends on stages.{dep}, which is disabled")


# A task's fields in DatasetColumns: every one must be named, no other.
DATASET_FIELDS = {"sst": ("id", "sentence", "label"), "para": ("id", "sentence1", "sentence2", "label"),
                  "sts": ("id", "sentence1", "sentence2", "label")}
METRIC_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+")
# The pair heads without weights of their own: the score is computed from the two sentence vectors.
PARAMETER_FREE_HEADS = {"para": ("cosine",), "sts": ("cosine", "dot")}


def _check_dataset_files(cfg, where: str) -> None:
    """data.extra_eval and data.train_files: each a file, a task, and a layout that fits the task."""
    names: dict[str, int] = {}
    for i, spec in enumerate(cfg.data.extra_eval):
        key = f"data.extra_eval[{i}]"
        if spec.name is None or not METRIC_SAFE_NAME.fullmatch(spec.name):
            raise ConfigError(f"{where}: {key}.name must be letters, digits, _ or - (it names the metrics "
                              f"eval/<name>/...), got {spec.name!r}")
        if spec.name in names:
            raise ConfigError(f"{where}: {key}.name: '{spec.name}' is also data.extra_eval[{names[spec.name]}]'s name")
        names[spec.name] = i
        if spec.task is None:
            raise ConfigError(f"{where}: {key}.task must be sst, para or sts (what the set is scored as)")
        _check_dataset_file(spec, spec.task, key, where)
    for task in TASKS:
        spec = getattr(cfg.data.train_files, task)
        if spec is None:
            continue
        key = f"data.train_files.{task}"
        if spec.name is not None:
            raise ConfigError(f"{where}: {key}.name: only data.extra_eval entries have a name")
        if spec.task not in (None, task):
            raise ConfigError(f"{where}: {key}.task: a {task} train file is scored as {task}, got {spec.task}")
        _check_dataset_file(spec, task, key, where)


def _check_dataset_file(spec, task: str, key: str, where: str) -> None:
    if not spec.file:
        raise ConfigError(f"{where}: {key}.file is missing (a path relative to the config file, or absolute)")
    if spec.columns is not None:
        named = {f for f, v in dataclasses.asdict(spec.columns).items() if v is not None}
        missing = [f for f in DATASET_FIELDS[task] if f not in named]
        if missing:
            raise ConfigError(f"{where}: {key}.columns.{missing[0]} is missing: a {task} file's columns must name "
                              f"{', '.join(DATASET_FIELDS[task])} (or leave columns null for the CS224N layout)")
        extra = sorted(named - set(DATASET_FIELDS[task]))
        if extra:
            raise ConfigError(f"{where}: {key}.columns.{extra[0]}: a {task} file has no such field "
                              f"(its fields: {', '.join(DATASET_FIELDS[task])})")
    if spec.scale is not None:
        if task != "sts":
            raise ConfigError(f"{where}: {key}.scale rescales similarity scores: sts only, not {task}")
        if len(spec.scale) != 2 or not spec.scale[0] < spec.scale[1]:
            raise ConfigError(f"{where}: {key}.scale must be [lo, hi] with lo < hi (the file's score range), "
                              f"got {spec.scale}")


def _check_technique_combinations(cfg, where: str) -> None:
    """Combinations that cannot mean anything are errors, never silent no-ops."""
    m, t, loss = cfg.model, cfg.train, cfg.loss
    if m.head_layers not in (1, 3):
        raise ConfigError(f"{where}: model.head_layers must be 1 or 3, got {m.head_layers}")
    if m.pals.enabled and (m.pals.size <= 0 or m.pals.heads <= 0 or m.pals.size % m.pals.heads):
        raise ConfigError(f"{where}: model.pals.size ({m.pals.size}) must be a positive multiple of model.pals.heads ({m.pals.heads})")
    if t.weighted_clip and (t.sampling == "summed" or not t.grad_clip > 0):
        raise ConfigError(f"{where}: train.weighted_clip scales a one-task step's clipping limit by its loss weight: "
                          f"it needs train.grad_clip > 0 and a sampling with one task per step, not "
                          f"grad_clip {t.grad_clip}, sampling {t.sampling}")
    if t.pcgrad and t.sampling != "summed":
        raise ConfigError(f"{where}: train.pcgrad needs train.sampling: summed (every task's gradient in one step); "
                          f"with {t.sampling} a step holds one task's gradient, so there is nothing to project")
    # Each pair task's encoding, head and loss must fit together.
    siamese = {"para": ("sbert", "cosine"), "sts": ("sbert", "cosine", "dot", "cosine_linear")}
    for task, task_cfg in (("para", m.para), ("sts", m.sts)):
        if task_cfg.encoding == "concat" and task_cfg.head in siamese[task]:
            raise ConfigError(f"{where}: model.{task}.head: {task_cfg.head} needs two sentence embeddings, but "
                              f"model.{task}.encoding: concat encodes a pair as one sequence")
    if (m.para.head == "cosine") != (loss.para == "cosine_embedding"):
        raise ConfigError(f"{where}: model.para.head: cosine and loss.para: cosine_embedding go together (the "
                          f"para output is then cos(u, v)); got model.para.head: {m.para.head}, loss.para: {loss.para}")
    if loss.sts == "cosine_embedding" and m.sts.head != "cosine":
        raise ConfigError(f"{where}: loss.sts: cosine_embedding scores pairs by cos(u, v), so it needs "
                          f"model.sts.head: cosine, got {m.sts.head}")
    if m.sts.cosine_weight is not None:
        if m.sts.head != "hybrid":
            raise ConfigError(f"{where}: model.sts.cosine_weight weighs the cosine in model.sts.head: hybrid; "
                              f"with head {m.sts.head} it would do nothing")
        if not 0 < m.sts.cosine_weight < 1:  # 1 would be head cosine with a dead head, 0 head linear
            raise ConfigError(f"{where}: model.sts.cosine_weight must be in (0, 1) (null: learned), got {m.sts.cosine_weight}")
    if m.sts.bound == "tanh" and m.sts.head == "cosine":
        raise ConfigError(f"{where}: model.sts.bound: tanh bounds a head's unbounded number; model.sts.head: "
                          f"cosine is 5 * cos(u, v), already in [-5, 5]")
    if loss.sts_mnr_epochs < 0:
        raise ConfigError(f"{where}: loss.sts_mnr_epochs must be >= 0")
    if loss.sts_mnr_epochs:
        if m.sts.head not in ("cosine", "dot"):
            raise ConfigError(f"{where}: loss.sts_mnr_epochs needs model.sts.head: cosine or dot (MNR trains the "
                              f"geometry of the two sentence embeddings those heads compare), got {m.sts.head}")
        sts_epochs = cfg.train.task_epochs.sts or cfg.train.epochs
        if loss.sts_mnr_epochs >= sts_epochs:
            raise ConfigError(f"{where}: loss.sts_mnr_epochs ({loss.sts_mnr_epochs}) must be below sts's epochs "
                              f"(train.epochs / train.task_epochs.sts: {sts_epochs}): the sts head's loss follows it")
    else:
        for key, value, off in (("loss.mnr_similarity", loss.mnr_similarity, "cosine"),
                                ("loss.mnr_scale", loss.mnr_scale, None)):
            if value != off:
                raise ConfigError(f"{where}: {key}: {value} only acts with loss.sts_mnr_epochs > 0")
    if not 0.0 <= loss.sst_label_smoothing < 1.0:
        raise ConfigError(f"{where}: loss.sst_label_smoothing must be in [0, 1), got {loss.sst_label_smoothing}")
    if loss.sst_rdrop < 0:
        raise ConfigError(f"{where}: loss.sst_rdrop must be >= 0 (0: off), got {loss.sst_rdrop}")
    if loss.mnr_scale is not None and loss.mnr_scale <= 0:
        raise ConfigError(f"{where}: loss.mnr_scale must be > 0 (null: 20 for cosine, 1 for dot), got {loss.mnr_scale}")
    # Per-task epochs and train fractions.
    trained = [task for task in TASKS if getattr(cfg.loss.weights, task) > 0]
    for task in TASKS:
        epochs = getattr(t.task_epochs, task)
        fraction = getattr(t.data_fraction, task)
        if epochs is not None and not 1 <= epochs <= t.epochs:
            raise ConfigError(f"{where}: train.task_epochs.{task} must be in 1..train.epochs ({t.epochs}), "
                              f"got {epochs} (null: all of train.epochs)")
        if not 0 < fraction <= 1:
            raise ConfigError(f"{where}: train.data_fraction.{task} must be in (0, 1], got {fraction}")
        if task not in trained and (epochs is not None or fraction != 1):
            key = f"train.task_epochs.{task}" if epochs is not None else f"train.data_fraction.{task}"
            raise ConfigError(f"{where}: {key} is set but loss.weights.{task} is 0, so {task} does not train")
    if trained and all((getattr(t.task_epochs, task) or t.epochs) < t.epochs for task in trained):
        longest = max(getattr(t.task_epochs, task) for task in trained)
        raise ConfigError(f"{where}: every trained task stops before train.epochs ({t.epochs}) by "
                          f"train.task_epochs; epochs {longest + 1}..{t.epochs} would train nothing: "
                          f"set train.epochs to {longest}")
    if m.freeze_encoder and t.layerwise_lr_decay != 1.0:
        raise ConfigError(f"{where}: train.layerwise_lr_decay has no effect with model.freeze_encoder: true")
    # A frozen encoder without PALs leaves a parameter-free pair head's task nothing to train
    # (finetune logs its loss without a gradient); when that is every trained task, nothing trains.
    free = [f"model.{task}.head: {getattr(m, task).head}" for task in trained
            if task != "sst" and getattr(m, task).head in PARAMETER_FREE_HEADS[task]]
    if m.freeze_encoder and not m.pals.enabled and trained and len(free) == len(trained):
        raise ConfigError(f"{where}: model.freeze_encoder: true (no PALs) with {' and '.join(free)} and "
                          f"loss.weights.sst 0: no trained task has a parameter to train; give a task a head "
                          f"with parameters, train sst, enable model.pals or unfreeze the encoder")
    if not 0 < t.layerwise_lr_decay <= 1:
        raise ConfigError(f"{where}: train.layerwise_lr_decay must be in (0, 1], got {t.layerwise_lr_decay}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"{where}: train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.lookahead and (t.lookahead_k < 1 or not 0 < t.lookahead_alpha < 1):
        raise ConfigError(f"{where}: train.lookahead_k must be >= 1 and train.lookahead_alpha in (0, 1) "
                          f"(alpha 1 is plain AdamW)")
    if t.smart.enabled and (t.smart.weight < 0 or t.smart.epsilon <= 0 or t.smart.step_size <= 0):
        raise ConfigError(f"{where}: train.smart: weight must be >= 0, epsilon and step_size > 0")
    if t.smart.enabled and cfg.precision == "bf16":
        raise ConfigError(f"{where}: train.smart.enabled with precision: bf16: SMART's perturbation "
                          f"(train.smart.epsilon {t.smart.epsilon:g}) is below bf16's resolution, so its term "
                          f"would measure rounding; use precision: auto (SMART then trains in fp32) or fp32")
