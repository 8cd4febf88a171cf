"""LoRA on parameters (``target_parameters``): the expert stacks of MoE models, or any 2-D weight.

A mixture-of-experts layer holds its experts' weights as 3-D parameters read by its own forward
(``experts.gate_up_proj``: (E, 2·intermediate, hidden)), so there is no linear layer to wrap.
:class:`LoraParams` replaces the module that owns such parameters and, on every forward, lends
it W + Σ s·B_e @ A_e (``ops.param_weight``) in place of each adapted W, then calls the module's
own forward. Each expert e has its own rank-r pair (layout in ``ops.param_delta``)::

    model.layers.0.mlp.experts.gate_up_proj                                 (E, out, in), unchanged key
    model.layers.0.mlp.experts.adapters.default.gate_up_proj.lora_A         (E·r, in)
    model.layers.0.mlp.experts.adapters.default.gate_up_proj.lora_B         (out, E·r)

A 2-D parameter (out, in) is one "expert": A (r, in), B (out, r). A stack whose module says
``is_transposed`` (transformers' flag, e.g. GPT-OSS) is stored (E, in, out).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn

from minilora import ops
from minilora.layers import LoraAdapter, init_adapter
from minilora.ops import merge_dtype
from minilora.tree import AdapterHost, merged_while_disabled, walk

__all__ = ["LoraParams", "param_hosts", "parameter_problem", "factor_shapes", "stack_transposed"]


def parameter_problem(module: nn.Module, name: str) -> str | None:
    """Why parameter ``name`` of ``module`` cannot carry LoRA, or None."""
    param = module._parameters.get(name)
    if param is None:
        return "it is not a parameter registered on that module"
    if param.dim() not in (2, 3):
        return f"it has shape {tuple(param.shape)}; LoRA on a parameter needs a 2-D (out, in) or 3-D (experts, ...) one"
    if not param.is_floating_point():
        return f"it is a {param.dtype} tensor, not a floating-point one"
    return None


def stack_transposed(param: torch.Tensor, owner: nn.Module) -> bool:
    """Whether ``param`` of module ``owner`` is an expert stack stored (experts, in, out): the
    module says so with transformers' ``is_transposed`` (GPT-OSS), as peft reads it."""
    return param.dim() == 3 and bool(getattr(owner, "is_transposed", False))


