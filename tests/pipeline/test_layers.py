"""The import graph of pipeline/ points down only, checked on the source with `ast`.

Layers, bottom first; a module may import project modules of strictly lower layers only:
no circles, no verb calling into another verb, nothing but `python -m pipeline` (and the
tests) importing the CLI, and stages/ free of ray, mlflow and pipeline.
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS = [
    ["constants", "yamlfile"],
    ["typed"],
    ["config_rules", "published"],
    ["config", "claims"],
    ["store", "tracking", "grids", "search_space", "cron", "submission", "bootstrap"],
    ["prepare", "registry", "comparison", "lifecycle"],
    ["dag", "differences"],
    ["tuning", "verdicts"],
    ["run", "ablate", "tune", "report", "leaderboard", "submit", "schedule", "predict", "sync"],  # the verbs
    ["cli"],
    ["__main__"],
]
VERBS = LAYERS[-3]
LAYER_OF = {module: i for i, layer in enumerate(LAYERS) for module in layer}
PIPELINE = REPO / "pipeline"


def project_imports(path: Path, package: str) -> set[str]:
    """The modules of `package` (and `stages`) a file imports, anywhere in it (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == package and len(parts) > 1:
                found.add(parts[1])
    return found


def all_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_every_pipeline_module_has_a_layer():
    modules = {p.stem for p in PIPELINE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYER_OF), "add the new module to LAYERS (or remove the stale name)"


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_imports_point_down_only(module):
    path = PIPELINE / f"{module}.py"
    imported = {m for m in project_imports(path, "pipeline") if m in LAYER_OF}
    upward = sorted(m for m in imported if LAYER_OF[m] >= LAYER_OF[module])
    assert not upward, f"pipeline/{module}.py (layer {LAYER_OF[module]}) imports {upward} from its own layer or above"


def test_no_verb_imports_another_verb():
    for verb in VERBS:
        others = project_imports(PIPELINE / f"{verb}.py", "pipeline") & (set(VERBS) - {verb})
        assert not others, f"pipeline/{verb}.py imports the verb(s) {sorted(others)}"


def test_only_main_and_the_tests_import_the_cli():
    importers = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
                 if ".venv" not in p.parts and "tests" not in p.parts and p.name != "__main__.py"
                 and "cli" in project_imports(p, "pipeline")]
    assert importers == []


def test_stages_import_neither_ray_mlflow_nor_pipeline():
    for path in sorted((REPO / "stages").glob("*.py")):
        bad = all_imports(path) & {"ray", "mlflow", "pipeline"}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    """The checks above cannot pass vacuously: imports inside functions and `from a.b import c` count."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline.cli import main\n    import pipeline.tune\nfrom pipeline import run\n")
    assert project_imports(probe, "pipeline") == {"cli", "tune", "run"}


def test_no_pipeline_file_is_over_450_lines():
    long = {p.name: n for p in PIPELINE.glob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these: {long}"
