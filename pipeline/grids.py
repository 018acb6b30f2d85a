"""Ablation grids: a YAML file of named variants, each a set of dotted config overrides.

    base: {train.epochs: 3}          # applied to every variant (optional)
    variants:
      baseline: {}
      pcgrad: {train.sampling: summed, train.pcgrad: true}
    published:                       # a report's numbers per variant (optional; pipeline/published.py)
      baseline: {sst: 0.505, para: 0.822, sts: 0.496}

Every variant is checked against the config when the grid is read, so a typo in the last
variant is an error before the first one starts; so is every published row.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import published
from pipeline.config import ConfigError, PipelineConfig, apply_overrides
from pipeline.yamlfile import read_yaml


def load_grid(path: str | Path, cfg: PipelineConfig | None = None) -> tuple[dict, dict[str, dict]]:
    """(base overrides, {variant name: overrides}); each variant validated on `cfg`."""
    base, variants, _ = load_grid_with_published(path, cfg)
    return base, variants


def load_grid_with_published(path: str | Path, cfg: PipelineConfig | None = None
                             ) -> tuple[dict, dict[str, dict], dict[str, dict[str, float | None]]]:
    """load_grid's two, and the grid's published numbers {variant: {sst, para, sts, overall}}."""
    path = Path(path)
    raw, lines = read_yaml(path, "grid")
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid is a mapping with 'variants' (and optionally 'base', 'published')")
    file_lines = lines
    lines = {**lines, **{k.removeprefix("variants."): v for k, v in lines.items() if k.startswith("variants.")}}
    unknown = set(raw) - {"base", "variants", "published"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{path}:{lines.get(key, '?')}: unknown key '{key}' "
                          f"(a grid has 'base', 'variants' and 'published')")
    base, variants = raw.get("base") or {}, raw.get("variants") or {}
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{path}: 'variants' must be a non-empty mapping of name -> overrides")
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
    return base, variants, published.parse(raw.get("published"), file_lines, path, variants)


def variant_overrides(spec: str, cfg: PipelineConfig) -> tuple[str, dict]:
    """`FILE:NAME` -> (NAME, base + that variant's overrides)."""
    if ":" not in spec:
        raise ConfigError(f"--variant {spec}: expected FILE:NAME, e.g. search_spaces/ablations/techniques.yaml:pcgrad")
    file, name = spec.rsplit(":", 1)
    base, variants = load_grid(file, cfg)
    if name not in variants:
        raise ConfigError(f"--variant {spec}: no variant '{name}' in {file}; it has {', '.join(variants)}")
    return name, {**base, **variants[name]}

