"""``minilora inspect MODEL_DIR [--targets ...]``: what LoRA can adapt in a model, and what a
targets spec would select, from ``config.json`` alone (built by :mod:`minilora.model_config`).
"""

from __future__ import annotations

import argparse
import warnings

from minilora.config import LoraConfig
from minilora.inject import find_targets, inject, trainable_parameters
from minilora.matching import closest_names, unmatched_targets
from minilora.model_config import adaptable_modules, adaptable_parameters, group_names, meta_model

__all__ = ["add_arguments", "run"]


def _print_groups(rows: list[tuple[str, str, int]]) -> None:
    width = max((len(n) for n, _, _ in rows), default=0)
    kind_width = max((len(w) for _, w, _ in rows), default=0)
    for name, what, count in rows:
        print(f"  {name:<{width}}  {what:<{kind_width}}  x{count}")


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
    parser.add_argument("--target-parameters", nargs="+", metavar="NAME",
                        help="target_parameters: parameters to adapt, e.g. mlp.experts.gate_up_proj (MoE experts)")
    parser.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="modules trained in full")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank for the parameter count (default 8)")


def run(args: argparse.Namespace) -> int:
    model = meta_model(args.model_dir)
    described = adaptable_modules(model)
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.model_dir}: {type(model).__name__}, {total:,d} parameters; modules LoRA can adapt:")
    _print_groups(group_names(described))
    parameters = adaptable_parameters(model)
    if parameters:
        print("parameters LoRA can adapt (target_parameters; a 3-D one gets an update per expert):")
        _print_groups(group_names(parameters))
    targets, params = _targets(args.targets, args.targets_regex), args.target_parameters
    if targets is None and not args.modules_to_save and not params:
        print("\n(--targets q_proj v_proj ... shows what a spec selects and the parameter count)")
        return 0
    config = LoraConfig(target_modules=[] if targets is None and params else targets, target_parameters=params,
                        r=args.r, modules_to_save=args.modules_to_save)
    names = [n for n, _ in model.named_modules() if n]
    missing = unmatched_targets(names, targets) if isinstance(targets, list) else []
    for entry in missing:
        close = closest_names(entry, names)
        print(f"\ntarget {entry!r} matches no module; closest: {', '.join(close) if close else 'nothing similar'}")
    with warnings.catch_warnings():  # the notes inject would warn about are printed above
        warnings.simplefilter("ignore")
        chosen = find_targets(model, config)  # raises, naming the closest names, if nothing matches
        inject(model, config)
    if targets is not None or not params:
        modules = [n for n in chosen if n in described]
        print(f"\ntargets {targets!r} select {len(modules)} modules:")
        _print_groups(group_names({n: described[n] for n in modules}))
    if params:  # find_targets names them "<module>.<parameter>", after the modules
        chosen_params = {n: parameters.get(n, "Parameter") for n in chosen if n not in described}
        print(f"\ntarget_parameters {params!r} select {len(chosen_params)} parameters:")
        _print_groups(group_names(chosen_params))
    trainable, total = trainable_parameters(model)
    print(f"\nr={args.r}: {trainable:,d} trainable parameters of {total:,d} ({100 * trainable / max(total, 1):.4f}%)"
          + (f", modules_to_save {args.modules_to_save} included" if args.modules_to_save else ""))
    return 0
