"""Which module names a LoraConfig selects: pure functions over names.

Every pattern taken from a config is matched through :mod:`minilora.patterns` (bounded time).

Order: exclude_modules, then anything inside a modules_to_save module, then
target_modules (list: exact name or dot-boundary suffix; str: ``re.fullmatch`` on the full name),
then layers_to_transform / layers_pattern (list targets matched by suffix only).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from minilora import patterns

if TYPE_CHECKING:
    from minilora.config import LoraConfig

__all__ = ["matches_name", "is_excluded", "is_target", "layer_index", "pattern_key",
           "inside_modules_to_save", "closest_names", "unmatched_targets"]


def matches_name(name: str, keys: Sequence[str]) -> bool:
    """True if ``name`` is one of ``keys`` or ends with ``"." + key`` for one of them."""
    return name in keys or any(name.endswith("." + key) for key in keys)


def is_excluded(name: str, config: LoraConfig) -> bool:
    spec = config.exclude_modules
    return bool(spec) and (patterns.fullmatch(spec, name) if isinstance(spec, str) else matches_name(name, spec))


def inside_modules_to_save(name: str, modules_to_save: Sequence[str] | None) -> bool:
    """True for a modules_to_save module and everything below it (``(^|.*\\.)m($|\\..*)``)."""
    return any(patterns.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save or ())


def layer_index(name: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    """The layer number in ``name``: the first number after ``layers_pattern``, or without a
    pattern the first numbered path segment (``model.layers.3.mlp`` -> 3)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)  # a fixed pattern, no config text in it
    else:
        names = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = (patterns.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in names)
        match = next(filter(None, found), None)
    return int(match.group("idx")) if match else None


def is_target(name: str, config: LoraConfig, targets: Sequence[str] | str | None = None) -> bool:
    """Would ``config`` put LoRA on the module called ``name``? (type is checked elsewhere)

    ``targets`` overrides ``config.target_modules`` (inject passes "all-linear" expanded).
    """
    targets = config.target_modules if targets is None else targets
    if targets is None or is_excluded(name, config) or inside_modules_to_save(name, config.modules_to_save):
        return False
    if isinstance(targets, str):
        return patterns.fullmatch(targets, name)
    if name in targets:
        return True  # an exact full name is taken as is: layers_to_transform does not apply
    if not any(name.endswith("." + key) for key in targets):
        return False
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first rank/alpha-pattern key that matches ``name`` (``(.*\\.)?(key)$``)."""
    for key in keys:
        if patterns.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def unmatched_targets(names: Sequence[str], targets: Sequence[str]) -> list[str]:
    """The list entries that match no module name at all (before types or exclusions)."""
    return [t for t in targets if not any(matches_name(n, [t]) for n in names)]


def closest_names(target: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` existing module names closest to a target that matched nothing.

    Compares the target with every dotted suffix of every name (so "q_prj" finds "q_proj" and
    "attn.q_prj" finds "self_attn.q_proj"), then reports the first full name having that suffix.
    """
    depth = target.count(".") + 1
    by_suffix: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for d in range(1, min(depth + 1, len(parts)) + 1):
            by_suffix.setdefault(".".join(parts[-d:]), name)
    hits = difflib.get_close_matches(target, list(by_suffix), n=n, cutoff=0.5)
    return list(dict.fromkeys(by_suffix[h] for h in hits))
