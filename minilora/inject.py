"""inject, find_targets, adapted_modules, unload: free functions over a model.

``inject`` works in two steps so that a bad request never half-modifies a model: ``_plan`` reads
the model and the config and raises on any problem; only then ``_apply`` swaps modules in.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch.nn as nn

from minilora.config import LoraConfig, decomposes
from minilora.layers import (SUPPORTED_TYPES, LoraConv1D, LoraEmbedding, LoraLayer, LoraLinear,
                             LoraMultiheadAttention, lora_layer_class, unsupported_reason)
from minilora.matching import closest_names, is_target, matches_name, unmatched_targets
from minilora.modules_to_save import ModulesToSave
from minilora.params import LoraParams, parameter_problem
from minilora.patterns import time_budget
from minilora.trainable_tokens import TrainableTokens, token_host_class
from minilora.tree import hosts, input_requires_grad, set_active, swap, vocabulary_ends, walk

__all__ = ["inject", "find_targets", "adapted_modules", "lora_layers", "trainable_parameters",
           "print_trainable_parameters", "unload", "LoraState", "Untied", "lora_state", "require_state",
           "update_trainable", "adapter_name_problem", "BASE_ADAPTER"]

BASE_ADAPTER = "__base__"  # the reserved name for "no adapter" in mixed batches
_SEQ_CLS_HEADS = ("classifier", "score")


@dataclass
class Untied:
    """A LoRA layer's weight that merge untied from a module sharing it (tied embeddings)."""

    shared: nn.Parameter  # the weight the layer shared before merge gave it its own copy
    config_flag: bool  # merge also set the model's config.tie_word_embeddings to False


@dataclass
class LoraState:
    """What minilora remembers on an injected model (``model.minilora_state``)."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    input_grad_hook: Any = None  # handle of the hook from _require_input_grads, removed by unload
    untied: dict[str, Untied] = field(default_factory=dict)  # by LoRA layer name; see merge.merge


def lora_state(model: nn.Module) -> LoraState | None:
    return getattr(model, "minilora_state", None)


def require_state(model: nn.Module, what: str, names: Sequence[str] = ()) -> LoraState:
    """The model's adapter state, ``names`` checked against it. ``what`` (the caller) starts the
    ValueError for a model without adapters or an unknown adapter name."""
    state = lora_state(model)
    if state is None or not state.configs:
        raise ValueError(f"{what}: this model has no minilora adapters; call minilora.inject(model, ...) first")
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"{what}: unknown adapter(s) {unknown}; this model has {sorted(state.configs)}")
    return state


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer in the model."""
    return ((n, m) for n, m in walk(model) if isinstance(m, LoraLayer))


