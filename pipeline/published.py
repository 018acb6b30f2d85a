"""The published numbers of a report grid: its `published:` mapping, one row per variant.

    published:
      baseline: {sst: 0.512, para: 0.816, sts: 0.866}               # overall computed
      annealed_concat: {sst: 0.529, para: 0.889, sts: 0.866, overall: 0.784}
      multitask_attempt: {sst: 0.404, para: null, sts: 0.300}       # a cell the report leaves empty

The dev scores as the report prints them: SST accuracy, Quora accuracy, STS Pearson. Every row
gives sst, para and sts (null for an empty cell). `overall` is optional: left out, it is
computed the way dev/overall is here, (sst + para + (sts + 1) / 2) / 3, and is null when a cell
is; given, it must be that formula to rounding, so a report that averages differently (report E
takes the plain mean of the three) is caught instead of being put beside ours.

`ablate` writes a variant's row as tags `published/sst`, ... on its MLflow run (a null cell
writes no tag); the comparison reads them back from there, like everything else it shows.
"""

from __future__ import annotations

import math

from pipeline.constants import METRIC
from pipeline.typed import did_you_mean
from pipeline.yamlfile import ConfigError

METRIC_OF = {"sst": "dev/sst_acc", "para": "dev/para_acc", "sts": "dev/sts_corr", "overall": METRIC}
CELLS = ("sst", "para", "sts")  # required in every row; overall is optional
RANGE = {"sst": (0.0, 1.0), "para": (0.0, 1.0), "sts": (-1.0, 1.0), "overall": (0.0, 1.0)}
TAG_PREFIX = "published/"
# A report's overall and the formula on its cells, both printed to 3 decimals, differ by up to
# ~0.001 (report D's "proportional + concat": 0.782 printed, 0.783 from its cells).
ROUNDING = 0.0015


def overall(sst: float | None, para: float | None, sts: float | None) -> float | None:
    """dev/overall's formula on published cells; None when one is missing."""
    if sst is None or para is None or sts is None:
        return None
    return (sst + para + (sts + 1) / 2) / 3


def parse(raw, lines: dict[str, int], path, variants) -> dict[str, dict[str, float | None]]:
    """{variant: {sst, para, sts, overall}} from a grid's `published:` value (None: no rows);
    `lines` are the grid file's {dotted key: line}; every row must name one of `variants`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:{lines.get('published', '?')}: 'published' must be a mapping of "
                          f"variant -> {{sst, para, sts[, overall]}}")
    rows = {}
    for row, cells in raw.items():
        where = f"{path}:{lines.get(f'published.{row}', '?')}: published row '{row}'"
        if row not in variants:
            raise ConfigError(f"{where} is not a variant of this grid{did_you_mean(str(row), variants)}")
        if not isinstance(cells, dict):
            raise ConfigError(f"{where}: expected a mapping {{sst, para, sts[, overall]}}, got {cells!r}")
        for key in cells:
            if key not in METRIC_OF:
                raise ConfigError(f"{path}:{lines.get(f'published.{row}.{key}', '?')}: published row '{row}': "
                                  f"unknown key '{key}'{did_you_mean(str(key), METRIC_OF)} "
                                  f"(a row has sst, para, sts and optionally overall)")
        missing = [key for key in CELLS if key not in cells]
        if missing:
            raise ConfigError(f"{where}: missing '{missing[0]}' (write null for a cell the report leaves empty)")
        numbers = {}
        for key, value in cells.items():
            at = f"{path}:{lines.get(f'published.{row}.{key}', '?')}: published row '{row}': {key}"
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ConfigError(f"{at}: expected a number or null, got {value!r}")
            low, high = RANGE[key]
            if value is not None and not low <= value <= high:
                raise ConfigError(f"{at}: {value} is outside [{low:g}, {high:g}]")
            numbers[key] = None if value is None else float(value)
        computed = overall(numbers["sst"], numbers["para"], numbers["sts"])
        if "overall" not in numbers:
            numbers["overall"] = computed
        elif numbers["overall"] is not None and computed is not None and abs(numbers["overall"] - computed) > ROUNDING:
            raise ConfigError(f"{path}:{lines.get(f'published.{row}.overall', '?')}: published row '{row}': overall "
                              f"{numbers['overall']:g} is not (sst + para + (sts + 1) / 2) / 3 = {computed:.4f}, "
                              f"this pipeline's dev/overall; leave it out to have it computed")
        rows[row] = {key: numbers[key] for key in METRIC_OF}
    return rows


def to_tags(numbers: dict[str, float | None] | None) -> dict[str, str]:
    """A row as MLflow tags, `published/sst` = "0.512", ...; null cells (and no row) give none."""
    return {TAG_PREFIX + key: repr(value) for key, value in (numbers or {}).items() if value is not None}


def from_tags(tags: dict[str, str]) -> dict[str, float]:
    """{dev metric name: published value} from a run's tags (empty for a run without them)."""
    return {metric: float(tags[TAG_PREFIX + key]) for key, metric in METRIC_OF.items() if TAG_PREFIX + key in tags}
