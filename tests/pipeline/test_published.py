"""A grid's published numbers: parsed and checked when the grid is read, the overall formula
against hand-computed values, and the MLflow tags they travel in."""

import pytest

from pipeline import published
from pipeline.config import ConfigError
from pipeline.grids import load_grid, load_grid_with_published

VARIANTS = "variants:\n  baseline: {}\n  pcgrad: {train.sampling: summed, train.pcgrad: true}\n"


def grid(tmp_path, rows: str):
    path = tmp_path / "g.yaml"
    path.write_text("# a test grid\n" + VARIANTS + "published:\n" + rows)
    return path


def test_overall_is_dev_overalls_formula():
    # (0.5 + 0.8 + (0.6 + 1) / 2) / 3 = (0.5 + 0.8 + 0.8) / 3 = 0.7
    assert published.overall(0.5, 0.8, 0.6) == pytest.approx(0.7)
    # Report A row 1: (0.512 + 0.816 + 1.866 / 2) / 3 = 2.261 / 3
    assert published.overall(0.512, 0.816, 0.866) == pytest.approx(0.753667, abs=1e-6)
    assert published.overall(0.404, None, 0.300) is None


def test_rows_parse_with_overall_computed_kept_or_null(tmp_path):
    path = grid(tmp_path, "  baseline: {sst: 0.5, para: 0.8, sts: 0.6}\n"
                          "  pcgrad: {sst: 0.529, para: 0.889, sts: 0.866, overall: 0.784}\n")
    base, variants, rows = load_grid_with_published(path)
    assert list(variants) == ["baseline", "pcgrad"]
    assert rows["baseline"] == pytest.approx({"sst": 0.5, "para": 0.8, "sts": 0.6, "overall": 0.7})
    assert rows["pcgrad"]["overall"] == 0.784  # the report's own, within rounding of the formula's 0.7837
    nulls = grid(tmp_path, "  baseline: {sst: 0.404, para: null, sts: 0.3}\n")
    assert load_grid_with_published(nulls)[2] == {"baseline": {"sst": 0.404, "para": None, "sts": 0.3, "overall": None}}
    assert load_grid(nulls) == ({}, variants)  # the two-value reader still reads a grid with published numbers


@pytest.mark.parametrize("rows,error", [
    ("  basline: {sst: 0.5, para: 0.8, sts: 0.6}\n",
     r"g\.yaml:6: published row 'basline' is not a variant of this grid \(did you mean 'baseline'\?\)"),
    ("  baseline:\n    sst: 0.5\n    para: 0.8\n    stss: 0.6\n",
     r"g\.yaml:9: published row 'baseline': unknown key 'stss' \(did you mean 'sts'\?\)"),
    ("  baseline: {sst: 0.5, para: 0.8}\n", r"g\.yaml:6: published row 'baseline': missing 'sts' \(write null"),
    ("  baseline: {sst: 0.5, para: 0.8, sts: high}\n", r"g\.yaml:6: published row 'baseline': sts: expected a number or null"),
    ("  baseline: {sst: 50.2, para: 0.8, sts: 0.6}\n", r"g\.yaml:6: published row 'baseline': sst: 50.2 is outside \[0, 1\]"),
    ("  baseline: {sst: 0.5, para: 0.8, sts: true}\n", r"sts: expected a number or null, got True"),
    ("  baseline: [0.5, 0.8, 0.6]\n", r"g\.yaml:6: published row 'baseline': expected a mapping"),
    # Report E's "overall" is the plain mean (0.416 + 0.376 + 0.019) / 3 = 0.270, not dev/overall's 0.434.
    ("  baseline: {sst: 0.416, para: 0.376, sts: 0.019, overall: 0.271}\n",
     r"g\.yaml:6: published row 'baseline': overall 0.271 is not \(sst \+ para \+ \(sts \+ 1\) / 2\) / 3 = 0\.4338"),
])
def test_a_bad_row_is_an_error_naming_file_and_line(tmp_path, rows, error):
    with pytest.raises(ConfigError, match=error):
        load_grid(grid(tmp_path, rows))


def test_published_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"g\.yaml:5: 'published' must be a mapping"):
        load_grid(grid(tmp_path, "  - baseline\n"))


def test_tags_carry_the_numbers_and_skip_null_cells():
    row = {"sst": 0.404, "para": None, "sts": -0.019, "overall": None}
    tags = published.to_tags(row)
    assert tags == {"published/sst": "0.404", "published/sts": "-0.019"}
    assert published.from_tags({**tags, "stage": "variant"}) == {"dev/sst_acc": 0.404, "dev/sts_corr": -0.019}
    assert published.to_tags(None) == {} and published.from_tags({"stage": "variant"}) == {}
