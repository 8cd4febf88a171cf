"""Docs stay true to the code: the API page is regenerated from docstrings, and the README's
commands are the ones CI and the Makefile run."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_api_reference_is_generated_from_current_docstrings():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "gen_api.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_public_name_has_a_docstring():
    import minilora

    missing = [n for n in minilora.__all__ if not (getattr(minilora, n).__doc__ or "").strip()]
    assert missing == []


def test_ci_runs_the_readme_test_command():
    readme, ci = _read("README.md"), _read(".ci", "run")
    commands = re.findall(r"^(make \w+)\s+#", readme, flags=re.M)
    assert "make test" in commands and "make demo" in commands
    assert re.search(r"^make test$", ci, flags=re.M)


def test_makefile_has_the_readme_targets():
    makefile = _read("Makefile")
    for target in ("test", "demo"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
