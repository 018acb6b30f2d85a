"""A grid's claims: published results, each a contrast of two of the grid's variants, that an
ablation of the grid checks (pipeline/verdicts.py measures them).

    claims:
      b_pals:
        says: PALs beat plain shared fine-tuning      # optional: the claim in words
        report: B                                     # where it is published
        rows: [PALs all three, base all three]        # the report's rows: the variant's, then the against's
        variant: pals                                 # a variant of this grid ...
        against: baseline                             # ... measured against this one
        metric: overall                               # what decides the verdict
        direction: helps                              # the published sign of variant - against on `metric`
        published:                                    # the rows' numbers as the report prints them
          variant: {sst: 0.508, para: 0.827, sts: 0.801}
          against: {sst: 0.496, para: 0.699, sts: 0.333}

`metric` is one of sst (SST accuracy), para (Quora accuracy), sts (STS Pearson), overall
(dev/overall, (sst + para + (sts + 1) / 2) / 3) or mean (the plain (sst + para + sts) / 3, the
overall some reports print). A published row gives any of these; overall and mean left out are
computed from the three cells when all three are given, and given ones must be those formulas to
rounding (as in pipeline/published.py). `direction` is helps or hurts; where both rows give the
metric it must be the sign of their difference (a contradiction is a typo, caught here), where
they do not it is the report's stated claim.

Every key is checked: an unknown key, a claim naming a variant the grid lacks, a missing number
for the direction to rest on... is a ConfigError naming the file, the line and the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline import published
from pipeline.typed import did_you_mean
from pipeline.yamlfile import ConfigError

CELLS = ("sst", "para", "sts")
METRICS = (*CELLS, "overall", "mean")
RANGE = {**published.RANGE, "mean": (-1 / 3, 1.0)}
DIRECTIONS = ("helps", "hurts")
REQUIRED = ("report", "rows", "variant", "against", "metric", "direction")
KEYS = (*REQUIRED, "says", "published")
SIDES = ("variant", "against")


@dataclass(frozen=True)
class Claim:
    """One published contrast: `variant` against `against`, decided on `metric`."""
    name: str
    report: str
    rows: tuple[str, str]  # the report's names of the variant's row and the against's
    variant: str
    against: str
    metric: str
    direction: str  # helps | hurts: the published sign of variant - against on `metric`
    published: dict[str, dict[str, float]] = field(default_factory=dict)  # "variant"/"against" -> metric -> number
    says: str = ""

    def published_delta(self, metric: str | None = None) -> float | None:
        """The report's variant minus against on `metric` (the claim's own by default); None
        where a row does not give it."""
        metric = metric or self.metric
        a, b = (self.published.get(side, {}).get(metric) for side in SIDES)
        return None if a is None or b is None else a - b


def parse(raw, lines: dict[str, int], path, variants) -> dict[str, Claim]:
    """{name: Claim} from a grid's `claims:` value (None: no claims); `lines` are the grid file's
    {dotted key: line}; every claim's variant and against must be among `variants`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}:{lines.get('claims', '?')}: 'claims' must be a mapping of claim name -> "
                          f"{{report, rows, variant, against, metric, direction[, says, published]}}")
    return {str(name): _claim(str(name), spec, lines, path, variants) for name, spec in raw.items()}


