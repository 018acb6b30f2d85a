"""Ablation grids: every variant is checked against the config when the grid is read."""

import pytest

from pipeline.config import ConfigError, PipelineConfig, apply_overrides, flatten, load_config
from pipeline.grids import load_grid, load_grid_with_published, variant_overrides
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


ABLATIONS = REPO / "search_spaces" / "ablations"
REPORTS = sorted((ABLATIONS / "reports").glob("*.yaml"))
# Grids of one-factor changes to pipeline.yaml's recipe: on the bare defaults several of them are
# the defaults themselves (pipeline.yaml's STS head is cosine, the default's linear).
ON_SHIPPED = {"claims.yaml"}


@pytest.mark.parametrize("grid", sorted(ABLATIONS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(ABLATIONS)))
def test_every_shipped_grid_loads_says_how_to_run_and_has_a_baseline(grid):
    text = grid.read_text()
    assert text.startswith("#") and f"--grid {grid.relative_to(REPO)}" in text
    on = load_config(REPO / "pipeline.yaml") if grid.name in ON_SHIPPED else PipelineConfig()
    base, variants = load_grid(grid, on)
    assert "baseline" in variants
    configs = {name: repr(apply_overrides(on, {**base, **v})) for name, v in variants.items()}
    if grid.name == "techniques.yaml":  # `proportional` is the default sampling, listed under the name users look for
        configs.pop("proportional")
    assert len(set(configs.values())) == len(configs), "two variants of the grid are the same config"


def test_one_report_grid_per_table_each_row_with_its_published_numbers():
    assert [p.name for p in REPORTS] == ["a_separate_encoders.yaml", "b_pals.yaml", "c_heads.yaml",
                                         "d_sampling_heads.yaml", "e_summed_mlm.yaml"]
    rows = {p.name[0]: load_grid_with_published(p) for p in REPORTS}
    # 4 + 6 + 6 + 7 + 6 table rows; report C has a variant per published cell (H: frozen only).
    assert {k: len(v[1]) for k, v in rows.items()} == {"a": 4, "b": 6, "c": 11, "d": 7, "e": 6}
    for _, variants, numbers in rows.values():
        assert set(numbers) == set(variants)
    assert rows["c"][2]["E_finetuned"] == pytest.approx({"sst": 0.503, "para": 0.883, "sts": 0.822,
                                                         "overall": (0.503 + 0.883 + 1.822 / 2) / 3})
    assert rows["a"][2]["multitask_cosine_linear_pcgrad"]["para"] is None


def test_the_mlm_and_pals_grids_change_one_thing_per_variant():
    base, variants = load_grid(ABLATIONS / "mlm.yaml")
    samplings = {name: apply_overrides(PipelineConfig(), {**base, **v}).train.sampling for name, v in variants.items()}
    assert set(samplings.values()) == {"summed"}, samplings
    base, variants = load_grid(ABLATIONS / "pals.yaml")
    wide = apply_overrides(PipelineConfig(), {**base, **variants["pals_wide"]}).model.pals
    assert wide.size > PipelineConfig().model.pals.size


def test_every_shipped_grid_is_valid_on_the_shipped_config():
    shipped = load_config(REPO / "pipeline.yaml")
    for path in sorted((REPO / "search_spaces" / "ablations").rglob("*.yaml")):
        load_grid(path, shipped)  # raises naming the file, line and variant


@pytest.mark.parametrize("name", [f"reports/{p.name}" for p in
                                  sorted((REPO / "search_spaces" / "ablations" / "reports").glob("*.yaml"))]
                         + ["best_recipes.yaml"])
def test_a_self_contained_grid_does_not_inherit_the_shipped_recipe(name):
    # A report's recipe must be the report's, whatever pipeline.yaml's own recipe is: every variant
    # resolves to the same model/train/loss/mlm settings on the shipped file and on bare defaults.
    shipped, plain = load_config(REPO / "pipeline.yaml"), PipelineConfig()
    base, variants = load_grid(REPO / "search_spaces" / "ablations" / name, shipped)
    for variant, overrides in variants.items():
        if name == "best_recipes.yaml" and variant == "baseline":
            continue  # the shipped recipe itself
        on_shipped = flatten(apply_overrides(shipped, {**base, **overrides}))
        on_plain = flatten(apply_overrides(plain, {**base, **overrides}))
        leaked = {k for k in on_shipped if k.split(".")[0] in ("model", "train", "loss", "mlm")
                  and on_shipped[k] != on_plain[k]}
        assert not leaked, f"{name}: {variant} takes {sorted(leaked)} from pipeline.yaml"


BEST_ROWS = {  # best_recipes.yaml's variant -> the report grid row it copies
    "A_separate_encoders": ("a_separate_encoders", "more_epochs_lr_batch"),
    "B_pals_all_three": ("b_pals", "pals_all_three"),
    "C_E_concat_3layer_hybrid": ("c_heads", "E_finetuned"),
    "D_annealed_concat_tanh": ("d_sampling_heads", "annealed_concat"),
    "E_mlm_pretraining": ("e_summed_mlm", "mlm_pretraining"),
}


def test_best_recipes_are_their_report_rows_exactly_with_their_published_numbers():
    shipped = load_config(REPO / "pipeline.yaml")
    ablations = REPO / "search_spaces" / "ablations"
    base, variants, published = load_grid_with_published(ablations / "best_recipes.yaml", shipped)
    assert set(variants) == {"baseline", *BEST_ROWS}
    assert flatten(apply_overrides(shipped, {**base, **variants["baseline"]})) == flatten(shipped)
    for variant, (grid, row) in BEST_ROWS.items():
        row_base, row_variants, row_published = load_grid_with_published(ablations / "reports" / f"{grid}.yaml", shipped)
        ours = flatten(apply_overrides(shipped, {**base, **variants[variant]}))
        theirs = flatten(apply_overrides(shipped, {**row_base, **row_variants[row]}))
        differ = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
        assert not differ, f"best_recipes.yaml:{variant} differs from reports/{grid}.yaml:{row}: {differ}"
        assert published[variant] == row_published[row], variant
