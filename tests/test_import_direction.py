"""Imports run one way: launchers -> training / evaluation / export / serving -> run / features / reward ->
model, decoding, data, distribute, config_validation -> storage, config_fields -> errors. Every import of every
module is checked, including the
ones inside functions, so a lazy import cannot hide a circle."""

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "showtell_dist"

# A package may import packages of a lower layer only (and its own modules).
LAYERS = {
    "errors": 0,
    "storage": 1, "config_fields": 1,
    "config_validation": 2, "data": 2, "decoding": 2, "distribute": 2, "model": 2,
    "run": 3, "features": 3, "reward": 3,
    "training": 4, "evaluation": 4, "export": 4, "serving": 4,
}
# Imports within a layer that are allowed. Training scores with evaluation (never the other way round).
# (The CIDEr-D reward reads the document frequencies data/ computes: reward sits above data.)
# The decoder reads the special token ids from data/tokenizer.py; config validation reads the decoding
# options' rules from decoding/options.py (neither is imported back).
SIDEWAYS = {("training", "evaluation"), ("decoding", "data"), ("config_validation", "decoding")}


def _module_name(path: pathlib.Path) -> str:
    parts = ("showtell_dist",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported_names(path: pathlib.Path):
    """(line, dotted name) for every showtell_dist name the module imports; `from a.b import c` gives a.b.c."""
    parts = tuple(_module_name(path).split("."))
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the module's package
                base = parts if is_package else parts[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ((module,) if module else ()))
            names = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("showtell_dist."):
                yield node.lineno, name


def _imported_packages(path: pathlib.Path):
    """(line, package) for every showtell_dist.<package> the module imports, once per import statement."""
    seen = set()
    for line, name in _imported_names(path):
        package = name.split(".")[1]
        if (line, package) not in seen:
            seen.add((line, package))
            yield line, package


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
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if target == source:
                continue
            if target not in LAYERS:
                violations.append(f"{where} imports unknown package {target}")
            elif LAYERS[target] > LAYERS[source] or (LAYERS[target] == LAYERS[source]
                                                     and (source, target) not in SIDEWAYS):
                violations.append(f"{where}: {source} imports {target}")
    assert not violations, "imports against the allowed direction:\n  " + "\n  ".join(violations)


def _import_graph() -> dict:
    """module -> the showtell_dist modules it imports (a name resolves to its longest module prefix)."""
    modules = {_module_name(p): p for p in _modules()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for _, imported in _imported_names(path):
            parts = imported.split(".")
            for n in range(len(parts), 0, -1):
                if ".".join(parts[:n]) in modules:
                    targets.add(".".join(parts[:n]))
                    break
        graph[name] = targets - {name}
    return graph


def _find_cycle(graph: dict) -> list | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_imports_itself_through_others():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("source,expected", [
    ("from showtell_dist.training import trainer", ["training"]),
    ("import showtell_dist.model.show_and_tell as m", ["model"]),
    ("from showtell_dist import training, errors", ["training", "errors"]),
    ("def f():\n    from showtell_dist.evaluation.evaluator import decode_split, scan_records", ["evaluation"]),
    ("from ..training import trainer", ["training"]),
    ("from . import tokenizer", ["data"]),
])
def test_the_walker_sees_every_form_of_import(tmp_path, monkeypatch, source, expected):
    module = tmp_path / "showtell_dist" / "data" / "probe.py"
    module.parent.mkdir(parents=True)
    module.write_text(source + "\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "showtell_dist")
    assert [package for _, package in _imported_packages(module)] == expected
