"""Search spaces: a YAML file of dotted config keys, each a distribution or a fixed value.

    train.lr: {distribution: loguniform, low: 1.0e-5, high: 3.0e-4}
    train.batch_size: {distribution: choice, values: [16, 32]}
    train.sampling: annealed          # a plain value: fixed for every trial

Pure: reading and checking a space needs neither Ray nor Optuna (they are imported only to
turn a space into their own domain objects). Every error names the file, the line and the key.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, PipelineConfig, apply_overrides, flatten, get
from pipeline.typed import check_value, did_you_mean, field_types
from pipeline.yamlfile import read_yaml

DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "int", "choice")
# A trial runs finetune + evaluate only, so it can vary only what those stages read; the rest
# (data, model.dir, mlm) shaped the artifacts every trial shares.
SEARCHABLE = ("seed", "device", "model.", "train.", "loss.")


@dataclass
class Param:
    """One searched config key: its distribution, bounds and where it is in the space file."""
    key: str
    distribution: Literal["loguniform", "uniform", "quniform", "int", "choice"]
    low: float | int | None = None
    high: float | int | None = None
    q: float | None = None
    values: list = field(default_factory=list)
    line: int = 0


@dataclass
class SearchSpace:
    path: str
    fixed: dict[str, Any]  # key: value set for every trial (applied before data_prep)
    params: dict[str, Param]

    def tune_domains(self) -> dict:
        """{key: ray.tune domain}: what Tune's random search samples from."""
        from ray import tune

        out = {}
        for key, p in self.params.items():
            if p.distribution == "loguniform":
                out[key] = tune.loguniform(p.low, p.high)
            elif p.distribution == "uniform":
                out[key] = tune.uniform(p.low, p.high)
            elif p.distribution == "quniform":
                out[key] = tune.quniform(p.low, p.high, p.q)
            elif p.distribution == "int":
                out[key] = tune.randint(p.low, p.high + 1)  # randint's upper bound is exclusive
            else:
                out[key] = tune.choice(list(p.values))
        return out

    def optuna_distributions(self) -> dict:
        """{key: optuna distribution}: what OptunaSearch's TPE samples from."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out = {}
        for key, p in self.params.items():
            if p.distribution == "loguniform":
                out[key] = FloatDistribution(p.low, p.high, log=True)
            elif p.distribution == "uniform":
                out[key] = FloatDistribution(p.low, p.high)
            elif p.distribution == "quniform":
                out[key] = FloatDistribution(p.low, p.high, step=p.q)
            elif p.distribution == "int":
                out[key] = IntDistribution(p.low, p.high)
            else:
                out[key] = CategoricalDistribution(list(p.values))
        return out

    def normalize(self, sampled: dict) -> dict:
        """A sampled point as config values: plain Python types, quniform snapped to its grid."""
        out = {}
        for key, p in self.params.items():
            value = sampled[key]
            value = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune
            if p.distribution == "quniform":
                value = round(p.low + round((value - p.low) / p.q) * p.q, 12)
            elif p.distribution == "int":
                value = int(value)
            out[key] = value
        return out

    def config_point(self, cfg: PipelineConfig) -> dict:
        """The config's own values of the searched keys (for points_to_evaluate); must lie in the space."""
        point = {}
        for key, p in self.params.items():
            value = get(cfg, key)
            inside = value in p.values if p.distribution == "choice" else (
                value is not None and p.low <= value <= p.high)
            if not inside:
                where = f"{{{', '.join(map(repr, p.values))}}}" if p.distribution == "choice" else f"[{p.low}, {p.high}]"
                raise ConfigError(f"{self.path}:{p.line}: {key}: --include-config: the config's value {value!r} is "
                                  f"outside the space {where}; widen the space or drop --include-config")
            point[key] = value
        return point


