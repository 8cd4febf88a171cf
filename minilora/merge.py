"""merge, unmerge, merge_and_unload, disable_adapters: free functions over an injected model."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from minilora.inject import Untied, lora_layers, lora_state, require_state, unload
from minilora.layers import LoraLayer
from minilora.params import param_hosts
from minilora.trainable_tokens import token_hosts
from minilora.tree import hosts, walk

__all__ = ["merge", "unmerge", "merge_and_unload", "disable_adapters", "mergeable"]


def _names(model: nn.Module, adapter_names: Sequence[str] | str | None, what: str) -> list[str]:
    if adapter_names is None:
        return list(require_state(model, what).active)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    require_state(model, what, names)
    return names


def mergeable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, host) for every host whose adapters merge into a weight: LoRA layers, LoRA on
    parameters and trainable-token hosts (all have ``merged``, ``merge_problem``, ``merge`` and
    ``unmerge``)."""
    return [*lora_layers(model), *param_hosts(model), *token_hosts(model)]


def _untie_shared(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> None:
    # A LoRA layer whose weight is also another module's (tied embeddings) gets its own copy before
    # merging; the shared one is kept in the model's state (on the layer it would be a state-dict key).
    owners: dict[int, int] = {}
    for _, module in walk(model):
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    state = lora_state(model)
    for name, layer in layers:
        if owners.get(id(layer.weight), 0) > 1:
            config = getattr(model, "config", None)
            flag = bool(getattr(config, "tie_word_embeddings", False))
            state.untied[name] = Untied(layer.weight, flag)
            layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            if flag:  # the config said tied: say so again once re-tied
                config.tie_word_embeddings = False
            warnings.warn(f"{name!r} shared its weight with another module (tied embeddings); it was untied "
                          "before merging so the other module keeps its weight (unmerge ties it again when "
                          "the weight comes back exactly, e.g. after merge(keep_original=True))", stacklevel=3)


def _retie(model: nn.Module) -> None:
    # Undo _untie_shared where unmerge brought the weight back to the shared one's exact values.
    state = lora_state(model)
    for name, untied in list(state.untied.items()):
        layer = model.get_submodule(name)
        if not isinstance(layer, LoraLayer):  # deleted since: nothing to tie again
            del state.untied[name]
        elif not layer.merged and torch.equal(layer.weight, untied.shared):
            layer.weight = untied.shared
            del state.untied[name]
            if untied.config_flag:
                model.config.tie_word_embeddings = True


def merge(model: nn.Module, safe: bool = False, keep_original: bool = False,
          adapter_names: Sequence[str] | str | None = None) -> nn.Module:
    """Add the adapters' deltas (s·B@A, computed in fp32 (fp64 for fp64 weights), rounded once) into the base weights.

    Args:
        safe: check every merged weight for non-finite values first; on any, raise naming the
            layer and leave all weights untouched.
        keep_original: keep a CPU copy of each original weight so ``unmerge`` restores it
            bit-exactly (subtracting the rounded delta, in bf16, changes ~41% of the elements).
        adapter_names: which adapters (default: the active ones).

    Trainable token rows (``trainable_token_indices``) are written into their weight in place of
    the old rows (rounded to its dtype), which are kept, so unmerge restores them exactly.

    Merging an adapter twice changes nothing. Returns the model.
    """
    names = _names(model, adapter_names, "merge")
    layers = mergeable(model)
    for name, layer in layers:
        todo = [n for n in names if n in layer.adapter_modules() and n not in layer.merged]
        if not todo:
            continue
        problem = layer.merge_problem(todo, keep_original)
        if problem:
            raise ValueError(f"cannot merge into {name!r}: {problem}; nothing was merged")
        if safe:
            bad = [t for t, tensor in layer.merged_tensors(todo).items() if tensor is not None
                   and not torch.isfinite(tensor).all()]
            if bad:
                raise ValueError(f"merging {todo} into {name!r} gives non-finite values in its {bad[0]}; "
                                 "nothing was merged (the adapter weights are probably broken)")
    _untie_shared(model, [(n, layer) for n, layer in layers if isinstance(layer, LoraLayer)
                          and any(a in layer.adapters and a not in layer.merged for a in names)])
    for _, layer in layers:
        layer.merge([n for n in names if n in layer.adapter_modules()], keep_original=keep_original)
    return model


def unmerge(model: nn.Module, adapter_names: Sequence[str] | str | None = None) -> nn.Module:
    """Take merged adapters back out of the weights (all merged ones by default).

    Exact when they were merged with ``keep_original=True``; otherwise W - delta, as peft.
    Without merged adapters this is a no-op.
    """
    require_state(model, "unmerge")
    names = None if adapter_names is None else _names(model, adapter_names, "unmerge")
    for _, layer in reversed(mergeable(model)):
        layer.unmerge(names)
    _retie(model)
    return model


def merge_and_unload(model: nn.Module, safe: bool = False,
                     adapter_names: Sequence[str] | str | None = None) -> nn.Module:
    """Merge, then put plain base layers back (modules_to_save: the trained copy). The result is
    an ordinary model with no minilora inside; the same object is returned."""
    merge(model, safe=safe, adapter_names=adapter_names)
    return unload(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every LoRA layer and modules_to_save wrapper off inside the block.

    The previous state comes back on exit, also when the block raises.

    Raises:
        ValueError: if adapters are merged (their deltas are in the weights; unmerge first).
    """
    require_state(model, "disable_adapters")
    modules = [host for _, host in hosts(model)]
    merged = [n for n, layer in mergeable(model) if layer.merged]
    if merged:
        raise ValueError(f"cannot disable adapters while they are merged (e.g. in {merged[0]!r}); "
                         "call minilora.unmerge(model) first")
    before = [m.disabled for m in modules]
    try:
        for m in modules:
            m.disabled = True
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.disabled = flag
