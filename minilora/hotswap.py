"""Hot-swapping: replace an adapter's weights in place, so a compiled model keeps its graph.

``prepare_for_hotswap`` (once, after loading the first adapter and before ``torch.compile``) gives
every adapter's factors room for a maximum rank (zero padding: outputs unchanged) and holds each
scaling in a buffer. ``hotswap_adapter`` then writes another saved adapter's factors and scalings
into those same tensors: the shapes, the Parameter objects and the Python constants the graph was
traced with all stay, so dynamo has nothing to recompile. Validation is ``load_adapter``'s
(``checkpoint.plan_load`` against a meta copy of the model without the adapter), plus what an
in-place swap needs; everything is checked before any tensor is written.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from minilora.adapters import delete_adapter
from minilora.checkpoint import LoadPlan, meta_clone, plan_load
from minilora.config import RANK_LIMIT, LoraConfig, decomposes
from minilora.inject import lora_layers, require_state
from minilora.layers import LoraLayer
from minilora.merge import mergeable
from minilora.modules_to_save import ModulesToSave
from minilora.tree import AdapterHost, hosts

__all__ = ["prepare_for_hotswap", "hotswap_adapter"]

def _unwrapped(model: nn.Module) -> nn.Module:
    # torch.compile(model) returns a wrapper holding the model as ``_orig_mod`` (its documented
    # attribute); adapters and their names live on the model itself. model.compile() needs nothing.
    return getattr(model, "_orig_mod", model)


def prepare_for_hotswap(model: nn.Module, target_rank: int | None = None,
                        adapter_names: list[str] | None = None) -> nn.Module:
    """Make later ``hotswap_adapter`` calls recompile nothing: call it after loading the first
    adapter, before ``torch.compile``.

    Every LoRA factor of ``adapter_names`` (default: all adapters) is zero-padded to
    ``target_rank``, the largest rank any adapter swapped in later will have: A (r, in) becomes
    (target_rank, in), B (out, r) becomes (out, target_rank), with the adapter's values in the
    leading ranks, so every output is unchanged. Each scaling is held in a 0-dim buffer. The
    adapters' configs, ``r`` and what ``save_adapter`` writes stay those of the adapter itself.
    ``target_rank=None`` holds the scalings only (swaps of adapters up to the current ranks).

    Raises:
        ValueError: no adapters, an unknown name, ``target_rank`` below a current rank (layer and
            rank named), not a positive integer, or not a multiple of a grouped conv's groups.
            The model is untouched when it raises.

    Returns:
        The same model object (``torch.compile``'s wrapper given: the wrapper).
    """
    inner = _unwrapped(model)
    state = require_state(inner, "prepare_for_hotswap", adapter_names or [])
    names = list(adapter_names or state.configs)
    if target_rank is not None and (isinstance(target_rank, bool) or not isinstance(target_rank, int)
                                    or not 0 < target_rank <= RANK_LIMIT):
        raise ValueError(f"prepare_for_hotswap: target_rank={target_rank!r} must be an integer from 1 to "
                         f"{RANK_LIMIT}: the largest rank of the adapters you will swap in")
    layers = [(n, layer, a) for n, layer in lora_layers(inner) for a in names if a in layer.adapters]
    for name, layer, adapter in layers if target_rank is not None else ():
        room, groups = layer.rank_room(adapter), layer.rank_groups()
        if target_rank < room:
            raise ValueError(f"prepare_for_hotswap: target_rank={target_rank} is below the rank {room} of adapter "
                             f"{adapter!r} at {name!r}; use at least the largest rank of the adapters loaded or "
                             "to be swapped in")
        if target_rank % groups:
            raise ValueError(f"prepare_for_hotswap: target_rank={target_rank} is not a multiple of the groups={groups} "
                             f"of the conv {name!r} (its B is a grouped conv); choose a multiple of {groups}")
    for _, layer, adapter in layers:
        if target_rank is not None and target_rank != layer.rank_room(adapter):
            layer.pad_rank(adapter, target_rank)
        layer.adapters[adapter].hold_scaling_as_tensor()
    return model


def hotswap_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *,
                    allow_pickle: bool = False) -> nn.Module:
    """Replace adapter ``adapter_name``'s weights, scalings and config in place with those of the
    adapter saved in ``path`` (peft's format), keeping its name, its active state and whether it
    trains. After ``prepare_for_hotswap`` a compiled model runs the new adapter without recompiling.

    The new adapter may have another rank per layer (after ``prepare_for_hotswap``, up to its
    ``target_rank``; without it, any: a larger rank gets new factor Parameters, which is fine
    eagerly but recompiles a compiled model), another ``lora_alpha``,
    ``alpha_pattern``, ``rank_pattern``, ``use_rslora`` or dropout. It may touch fewer layers than
    the current one (those get zero factors: they add nothing) and train fewer modules_to_save
    (those go back to the original module's values). It must not touch a layer the current adapter
    does not: that would need a new LoRA layer, that is, another graph (use ``load_adapter``).

    Raises:
        AdapterFileError: as ``load_adapter`` (missing or corrupt files, missing or unexpected
            keys, wrong shapes or dtypes, non-finite values, ...).
        ValueError: the file also holds base weights (``save_embedding_layers``) other than the
            model's (equal ones are accepted: adapters trained on one resized vocabulary).
        ValueError: no such adapter, or one merged into the weights; the new adapter does not fit
            the model (as ``load_adapter``), touches a layer or modules_to_save module the current
            one does not, needs more rank than ``prepare_for_hotswap`` made room for, differs in
            ``use_dora`` or ``lora_bias``, trains biases (``bias`` other than "none", either
            adapter), or was initialised with pissa/olora (either adapter: they rewrite the base
            weight).
            On any error the model is exactly as it was.

    Returns:
        The same model object.
    """
    inner = _unwrapped(model)
    state = require_state(inner, "hotswap_adapter", [adapter_name])
    old = state.configs[adapter_name]
    merged = [n for n, host in mergeable(inner) if adapter_name in host.merged]
    if merged:
        raise ValueError(f"hotswap_adapter: adapter {adapter_name!r} is merged into {merged[0]!r} (and "
                         f"{len(merged) - 1} other layers); call minilora.unmerge(model) first")
    dry = meta_clone(inner)
    delete_adapter(dry, adapter_name)  # the model as a fresh load_adapter would find it
    plan = plan_load(dry, path, adapter_name, is_trainable=not old.inference_mode, allow_pickle=allow_pickle)
    where = f"hotswap_adapter({os.fspath(path)!r})"
    _check_configs(where, old, plan.config, adapter_name)
    current = {n: h for n, h in hosts(inner) if adapter_name in h.adapter_modules()}
    fresh = {n: h for n, h in hosts(plan.dry) if adapter_name in h.adapter_modules()}
    _check_hosts(where, adapter_name, current, fresh)
    # Adapters trained on one resized vocabulary each carry the same base rows (save_embedding_layers):
    # those the model holds already are no change; others would be (a swap replaces adapter weights only).
    tensors = inner.state_dict(keep_vars=True) if plan.base_keys else {}  # (a swap's hot path: only when needed)
    # (the model may hold it under a modules_to_save wrapper the file's model did not have)
    held = {k: tensors.get(k, tensors.get(f"{k.rpartition('.')[0]}.original_module.weight")) for k in plan.base_keys}
    changed = [k for k, t in held.items()
               if t is None or not torch.equal(plan.values[k], t.detach().to(plan.values[k].device))]
    if changed:
        raise ValueError(f"{where}: the file also holds base weights ({changed[0]!r}, peft's save_embedding_layers) "
                         "that differ from the model's; a swap replaces adapter weights only: use load_adapter")
    _apply(inner, plan, adapter_name, current, fresh)
    state.configs[adapter_name] = plan.config
    return model


def _check_configs(where: str, old: LoraConfig, new: LoraConfig, adapter_name: str) -> None:
    """What the two adapters must share for one to replace the other in place."""
    for field in ("use_dora", "lora_bias"):  # a tensor more or less in each layer: another graph
        if getattr(old, field) != getattr(new, field):
            raise ValueError(f"{where}: {field}={getattr(new, field)} in the new adapter, but adapter "
                             f"{adapter_name!r} has {field}={getattr(old, field)}; swap only adapters that agree on "
                             f"it, or load this one with load_adapter")
    for which, config in (("current adapter", old), ("new adapter", new)):
        if config.bias != "none":
            raise ValueError(f"{where}: the {which} has bias={config.bias!r}: it trains the base model's biases, "
                             "which a swap can neither undo nor keep apart; use load_adapter / delete_adapter")
        if decomposes(config.init_lora_weights):
            raise ValueError(f"{where}: the {which} has init_lora_weights={config.init_lora_weights!r}, which "
                             "rewrites the base weight when it is loaded; a swap cannot; use load_adapter")


def _check_hosts(where: str, adapter_name: str, current: dict[str, AdapterHost],
                 fresh: dict[str, AdapterHost]) -> None:
    """Every module the new adapter touches is one the current adapter touches, of the same kind,
    with room for its rank; a DoRA adapter touches the same layers (zero factors are not a no-op
    for DoRA's magnitude)."""
    other = sorted(n for n, h in {**current, **fresh}.items() if not isinstance(h, (LoraLayer, ModulesToSave)))
    if other:
        raise ValueError(f"{where}: {other[0]!r} is a {type({**current, **fresh}[other[0]]).__name__}; a swap writes "
                         "only LoRA layers and modules_to_save copies (not LoRA on parameters nor token rows); "
                         "use load_adapter")
    new_only = sorted(set(fresh) - set(current))
    if new_only:
        raise ValueError(f"{where}: the new adapter touches {new_only[:5]}, which adapter {adapter_name!r} does not "
                         "(a swap cannot add LoRA layers or trained copies; a compiled graph would change). Load "
                         f"the adapter touching the most modules first, or use load_adapter")
    for name, host in fresh.items():
        if type(host) is not type(current[name]):
            raise ValueError(f"{where}: {name!r} is a {type(current[name]).__name__} in the model but the new adapter "
                             f"makes it a {type(host).__name__}; use load_adapter")
        if isinstance(host, LoraLayer) and _prepared(current[name], adapter_name):
            r, room = host.adapters[adapter_name].r, current[name].rank_room(adapter_name)
            if r > room:
                raise ValueError(f"{where}: the new adapter has rank {r} at {name!r}, where adapter {adapter_name!r} "
                                 f"has room for rank {room}; call minilora.prepare_for_hotswap(model, "
                                 f"target_rank={r}) (or more) after loading the first adapter and before compiling")
    dora_gone = [n for n in set(current) - set(fresh)
                 if isinstance(current[n], LoraLayer) and current[n].adapters[adapter_name].magnitude is not None]
    if dora_gone:
        raise ValueError(f"{where}: DoRA adapter {adapter_name!r} touches {sorted(dora_gone)[:5]}, which the new "
                         "adapter does not; swap DoRA adapters over the same layers, or use load_adapter")


def _prepared(layer: LoraLayer, adapter_name: str) -> bool:
    """Whether ``prepare_for_hotswap`` fixed this adapter's shapes (its scaling is held as a tensor).
    An unprepared adapter may grow: it gets new, larger factor Parameters (eager use only)."""
    return isinstance(layer.adapters[adapter_name].scaling, torch.Tensor)


def _apply(model: nn.Module, plan: LoadPlan, adapter_name: str, current: dict[str, AdapterHost],
           fresh: dict[str, AdapterHost]) -> None:
    """Write the checked values in place (all checks done)."""
    targets = model.state_dict(keep_vars=True)
    factors = {f"{n}.adapters.{adapter_name}.{p}": (n, p) for n, h in fresh.items()
               if isinstance(h, LoraLayer) for p in ("lora_A", "lora_B")}
    with torch.no_grad():
        for name, host in current.items():
            if name in fresh:
                continue
            if isinstance(host, LoraLayer):  # not in the new adapter: zero factors add exactly nothing
                adapter = host.adapters[adapter_name]
                for tensor in (adapter.lora_A, adapter.lora_B, adapter.lora_bias):
                    if tensor is not None:
                        tensor.zero_()
            elif isinstance(host, ModulesToSave):  # back to the original module's values
                host.modules_to_save[adapter_name].load_state_dict(host.original_module.state_dict())
        for name, host in fresh.items():  # more rank than an unprepared adapter's factors hold: grow them
            if isinstance(host, LoraLayer) and host.adapters[adapter_name].r > current[name].rank_room(adapter_name):
                current[name].pad_rank(adapter_name, host.adapters[adapter_name].r)
        for key, value in plan.values.items():
            if key in plan.base_keys:
                continue  # base rows equal to the model's (checked): nothing to write
            if key in factors:
                name, param = factors[key]
                current[name].write_factor(adapter_name, param, value)
            else:  # lora_bias, DoRA's magnitude, modules_to_save copies: same shapes
                targets[key].copy_(value.to(targets[key].device))
        for name, host in fresh.items():
            if isinstance(host, LoraLayer):
                new, adapter = host.adapters[adapter_name], current[name].adapters[adapter_name]
                adapter.r, adapter.alpha, adapter.dropout = new.r, new.alpha, new.dropout
                adapter.set_scaling(new.scaling)
