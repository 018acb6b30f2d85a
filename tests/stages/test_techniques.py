"""Every named variant of search_spaces/ablations/techniques.yaml runs end to end on 48 rows per
split with the tiny BERT: (mlm_pretrain,) finetune, evaluate; dev/overall comes out finite."""

import math
from pathlib import Path

import pytest

from pipeline.config import SMOKE_OVERRIDES, PipelineConfig, apply_overrides
from pipeline.grids import load_grid, variant_overrides
from stages import evaluate, finetune, mlm_pretrain

GRID = Path(__file__).resolve().parents[2] / "search_spaces" / "ablations" / "techniques.yaml"
VARIANTS = list(load_grid(GRID)[1])


def _quiet(*args, **kwargs):
    pass




@pytest.fixture(scope="module")
def smoke_cfg(shared_data_dir, tiny_model_dir):
    return apply_overrides(PipelineConfig(), {
        **SMOKE_OVERRIDES, "device": "cpu", "data.dir": str(shared_data_dir), "model.dir": str(tiny_model_dir),
        "data.max_rows": 48, "data.on_bad_rows": "drop", "train.epochs": 2})




def test_the_grid_has_the_techniques_of_issue_8():
    assert {"baseline", "summed_loss", "pcgrad", "smart", "sequential", "normalized_loss", "mnr_loss",
            "layerwise_lr_decay", "lookahead", "frozen_encoder", "annealed", "mlm_pretrain"} <= set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_runs_end_to_end(variant, smoke_cfg, prepared, tmp_path):
    name, overrides = variant_overrides(f"{GRID}:{variant}", smoke_cfg)
    cfg = apply_overrides(smoke_cfg, overrides)
    inputs = {"data_prep": prepared}
    if cfg.stages.mlm_pretrain.enabled:
        mlm_pretrain.run(cfg, inputs, tmp_path / "mlm", _quiet)
        inputs["mlm_pretrain"] = tmp_path / "mlm"
    trained = finetune.run(cfg, inputs, tmp_path / "finetune", _quiet)
    assert trained["metrics"]["best/epoch"] in (1.0, 2.0)
    result = evaluate.run(cfg, {**inputs, "finetune": tmp_path / "finetune"}, tmp_path / "evaluate", _quiet)
    overall = result["metrics"]["dev/overall"]
    assert math.isfinite(overall) and 0 <= overall <= 1, (name, result["metrics"])
