"""Regular expressions from configs and adapter files, compiled once and matched in bounded time.

Config fields that are regular expressions (a string ``target_modules`` / ``exclude_modules``,
``rank_pattern`` / ``alpha_pattern`` keys, ``layers_pattern`` and ``modules_to_save`` entries) may
come from an untrusted ``adapter_config.json``, and ``(a|a)*b`` backtracks exponentially: ``re`` can
spin for hours. The ``regex`` engine (``re``'s syntax and meaning) stops a match at a timeout, under
one budget per operation (:func:`time_budget`): a hostile pattern costs seconds and a clear error.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from collections.abc import Iterator
from typing import Any

import regex

__all__ = ["PatternError", "compile_pattern", "fullmatch", "match", "time_budget", "MATCH_BUDGET_S"]

#: Seconds that all the pattern matches of one operation (an inject, a load, an offline merge) may
#: take together. A legitimate pattern matches a module name in microseconds, so even a model with
#: 10⁴ modules and a dozen patterns needs well under 0.1 s; 5 s leaves a 50x margin on a slow machine.
MATCH_BUDGET_S = 5.0

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("minilora_pattern_deadline",
                                                                         default=None)


class PatternError(ValueError):
    """A pattern that does not compile, or whose matching ran out of its time budget."""


@contextlib.contextmanager
def time_budget(seconds: float | None = None) -> Iterator[None]:
    """All matches inside share one deadline ``seconds`` (default :data:`MATCH_BUDGET_S`) from now.
    Nested budgets keep the earlier deadline (an inner operation cannot extend its caller's)."""
    outer = _deadline.get()
    deadline = time.monotonic() + (MATCH_BUDGET_S if seconds is None else seconds)
    token = _deadline.set(deadline if outer is None else min(outer, deadline))
    try:
        yield
    finally:
        _deadline.reset(token)


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> Any:
    return regex.compile(pattern, flags=regex.VERSION0)  # VERSION0: re's semantics


def compile_pattern(pattern: str) -> Any:
    """The compiled pattern (cached).

    Raises:
        PatternError: it is not a valid regular expression (the message gives the reason).
    """
    try:
        return _compiled(pattern)
    except (regex.error, OverflowError, RecursionError, ValueError) as err:
        raise PatternError(f"{pattern!r} is not a valid regular expression ({err})") from None


def _timeout(pattern: str) -> float:
    deadline = _deadline.get()
    if deadline is None:  # a call outside any operation's budget gets the whole budget for itself
        return MATCH_BUDGET_S
    left = deadline - time.monotonic()
    if left <= 0:
        raise _too_slow(pattern)
    return left


def _too_slow(pattern: str) -> PatternError:
    return PatternError(f"matching module names against the regular expression {pattern!r} took more than "
                        f"{MATCH_BUDGET_S:g} s, so it was stopped: the pattern backtracks catastrophically "
                        "(nested or overlapping repetition such as '(a|a)*'); rewrite it, e.g. as a list "
                        "of module names")


def fullmatch(pattern: str, name: str) -> bool:
    """``re.fullmatch(pattern, name)`` in bounded time (raises :class:`PatternError` past it)."""
    try:
        return compile_pattern(pattern).fullmatch(name, timeout=_timeout(pattern)) is not None
    except TimeoutError:
        raise _too_slow(pattern) from None


def match(pattern: str, name: str) -> Any:
    """``re.match(pattern, name)`` (anchored at the start) in bounded time; the match or None."""
    try:
        return compile_pattern(pattern).match(name, timeout=_timeout(pattern))
    except TimeoutError:
        raise _too_slow(pattern) from None
