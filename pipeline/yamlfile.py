"""YAML files read with their line numbers: the one reader for configs, grids, search spaces
and schedules, so every error about a file can name the file and the line.
"""

from __future__ import annotations

from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A problem in what the user wrote (a file, a --set, a flag), with the place in the message."""


def read_yaml(path: str | Path, what: str) -> tuple[object, dict[str, int]]:
    """(the file's content as plain Python, {dotted key: line number}); `what` names the kind
    of file in the errors ("config", "grid", "search space")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return mapping_with_lines(root, str(path))


def mapping_with_lines(node: yaml.Node | None, filename: str, prefix: str = "") -> tuple[object, dict[str, int]]:
    """Plain Python from a composed YAML node, plus {dotted key: line number} of every mapping
    key (nested keys as `a.b.c`); a key given twice is an error naming both lines."""
    lines: dict[str, int] = {}

    def convert(n, path):
        if n is None:
            return None
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k, v in n.value:
                key = yaml.safe_load(yaml.serialize(k))
                dotted = f"{path}.{key}" if path else str(key)
                if key in out:
                    raise ConfigError(f"{filename}:{k.start_mark.line + 1}: duplicate key '{dotted}' "
                                      f"(first at line {lines[dotted]})")
                lines[dotted] = k.start_mark.line + 1
                out[key] = convert(v, dotted)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [convert(v, path) for v in n.value]
        return yaml.safe_load(yaml.serialize(n))

    return convert(node, prefix), lines


def line_of(path: str | Path, key: str) -> str:
    """`file:line` of a dotted key in a YAML file (the file alone when the key is not written there)."""
    try:
        _, lines = read_yaml(path, "YAML")
    except ConfigError:
        return str(path)
    return f"{path}:{lines[key]}" if key in lines else str(path)
