"""Claims: the verdict rule on hand-made intervals, the `claims:` section's checks, and the
shipped claims.yaml (every claim two valid configs on pipeline.yaml, its numbers the report grids')."""

import csv
import io

import pytest

from pipeline import verdicts
from pipeline.claims import Claim
from pipeline.config import SMOKE_OVERRIDES, ConfigError, apply_overrides, flatten, load_config
from pipeline.grids import load_grid_with_published, read_claims, read_grid
from tests.conftest import REPO

ABLATIONS = REPO / "search_spaces" / "ablations"
CLAIMS = ABLATIONS / "claims.yaml"


# ---------------------------------------------------------------- the verdict rule


@pytest.mark.parametrize("direction, ci, expected", [
    ("helps", (0.004, 0.031), verdicts.HOLDS),
    ("helps", (-0.031, -0.004), verdicts.REVERSED),
    ("helps", (-0.010, 0.020), verdicts.NO_EFFECT),
    ("hurts", (-0.031, -0.004), verdicts.HOLDS),
    ("hurts", (0.004, 0.031), verdicts.REVERSED),
    ("hurts", (-0.020, 0.010), verdicts.NO_EFFECT),
    ("helps", (0.0, 0.02), verdicts.NO_EFFECT),  # an end on 0 does not exclude it
    ("hurts", (-1e-15, 1e-15), verdicts.NO_EFFECT),  # float rounding is no effect
])
def test_verdict_rule(direction, ci, expected):
    assert verdicts.verdict(direction, ci) == expected


def test_half_width_is_the_smallest_effect_the_run_could_see():
    assert verdicts.half_width((-0.010, 0.020)) == pytest.approx(0.015)


def claim(direction="helps", metric="overall", **published) -> Claim:
    return Claim("c", "B", ("PALs", "base"), "pals", "baseline", metric, direction, published)


def test_markdown_and_csv_say_the_verdict_and_the_half_width():
    rows = [verdicts.Measured(claim(variant={"overall": 0.745}, against={"overall": 0.620}),
                              {"overall": 0.005, "sst": -0.002}, {"overall": (-0.010, 0.020)}, 2, verdicts.NO_EFFECT),
            verdicts.Measured(claim("hurts", "sts"), {"sts": -0.04}, {"sts": (-0.06, -0.02)}, 2, verdicts.HOLDS),
            verdicts.Measured(claim(), {}, {}, 0, verdicts.NOT_RUN)]
    md = verdicts.to_markdown(rows).splitlines()
    cells = [c.strip() for c in md[2].strip("| ").split("|")]
    assert cells[:8] == ["c", "B", "PALs vs base", "pals vs baseline", "overall", "+0.125 (0.620 → 0.745), helps",
                         "+0.0050 [-0.0100, +0.0200]", "no detectable effect (±0.0150)"]
    assert cells[8] == "-0.0020" and cells[11] == "+0.0050 [-0.0100, +0.0200]"  # ours on sst (no interval), overall
    assert "hurts (stated)" in md[3] and "[-0.0600, -0.0200]*" in md[3] and "| holds |" in md[3]
    assert "| not run |" in md[4]
    table = list(csv.DictReader(io.StringIO(verdicts.to_csv(rows))))
    assert table[0]["half_width"] == "0.015000" and table[0]["published_delta"] == "0.125000"
    assert table[1]["published_delta"] == "" and table[2]["verdict"] == "not run"
    assert verdicts.counts(rows) == {"claims/holds": 1, "claims/reversed": 0, "claims/no_detectable_effect": 1,
                                     "claims/not_run": 1, "claims/no_interval": 0}


# ---------------------------------------------------------------- the claims section


GRID = """# a test grid
variants:
  baseline: {}
  pals: {model.pals.enabled: true}
claims:
  pals_help:
    report: B
    rows: [PALs, base]
    variant: pals
    against: baseline
    metric: overall
    direction: helps
    published:
      variant: {sst: 0.508, para: 0.827, sts: 0.801}
      against: {sst: 0.496, para: 0.699, sts: 0.333}
"""


def write(tmp_path, text):
    path = tmp_path / "g.yaml"
    path.write_text(text)
    return path


