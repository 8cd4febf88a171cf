"""No module of the library imports another module's private (underscore) names: what two
modules share gets a public name in one home (e.g. ``minilora.tree`` for walking the model)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("minilora", "kernels")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Private names imported from our packages, and private attributes read through a name bound
    by such an import (``from minilora.kernels import lora_matmul as _k`` ... ``_k._check_device``)."""
    found, bound = [], set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").split(".")[0] in OURS
            private = [a.name for a in node.names if _private(a.name)]
            if ours and private:
                found.append(f"{path.relative_to(root)}:{node.lineno}: from {'.' * node.level}{node.module or ''} "
                             f"import {', '.join(private)}")
            if ours:
                bound.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in OURS and any(_private(p) for p in parts):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: import {alias.name}")
                if parts[0] in OURS:
                    bound.add(alias.asname or parts[0])
    for node in ast.walk(tree):
        chain, value = [], node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(node, ast.Attribute) and isinstance(value, ast.Name) and value.id in bound \
                and _private(node.attr):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {value.id}.{'.'.join(reversed(chain))}")
    return found


def test_no_module_imports_another_modules_private_names():
    files = [p for package in OURS for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 10
    found = [line for path in files for line in _private_imports(path)]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_check_sees_a_private_import(tmp_path):
    (tmp_path / "bad.py").write_text("def f():\n    from minilora.inject import _plan, lora_state\n")
    assert _private_imports(tmp_path / "bad.py", tmp_path) == ["bad.py:2: from minilora.inject import _plan"]


def test_the_check_sees_a_private_attribute_of_an_imported_module(tmp_path):
    (tmp_path / "bad.py").write_text("from minilora.kernels import lora_matmul as _k\nimport minilora.ops\n"
                                     "_k._check_device(x=1)\n_k.check_device(x=1)\nminilora.ops._backend\n"
                                     "self._private\n")
    assert sorted(_private_imports(tmp_path / "bad.py", tmp_path)) == [
        "bad.py:3: _k._check_device", "bad.py:5: minilora.ops._backend"]
