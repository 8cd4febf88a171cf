"""``minilora inspect MODEL_DIR [--targets ...]``: what LoRA can adapt in a model, and what a
targets spec would select, from ``config.json`` alone.

The model is built on the meta device (shapes, no memory, no weights), so a 70B config is
inspected in about a second. Repeated blocks are folded: ``model.layers.{0..31}.self_attn.q_proj``.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import torch.nn as nn

from minilora.config import LoraConfig
from minilora.inject import find_targets, inject, trainable_parameters
from minilora.layers import LoraConv, LoraConv1D, LoraEmbedding, LoraLinear, lora_layer_class
from minilora.matching import closest_names, unmatched_targets

__all__ = ["meta_model", "adaptable_modules", "group_names", "add_arguments", "run"]

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a numeric path segment: model.layers.<3>.mlp


def meta_model(folder: str | Path) -> nn.Module:
    """The model described by ``folder/config.json``, built on the meta device (no weights).

    Raises:
        FileNotFoundError: no config.json.
        ValueError: transformers does not know the architecture (e.g. a trust_remote_code model).
    """
    import torch
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"MODEL_DIR {folder} has no config.json; give a transformers model folder")
    try:
        json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({err})") from None
    config = transformers.AutoConfig.from_pretrained(str(folder))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if cls is not None:
            return cls(config)
        if arch:
            raise ValueError(f"config.json names architecture {arch!r}, which transformers "
                             f"{transformers.__version__} does not have (custom code is never run)")
        return transformers.AutoModel.from_config(config)


def _describe(module: nn.Module) -> str:
    """'Linear 4096->11008', 'Conv1D 768->2304', 'Embedding 32000x4096', 'Conv2d 4->8 k3x3'."""
    cls = lora_layer_class(module)
    w = module.weight
    if cls is LoraConv1D:
        return f"Conv1D {w.shape[0]}->{w.shape[1]}"
    if cls is LoraEmbedding:
        return f"Embedding {w.shape[0]}x{w.shape[1]}"
    if cls is LoraConv:
        return f"{type(module).__name__} {module.in_channels}->{module.out_channels} k{'x'.join(map(str, module.kernel_size))}"
    return f"{type(module).__name__} {w.shape[1]}->{w.shape[0]}"


def adaptable_modules(model: nn.Module) -> dict[str, str]:
    """Every module LoRA supports, name -> short description, in model order."""
    return {n: _describe(m) for n, m in model.named_modules() if n and lora_layer_class(m) is not None}


def _span(values: list[int]) -> str:
    values = sorted(set(values))
    if len(values) == 1:  # the same number in every member (t5's "layer.0"): no braces
        return str(values[0])
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def group_names(described: dict[str, str]) -> list[tuple[str, str, int]]:
    """Fold names that differ only in their layer numbers (and have the same description):
    [('model.layers.{0..31}.self_attn.q_proj', 'Linear 4096->4096', 32), ...] in model order."""
    groups: dict[tuple[str, str], list[list[int]]] = {}
    for name, what in described.items():
        key = (_INDEX.sub("#", name), what)
        groups.setdefault(key, []).append([int(i) for i in _INDEX.findall(name)])
    out = []
    for (pattern, what), indices in groups.items():
        if len(indices) == 1:
            out.append((pattern.replace("#", "{}").format(*indices[0]), what, 1))
            continue
        spans = [_span([ix[pos] for ix in indices]) for pos in range(len(indices[0]))]
        out.append((pattern.replace("#", "{}").format(*spans), what, len(indices)))
    return out


def _print_groups(rows: list[tuple[str, str, int]], indent: str = "  ") -> None:
    width = max((len(n) for n, _, _ in rows), default=0)
    kind_width = max((len(w) for _, w, _ in rows), default=0)
    for name, what, count in rows:
        print(f"{indent}{name:<{width}}  {what:<{kind_width}}  x{count}")


def _targets(values: list[str] | None, regex: str | None) -> list[str] | str | None:
    if values and regex:
        raise ValueError("give either --targets NAME ... or --targets-regex PATTERN, not both")
    if regex is not None:
        return regex
    if values == ["all-linear"]:
        return "all-linear"
    return values


# ---------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a transformers model folder (config.json is enough)")
    parser.add_argument("--targets", nargs="+", metavar="NAME",
                        help="target_modules as a list (exact names or dot-boundary suffixes), or all-linear")
    parser.add_argument("--targets-regex", metavar="PATTERN", help="target_modules as a regex (re.fullmatch)")
    parser.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="modules trained in full")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank for the parameter count (default 8)")


def run(args: argparse.Namespace) -> int:
    model = meta_model(args.model_dir)
    described = adaptable_modules(model)
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.model_dir}: {type(model).__name__}, {total:,d} parameters; modules LoRA can adapt:")
    _print_groups(group_names(described))
    targets = _targets(args.targets, args.targets_regex)
    if targets is None and not args.modules_to_save:
        print("\n(--targets q_proj v_proj ... shows what a spec selects and the parameter count)")
        return 0
    config = LoraConfig(target_modules=targets, r=args.r, modules_to_save=args.modules_to_save)
    names = [n for n, _ in model.named_modules() if n]
    missing = unmatched_targets(names, targets) if isinstance(targets, list) else []
    for entry in missing:
        close = closest_names(entry, names)
        print(f"\ntarget {entry!r} matches no module; closest: {', '.join(close) if close else 'nothing similar'}")
    with warnings.catch_warnings():  # the notes inject would warn about are printed above
        warnings.simplefilter("ignore")
        chosen = find_targets(model, config)  # raises, naming the closest names, if nothing matches
        inject(model, config)
    print(f"\ntargets {targets!r} select {len(chosen)} modules:")
    _print_groups(group_names({n: described[n] for n in chosen}))
    trainable, total = trainable_parameters(model)
    print(f"\nr={args.r}: {trainable:,d} trainable parameters of {total:,d} ({100 * trainable / total:.4f}%)"
          + (f", modules_to_save {args.modules_to_save} included" if args.modules_to_save else ""))
    return 0