def test_a_claim_is_read_with_its_published_numbers_and_overall_computed(tmp_path):
    (c,) = read_grid(write(tmp_path, GRID)).claims.values()
    assert (c.name, c.variant, c.against, c.metric, c.direction, c.rows) == (
        "pals_help", "pals", "baseline", "overall", "helps", ("PALs", "base"))
    assert c.published["variant"]["overall"] == pytest.approx((0.508 + 0.827 + 1.801 / 2) / 3)
    assert c.published["against"]["mean"] == pytest.approx((0.496 + 0.699 + 0.333) / 3)
    assert c.published_delta("sts") == pytest.approx(0.468)
    assert read_claims(write(tmp_path, GRID)) == {"pals_help": c}


@pytest.mark.parametrize("edit, message", [
    (("    metric: overall\n", "    metric: overall\n    metrc: sts\n"),
     r"g\.yaml:12: claim 'pals_help': metrc: unknown key \(did you mean 'metric'\?\)"),
    (("    against: baseline\n", "    against: basline\n"),
     r"g\.yaml:10: claim 'pals_help': against: 'basline' is not a variant of this grid \(did you mean 'baseline'\?\)"),
    (("    direction: helps\n", "    direction: hurts\n"),
     r"g\.yaml:12: claim 'pals_help': direction: hurts, but the published overall goes 0\.620 -> 0\.745"),
    (("    direction: helps\n", ""), r"g\.yaml:6: claim 'pals_help': missing 'direction'"),
    (("    metric: overall\n", "    metric: f1\n"), r"g\.yaml:11: claim 'pals_help': metric: 'f1' is not one of"),
    (("    rows: [PALs, base]\n", "    rows: [PALs]\n"), r"g\.yaml:8: claim 'pals_help': rows: expected the two rows"),
    (("    against: baseline\n", "    against: pals\n"), r"claim 'pals_help': against: the same variant as 'variant'"),
    (("sts: 0.801}", "sts: 0.801, mean: 0.80}"),
     r"g\.yaml:14: claim 'pals_help': published\.variant\.mean: 0\.8 is not \(sst \+ para \+ sts\) / 3"),
    (("sts: 0.801}", "sts: 1.801}"), r"published\.variant\.sts: 1\.801 is outside \[-1, 1\]"),
    (("      against:", "      againts:"), r"g\.yaml:15: claim 'pals_help': published\.againts: unknown key"),
    (("sts: 0.333}", "sts: 0.333, overall: 0.6205}\n      variant: {}"), r"duplicate key 'claims\.pals_help\.published\.variant'"),
])
def test_a_bad_claim_names_the_file_line_and_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        read_grid(write(tmp_path, GRID.replace(*edit)))


def test_a_direction_without_numbers_is_the_stated_one(tmp_path):
    text = GRID.replace("    metric: overall\n", "    metric: para\n").replace("para: 0.827, ", "")
    (c,) = read_grid(write(tmp_path, text)).claims.values()
    assert c.published_delta() is None and c.direction == "helps"


def test_claims_must_be_a_mapping_and_a_published_tie_has_no_direction(tmp_path):
    with pytest.raises(ConfigError, match=r"g\.yaml:5: 'claims' must be a mapping"):
        read_grid(write(tmp_path, GRID.split("claims:")[0] + "claims: [pals]\n"))
    with pytest.raises(ConfigError, match="both rows give sts 0.333 -> 0.333: no direction"):
        read_grid(write(tmp_path, GRID.replace("    metric: overall\n", "    metric: sts\n").replace("0.801", "0.333")))


# ---------------------------------------------------------------- the shipped claims


def test_every_claim_of_claims_yaml_is_two_valid_different_configs_on_pipeline_yaml():
    shipped = load_config(REPO / "pipeline.yaml")
    grid = read_grid(CLAIMS, shipped)  # raises naming the file and line of a bad variant or claim
    assert len(grid.claims) >= 30 and {c.report for c in grid.claims.values()} == set("ABCDE")
    assert grid.variants["baseline"] == {} and grid.base == {}  # the baseline is pipeline.yaml's recipe
    for c in grid.claims.values():
        configs = [flatten(apply_overrides(shipped, {**grid.base, **grid.variants[v]})) for v in (c.variant, c.against)]
        changed = {k for k in configs[0] if configs[0][k] != configs[1][k]}
        assert changed, f"{c.name}: {c.variant} and {c.against} are the same config"
    for name, overrides in grid.variants.items():  # as `ablate --smoke` and the reports' 10 epochs resolve them
        variant = apply_overrides(shipped, {**grid.base, **overrides})
        apply_overrides(variant, SMOKE_OVERRIDES)
        apply_overrides(variant, {"train.epochs": 10})
    used = {v for c in grid.claims.values() for v in (c.variant, c.against)}
    assert used == set(grid.variants), f"variants no claim uses: {set(grid.variants) - used}"


