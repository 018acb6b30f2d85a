"""Ablation grids: a YAML file of named variants, each a set of dotted config overrides.

    base: {train.epochs: 3}          # applied to every variant (optional)
    variants:
      baseline: {}
      pcgrad: {train.sampling: summed, train.pcgrad: true}

Every variant is checked against the config when the grid is read, so a typo in the last
variant is an error before the first one starts.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import ConfigError, PipelineConfig, apply_overrides


def load_grid(path: str | Path, cfg: PipelineConfig | None = None) -> tuple[dict, dict[str, dict]]:
    """(base overrides, {variant name: overrides}); each variant validated on `cfg`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: grid file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    lines = _key_lines(path)
    unknown = set(raw) - {"base", "variants"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{path}:{lines.get(key, '?')}: unknown key '{key}' (a grid has 'base' and 'variants')")
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
    return base, variants


def variant_overrides(spec: str, cfg: PipelineConfig) -> tuple[str, dict]:
    """`FILE:NAME` -> (NAME, base + that variant's overrides)."""
    if ":" not in spec:
        raise ConfigError(f"--variant {spec}: expected FILE:NAME, e.g. search_spaces/ablations/techniques.yaml:pcgrad")
    file, name = spec.rsplit(":", 1)
    base, variants = load_grid(file, cfg)
    if name not in variants:
        raise ConfigError(f"--variant {spec}: no variant '{name}' in {file}; it has {', '.join(variants)}")
    return name, {**base, **variants[name]}


def _key_lines(path: Path) -> dict[str, int]:
    """Line of each top-level key and each variant name, for error messages."""
    lines = {}
    node = yaml.compose(path.read_text())
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            lines[k.value] = k.start_mark.line + 1
            if k.value == "variants" and isinstance(v, yaml.MappingNode):
                for vk, _ in v.value:
                    lines[vk.value] = vk.start_mark.line + 1
    return lines
