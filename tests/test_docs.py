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


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation but - and _ dropped, spaces
    to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path):
    with open(path) as f:
        headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", f.read(), flags=re.M)
    seen, anchors = {}, set()
    for heading in headings:  # GitHub numbers repeated headings: x, x-1, x-2
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_relative_links_in_the_docs_resolve():
    pages = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                             if n.endswith(".md")]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", _read(page), flags=re.S)  # links inside code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), file)) if file else \
                os.path.join(ROOT, page)
            if not os.path.exists(path):
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and path.endswith(".md") and anchor not in _anchors(path):
                broken.append(f"{page}: {target} (no such heading)")
    assert broken == [], "\n".join(broken)
