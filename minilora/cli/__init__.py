"""The ``minilora`` command line: ``demo``, ``merge``, ``inspect``, ``bench``.

Each subcommand imports transformers / matplotlib inside its ``run``, so ``minilora --help``
costs no more than ``import minilora``. A failure is one line on stderr (``--debug``: the
traceback): errors meant for users (``ValueError``, ``OSError``) as they are,
anything else as an internal error, so that a bad input no check caught yet shows.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from minilora.model_config import one_line

__all__ = ["main", "one_line"]

#: exit codes: 1 for a failed command, 2 for a bad command line (argparse's convention).
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

#: subcommand -> module under minilora.cli defining ``add_arguments(parser)`` and ``run(args)``.
_SUBCOMMANDS = {
    "demo": "which modules should LoRA train? a real pretrained model, trained and compared",
    "merge": "merge a peft-format adapter into a safetensors checkpoint folder, block by block",
    "inspect": "list the modules LoRA can adapt and what a targets spec selects",
    "bench": "where the benchmarks live and how to run them",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minilora", description="LoRA for PyTorch, interchangeable with peft.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_ in _SUBCOMMANDS.items():
        module = importlib.import_module(f"minilora.cli.{name}")  # light: each imports lazily
        sub = subparsers.add_parser(name, help=help_, description=help_)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback on errors")
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _message(err: Exception) -> str:
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        # raised by the system: "[Errno 13] Permission denied: 'x'" -> "x: Permission denied"
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        return f"{paths}: {err.strerror}" if paths else err.strerror
    if isinstance(err, (ValueError, OSError)):
        return one_line(err)
    return f"internal error, please report: {type(err).__name__}: {one_line(err)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 on success)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args) or 0)
    except (KeyboardInterrupt, Exception) as err:  # noqa: BLE001 -- the one place that turns errors into a message
        if args.debug:
            raise
        if isinstance(err, KeyboardInterrupt):
            print(f"minilora {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"minilora {args.command}: error: {_message(err)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
