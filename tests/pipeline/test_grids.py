"""Ablation grids: every variant is checked against the config when the grid is read."""

import pytest

from pipeline.config import ConfigError, PipelineConfig, apply_overrides
from pipeline.grids import load_grid, variant_overrides
from tests.conftest import REPO

TECHNIQUES = REPO / "search_spaces" / "ablations" / "techniques.yaml"
ISSUE_8_NAMES = {  # the vocabulary users see in MLflow's `ablation` tag
    "baseline", "concat_pairs", "cosine_sts", "cosine_embedding_loss", "sbert_head", "mnr_loss", "deep_heads",
    "mean_pooling", "round_robin", "proportional", "annealed", "summed_loss", "loss_weights", "pcgrad", "pals",
    "separate_encoders", "sequential", "smart", "mlm_pretrain", "frozen_encoder", "layerwise_lr_decay", "lookahead",
}
ISSUE_12_NAMES = {  # the published recipes' switches (../shared/SEED-RECIPES.md)
    "concat_para_cosine_sts", "dot_sts", "mnr_dot", "tanh_sts", "cosine_linear_sts", "hybrid_sts_fixed", "hybrid_sts",
    "concat_hybrid_sts", "para_mse", "constant_lr", "cosine_lr", "task_epochs", "data_fraction",
}


def test_techniques_grid_has_every_named_variant_and_each_applies():
    text = TECHNIQUES.read_text()
    assert text.startswith("#")
    base, variants = load_grid(TECHNIQUES)
    assert ISSUE_8_NAMES <= set(variants) and ISSUE_12_NAMES <= set(variants)
    assert variants["baseline"] == {}
    for name, overrides in variants.items():
        cfg = apply_overrides(PipelineConfig(), {**base, **overrides})
        assert cfg != PipelineConfig() or name in ("baseline", "proportional"), name


def test_variant_by_name():
    name, overrides = variant_overrides(f"{TECHNIQUES}:pcgrad", PipelineConfig())
    assert name == "pcgrad"
    assert overrides == {"train.sampling": "summed", "train.pcgrad": True}


def test_unknown_variant_lists_the_names():
    with pytest.raises(ConfigError, match="no variant 'pcgard' in .*it has baseline, concat_pairs"):
        variant_overrides(f"{TECHNIQUES}:pcgard", PipelineConfig())


def test_bad_variant_names_file_line_and_variant(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("variants:\n  ok: {}\n  broken:\n    train.lrr: 1\n")
    with pytest.raises(ConfigError, match=r"g\.yaml:3: variant 'broken': override train\.lrr: unknown key"):
        load_grid(grid)


def test_contradictory_variant_is_rejected_when_read(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("variants:\n  bad: {train.pcgrad: true, train.sampling: round_robin}\n")
    with pytest.raises(ConfigError, match="variant 'bad'.*train.pcgrad needs train.sampling: summed"):
        load_grid(grid)


def test_unknown_top_level_key(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("variants:\n  a: {}\nvariant:\n  b: {}\n")
    with pytest.raises(ConfigError, match=r"g\.yaml:3: unknown key 'variant'"):
        load_grid(grid)


@pytest.mark.parametrize("grid", sorted((REPO / "search_spaces" / "ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_grid_loads_says_how_to_run_and_has_a_baseline(grid):
    text = grid.read_text()
    assert text.startswith("#") and f"--grid search_spaces/ablations/{grid.name}" in text
    base, variants = load_grid(grid)
    assert "baseline" in variants
    configs = {name: repr(apply_overrides(PipelineConfig(), {**base, **v})) for name, v in variants.items()}
    if grid.name == "techniques.yaml":  # `proportional` is the default sampling, listed under the name users look for
        configs.pop("proportional")
    assert len(set(configs.values())) == len(configs), "two variants of the grid are the same config"
