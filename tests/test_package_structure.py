"""The package's structure (issue 15): no import cycles between its modules, and no module reads private
attributes that another module of the package defines (the trainer/controller boundary among others)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adaptive_mamba"
TRAINER, CONTROLLER = "adaptive_mamba.training.trainer", "adaptive_mamba.training.adaptation"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse_package() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, tree: ast.Module, modules: set[str]) -> set[str]:
    """The package's modules that module `name` imports anywhere (top level, inside functions, under
    TYPE_CHECKING): `import a.b`, `from a.b import c` (a.b.c when c is a module) and relative `from . import x`."""
    package = name if any(m.startswith(name + ".") for m in modules) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:     # a symbol's module: a.b.Class -> a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    trees = parse_package()
    return {name: imported_modules(name, tree, set(trees)) for name, tree in trees.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle as one path [a, b, ..., a] through each group of modules that import each other (strongly
    connected components of two or more modules, Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = {stack.pop()}
            while node not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [cycle_through(graph, min(group), group) for group in groups]


def cycle_through(graph: dict[str, set[str]], start: str, group: set[str]) -> list[str]:
    """A shortest import path from `start` back to itself inside `group` (breadth-first)."""
    paths = [[start]]
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph[path[-1]] & group):
            if nxt == start:
                return path + [start]
            if nxt not in path:
                paths.append(path + [nxt])
    raise AssertionError(f"{start} is on no cycle of {sorted(group)}")


def test_the_import_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "adaptive_mamba.model" in graph["adaptive_mamba.chunked"]                      # from a.b import Class
    assert "adaptive_mamba.pillars.common" in graph["adaptive_mamba.pillars.masks"]       # from a.b import (...)
    assert "adaptive_mamba.tokenizer" in graph["adaptive_mamba.evaluation.generation"]    # from ..b import c
    assert "adaptive_mamba.model" in graph["adaptive_mamba.pillars.scan_order"]           # under TYPE_CHECKING
    assert "adaptive_mamba.evaluation.generation" in graph["adaptive_mamba.evaluation.lm_eval_adapter"]  # from .b
    assert "adaptive_mamba.evaluation.tasks" in graph["adaptive_mamba.evaluation.suite"]  # from . import tasks
    cycles = import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}})
    assert cycles == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_in_the_package() -> None:
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def private_definitions(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, module variables and `self._x = ...` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def foreign_private_reads(trees: dict[str, ast.Module]) -> list[str]:
    """`obj._x` (obj not self/cls) in one module where `_x` is private to another module of the package and not
    defined by the reader itself."""
    defined = {name: private_definitions(tree) for name, tree in trees.items()}
    found = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and node.attr not in defined[name]):
                owners = sorted(other for other, names in defined.items() if other != name and node.attr in names)
                if owners:
                    found.append(f"{name}:{node.lineno} reads {ast.unparse(node)} (private to {', '.join(owners)})")
    return found


def test_the_private_attribute_check_finds_a_violation() -> None:
    trees = {TRAINER: ast.parse("class Trainer:\n    def __init__(self):\n        self._engine = None\n"),
             CONTROLLER: ast.parse("def refresh(trainer):\n    return trainer._engine.module, trainer.engine\n")}
    assert foreign_private_reads(trees) == [f"{CONTROLLER}:2 reads trainer._engine (private to {TRAINER})"]


def test_no_module_reads_another_modules_private_attributes() -> None:
    """In particular the controller (training/adaptation.py) and the trainer (training/trainer.py) talk through
    public methods only."""
    found = foreign_private_reads(parse_package())
    assert not found, "\n".join(found)
