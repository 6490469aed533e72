"""The package's layers, enforced: which part of visrl may import which (docs/design.md "Layers").

Every ``import`` of every module under ``visrl/`` (module level and inside functions, read with ``ast``) is
checked against :data:`LAYERS`; a module-level import cycle between files fails too. The table is the one
in docs/design.md: change both together.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "visrl"

PLUMBING = {"visrl.dist", "visrl.progress"}  # bottom-layer helpers any layer above the leaves may use
# part of visrl -> the parts it may import (besides itself); a part is a subpackage or a top-level module
LAYERS: dict[str, set[str]] = {
    "visrl": set(),  # the package's __init__
    "visrl.data": set(),  # the leaf: records, boxes, images, prompts, synthetic world, rows, io, hashing
    "visrl.losses": set(),  # pure tensor maths (torch only, checked below)
    "visrl.dist": set(),
    "visrl.progress": set(),
    "visrl.models": {"visrl.data", *PLUMBING},
    "visrl.benchmarks": {"visrl.data", "visrl.models", *PLUMBING},  # a policy, never a training module
    "visrl.rollout": {"visrl.data", "visrl.models", "visrl.benchmarks", *PLUMBING},  # scorers reuse answer metrics
    "visrl.training": {"visrl.data", "visrl.models", "visrl.losses", "visrl.rollout", "visrl.benchmarks", *PLUMBING},
    "visrl.logging": {"visrl.data", *PLUMBING},
    "visrl.runs": {"visrl.data", "visrl.logging", *PLUMBING},
    "visrl.summary": {"visrl.data", "visrl.benchmarks", "visrl.logging"},
    "visrl.report": {"visrl.data", "visrl.logging"},
    "visrl.compare": {"visrl.data", "visrl.pipeline"},  # builds the benchmark the one way the pipeline does
    "visrl.config": {"visrl.data", "visrl.losses"},  # the schema and the one-line errors of run.py
    "visrl.pipeline": {"visrl.data", "visrl.models", "visrl.losses", "visrl.rollout", "visrl.benchmarks",
                       "visrl.training", "visrl.logging", "visrl.runs", "visrl.summary", *PLUMBING},
}  # fmt: skip
TORCH_ONLY = {"visrl.losses"}  # third-party imports allowed there: torch alone
STDLIB_OK = {"__future__", "collections", "dataclasses", "math", "typing", "enum", "functools"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """``visrl.data.boxes`` -> ``visrl.data``; ``visrl.pipeline`` -> ``visrl.pipeline``."""
    return ".".join(module.split(".")[:2])


def imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``path``; relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: list[tuple[int, str]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module_name(path).split(".")
                pkg = pkg[: len(pkg) - node.level + (path.name == "__init__.py")]
                base = ".".join([*pkg, base] if base else pkg)
            found += [
                (node.lineno, f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base)
                for a in node.names
            ]
    return sorted(set(found))


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def layer_violations() -> list[str]:
    bad = []
    for path in package_files():
        mine = part_of(module_name(path))
        allowed = LAYERS.get(mine)
        if allowed is None:
            bad.append(f"{path.relative_to(ROOT)}: part {mine!r} is not in the layer table")
            continue
        for line, target in imports(path):
            if target.startswith("visrl") and target != "visrl":
                theirs = part_of(target)
                if theirs != mine and theirs not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {mine} may not import {target}")
            elif mine in TORCH_ONLY and target.split(".")[0] not in {"torch", *STDLIB_OK}:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {target} (torch only)")
    return bad


def file_cycles() -> list[list[str]]:
    """Cycles of imports between files, function-level imports included (Tarjan SCCs)."""
    graph = {module_name(p): set() for p in package_files()}
    for path in package_files():
        for _, target in imports(path):
            while target and target not in graph:
                target = target.rpartition(".")[0]
            if target and target not in (module_name(path), "visrl"):
                graph[module_name(path)].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            comp = []
            while True:
                top = stack.pop()
                comp.append(top)
                if top == node:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_every_import_respects_the_layers() -> None:
    bad = layer_violations()
    assert not bad, "imports against the layers (docs/design.md):\n" + "\n".join(bad)


def test_the_layer_table_is_acyclic() -> None:
    """The table is a partial order (so no two parts can import each other, directly or through others)."""
    seen: dict[str, set[str]] = {}

    def below(part: str, path: tuple[str, ...] = ()) -> set[str]:
        assert part not in path, f"layer cycle: {' -> '.join((*path, part))}"
        if part not in seen:
            seen[part] = (
                set().union(*({p, *below(p, (*path, part))} for p in LAYERS[part])) if LAYERS[part] else set()
            )
        return seen[part]

    for part in LAYERS:
        below(part)


def test_no_import_cycle_between_files() -> None:
    cycles = file_cycles()
    assert not cycles, f"import cycles between files: {cycles}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from visrl.training.fit import fit\n", "visrl.data may not import visrl.training.fit"),
        ("import pytorch_lightning\n", None),
    ],
)
def test_the_checker_catches_a_bad_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: str | None
) -> None:
    """The checker itself: a data module importing training is reported; a third-party import is not."""
    fake = PACKAGE / "data" / "_layer_probe.py"
    monkeypatch.setattr(sys.modules[__name__], "package_files", lambda: [fake])
    fake_text = {fake: source}
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: fake_text.get(self) or "")
    bad = layer_violations()
    assert (expected in bad[0]) if expected else not bad
