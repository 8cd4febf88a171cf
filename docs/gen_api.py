"""Generate docs/api.md from the docstrings of everything in ``minilora.__all__``.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is stale (a test runs this)
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "api.md")


def _entry(name: str, obj: object) -> list[str]:
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "value"
    try:
        signature = str(inspect.signature(obj)) if callable(obj) else ""
    except (TypeError, ValueError):
        signature = ""
    doc = inspect.getdoc(obj) or "(no docstring)"
    lines = [f"## `{name}{signature}`", "", f"*{kind}* — `{getattr(obj, '__module__', '')}`", "", doc, ""]
    if inspect.isclass(obj):
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_") or not callable(member) and not isinstance(member, (classmethod, staticmethod)):
                continue
            member = getattr(obj, attr)
            try:
                sig = str(inspect.signature(member))
            except (TypeError, ValueError):
                sig = "(...)"
            member_doc = inspect.getdoc(member)
            if member_doc:
                lines += [f"### `{name}.{attr}{sig}`", "", member_doc, ""]
    return lines


def render() -> str:
    import minilora

    lines = ["# API reference", "",
             "Generated from the docstrings by `python docs/gen_api.py`; a test fails when this page",
             "is out of date. Everything here is exported by `import minilora` (`minilora.__all__`).", ""]
    for name in minilora.__all__:
        lines += _entry(name, getattr(minilora, name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = open(TARGET).read() if os.path.exists(TARGET) else ""
        if current != text:
            print("docs/api.md is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    with open(TARGET, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
