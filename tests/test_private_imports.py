"""No module of the library imports another module's private (underscore) names: what two
modules share gets a public name in one home (e.g. ``minilora.tree`` for walking the model)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("minilora", "kernels")


def _private_imports(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").split(".")[0] in OURS
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if ours and private:
                found.append(f"{path.relative_to(root)}:{node.lineno}: from {'.' * node.level}{node.module or ''} "
                             f"import {', '.join(private)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in OURS and any(p.startswith("_") and not p.startswith("__") for p in parts):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: import {alias.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    files = [p for package in OURS for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 10
    found = [line for path in files for line in _private_imports(path)]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_check_sees_a_private_import(tmp_path):
    (tmp_path / "bad.py").write_text("def f():\n    from minilora.inject import _plan, lora_state\n")
    assert _private_imports(tmp_path / "bad.py", tmp_path) == ["bad.py:2: from minilora.inject import _plan"]