SOURCE = {  # claim -> (report grid, the variant's row, the against's row) where both rows are in that grid
    "a_all_quora": ("a_separate_encoders", "all_quora", "baseline"),
    "a_more_epochs_sst": ("a_separate_encoders", "more_epochs_lr_batch", "all_quora"),
    "a_more_epochs_sts": ("a_separate_encoders", "more_epochs_lr_batch", "all_quora"),
    "a_separate_encoders_sst": ("a_separate_encoders", "baseline", "multitask_cosine_linear_pcgrad"),
    "a_separate_encoders_sts": ("a_separate_encoders", "baseline", "multitask_cosine_linear_pcgrad"),
    "b_pals": ("b_pals", "pals_all_three", "baseline"),
    "b_pals_sst_only": ("b_pals", "pals_sst_only", "base_sst_only"),
    "b_multitask_sst": ("b_pals", "baseline", "base_sst_only"),
    "b_multitask_sst_pals": ("b_pals", "pals_all_three", "pals_sst_only"),
    "b_pcgrad": ("b_pals", "pals_pcgrad", "pals_all_three"),
    "b_cosine_sts": ("b_pals", "pals_cosine_sts", "pals_all_three"),
    "c_deep_heads_learned_split": ("c_heads", "B_finetuned", "baseline"),
    "c_round_robin": ("c_heads", "C_finetuned", "B_finetuned"),
    "c_concat_para": ("c_heads", "D_finetuned", "C_finetuned"),
    "c_concat_sts": ("c_heads", "D_finetuned", "C_finetuned"),
    "c_smart": ("c_heads", "H_frozen", "E_frozen"),
    "c_finetuning": ("c_heads", "E_finetuned", "E_frozen"),
    "d_annealed_concat": ("d_sampling_heads", "annealed_concat", "proportional_concat"),
    "d_annealed_cosine": ("d_sampling_heads", "annealed_cosine", "proportional_cosine"),
    "d_annealed_mnr": ("d_sampling_heads", "annealed_cosine_mnr", "proportional_cosine_mnr"),
    "d_concat_sts_annealed": ("d_sampling_heads", "annealed_concat", "annealed_cosine"),
    "d_concat_sts_proportional": ("d_sampling_heads", "proportional_concat", "proportional_cosine"),
    "d_mnr_annealed": ("d_sampling_heads", "annealed_cosine_mnr", "annealed_cosine"),
    "d_mnr_proportional": ("d_sampling_heads", "proportional_cosine_mnr", "proportional_cosine"),
    "d_best_vs_baseline": ("d_sampling_heads", "annealed_concat", "baseline"),
    "e_mlm": ("e_summed_mlm", "mlm_pretraining", "summed_three_heads"),
    "e_pcgrad": ("e_summed_mlm", "pcgrad", "summed_three_heads"),
    "e_mlm_under_pcgrad": ("e_summed_mlm", "mlm_pcgrad", "pcgrad"),
    "e_pcgrad_under_mlm": ("e_summed_mlm", "mlm_pcgrad", "mlm_pretraining"),
    "e_multitask_sst": ("e_summed_mlm", "summed_three_heads", "baseline"),
}


def test_every_claims_numbers_are_its_report_grid_rows():
    claims = read_claims(CLAIMS)
    assert set(claims) == set(SOURCE)
    for name, (grid, variant_row, against_row) in SOURCE.items():
        _, _, rows = load_grid_with_published(ABLATIONS / "reports" / f"{grid}.yaml")
        c = claims[name]
        assert c.report == grid[0].upper(), name
        for side, row in (("variant", variant_row), ("against", against_row)):
            theirs = {k: v for k, v in rows[row].items() if v is not None}
            ours = c.published[side]
            assert {k: ours[k] for k in ("sst", "para", "sts") if k in ours} == \
                {k: theirs[k] for k in ("sst", "para", "sts") if k in theirs}, (name, side)
            if "overall" in ours and "overall" in theirs:
                assert ours["overall"] == pytest.approx(theirs["overall"], abs=0.0015), (name, side)
