"""The model tree: the modules that host adapters, and walking and swapping them in a model.

The LoRA layers (``minilora.layers``) and the modules_to_save wrappers (``minilora.modules_to_save``)
are both :class:`AdapterHost` s: model-level code never asks which kind a host is.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn

from minilora.rows import RowAdapters

__all__ = ["AdapterHost", "take_parameters", "give_back_parameters", "merged_while_disabled", "walk", "hosts",
           "swap", "set_active", "vocabulary_ends", "input_requires_grad"]


class AdapterHost(nn.Module):
    """A module that holds one entry per adapter in an ``nn.ModuleDict`` (``adapter_modules()``).

    State every host shares: ``active`` (the active adapters this host holds, in order),
    ``disabled`` (run as the plain module, set by ``disable_adapters``) and ``row_adapters`` (one
    adapter name per batch row, set by ``per_sample_adapters``; None otherwise).
    """

    def __init__(self) -> None:
        super().__init__()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.row_adapters: RowAdapters | None = None

    def adapter_modules(self) -> nn.ModuleDict:
        """Adapter name -> the module holding that adapter's trainable parameters."""
        raise NotImplementedError

    def set_active(self, names: tuple[str, ...]) -> None:
        """Activate those of ``names`` this host holds (the others do not touch it)."""
        self.active = tuple(n for n in names if n in self.adapter_modules())

    def delete_adapter(self, name: str) -> None:
        del self.adapter_modules()[name]
        self.set_active(self.active)

    def unwrap(self) -> nn.Module:
        """The plain module to put back in this host's place when its adapters go away."""
        raise NotImplementedError

    def inner_hosts(self) -> dict[str, AdapterHost]:
        """Hosts registered inside this one, by child name, that model-level code treats as hosts
        of their own (``walk`` yields them): the LoRA layer on an ``nn.MultiheadAttention``'s
        ``out_proj``. Their adapters come and go with this host's."""
        return {}


def take_parameters(host: nn.Module, base: nn.Module) -> None:
    """Register ``base``'s ``weight`` and ``bias`` on ``host`` under those names (a host keeps the
    base layer's parameter names, so state dicts and optimizers see the same keys)."""
    host.weight = base.weight
    host.register_parameter("bias", getattr(base, "bias", None))
    # The tensors now live in the host only: a second reference from the base would keep the full
    # weight alive on every rank after FSDP shards the host. give_back_parameters puts them back.
    for tensor_name in ("weight", "bias"):
        if tensor_name in base._parameters:
            base._parameters[tensor_name] = None


def give_back_parameters(host: nn.Module) -> nn.Module:
    """The host's ``base_layer`` holding the host's current weight and bias again (for unwrap)."""
    base = host.base_layer
    base.weight = host.weight
    if host.bias is not None:
        base.bias = host.bias
    return base


def merged_while_disabled(merged: list[str]) -> RuntimeError:
    """The error of a host's forward with adapters disabled while ``merged`` are in its weights
    (merged inside ``disable_adapters``): the plain module's output is no longer there to give."""
    return RuntimeError(f"adapters {merged} are merged into the weights, so they cannot be disabled; call "
                        "minilora.unmerge(model) first (or merge outside disable_adapters)")


def walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) over the model, not descending into adapter hosts (except into their
    ``inner_hosts``). A module registered at several paths (an embedding shared by encoder and
    decoder) comes once, at its first path, as in ``named_modules()``; ``swap`` keeps every path
    pointing at the same object."""
    stack, seen = [("", model)], set()
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        items = module.inner_hosts().items() if isinstance(module, AdapterHost) else module._modules.items()
        children = [(f"{name}.{n}" if name else n, m) for n, m in items if m is not None]
        stack.extend(reversed(children))


def hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    """(name, host) for every adapter host in the model, in model order."""
    return ((n, m) for n, m in walk(model) if isinstance(m, AdapterHost))


def swap(model: nn.Module, swaps: dict[int, nn.Module]) -> None:
    """Put ``swaps[id(old)]`` wherever ``old`` is registered, at every path, in one walk: a module
    registered twice stays one object (replacing it at its first path only would leave the other
    path on the bare module)."""
    stack, seen = [model], set()
    while stack:
        parent = stack.pop()
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for child_name, child in parent._modules.items():
            if child is None:
                continue
            if id(child) in swaps:
                setattr(parent, child_name, swaps[id(child)])
            elif not isinstance(child, AdapterHost):
                stack.append(child)


def set_active(model: nn.Module, names: tuple[str, ...]) -> None:
    """Make ``names`` the active adapters of every host in the model."""
    for _, host in hosts(model):
        host.set_active(names)


def vocabulary_ends(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """``model.get_input_embeddings()`` and ``model.get_output_embeddings()`` (the token embedding
    and the output head), each None where the model has none: any module may be asked."""
    ends = []
    for getter in (getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)):
        try:
            ends.append(getter() if callable(getter) else None)
        except NotImplementedError:  # transformers models without one raise it
            ends.append(None)
    return ends[0], ends[1]


def input_requires_grad(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook: the module's floating-point output requires grad in training.

    Reentrant checkpointing (``torch.utils.checkpoint(use_reentrant=True)``) only backpropagates
    into a block whose input requires grad; a frozen embedding's output does not, so the adapters
    inside every checkpointed block would silently get no gradient. Under torch.compile it steps
    aside: ``requires_grad_`` on an intermediate breaks the graph, and dynamo traces checkpointed
    blocks without needing the input to require grad.
    """
    if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor) \
            and output.is_floating_point() and not output.requires_grad \
            and not torch.compiler.is_compiling():
        output.requires_grad_(True)
