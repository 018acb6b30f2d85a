"""Ablation grids: a YAML file of named variants, each a set of dotted config overrides.

    base: {train.epochs: 3}          # applied to every variant (optional)
    variants:
      baseline: {}
      pcgrad: {train.sampling: summed, train.pcgrad: true}
    published:                       # a report's numbers per variant (optional; pipeline/published.py)
      baseline: {sst: 0.505, para: 0.822, sts: 0.496}
    claims:                          # published contrasts of two variants (optional; pipeline/claims.py)
      pcgrad_helps: {report: E, rows: [...], variant: pcgrad, against: baseline, metric: overall, ...}

Every variant is checked against the config when the grid is read, so a typo in the last
variant is an error before the first one starts; so is every published row and every claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline import claims as claims_section, published
from pipeline.claims import Claim
from pipeline.config import ConfigError, PipelineConfig, apply_overrides
from pipeline.yamlfile import read_yaml

SECTIONS = ("base", "variants", "published", "claims")


@dataclass
class Grid:
    """A grid file's sections, each checked."""
    base: dict
    variants: dict[str, dict]
    published: dict[str, dict[str, float | None]] = field(default_factory=dict)  # {variant: {sst, para, sts, overall}}
    claims: dict[str, Claim] = field(default_factory=dict)


def load_grid(path: str | Path, cfg: PipelineConfig | None = None) -> tuple[dict, dict[str, dict]]:
    """(base overrides, {variant name: overrides}); each variant validated on `cfg`."""
    grid = read_grid(path, cfg)
    return grid.base, grid.variants


def load_grid_with_published(path: str | Path, cfg: PipelineConfig | None = None
                             ) -> tuple[dict, dict[str, dict], dict[str, dict[str, float | None]]]:
    """load_grid's two, and the grid's published numbers {variant: {sst, para, sts, overall}}."""
    grid = read_grid(path, cfg)
    return grid.base, grid.variants, grid.published


def read_grid(path: str | Path, cfg: PipelineConfig | None = None) -> Grid:
    """The whole grid, every variant validated on `cfg` (default: the config's defaults)."""
    path = Path(path)
    raw, file_lines, variants = _sections(path)
    lines = {**file_lines, **{k.removeprefix("variants."): v for k, v in file_lines.items() if k.startswith("variants.")}}
    base = raw.get("base") or {}
    cfg = cfg or PipelineConfig()
    for name, overrides in variants.items():
        overrides = overrides or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}:{lines.get(name, '?')}: variant '{name}': expected a mapping of key: value")
        try:
            apply_overrides(cfg, {**base, **overrides})
        except ConfigError as e:
            raise ConfigError(f"{path}:{lines.get(name, '?')}: variant '{name}': {e}") from None
        variants[name] = overrides
    return Grid(base, variants, published.parse(raw.get("published"), file_lines, path, variants),
                claims_section.parse(raw.get("claims"), file_lines, path, variants))


def read_claims(path: str | Path) -> dict[str, Claim]:
    """The grid's claims alone, checked against its variant names but not the variants against a
    config: for a finished ablation's grid, whose variants its own config already accepted."""
    raw, lines, variants = _sections(Path(path))
    return claims_section.parse(raw.get("claims"), lines, path, variants)


def _sections(path: Path) -> tuple[dict, dict[str, int], dict]:
    """(the file's mapping, {dotted key: line}, its variants) with the top-level keys checked."""
    raw, lines = read_yaml(path, "grid")
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid is a mapping with 'variants' (and optionally 'base', 'published', 'claims')")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{path}:{lines.get(key, '?')}: unknown key '{key}' "
                          f"(a grid has 'base', 'variants', 'published' and 'claims')")
    variants = raw.get("variants") or {}
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{path}: 'variants' must be a non-empty mapping of name -> overrides")
    return raw, lines, variants


def variant_overrides(spec: str, cfg: PipelineConfig) -> tuple[str, dict]:
    """`FILE:NAME` -> (NAME, base + that variant's overrides)."""
    if ":" not in spec:
        raise ConfigError(f"--variant {spec}: expected FILE:NAME, e.g. search_spaces/ablations/techniques.yaml:pcgrad")
    file, name = spec.rsplit(":", 1)
    base, variants = load_grid(file, cfg)
    if name not in variants:
        raise ConfigError(f"--variant {spec}: no variant '{name}' in {file}; it has {', '.join(variants)}")
    return name, {**base, **variants[name]}

