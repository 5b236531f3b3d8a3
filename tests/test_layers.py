"""Imports run one way: down the layers ARCHITECTURE.md draws, never back up, and no package cycles.

Every ``import`` in ``modelzoo/``, ``models/`` and ``data_prep/`` is read from the source (those
inside functions too: a local import hides a cycle, it does not remove it) and mapped to the
layer of the package it names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source dir -> the import package it installs as (pyproject's package-dir)
SOURCES = {"modelzoo": "modelzoo", "models": "modelzoo.models", "data_prep": "modelzoo.data_prep"}
#: package under ``modelzoo.`` -> layer; a module may import its own layer and the ones below
LAYERS = {
    "config": 0, "data": 0, "checkpoint": 0, "backends": 0, "parallel": 0,
    "models": 1,
    "training": 2, "generation": 2, "convert": 2, "compile": 2, "data_prep": 2, "peft": 2, "eval": 2,
    "serving": 3,
    "cli": 4,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [SOURCES[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
    return found


def layer_of(module: str) -> str | None:
    """The layer package of a ``modelzoo.*`` module (None: outside modelzoo, or the root package)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "modelzoo" and len(parts) > 1 else None


def package_edges() -> dict[tuple[str, str], list[str]]:
    """``(importer package, imported package)`` -> where (``file:line``), across packages."""
    edges: dict[tuple[str, str], list[str]] = {}
    for src in SOURCES:
        for path in sorted((ROOT / src).rglob("*.py")):
            importer = layer_of(module_name(path))
            for line, target in imports_of(path):
                imported = layer_of(target)
                if importer and imported and imported != importer:
                    edges.setdefault((importer, imported), []).append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def upward(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    bad = []
    for (importer, imported), where in sorted(edges.items()):
        if importer not in LAYERS or imported not in LAYERS:
            bad.append(f"{where[0]}: package modelzoo.{importer if importer not in LAYERS else imported} has no "
                       "layer; add it to LAYERS as ARCHITECTURE.md places it")
        elif LAYERS[imported] > LAYERS[importer]:
            bad.append(f"{where[0]}: modelzoo.{importer} (layer {LAYERS[importer]}) imports modelzoo.{imported} "
                       f"(layer {LAYERS[imported]})")
    return bad


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for importer, imported in edges:
        graph.setdefault(importer, set()).add(imported)
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_imports_upward():
    assert upward(package_edges()) == []


def test_no_import_cycle_between_packages():
    edges = package_edges()
    assert cycles(edges) == [], {f"{a}->{b}": edges[(a, b)] for c in cycles(edges) for a, b in zip(c, c[1:], strict=False)}


PROBES = {  # what the old tree had, inside functions: the model reaching into the trainer, the config into the model
    "models/llama/patch_llama.py": ("from modelzoo.training.loss import weighted_cross_entropy",
                                    "modelzoo.models (layer 1) imports modelzoo.training (layer 2)"),
    "modelzoo/config/checks.py": ("from modelzoo.models.llama import presets",
                                  "modelzoo.config (layer 0) imports modelzoo.models (layer 1)"),
}


@pytest.mark.parametrize("source", sorted(PROBES))
def test_the_check_catches_a_hidden_upward_import(tmp_path, monkeypatch, source):
    import shutil
    import sys

    for src in SOURCES:
        shutil.copytree(ROOT / src, tmp_path / src, ignore=shutil.ignore_patterns("__pycache__"))
    statement, expected = PROBES[source]
    target = tmp_path / source
    target.write_text(target.read_text(encoding="utf-8") + f"\n\ndef _probe():\n    {statement}\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems = upward(package_edges())
    assert any(p.startswith(source) and expected in p for p in problems), problems
