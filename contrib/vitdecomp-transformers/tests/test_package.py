"""The pack uses only vitdecomp's public API and imports no framework at import time."""

from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "vitdecomp_transformers"


def _imports(tree, top_level_only):
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_only_public_vitdecomp_imports():
    for path in SRC.glob("*.py"):
        for mod in _imports(ast.parse(path.read_text()), top_level_only=False):
            assert not mod.startswith("vitdecomp_plugins"), f"{path.name} imports the built-in plugins ({mod})"
            assert not mod.startswith("vitdecomp._"), f"{path.name} imports a private vitdecomp module ({mod})"


def test_transformers_is_imported_lazily():
    for path in SRC.glob("*.py"):
        top = set(_imports(ast.parse(path.read_text()), top_level_only=True))
        assert not any(m.split(".")[0] in ("transformers", "timm", "open_clip") for m in top), \
            f"{path.name} imports a framework at import time: supports() must be able to say no without it"