def load_space(path: str | Path, cfg: PipelineConfig | None = None) -> SearchSpace:
    """Read and check a search-space YAML; every error names the file, the line and the key."""
    path = Path(path)
    raw, key_lines = read_yaml(path, "search space")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: a search space is a non-empty mapping of config key -> distribution")
    cfg = cfg or PipelineConfig()
    leaves = flatten(PipelineConfig())
    fixed, params, lines = {}, {}, {}
    for key, value in raw.items():
        key, line = str(key), key_lines[str(key)]
        where = f"{path}:{line}: {key}"
        lines[key] = line
        if key not in leaves:
            raise ConfigError(f"{where}: unknown config key" + did_you_mean(key, leaves)
                              + " (keys are dotted config keys, as in --set)")
        if isinstance(value, dict):
            params[key] = _parse_param(key, value, line, where)
        elif isinstance(value, list):
            raise ConfigError(f"{where}: a list is not a distribution; write {{distribution: choice, values: [...]}}")
        else:
            fixed[key] = value
    for key, value in fixed.items():
        fixed[key] = check_value(_leaf_annotation(key), value, key, f"{path}:{lines[key]}")
    try:
        base = apply_overrides(cfg, fixed)
    except ConfigError as e:
        raise ConfigError(f"{path}: its fixed values do not go together: {e}") from None
    for key, p in params.items():
        _check_param_fits_config(p, base, f"{path}:{p.line}: {key}")
    if not params:
        raise ConfigError(f"{path}: nothing to search: every entry is a fixed value")
    return SearchSpace(str(path), fixed, params)


def _parse_param(key: str, spec: dict, line: int, where: str) -> Param:
    """One `{distribution: ..., bounds}` mapping -> Param, checked on its own."""
    if not key.startswith(SEARCHABLE):
        raise ConfigError(f"{where}: cannot be searched: trials run finetune + evaluate only, on artifacts every "
                          f"trial shares; a search varies seed, device, model.*, train.* or loss.* "
                          f"(set {key} as a fixed value instead)")
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: distribution must be one of {', '.join(DISTRIBUTIONS)}, got {dist!r}")
    allowed = {"choice": {"values"}, "quniform": {"low", "high", "q"}}.get(dist, {"low", "high"})
    given = set(spec) - {"distribution"}
    if given - allowed:
        raise ConfigError(f"{where}: unknown field '{sorted(given - allowed)[0]}' for {dist} "
                          f"(it takes {', '.join(sorted(allowed))})")
    if allowed - given:
        raise ConfigError(f"{where}: {dist} needs {', '.join(sorted(allowed - given))}")
    if dist == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: choice needs a non-empty list of values, got {values!r}")
        for v in values:
            if isinstance(v, (list, dict)):
                raise ConfigError(f"{where}: choice values must be single values, got {v!r}")
        if len({json.dumps(v) for v in values}) < len(values):
            raise ConfigError(f"{where}: choice values repeat: {values}")
        return Param(key, dist, values=values, line=line)
    low, high = _number(spec["low"], "low", where), _number(spec["high"], "high", where)
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high}); for a constant write `{key}: {low}`")
    q = None
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    if dist == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}: int needs integer bounds, got low {low!r}, high {high!r}")
    if dist == "quniform":
        q = _number(spec["q"], "q", where)
        steps = (high - low) / q if q > 0 else -1
        if q <= 0 or abs(steps - round(steps)) > 1e-9 * max(1.0, steps):
            raise ConfigError(f"{where}: quniform needs q > 0 dividing high - low ({high} - {low}), got q = {q}")
    return Param(key, dist, low=low, high=high, q=q, line=line)


def _check_param_fits_config(p: Param, base: PipelineConfig, where: str) -> None:
    """Every value the distribution can produce must be a valid value of the config key."""
    kind = _leaf_type(p.key)
    if p.distribution in ("loguniform", "uniform", "quniform") and kind is not float:
        raise ConfigError(f"{where}: a {p.distribution} gives real numbers but the key holds "
                          f"{_type_name(kind)}; use {'int or ' if kind is int else ''}choice")
    if p.distribution == "int" and kind not in (int, float):
        raise ConfigError(f"{where}: int gives integers but the key holds {_type_name(kind)}; use choice")
    candidates = p.values if p.distribution == "choice" else [p.low, p.high]
    for value in candidates:
        try:
            apply_overrides(base, {p.key: value})
        except ConfigError as e:
            raise ConfigError(f"{where}: value {value!r} is not valid: {e}") from None


def _leaf_annotation(key: str):
    tp: Any = PipelineConfig
    for part in key.split("."):
        tp = field_types(tp)[part]
    return tp


def _leaf_type(key: str):
    """The annotated type of a dotted config key, Optional unwrapped."""
    tp = _leaf_annotation(key)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {int: "integers", bool: "true/false", str: "text"}.get(tp, str(tp))


def _number(value, name: str, where: str):
    if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    return value
