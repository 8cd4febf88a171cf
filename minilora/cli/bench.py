"""``minilora bench``: says where the benchmarks are and how to run them. They are scripts in the
repository's ``benchmarks/`` (comparing against peft, a benchmark-only dependency), not installed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]

_SCRIPTS = {
    "bench_cpu.py": "LoRA Linear forward/backward and inject time vs peft on this CPU",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="only list the scripts")


def run(args: argparse.Namespace) -> int:
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    where = folder if folder.is_dir() else Path("benchmarks")
    print(f"The benchmarks are scripts in {where}/ (a source checkout; they need peft installed):")
    for script, what in _SCRIPTS.items():
        print(f"  python {where / script}    # {what}")
    if not args.list:
        print("or `make bench`. Results are written to benchmarks/results/.")
    return 0
