"""Imports run one way: launchers -> training / evaluation / export / serving -> run / features -> model,
decoding, data, distribute -> storage -> errors. Every import of every module is checked, including the ones
inside functions, so a lazy import cannot hide a circle."""

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "showtell_dist"

# A package may import packages of a lower layer only (and its own modules).
LAYERS = {
    "errors": 0,
    "storage": 1,
    "data": 2, "decoding": 2, "distribute": 2, "model": 2,
    "run": 3, "features": 3,
    "training": 4, "evaluation": 4, "export": 4, "serving": 4,
}
# Imports within a layer that are allowed: training scores with evaluation (never the other way round).
SIDEWAYS = {("training", "evaluation")}


def _package_of(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_packages(path: pathlib.Path):
    """(line, package) for every showtell_dist.<package> the module imports."""
    module_parts = ("showtell_dist",) + path.relative_to(PACKAGE).with_suffix("").parts
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module_parts[:len(module_parts) - node.level]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            # `from showtell_dist import training` names the package in the imported names.
            names = ([f"{module}.{alias.name}" for alias in node.names] if module == "showtell_dist"
                     else [module])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "showtell_dist" and len(parts) > 1:
                yield node.lineno, parts[1]


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_package_has_a_layer():
    packages = {_package_of(p) for p in _modules()} - {"__init__"}
    unknown = sorted(packages - set(LAYERS))
    assert not unknown, (f"showtell_dist/{unknown} have no place in the import layers of {__file__}; "
                         "add them to LAYERS.")


def test_imports_run_one_way():
    violations = []
    for path in _modules():
        source = _package_of(path)
        if source == "__init__":
            continue
        for line, target in _imported_packages(path):
            if target == source:
                continue
            if target not in LAYERS:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports unknown package {target}")
            elif LAYERS[target] > LAYERS[source] or (LAYERS[target] == LAYERS[source]
                                                     and (source, target) not in SIDEWAYS):
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports {target}")
    assert not violations, "imports against the allowed direction:\n  " + "\n  ".join(violations)


@pytest.mark.parametrize("source,expected", [
    ("from showtell_dist.training import trainer", ["training"]),
    ("import showtell_dist.model.show_and_tell as m", ["model"]),
    ("from showtell_dist import training, errors", ["training", "errors"]),
    ("def f():\n    from showtell_dist.evaluation.evaluator import decode_split", ["evaluation"]),
    ("from ..training import trainer", ["training"]),
    ("from . import tokenizer", ["data"]),
])
def test_the_walker_sees_every_form_of_import(tmp_path, monkeypatch, source, expected):
    module = tmp_path / "showtell_dist" / "data" / "probe.py"
    module.parent.mkdir(parents=True)
    module.write_text(source + "\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "showtell_dist")
    assert [package for _, package in _imported_packages(module)] == expected