def _claim(name: str, spec, lines: dict[str, int], path, variants) -> Claim:
    def at(key: str = "") -> str:
        dotted = f"claims.{name}" + (f".{key}" if key else "")
        return f"{path}:{lines.get(dotted, lines.get(f'claims.{name}', '?'))}: claim '{name}'" + (f": {key}" if key else "")

    if not isinstance(spec, dict):
        raise ConfigError(f"{at()}: expected a mapping {{{', '.join(REQUIRED)}[, says, published]}}, got {spec!r}")
    for key in spec:
        if key not in KEYS:
            raise ConfigError(f"{at(str(key))}: unknown key{did_you_mean(str(key), KEYS)} "
                              f"(a claim has {', '.join(KEYS)})")
    missing = [key for key in REQUIRED if key not in spec]
    if missing:
        raise ConfigError(f"{at()}: missing '{missing[0]}'")
    for key in ("report", "variant", "against", "says"):
        if key in spec and (not isinstance(spec[key], str) or not spec[key].strip()):
            raise ConfigError(f"{at(key)}: expected a non-empty string, got {spec[key]!r}")
    for key in SIDES:
        if spec[key] not in variants:
            raise ConfigError(f"{at(key)}: '{spec[key]}' is not a variant of this grid"
                              f"{did_you_mean(spec[key], variants)}")
    if spec["variant"] == spec["against"]:
        raise ConfigError(f"{at('against')}: the same variant as 'variant' ({spec['variant']}): nothing to contrast")
    rows = spec["rows"]
    if not isinstance(rows, list) or len(rows) != 2 or not all(isinstance(r, str) and r.strip() for r in rows):
        raise ConfigError(f"{at('rows')}: expected the two rows' names [variant's, against's], got {rows!r}")
    if spec["metric"] not in METRICS:
        raise ConfigError(f"{at('metric')}: '{spec['metric']}' is not one of {', '.join(METRICS)}"
                          f"{did_you_mean(str(spec['metric']), METRICS)}")
    if spec["direction"] not in DIRECTIONS:
        raise ConfigError(f"{at('direction')}: expected helps or hurts, got {spec['direction']!r}")
    numbers = _published(spec.get("published"), at)
    claim = Claim(name, spec["report"], (rows[0], rows[1]), spec["variant"], spec["against"], spec["metric"],
                  spec["direction"], numbers, spec.get("says", ""))
    delta = claim.published_delta()
    if delta is not None:
        shown = " -> ".join(f"{numbers[side][claim.metric]:.3f}" for side in ("against", "variant"))
        if abs(delta) < 1e-12:
            raise ConfigError(f"{at('published')}: both rows give {claim.metric} {shown}: no direction to check")
        if ("helps" if delta > 0 else "hurts") != claim.direction:
            raise ConfigError(f"{at('direction')}: {claim.direction}, but the published {claim.metric} goes {shown} "
                              f"(against -> variant)")
    return claim


def _published(raw, at) -> dict[str, dict[str, float]]:
    """{"variant": {metric: number}, "against": {...}}: the numbers given, then overall and mean
    computed from the cells where left out."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{at('published')}: expected {{variant: {{...}}, against: {{...}}}}, got {raw!r}")
    out = {}
    for side, cells in raw.items():
        if side not in SIDES:
            raise ConfigError(f"{at(f'published.{side}')}: unknown key{did_you_mean(str(side), SIDES)} "
                              f"(published has variant and against)")
        if not isinstance(cells, dict):
            raise ConfigError(f"{at(f'published.{side}')}: expected a mapping of metric -> number, got {cells!r}")
        out[side] = _row(cells, lambda key, side=side: at(f"published.{side}.{key}"))
    return out


def _row(cells: dict, at) -> dict[str, float]:
    numbers = {}
    for key, value in cells.items():
        if key not in METRICS:
            raise ConfigError(f"{at(key)}: unknown key{did_you_mean(str(key), METRICS)} (a row has {', '.join(METRICS)})")
        if value is None:
            continue  # a cell the report leaves empty
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{at(key)}: expected a number or null, got {value!r}")
        low, high = RANGE[key]
        if not low <= value <= high:
            raise ConfigError(f"{at(key)}: {value} is outside [{low:g}, {high:g}]")
        numbers[key] = float(value)
    if all(c in numbers for c in CELLS):
        computed = {"overall": published.overall(*(numbers[c] for c in CELLS)),
                    "mean": sum(numbers[c] for c in CELLS) / 3}
        formula = {"overall": "(sst + para + (sts + 1) / 2) / 3", "mean": "(sst + para + sts) / 3"}
        for key, value in computed.items():
            if key not in numbers:
                numbers[key] = value
            elif abs(numbers[key] - value) > published.ROUNDING:
                raise ConfigError(f"{at(key)}: {numbers[key]:g} is not {formula[key]} = {value:.4f}; "
                                  f"leave it out to have it computed")
    return numbers