def factor_shapes(shape: tuple[int, ...], r: int,
                  transposed: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
    """(A, B) shapes of LoRA at rank r on a parameter of ``shape``: ((E·r, in), (out, E·r)), E = 1
    for a 2-D (out, in) one; a 3-D stack is (E, out, in), or (E, in, out) when ``transposed``. Its
    trainable count is E·r·(in + out)."""
    experts = shape[0] if len(shape) == 3 else 1
    n_out, n_in = shape[-2:]
    if transposed:
        n_in, n_out = n_out, n_in
    return (experts * r, n_in), (n_out, experts * r)


class LoraParams(AdapterHost):
    """Adapts parameters ``targets`` of a module; every other attribute reads through to it.

    The module's parameters, buffers and children are registered here under their own names (the
    state-dict keys do not move); the module keeps its children but lends its parameter and buffer
    slots, filled only while its forward runs. Adapters: ``adapters[adapter][parameter]``, a
    :class:`~minilora.layers.LoraAdapter` each.
    """

    def __init__(self, base: nn.Module, targets: tuple[str, ...]) -> None:
        super().__init__()
        object.__setattr__(self, "base_layer", base)  # kept out of the module tree, as LoraLayer does
        # peft's order of the nested wrappers (and so of its file keys): the module's own order.
        self.targets = tuple(n for n in base._parameters if n in targets)
        # Straight into the registries: register_*'s "already exists" check would see the base's
        # attributes through __getattr__.
        self._modules.update(base._modules)
        self._buffers.update(base._buffers)
        self._non_persistent_buffers_set.update(base._non_persistent_buffers_set)
        self._parameters.update(base._parameters)
        base._buffers.update(dict.fromkeys(base._buffers))
        base._parameters.update(dict.fromkeys(base._parameters))
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []  # adapters whose deltas are in the parameters, in merge order
        self.original_weights: tuple[torch.Tensor, ...] | None = None  # merge(keep_original=True)'s CPU copies
        self.train(base.training)

    # ------------------------------------------------------------ layout
    def transposed(self, name: str) -> bool:
        """Whether parameter ``name`` is an expert stack stored (experts, in, out)."""
        return stack_transposed(self._parameters[name], self.base_layer)

    # ------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, ranks: dict[str, tuple[int, float, float]], init: bool | str) -> None:
        """Add ``adapter_name`` on every target; ``ranks[parameter] = (r, alpha, scaling)``."""
        per_param = nn.ModuleDict()
        for name in self.targets:
            r, alpha, scaling = ranks[name]
            weight = self._parameters[name]
            dtype = merge_dtype(weight.dtype)  # fp32 adapters over a bf16/fp16 parameter; fp64 stays fp64
            shapes = factor_shapes(tuple(weight.shape), r, self.transposed(name))
            adapter = LoraAdapter(*shapes, r=r, alpha=alpha, scaling=scaling, dropout=0.0, lora_bias=False,
                                  dtype=dtype, device=weight.device)
            adapter.train(self.training)
            if not adapter.lora_A.is_meta:
                init_adapter(adapter, init)
            per_param[name] = adapter
        self.adapters[adapter_name] = per_param

    def adapter_modules(self) -> nn.ModuleDict:
        return self.adapters

    # ------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.row_adapters is not None:
            raise ValueError("per_sample_adapters: LoRA on parameters (target_parameters) changes the weight of a "
                             "whole module, so it cannot give each row its own adapter (as in peft); run one adapter "
                             "per batch with set_adapter")
        if self.disabled and self.merged:
            raise merged_while_disabled(self.merged)
        live = () if self.disabled else tuple(n for n in self.active if n not in self.merged)
        lent = dict(self._parameters)
        for name in self.targets if live else ():
            factors = [(a.lora_A, a.lora_B, a.scaling) for a in (self.adapters[n][name] for n in live)]
            lent[name] = ops.param_weight(lent[name], factors, transposed=self.transposed(name))
        base = self.base_layer
        base._parameters.update(lent)
        base._buffers.update(self._buffers)
        try:
            return base(*args, **kwargs)
        finally:  # the slots stay empty outside forward: the tensors live here only (FSDP, to_empty)
            base._parameters.update(dict.fromkeys(lent))
            base._buffers.update(dict.fromkeys(self._buffers))

    def __getattr__(self, name: str) -> Any:
        # Code written for the plain module (``experts.num_experts``) reads its attributes.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":  # not set yet (a copy being built): no fallback to recurse into
                raise
            return getattr(self.base_layer, name)

    # ------------------------------------------------------------ merge
    def delta(self, adapter_name: str, name: str) -> torch.Tensor:
        """s·B_e@A_e of ``adapter_name`` on parameter ``name``, in ``merge_dtype``, its stored layout."""
        adapter, weight = self.adapters[adapter_name][name], self._parameters[name]
        return ops.param_delta(adapter.lora_A.detach(), adapter.lora_B.detach(), adapter.scaling,
                               merge_dtype(weight.dtype), tuple(weight.shape),
                               transposed=self.transposed(name)).to(weight.device)

    def merge_problem(self, names: list[str], keep_original: bool = False) -> str | None:
        """Why adapters ``names`` cannot be merged here, or None (asked before any weight changes)."""
        if keep_original and self.original_weights is None and self.merged:
            return (f"keep_original=True while {self.merged} are already merged without it: the original "
                    "weights are gone; unmerge(model) first")
        return None

    def merged_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Each target parameter with ``names`` added: W + delta in ``merge_dtype``, rounded once per adapter."""
        out = {}
        for name in self.targets:
            weight = self._parameters[name].detach()
            for adapter_name in names:
                weight = (weight + self.delta(adapter_name, name)).to(weight.dtype)
            out[name] = weight
        return out

    def merge(self, names: list[str], keep_original: bool = False) -> None:
        names = [n for n in names if n in self.adapters and n not in self.merged]
        if not names:
            return
        problem = self.merge_problem(names, keep_original)
        if problem:
            raise ValueError(f"cannot merge: {problem}")
        if keep_original and self.original_weights is None:
            self.original_weights = tuple(self._parameters[n].detach().to("cpu", copy=True) for n in self.targets)
        self._write(self.merged_tensors(names))
        self.merged.extend(names)

    def unmerge(self, names: list[str] | None = None) -> None:
        names = list(self.merged) if names is None else [n for n in self.merged if n in names]
        if not names:
            return
        remaining = [n for n in self.merged if n not in names]
        if self.original_weights is not None:  # exact: the kept original, then what stays merged
            self._write(dict(zip(self.targets, self.original_weights)))
            self.merged = []
            if remaining:
                self.merge(remaining)  # the original stays kept: no second copy
            else:
                self.original_weights = None
            return
        out = {}
        for name in self.targets:
            weight = self._parameters[name].detach()
            for adapter_name in reversed(names):  # LIFO, as peft
                weight = (weight - self.delta(adapter_name, name)).to(weight.dtype)
            out[name] = weight
        self._write(out)
        self.merged = remaining

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in tensors.items():
                self._parameters[name].copy_(tensor)

    # ------------------------------------------------------------ unload
    def unwrap(self) -> nn.Module:
        """The plain module, holding this host's current parameters and buffers."""
        base = self.base_layer
        base._parameters.update(self._parameters)
        base._buffers.update(self._buffers)
        return base

    def extra_repr(self) -> str:
        return (f"{type(self.base_layer).__name__}, parameters={list(self.targets)}, active={list(self.active)}, "
                f"merged={self.merged}")


def param_hosts(model: nn.Module) -> Iterator[tuple[str, LoraParams]]:
    """(name, host) for every :class:`LoraParams` in the model."""
    return ((n, m) for n, m in walk(model) if isinstance(m, LoraParams))
