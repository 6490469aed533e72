"""The one backbone-family table: complete rows, checkpoint ids, and no family branching anywhere else.

Why: per-family facts (classes, image tokens, vision modules, LoRA target, templates, box formats) live in
``visrl/models/families.py`` only; these tests keep it that way and keep the models package free of import
cycles (``backbone`` <- ``tiny`` / ``real``, never back).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import transformers

from visrl.models.encoding import VLMEncoder
from visrl.models.families import FAMILIES, family_of, get_family, resolve

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "visrl"
TABLE = PACKAGE / "models" / "families.py"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_row_is_complete_and_resolves(name):
    fam = FAMILIES[name]
    assert fam.name == name
    assert hasattr(transformers, fam.model_class) and hasattr(transformers, fam.processor_class)
    assert issubclass(fam.encoder, VLMEncoder)
    assert fam.image_token in fam.image_strings and fam.vision_modules and fam.hub_ids
    assert callable(resolve(fam.tiny_config)) and callable(resolve(fam.tiny_processor))
    module, _, cls = fam.box_format.rpartition(".")
    assert hasattr(__import__(module, fromlist=[cls]), cls)
    assert not set(fam.written_tokens) & set(fam.image_strings)


def test_checkpoint_ids_map_to_their_family():
    assert family_of("Qwen/Qwen2-VL-7B-Instruct").name == "qwen2vl"
    assert family_of("Qwen/Qwen2.5-VL-7B-Instruct").name == "qwen25vl"
    assert family_of("someone/Qwen2_5-VL-3B-finetune").name == "qwen25vl"
    assert family_of("llava-hf/llava-1.5-13b-hf").name == "llava"
    with pytest.raises(ValueError, match="model.hf_id: cannot infer the family of 'org/unknown'"):
        family_of("org/unknown")
    with pytest.raises(ValueError, match="model.family: unknown backbone family 'gpt'"):
        get_family("gpt")


def _family_literals(tree: ast.AST) -> list[int]:
    """Lines comparing against a family name, or dicts keyed by several family names."""
    names = set(FAMILIES)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Constant) and o.value in names for o in operands):
                lines.append(node.lineno)
            if any(isinstance(o, ast.Tuple | ast.List | ast.Set) and any(isinstance(e, ast.Constant) and e.value in names for e in o.elts) for o in operands):  # fmt: skip
                lines.append(node.lineno)
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if len(keys & names) >= 2:
                lines.append(node.lineno)
    return lines


def test_no_family_branching_outside_the_table():
    found = {}
    for file in PACKAGE.rglob("*.py"):
        if file == TABLE:
            continue
        lines = _family_literals(ast.parse(file.read_text()))
        if lines:
            found[str(file.relative_to(REPO))] = lines
    assert not found, f"family names compared or tabled outside visrl/models/families.py: {found}"


def _module_imports(file: Path) -> set[str]:
    """visrl.models modules imported at module level (not inside functions)."""
    out = set()
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("visrl.models."):
            out.add(node.module.rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("visrl.models.")}
    return out


def test_models_package_has_no_import_cycle():
    files = {f.stem: f for f in (PACKAGE / "models").glob("*.py") if f.stem != "__init__"}
    graph = {name: _module_imports(f) & set(files) for name, f in files.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle in visrl/models: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())
    assert "real" not in graph["backbone"] and "tiny" not in graph["backbone"]