def _base_type(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


# ---------------------------------------------------------------- planning
@dataclass
class _Target:
    name: str
    layer_cls: type[LoraLayer]
    r: int
    alpha: float


@dataclass
class _Tokens:
    name: str
    indices: list[int]
    follows: str | None = None            # the module whose rows this one shares (tied weight)


@dataclass
class _ParamTarget:
    name: str                                    # the module owning the parameters
    ranks: dict[str, tuple[int, float, float]]   # parameter -> (r, alpha, scaling)


@dataclass
class _Plan:
    targets: list[_Target]
    params: list[_ParamTarget]
    save: list[str]                       # modules_to_save names, outermost only
    ties: list[list[str]]                 # groups of save names sharing one weight
    warnings: list[str]
    tokens: list[_Tokens] = field(default_factory=list)  # owners first, then the modules following them


def _expand_all_linear(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> list[str]:
    """peft's "all-linear": every Linear/Conv1D by full name, minus the output embedding. (A
    SEQ_CLS head needs no rule here: it is in modules_to_save, which is never a LoRA target.)"""
    def linear_like(module: nn.Module) -> bool:  # unknown quantized Linears too: inject refuses them by name
        cls = lora_layer_class(module)
        return (cls is not None and issubclass(cls, LoraLinear)) or unsupported_reason(module) is not None

    out_emb = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return [n for n, m in modules
            if linear_like(_base_type(m)) and out_emb is not m and out_emb is not _base_type(m)]


def _attention_of(name: str, modules: list[tuple[str, nn.Module]]) -> str | None:
    """The nn.MultiheadAttention (plain or adapted) whose ``out_proj`` module ``name`` is, or None."""
    parent, _, leaf = name.rpartition(".")
    if leaf != "out_proj":
        return None
    owner = next((m for n, m in modules if n == parent), None)
    return parent if isinstance(_base_type(owner), nn.MultiheadAttention) else None


def _closest_hint(target: str, names: list[str]) -> str:
    close = closest_names(target, names)
    return f"{target!r} (closest: {', '.join(close)})" if close else f"{target!r} (nothing similar)"


def adapter_name_problem(model: nn.Module, name: object) -> str | None:
    """Why ``name`` cannot name a new adapter of ``model``, or None. The one check for every way
    an adapter comes into being (inject, load_adapter through inject, add_weighted_adapter)."""
    if not isinstance(name, str) or not name or "." in name or name == BASE_ADAPTER:
        # A dot would split the state-dict key (``adapters.<name>.lora_A``); BASE_ADAPTER marks the
        # rows of per_sample_adapters that run without an adapter, so it must never be one.
        return (f"adapter_name={name!r} is invalid: use a non-empty string without dots, other than "
                f"{BASE_ADAPTER!r} (reserved for rows without adapter in per_sample_adapters)")
    if hasattr(nn.ModuleDict, name):  # adapters live in ModuleDicts, which refuse their own attributes as keys
        return (f"adapter_name={name!r} is invalid: it is an attribute of torch's nn.ModuleDict, which holds each "
                "layer's adapters; choose another name")
    state = lora_state(model)
    if state and name in state.configs:
        return (f"an adapter named {name!r} is already injected into this model; use another adapter_name "
                f"(existing: {sorted(state.configs)}) or delete it first")
    return None


def _plan(model: nn.Module, config: LoraConfig, adapter_name: str) -> _Plan:
    """What inject would do; raises on any problem. The adapter name is checked by the caller
    (``adapter_name_problem``): a dry run (find_targets) has none."""
    state = lora_state(model)
    if state and config.bias != "none":
        others = [n for n, c in state.configs.items() if c.bias != "none"]
        if others:
            raise ValueError(f"bias={config.bias!r} for adapter {adapter_name!r}, but adapter {others[0]!r} already "
                             "trains biases; only one adapter may use a bias mode other than 'none' (as in peft)")
    modules = list(walk(model))
    names = [n for n, _ in modules if n]
    notes: list[str] = []
    targets = config.target_modules
    if targets is None and not config.target_parameters:
        raise ValueError("LoraConfig.target_modules is None: name the modules to adapt, e.g. "
                         "targets=['q_proj', 'v_proj'], a regex string, or 'all-linear' (or parameters in "
                         "target_parameters)")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _expand_all_linear(model, modules)
        skipped = [n for n in targets if _attention_of(n, modules)]
        if skipped:
            targets = [n for n in targets if n not in skipped]
            notes.append(f"'all-linear' leaves out {skipped}: the out_proj of an nn.MultiheadAttention is never "
                         "called, so LoRA there would do nothing (peft adds one anyway); target the attention module "
                         f"itself (e.g. {_attention_of(skipped[0], modules)!r}) to adapt it")
    save_names = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":  # peft's sequence-classification model trains its head too
        save_names += [h for h in _SEQ_CLS_HEADS if h in names and h not in save_names]
    matching = config if save_names == (config.modules_to_save or []) else config.replace(modules_to_save=save_names)
    chosen = _choose_targets(modules, config, matching, targets, notes) if targets else []
    if targets:  # None or [] with target_parameters: no module asked for
        _check_matched(modules, names, config, chosen, notes)
    save = _plan_modules_to_save(modules, names, save_names, config, chosen, notes)
    params = _choose_parameters(modules, config, state, {t.name for t in chosen}, save, notes)
    # LoRA layers of earlier adapters count too: wrapping one would hide it inside the copy.
    lora_names = {t.name for t in chosen} | {n for n, m in modules if isinstance(m, LoraLayer)}
    ties = _tied_groups(modules, save, lora_names)
    save = [n for group in ties for n in group if n not in save] + save
    tokens = _plan_tokens(model, modules, config, lora_names, save) if config.trainable_token_indices else []
    return _Plan(chosen, params, save, ties, notes, tokens)


def _choose_parameters(modules: list[tuple[str, nn.Module]], config: LoraConfig, state: LoraState | None,
                       chosen: set[str], save: list[str], notes: list[str]) -> list[_ParamTarget]:
    """The parameters ``config.target_parameters`` selects, by owning module, each checked. A name
    matches ``<module>.<parameter>`` exactly or as a dot-boundary suffix (peft's rule, which ignores
    exclude_modules and layers_to_transform)."""
    wanted = config.target_parameters or []
    if not wanted:
        return []
    for other_name, other in (state.configs.items() if state else ()):
        if other.target_parameters and set(other.target_parameters) != set(wanted):
            raise ValueError(f"target_parameters={wanted} differs from adapter {other_name!r}'s "
                             f"{other.target_parameters}: all adapters on parameters must target the same set "
                             "(as in peft); use the same list, or give this adapter a model of its own")
    found: dict[str, list[str]] = {}
    keys = []  # every candidate "<module>.<parameter>", for the hint when nothing matches
    inner = chosen | {n for n, m in modules if isinstance(m, (LoraLayer, LoraParams, ModulesToSave))}
    owners: dict[int, list[str]] = {}
    for name, module in modules:
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    for name, module in modules:
        for pname, param in module._parameters.items():
            key = f"{name}.{pname}" if name else pname
            keys.append(key)
            if param is None or not matches_name(key, wanted):
                continue
            _check_parameter(name, module, pname, chosen, save, inner)
            if len(owners[id(param)]) > 1:  # a merge would change the other owner's weight too
                raise ValueError(f"target_parameters matches {key}, which is shared with "
                                 f"{[o for o in owners[id(param)] if o != key]} (tied weights); adapt it through "
                                 "target_modules, or untie it first")
            found.setdefault(name, []).append(pname)
    missing = unmatched_targets([f"{n}.{p}" for n, ps in found.items() for p in ps], wanted)
    hints = "; ".join(_closest_hint(t, keys) for t in missing)
    if not found:
        raise ValueError(f"no parameter matches target_parameters: {hints}")
    if missing:
        notes.append(f"target_parameters entries matched no parameter and were skipped: {hints}")
    out = []
    for name, pnames in found.items():
        ranks = {}
        for pname in pnames:
            r, alpha = config.rank_and_alpha(f"{name}.{pname}")  # peft looks up patterns by this key
            ranks[pname] = (r, alpha, config.scaling_for(r, alpha))
        out.append(_ParamTarget(name, ranks))
    return out


def _check_parameter(name: str, module: nn.Module, pname: str, chosen: set[str], save: list[str],
                     inner: set[str]) -> None:
    """Raise when parameter ``pname`` of module ``name`` cannot carry LoRA."""
    where = f"target_parameters matches {name + '.' if name else ''}{pname}"
    if not name:
        raise ValueError(f"{where}, a parameter of the model itself: only parameters of a sub-module can be "
                         "adapted (as in peft); move it into a sub-module")
    if isinstance(module, LoraLayer) or name in chosen:
        raise ValueError(f"{where}, but {name!r} is adapted through target_modules: a module is adapted either "
                         "as a module or through its parameters; drop it from one of the two")
    if any(name == s or name.startswith(s + ".") for s in save):
        raise ValueError(f"{where}, inside modules_to_save module(s) {save}, which are trained in full; "
                         "drop it from one of the two")
    below = sorted(n for n in inner if n.startswith(name + "."))
    if below:
        raise ValueError(f"{where}, but {below[0]!r} inside {name!r} carries adapters or is a LoRA target; "
                         "adapt one of the two")
    if isinstance(module, LoraParams) and pname not in module.targets:
        raise ValueError(f"{where}, but {name!r} already carries LoRA on {list(module.targets)} from another "
                         "adapter; all adapters on parameters must target the same set (as in peft)")
    problem = parameter_problem(module, pname)
    if problem:
        raise ValueError(f"{where}, but {problem}")


def _choose_targets(modules: list[tuple[str, nn.Module]], config: LoraConfig, matching: LoraConfig,
                    targets: list[str] | str, notes: list[str]) -> list[_Target]:
    """The modules ``matching`` selects, each checked against its LoRA class; notes get the
    warnings inject will give."""
    chosen: list[_Target] = []
    rewritten: list[tuple[str, list[str]]] = []  # (layer, its adapters) whose base weight pissa/olora rewrites
    for name, module in modules:
        if not name or not is_target(name, matching, targets):
            continue
        base = _base_type(module)
        cls = lora_layer_class(base)
        refused = unsupported_reason(base)
        if refused:
            raise ValueError(f"module {name!r} matches target_modules but {refused}; exclude it, or load the model "
                             "unquantized or with bitsandbytes")
        if cls is None:
            raise ValueError(f"module {name!r} matches target_modules but is a {type(base).__name__}; "
                             f"LoRA supports {SUPPORTED_TYPES}. Narrow target_modules to its linear sub-layers")
        _check_kind(name, modules, cls, base, config, notes)
        if config.use_dora and not cls.supports_dora:
            raise ValueError(f"use_dora=True on {name!r}, a {type(base).__name__}: DoRA over a quantized base is not "
                             "supported by minilora; use plain LoRA (use_dora=False) there, or exclude it")
        r, alpha = config.rank_and_alpha(name)
        if decomposes(config.init_lora_weights):
            _check_decomposable(name, module, cls, r, config.init_lora_weights)
            if isinstance(module, LoraLayer):
                rewritten.append((name, sorted(module.adapters)))
        matrix = issubclass(cls, (LoraLinear, LoraEmbedding))
        if config.init_lora_weights == "orthogonal" and (not matrix or r % 2):
            found = f"has r={r}, which is odd" if matrix else f"is of type {type(base).__name__}"
            raise ValueError(f"init_lora_weights='orthogonal' splits one random r x r basis into two halves, one "
                             f"for A and one for B, so it needs an even r and a Linear, Conv1D or Embedding layer; "
                             f"target {name!r} {found}. Use an even r (rank_pattern for that layer) or another init")
        if config.lora_bias and cls is LoraEmbedding:  # peft cannot load such an adapter
            raise ValueError(f"lora_bias=True is not supported for embeddings (as in peft), but target {name!r} is "
                             "an Embedding; exclude it or set lora_bias=False")
        # The module's own bias: an adapted layer holds it, its base_layer's slot is emptied.
        if config.lora_bias and getattr(module, "bias", None) is None:
            notes.append(f"lora_bias=True on {name!r}, which has no bias: this adapter cannot be merged")
        problem = cls.rank_problem(base, r)
        if problem:
            raise ValueError(f"target {name!r}: {problem}, or exclude it")
        fan_hint = cls is LoraConv1D
        if config.fan_in_fan_out != fan_hint and cls in (LoraLinear, LoraConv1D):
            notes.append(f"fan_in_fan_out={config.fan_in_fan_out} does not fit {name!r} "
                         f"({type(base).__name__}); using fan_in_fan_out={fan_hint} for it")
        chosen.append(_Target(name, cls, r, alpha))

    if rewritten:
        others = sorted({a for _, adapters in rewritten for a in adapters})
        more = f" (and {len(rewritten) - 1} other layers)" if len(rewritten) > 1 else ""
        notes.append(f"init_lora_weights={config.init_lora_weights!r} replaces the weight of {rewritten[0][0]!r}{more} "
                     f"by its residual, and adapters {others} already there now add their deltas to that residual "
                     "(as in peft): their outputs change. Give the PiSSA/OLoRA adapter a model of its own if that "
                     "is not wanted")
    return chosen


def _check_kind(name: str, modules: list[tuple[str, nn.Module]], cls: type[LoraLayer], base: nn.Module,
                config: LoraConfig, notes: list[str]) -> None:
    """Refuse what the target's kind cannot take (its ``target_problem``; an attention's out_proj);
    note what it ignores."""
    attention = _attention_of(name, modules)
    if attention:
        raise ValueError(f"module {name!r} matches target_modules but is the out_proj of the nn.MultiheadAttention "
                         f"{attention!r}, which passes its weight to F.multi_head_attention_forward and never calls "
                         f"it: LoRA there would do nothing (peft adds one anyway). Target {attention!r} instead "
                         "(LoRA on its in_proj_weight and out_proj)")
    problem = cls.target_problem(base, config)
    if problem:
        raise ValueError(f"target {name!r}: {problem}")
    if cls is LoraMultiheadAttention and config.lora_dropout and not config.inference_mode:
        notes.append(f"lora_dropout={config.lora_dropout} does not apply to {name!r}: LoRA on nn.MultiheadAttention "
                     "is added to its weights, there is no branch input to drop (peft ignores it there too)")


def _check_matched(modules: list[tuple[str, nn.Module]], names: list[str], config: LoraConfig,
                   chosen: list[_Target], notes: list[str]) -> None:
    """Raise when nothing was chosen; note list entries that matched nothing."""
    if isinstance(config.target_modules, list):
        missing = unmatched_targets(names, config.target_modules)
        if missing and not chosen:
            hints = "; ".join(_closest_hint(t, names) for t in missing)
            raise ValueError(f"no module matches target_modules: {hints}")
        if missing:
            notes.append("target_modules entries matched no module and were skipped: "
                         + "; ".join(_closest_hint(t, names) for t in missing))
    if not chosen:
        linear = [n for n, m in modules if lora_layer_class(_base_type(m)) is not None][:5]
        raise ValueError(f"target_modules={config.target_modules!r} selects no module that LoRA can adapt (after "
                         "exclude_modules, modules_to_save and layers_to_transform); adaptable modules include "
                         f"{linear}")


def _check_decomposable(name: str, module: nn.Module, cls: type[LoraLayer], r: int, init: str) -> None:
    """Refuse pissa / olora where they cannot run. ``module`` is the plain module or, when an
    earlier adapter put LoRA there, its LoRA layer: that holds the current weight itself (its
    base_layer keeps hyper-parameters only), which is what gets decomposed, as in peft."""
    if cls not in (LoraLinear, LoraConv1D):
        raise ValueError(f"init_lora_weights={init!r} needs linear layers, but target {name!r} is a "
                         f"{type(_base_type(module)).__name__}")
    shape = tuple(module.weight.shape)
    if r > min(shape):
        raise ValueError(f"init_lora_weights={init!r} takes r={r} principal directions of {name!r}, whose weight "
                         f"{shape} has only {min(shape)}; use a smaller r (or rank_pattern) for it")
    if isinstance(module, LoraLayer) and module.merged:
        # Decomposing the merged weight mixes the merged adapters in, and with
        # merge(keep_original=True) a later unmerge would restore the kept original and drop the
        # residual. Refused rather than half right.
        raise ValueError(f"init_lora_weights={init!r} on {name!r}, whose weight has adapters {module.merged} merged "
                         "into it: the decomposition would mix them in; call minilora.unmerge(model) first")


def _plan_modules_to_save(modules, names, save_names, config, chosen, notes) -> list[str]:
    chosen_names = {t.name for t in chosen}
    save: list[str] = []
    for name, module in modules:
        if not name or not matches_name(name, save_names) or any(name.startswith(s + ".") for s in save):
            continue
        if isinstance(module, (LoraLayer, LoraParams)) or name in chosen_names:
            raise ValueError(f"module {name!r} is both a LoRA target and in modules_to_save; a module is either "
                             "adapted with LoRA or trained in full, not both")
        save.append(name)
    user_missing = unmatched_targets(names, list(config.modules_to_save or []))
    if user_missing:
        notes.append("modules_to_save entries matched no module: "
                     + "; ".join(_closest_hint(t, names) for t in user_missing))
    return save


def _weight_sharers(modules: list[tuple[str, nn.Module]]) -> dict[int, list[str]]:
    """id of each ``weight`` Parameter -> the modules holding it (several: tied embeddings). A LoRA
    layer holds its base weight itself (base_layer keeps hyper-parameters only)."""
    sharers: dict[int, list[str]] = {}
    for name, module in modules:
        # (a modules_to_save host holds the weight in its original module: a later adapter's copy
        # must reach the tied partner an earlier adapter wrapped too)
        held = module.original_module if isinstance(module, ModulesToSave) else module
        weight = getattr(held, "weight", None) if name else None
        if isinstance(weight, nn.Parameter):
            sharers.setdefault(id(weight), []).append(name)
    return sharers


def _tied_groups(modules, save: list[str], lora_names: set[str]) -> list[list[str]]:
    """Groups of modules sharing their ``weight`` with a modules_to_save module (tied input and
    output embeddings): they all get wrapped and share one trainable copy, so they stay tied."""
    owners = _weight_sharers(modules)
    groups = []
    for name in save:
        module = dict(modules)[name]
        weight = getattr(module.original_module if isinstance(module, ModulesToSave) else module, "weight", None)
        group = owners.get(id(weight), [name]) if isinstance(weight, nn.Parameter) else [name]
        if len(group) > 1 and group not in groups:
            clash = [g for g in group if g in lora_names]
            if clash:
                raise ValueError(f"{clash[0]!r} shares its weight with {name!r} (tied embeddings) and cannot "
                                 f"carry LoRA (from this adapter or an earlier one) while {name!r} is trained in full; "
                                 "drop one of them")
            groups.append(group)
    return groups


def _input_embedding_name(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> str:
    """The name of ``model.get_input_embeddings()`` (what a list ``trainable_token_indices``
    trains), else of the one module named ``embed_tokens``."""
    embedding = vocabulary_ends(model)[0]
    found = [n for n, m in modules
             if n and (m is embedding if embedding is not None else matches_name(n, ["embed_tokens"]))]
    if len(found) != 1:
        raise ValueError("trainable_token_indices is a list, which trains the model's input embedding, but this model "
                         f"has {'no' if not found else len(found)} input embedding(s) (get_input_embeddings(), or a "
                         "module named embed_tokens); give {module name: [token ids]} instead")
    return found[0]


def _token_module_problem(name: str, module: nn.Module, indices: list[int], lora_names: set[str],
                          save: list[str]) -> str | None:
    """Why the rows ``indices`` of module ``name`` cannot train, or None."""
    if name in lora_names:
        return f"{name!r} carries LoRA (from this adapter or an earlier one); a module takes LoRA or trainable tokens"
    if name in save or isinstance(module, ModulesToSave):
        return (f"{name!r} is trained in full (modules_to_save); as in peft, list it in modules_to_save or in "
                "trainable_token_indices, not both")
    base = module.base_layer if isinstance(module, TrainableTokens) else module  # (a host holds the weight)
    if not isinstance(module, TrainableTokens) and token_host_class(module) is None:
        return f"{name!r} is a {type(base).__name__}; token rows can be trained in an nn.Embedding or an nn.Linear head"
    if getattr(base, "max_norm", None) is not None:
        return f"{name!r} renormalises its rows (max_norm={base.max_norm}), which minilora's token rows do not support"
    if getattr(base, "embed_scale", None) is not None:
        return f"{name!r} scales its output (embed_scale), which minilora's token rows do not support"
    rows = module.weight.shape[0]
    bad = [i for i in indices if i >= rows]
    if bad:
        return f"token ids {bad} are out of range for {name!r}, which has {rows} rows (ids 0..{rows - 1})"
    return None


def _plan_tokens(model: nn.Module, modules: list[tuple[str, nn.Module]], config: LoraConfig, lora_names: set[str],
                 save: list[str]) -> list[_Tokens]:
    """Which modules get trainable token rows: the config's, then every module sharing one's
    weight (a tied head), which follows its rows."""
    value = config.trainable_token_indices
    named = {_input_embedding_name(model, modules): value} if isinstance(value, list) else \
        {n: config.token_indices_for(n) for n, _ in modules if n and config.token_indices_for(n) is not None}
    if isinstance(value, dict):
        names = [n for n, _ in modules if n]
        missing = [k for k in value if not any(matches_name(n, [k]) for n in named)]
        if missing:
            raise ValueError("trainable_token_indices names no module for " + "; ".join(_closest_hint(k, names)
                                                                                        for k in missing))
    by_name = dict(modules)
    for name in list(named):  # a head that follows an earlier adapter's rows: its owner takes them
        module = by_name[name]
        if isinstance(module, TrainableTokens) and module.follows is not None:
            owner = next(n for n, m in modules if m is module.follows)
            named.setdefault(owner, named[name])
    sharing = _weight_sharers(modules)
    owners: list[_Tokens] = []
    followers: list[_Tokens] = []
    for name, indices in named.items():
        module = by_name[name]
        if any(f.name == name for f in followers) or \
                (isinstance(module, TrainableTokens) and module.follows is not None):
            continue  # a tied head named too: it follows its owner (the same ids are checked there)
        problem = _token_module_problem(name, module, indices, lora_names, save)
        if problem:
            raise ValueError(f"trainable_token_indices: {problem}")
        owners.append(_Tokens(name, indices))
        for partner in sharing.get(id(module.weight), []):
            if partner == name:
                continue
            if partner in named and named[partner] != indices:
                raise ValueError(f"trainable_token_indices gives {name!r} ids {indices} and {partner!r} ids "
                                 f"{named[partner]}, but they share one weight (tied embeddings): the shared rows "
                                 "must be the same; give both the same ids (or name only the embedding)")
            problem = _token_module_problem(partner, by_name[partner], indices, lora_names, save)
            if problem:
                raise ValueError(f"trainable_token_indices: {partner!r} shares its weight with {name!r} (tied "
                                 f"embeddings) and must train the same rows, but {problem}")
            followers.append(_Tokens(partner, indices, follows=name))
    return owners + followers


# ---------------------------------------------------------------- applying
def _resolve_config(config: LoraConfig | None, targets: Any, fields: dict[str, Any]) -> LoraConfig:
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a minilora.LoraConfig, got {type(config).__name__}; "
                        "build one with LoraConfig(...) or LoraConfig.from_dict(peft_config.to_dict())")
    if targets is not None:
        fields = {**fields, "target_modules": targets}
    unknown = set(fields) - {f.name for f in dataclasses.fields(LoraConfig)}
    if unknown:
        raise TypeError(f"inject() got unknown LoraConfig fields {sorted(unknown)}")
    return config.replace(**fields) if config is not None else LoraConfig(**fields)


def inject(model: nn.Module, config: LoraConfig | None = None, *, targets: list[str] | str | None = None,
           adapter_name: str = "default", **fields: Any) -> nn.Module:
    """Put LoRA on the modules ``config`` selects and wrap its ``modules_to_save``; in place.

    ``inject(model, targets=["q_proj", "v_proj"], r=16)`` is shorthand for
    ``inject(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=16))``. The first adapter
    becomes active; a further ``adapter_name`` is added inactive (see ``set_adapter``). Afterwards
    only the active adapter's parameters, its modules_to_save copies and the biases its bias mode
    names require grad.

    ``init_lora_weights="pissa"`` / ``"olora"`` on a layer that already carries adapters
    decomposes its current weight and leaves the residual under them too (warns).

    Raises:
        ValueError: nothing matches (with the closest existing names), a matched module has an
            unsupported type, the adapter name exists or is invalid (empty, with a dot, or
            ``"__base__"``), pissa/olora on a layer with merged adapters, ... The model is
            untouched when it raises.

    Returns:
        The same model object.
    """
    config = _resolve_config(config, targets, fields)
    problem = adapter_name_problem(model, adapter_name)
    if problem:
        raise ValueError(problem)
    with time_budget():  # the config's patterns are matched against every module name
        plan = _plan(model, config, adapter_name)
    for note in plan.warnings:
        warnings.warn(note, stacklevel=2)

    _apply(model, plan, config, adapter_name)
    state = model.minilora_state = lora_state(model) or LoraState()
    state.configs[adapter_name] = config
    if not state.active:
        state.active = (adapter_name,)
    set_active(model, state.active)
    update_trainable(model)
    _require_input_grads(model, state)
    return model


def _apply(model: nn.Module, plan: _Plan, config: LoraConfig, adapter_name: str) -> None:
    """Build the planned LoRA layers and modules_to_save copies and swap them in, in one walk."""
    swaps: dict[int, nn.Module] = {}
    for target in plan.params:
        module = model.get_submodule(target.name)
        host = module if isinstance(module, LoraParams) else LoraParams(module, tuple(target.ranks))
        host.add_adapter(adapter_name, target.ranks, config.init_lora_weights)
        if host is not module:
            swaps[id(module)] = host
    for target in plan.targets:
        module = model.get_submodule(target.name)
        layer = module if isinstance(module, LoraLayer) else target.layer_cls(module)
        layer.add_adapter(adapter_name, r=target.r, alpha=target.alpha,
                          scaling=config.scaling_for(target.r, target.alpha), dropout=config.lora_dropout,
                          lora_bias=config.lora_bias, init=config.init_lora_weights, use_dora=config.use_dora)
        if layer is not module:
            swaps[id(module)] = layer
    copies = {}
    for name in plan.save:
        module = model.get_submodule(name)
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        copies[name] = wrapper.add_copy(adapter_name)
        if wrapper is not module:
            swaps[id(module)] = wrapper
    hosts_by_name: dict[str, TrainableTokens] = {}
    for tokens in plan.tokens:  # owners come before the modules following them
        module = model.get_submodule(tokens.name)
        if isinstance(module, TrainableTokens):
            host = module
        else:
            host = token_host_class(module)(module, follows=hosts_by_name.get(tokens.follows))
            swaps[id(module)] = host
        hosts_by_name[tokens.name] = host
        host.add_rows(adapter_name, tokens.indices)
    swap(model, swaps)
    for group in plan.ties:
        shared = copies[group[0]].weight
        for name in group[1:]:
            copies[name].weight = shared


def _require_input_grads(model: nn.Module, state: LoraState) -> None:
    """Hook the model's input embedding (``get_input_embeddings()``, as it is after this inject)
    so its output requires grad in training. Numerically a no-op; costs the first block's input
    gradient. Models without ``get_input_embeddings`` need ``minilora.training.require_input_grads``."""
    if state.input_grad_hook is not None:
        state.input_grad_hook.remove()
        state.input_grad_hook = None
    embedding = vocabulary_ends(model)[0]
    if isinstance(embedding, nn.Module):
        state.input_grad_hook = embedding.register_forward_hook(input_requires_grad)


def update_trainable(model: nn.Module) -> None:
    """Freeze everything, then let the active adapters' parameters (and their bias mode) train."""
    state = lora_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if state is None:
        return
    active = [state.configs[n] for n in state.active]
    if any(c.inference_mode for c in active):
        return
    for _, host in hosts(model):
        for name in host.active:
            host.adapter_modules()[name].requires_grad_(True)
    modes = {c.bias for c in active}
    if "all" in modes:
        for name, p in model.named_parameters():
            if (name == "bias" or name.endswith(".bias")) and ".original_module." not in f".{name}":
                p.requires_grad_(True)
    if "lora_only" in modes:
        for _, layer in lora_layers(model):  # only where an active adapter of this layer asks for it
            if layer.bias is not None and any(state.configs[n].bias == "lora_only" for n in layer.active):
                layer.bias.requires_grad_(True)


def find_targets(model: nn.Module, config: LoraConfig | None = None, **fields: Any) -> list[str]:
    """The module names ``inject`` would put LoRA on, then the ``<module>.<parameter>`` names of
    target_parameters (a dry run; raises as inject would)."""
    config = _resolve_config(config, fields.pop("targets", None), fields)
    with time_budget():
        plan = _plan(model, config, "__dry_run__")
    return [t.name for t in plan.targets] + [f"{t.name}.{p}" for t in plan.params for p in t.ranks]


def adapted_modules(model: nn.Module) -> list[str]:
    """Names of the modules that carry LoRA (on the module or on its parameters), in model order."""
    return [n for n, m in walk(model) if isinstance(m, (LoraLayer, LoraParams))]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once. A 4-bit packed
    weight (bitsandbytes' Params4bit) counts its values, not its bytes: two per byte of storage,
    as peft counts them."""
    bnb = sys.modules.get("bitsandbytes")  # never imported just to look
    packed = bnb.nn.Params4bit if bnb is not None else ()
    trainable = total = 0
    for p in model.parameters():
        count = p.numel()
        if isinstance(p, packed):
            count *= 2 * p.element_size()
        total += count
        trainable += count if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print peft's line: ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: plain base layers back, each modules_to_save wrapper
    replaced by its active trained copy (as peft). Returns the model (same object)."""
    swap(model, {id(host): host.unwrap() for name, host in list(hosts(model)) if name})
    state = lora_state(model)
    if state is not None:
        if state.input_grad_hook is not None:
            state.input_grad_hook.remove()
        del model.minilora_state
    return model
