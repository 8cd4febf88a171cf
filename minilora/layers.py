"""LoRA layers: one small module per base-layer kind, the math in ``minilora.ops``.

A LoRA layer replaces its base layer in the model and registers the base layer's parameters
(``weight``, ``bias``) on itself under the same names, so the model's state-dict keys for the base
weights do not move. Adapters live in ``self.adapters[name]`` (a :class:`LoraAdapter` each)::

    model.layers.0.q_proj.weight                    the base weight, unchanged key
    model.layers.0.q_proj.adapters.default.lora_A   (r, in)
    model.layers.0.q_proj.adapters.default.lora_B   (out, r)

Forward: ``y = base(x) + Σ_active s · B(A(dropout(x)))``; merged adapters are already in the
weight and are skipped. A DoRA adapter (``use_dora=True``) also holds a trainable magnitude m, one
value per output, and rescales the running output (see :meth:`LoraLayer.dora_step`)::

    model.layers.0.q_proj.adapters.default.magnitude  (out,)  [ConvNd: (1, out, 1, ...)]

The original base module is kept (unregistered) for its hyper-parameters, which read through
the LoRA layer under the base's names (``q_proj.out_features``, ``emb.padding_idx``; ``in_features``
/ ``out_features`` on every kind), read-only, and to be put back by ``unload``.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora import ops
from minilora.config import decomposes, pissa_iterations
from minilora.ops import merge_dtype
from minilora.tree import AdapterHost, give_back_parameters, merged_while_disabled, take_parameters

if TYPE_CHECKING:
    from minilora.config import LoraConfig

__all__ = ["LoraAdapter", "LoraLayer", "LoraLinear", "LoraConv1D", "LoraEmbedding", "LoraConv",
           "LoraMultiheadAttention", "lora_layer_class", "unsupported_reason", "merge_dtype", "init_adapter",
           "SUPPORTED_TYPES"]

SUPPORTED_TYPES = ("nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, "
                   "nn.MultiheadAttention, bitsandbytes Linear4bit and Linear8bitLt")


class LoraAdapter(nn.Module):
    """One adapter's trainable factors and constants.

    Shapes (r = rank): Linear/Conv1D A (r, in), B (out, r); Embedding A (r, num_embeddings),
    B (dim, r); ConvNd A (r, in, *kernel), B (out, r // groups, 1, ...). ``lora_bias`` (out,) is
    peft's bias on B, scaled like the rest of the branch. ``magnitude`` is DoRA's m, shaped as
    peft saves it: (out,), (dim,) for an Embedding, (1, out, 1, ...) for a ConvNd; None for LoRA.
    """

    def __init__(self, A_shape: tuple[int, ...], B_shape: tuple[int, ...], *, r: int, alpha: float,
                 scaling: float, dropout: float, lora_bias: bool, dtype: torch.dtype,
                 device: torch.device, magnitude_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(A_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(B_shape, dtype=dtype, device=device))
        self.lora_bias = nn.Parameter(torch.zeros(B_shape[0], dtype=dtype, device=device)) if lora_bias else None
        self.magnitude = None if magnitude_shape is None else \
            nn.Parameter(torch.empty(magnitude_shape, dtype=dtype, device=device))
        # DoRA's factor m / ‖W + sBA‖ at merge time, in the weight's layout: unmerge without
        # keep_original divides it out (the norm of the merged weight is another number).
        self.register_buffer("merged_scale", None, persistent=False)
        self.r, self.alpha, self.scaling, self.dropout = r, alpha, scaling, dropout

    def extra_repr(self) -> str:
        dora = ", dora" if self.magnitude is not None else ""
        padded = f" (room for {self.lora_A.shape[0]})" if self.lora_A.shape[0] != self.r else ""
        scaling = "(held, meta)" if isinstance(self.scaling, torch.Tensor) and self.scaling.is_meta \
            else f"{float(self.scaling):g}"
        return f"r={self.r}{padded}, alpha={self.alpha}, scaling={scaling}, dropout={self.dropout}{dora}"

    # ------------------------------------------------------------ hot-swapping
    def hold_scaling_as_tensor(self) -> None:
        """Keep s in a 0-dim buffer (not saved): torch.compile then reads it as an input instead of
        baking the number into the graph, so changing it (``set_scaling``) does not recompile. Its
        dtype is ``merge_dtype`` of the factors': fp32 holds s as the fp32 branch uses it."""
        if not isinstance(self.scaling, torch.Tensor):
            value = self.scaling
            del self.scaling  # the plain attribute; the buffer takes its name
            self.register_buffer("scaling", torch.tensor(value, dtype=merge_dtype(self.lora_A.dtype),
                                                         device=self.lora_A.device), persistent=False)

    def set_scaling(self, value: float) -> None:
        """Change s in place: a buffer is filled (compiled graphs keep reading it), a number replaced."""
        if isinstance(self.scaling, torch.Tensor):
            with torch.no_grad():
                self.scaling.fill_(value)
        else:
            self.scaling = value

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round a held s to 8 bits, an error of up to 2⁻⁹ on every
        # branch: the buffer follows the factors' device but keeps its precision.
        held = self._buffers.get("scaling")
        super()._apply(fn, recurse)
        if held is not None and self._buffers["scaling"].dtype != held.dtype:
            self._buffers["scaling"] = held.to(self._buffers["scaling"].device)
        return self


def _from_base(attr: str) -> property:
    """A read-only property giving ``self.base_layer.<attr>``, for code written for the plain layer
    (transformers' DPR: ``encode_proj.out_features``). Not a ``__getattr__`` fallback: compile traces
    it without a graph break, and an assignment raises instead of leaving a stray attribute."""

    def get(layer: LoraLayer) -> object:
        return getattr(layer.base_layer, attr)

    def refuse(layer: LoraLayer, value: object) -> None:
        raise AttributeError(f"{type(layer).__name__} reads {attr!r} from its base {type(layer.base_layer).__name__} "
                             f"(read-only: the adapter factors are shaped for it); set it on the plain module before "
                             f"minilora.inject, or after minilora.unload")

    return property(get, refuse, doc=f"The base layer's ``{attr}`` (read-only).")


class LoraLayer(AdapterHost):
    """Base class: the adapters, the merge state and the merge, shared by every kind;
    subclasses give the kind's math. Switching, disabling and per-row adapters come from
    :class:`~minilora.tree.AdapterHost`.

    A subclass defines ``base_forward(x, bias)``, ``lora_term(adapter, x)`` (the scaled LoRA term
    in the adapter dtype, for an input already cast and dropped out), ``delta_weight(adapter)``
    (``merge_dtype``, the weight's stored shape), ``factor_shapes(r)``, and for DoRA
    ``dora_norm(adapter)`` (the low-rank forward norm) and ``magnitude_shape()``.
    """

    #: whether A is the large factor initialised with kaiming/gaussian (False for Embedding).
    init_on_A = True
    #: whether the weight is stored (in, out), its outputs along dim 1 (Conv1D, Embedding's dims).
    transposed = False
    #: whether use_dora=True can be built on this kind (inject refuses it before changing anything).
    supports_dora = True
    #: cast each branch to the output dtype before adding it, instead of adding wide and rounding once.
    round_branch_first = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "base_layer", base)  # kept out of the module tree on purpose
        self._take_parameters(base)
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []  # adapters whose deltas are in the weight, in merge order
        # merge(keep_original=True)'s CPU copy of (weight, bias), for a bit-exact unmerge.
        self.original_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # A new module starts in training mode; injecting into an eval model must not switch the
        # LoRA dropout on (forward checks self.training).
        self.train(base.training)

    def _take_parameters(self, base: nn.Module) -> None:
        """Register the base's tensors on this layer under their names (``weight``, ``bias``)."""
        take_parameters(self, base)

    # ------------------------------------------------------------ adapters
    @staticmethod
    def rank_problem(base: nn.Module, r: int) -> str | None:
        """Why rank ``r`` cannot be used on ``base``, or None (inject asks before building)."""
        return None

    @staticmethod
    def target_problem(base: nn.Module, config: LoraConfig) -> str | None:
        """Why ``config`` cannot put LoRA on ``base`` at all, or None (inject asks before building)."""
        return None

    def add_adapter(self, name: str, *, r: int, alpha: float, scaling: float, dropout: float,
                    lora_bias: bool, init: bool | str, use_dora: bool = False) -> LoraAdapter:
        problem = self.rank_problem(self.base_layer, r)
        if problem:
            raise ValueError(problem)
        # fp32 adapters over a bf16/fp16 base (training stability); fp64 stays fp64.
        dtype = self.weight.dtype if self.weight.dtype in (torch.float32, torch.float64) else torch.float32
        adapter = LoraAdapter(*self.factor_shapes(r), r=r, alpha=alpha, scaling=scaling, dropout=dropout,
                              lora_bias=lora_bias, dtype=dtype, device=self.weight.device,
                              magnitude_shape=self.magnitude_shape() if use_dora else None)
        adapter.train(self.training)
        self.adapters[name] = adapter
        if not adapter.lora_A.is_meta:  # meta tensors hold no values: nothing to initialise
            _scheme(init)(self, adapter)
            if use_dora:  # m starts at ‖W + sBA‖ (after pissa/olora moved W), so DoRA starts as LoRA
                with torch.no_grad():
                    adapter.magnitude.copy_(self.dora_direct_norm(adapter, self.weight.detach()))
        return adapter

    def adapter_modules(self) -> nn.ModuleDict:
        return self.adapters

    # ------------------------------------------------------------ rank room (hot-swapping)
    # ``prepare_for_hotswap`` zero-pads an adapter's factors to a larger rank, its room, so adapters
    # of any rank up to it fit in place: zero rows of A and columns of B add nothing. The adapter's
    # ``r`` stays its own rank; its factors are its leading ranks. A grouped conv's B reads A's
    # output channels in ``rank_groups`` blocks, so A's leading ranks are the head of each block.
    def rank_groups(self) -> int:
        """How many blocks A's rank dim is read in (a grouped conv's groups; 1 elsewhere)."""
        return 1

    def rank_room(self, name: str) -> int:
        """The rank adapter ``name``'s factors can hold (its r, or more once padded)."""
        return self.adapters[name].lora_A.shape[0]

    def unpadded(self, name: str, param: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (adapter ``name``'s ``param``, or a copy of it) without the padding, what a
        file of this adapter holds: A (room, ...) -> (r, ...), B (out, room / g, ...) -> (out, r / g,
        ...); other tensors whole. A grouped conv's A comes as a copy, the others as views."""
        r, g = self.adapters[name].r, self.rank_groups()
        if param == "lora_A":
            return tensor.unflatten(0, (g, -1))[:, : r // g].flatten(0, 1)
        return tensor[:, : r // g] if param == "lora_B" else tensor

    def write_factor(self, name: str, param: str, value: torch.Tensor) -> None:
        """Copy ``value`` (shaped for a rank up to the room) into adapter ``name``'s ``param``,
        zeroing the rest of the room. In place: the Parameter object stays (a compiled graph, an
        optimizer hold it)."""
        tensor, g = getattr(self.adapters[name], param), self.rank_groups()
        with torch.no_grad():
            if param == "lora_A":
                tensor.zero_()
                tensor.unflatten(0, (g, -1))[:, : value.shape[0] // g].copy_(value.unflatten(0, (g, -1)))
            elif param == "lora_B":
                tensor.zero_()
                tensor[:, : value.shape[1]].copy_(value)
            else:
                tensor.copy_(value)

    def pad_rank(self, name: str, room: int) -> None:
        """Give adapter ``name`` room for rank ``room`` (>= its room; a multiple of rank_groups):
        new zero-padded factor Parameters, same dtype, device and requires_grad."""
        adapter = self.adapters[name]
        for param in ("lora_A", "lora_B"):
            old = getattr(adapter, param)
            shape = list(old.shape)
            shape[0 if param == "lora_A" else 1] = room if param == "lora_A" else room // self.rank_groups()
            setattr(adapter, param, nn.Parameter(old.new_zeros(shape), requires_grad=old.requires_grad))
            self.write_factor(name, param, old.detach())

    @property
    def _live(self) -> tuple[str, ...]:
        """The active adapters that are not merged: what forward has to add."""
        return tuple(n for n in self.active if n not in self.merged)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                raise merged_while_disabled(self.merged)
            return self.base_forward(x)
        if self.row_adapters is not None:
            return self._forward_rows(x)
        y = self.base_forward(x)
        if not self._live:
            return y
        dtype = y.dtype
        early = self.round_branch_first and not torch.is_autocast_enabled(x.device.type)
        for name in self._live:
            adapter = self.adapters[name]
            if adapter.magnitude is not None:
                y = self.dora_step(adapter, x, y)
            else:
                delta = self.branch(adapter, x)
                y = y + (delta.to(dtype) if early else delta)
        return y.to(dtype)

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed batch: row i gets the adapter named ``row_adapters[i]`` ('__base__': none)."""
        names = self.row_adapters
        if x.dim() == 0 or x.shape[0] != len(names):
            # Rows would silently get another row's adapter (e.g. a model that flattens the batch).
            raise ValueError(f"per-row adapters: this layer got an input of shape {tuple(x.shape)}, but "
                             f"{len(names)} row adapters were given; dim 0 must be the batch")
        y = self.base_forward(x)
        dtype, out = y.dtype, y
        stack = self.stacked_adapters()
        stacked = () if stack is None else stack.names
        if any(name in stacked for name in names.distinct()):
            # One batched product for every plain adapter; DoRA and lora_bias adapters loop below.
            # Both paths add into y in place, on stacked rows only: the rows left to the loop keep
            # their base output in y (DoRA reads it).
            out = ops.multi_lora_add(y, x, stack, names.slots(stacked, x.device))
        for name in names.distinct():
            if name not in self.adapters or name in stacked:
                continue  # '__base__', an adapter that does not touch this layer, or done above
            rows = names.index(names.rows_of(name), x.device)
            adapter = self.adapters[name]
            if adapter.magnitude is None:
                delta = self.branch(adapter, x.index_select(0, rows))
                out = out.to(torch.promote_types(out.dtype, delta.dtype))
                out = out.index_add(0, rows, delta.to(out.dtype))
            else:  # each row has one adapter: its DoRA output replaces the row's base output
                new = self.dora_step(adapter, x.index_select(0, rows), y.index_select(0, rows))
                out = out.to(torch.promote_types(out.dtype, new.dtype))
                out = out.index_copy(0, rows, new.to(out.dtype))
        return out.to(dtype)

    def stacked_adapters(self) -> ops.StackedLora | None:
        """This layer's plain LoRA adapters stacked for mixed batches (``ops.StackedLora``), or None:
        kinds whose branch is x Aᵀ Bᵀ (``LoraLinear`` and its subclasses) override this."""
        return None

    # ------------------------------------------------------------ DoRA
    def branch(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        """s · B(A(dropout(x))) (+ s · lora_bias), in the adapter dtype."""
        x = x.to(adapter.lora_A.dtype)
        if adapter.dropout > 0.0 and self.training:
            x = F.dropout(x, adapter.dropout, training=True)
        return self.lora_term(adapter, x)

    def dora_step(self, adapter: LoraAdapter, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """DoRA's update of the running output ``y`` (the base output, bias included, plus the
        adapters before this one), with g = m / ‖W + sBA‖ (a constant for autograd)::

            y + (g - 1) · base + g · s · B(A(x'))

        Without dropout (or in eval) x' = x and base = y - bias: for a lone adapter, DoRA's
        (m / ‖W + sBA‖) ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + bias. With dropout in training x' = dropout(x) and
        base = x' Wᵀ, computed in the weight's dtype.
        """
        g = adapter.magnitude / self.dora_norm(adapter)
        x = x.to(adapter.lora_A.dtype)
        if adapter.dropout > 0.0 and self.training:
            x = F.dropout(x, adapter.dropout, training=True)
            base = self.base_forward(x.to(self.weight.dtype), bias=False).to(x.dtype)
        else:
            bias = self.output_bias()
            base = y if bias is None else y - bias
        return y + (g - 1) * base + g * self.lora_term(adapter, x)

    def output_bias(self) -> torch.Tensor | None:
        """The base bias, shaped to broadcast over this layer's output."""
        return self.bias

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.weight.shape[1 if self.transposed else 0],)

    def dora_direct_norm(self, adapter: LoraAdapter, weight: torch.Tensor) -> torch.Tensor:
        """‖weight + s·B·A‖ per output, formed in full in ``merge_dtype`` (initialisation and
        merge; the offline merge sums the same blocks). Shaped like ``adapter.magnitude``."""
        merged = weight.to(merge_dtype(weight.dtype)) + self.delta_weight(adapter).to(weight.device)
        norm = ops.dora_merge_norm((merged[rows] for rows in ops.row_blocks(tuple(merged.shape))),
                                   self.transposed)
        return norm.view(self.magnitude_shape())

    def dora_scale_weight(self, scale: torch.Tensor) -> torch.Tensor:
        """A per-output factor laid out to multiply the stored weight."""
        lead = (1, -1) if self.transposed else (-1,)
        return scale.reshape(*lead, *(1,) * (self.weight.dim() - len(lead)))

    # ------------------------------------------------------------ merge
    def merge_problem(self, names: list[str], keep_original: bool = False) -> str | None:
        """Why adapters ``names`` cannot be merged into this layer, or None. merge() asks every
        layer before changing any weight, so a refused merge leaves nothing half merged."""
        if keep_original and self.original_weights is None and self.merged:
            return (f"keep_original=True while {self.merged} are already merged without it: the original "
                    "weight is gone; unmerge(model) first")
        for name in names:
            if self.adapters[name].lora_bias is not None and self.bias is None:
                return f"adapter {name!r} has a lora_bias but the base layer has no bias to merge it into"
        return None

    def merged_weights(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias with ``names`` added, computed in ``merge_dtype``, rounded once.
        The callers have asked ``merge_problem``."""
        weight, bias = self._dense_weight(), None if self.bias is None else self.bias.detach()
        unmerged = None  # the weight without merged adapters, for DoRA's norms (as forward sees it)
        for name in names:
            adapter = self.adapters[name]
            delta = self.delta_weight(adapter).to(weight.device)
            if adapter.magnitude is None:
                # W (bf16) + delta (fp32) computes in fp32 and rounds once: peft's in-place add does the same.
                weight = (weight + delta).to(weight.dtype)
            else:
                # (m / ‖W0 + ΔW‖) ⊙ (W + ΔW) with W0 the unmerged weight, in merge_dtype, rounded once.
                unmerged = self.unmerged_weight() if unmerged is None else unmerged
                norm = self.dora_direct_norm(adapter, unmerged)
                scale = self.dora_scale_weight(adapter.magnitude.detach().to(norm.dtype) / norm)
                adapter.merged_scale = scale
                weight = (scale * (weight + delta)).to(self.weight.dtype)
            if adapter.lora_bias is not None:
                bias = (bias + adapter.scaling * adapter.lora_bias.detach()).to(self.bias.dtype)
        return weight, bias

    def merged_tensors(self, names: list[str]) -> dict[str, torch.Tensor | None]:
        """``merged_weights`` by tensor name, as every merging host gives it (merge's safe check)."""
        weight, bias = self.merged_weights(names)
        return {"weight": weight, "bias": bias}

    def unmerged_weight(self) -> torch.Tensor:
        """The weight without the merged adapters: the kept original, or (as peft) the current
        weight with each merged adapter taken out again, rounded as unmerge rounds."""
        if not self.merged:
            return self.weight.detach()
        if self.original_weights is not None:
            return self.original_weights[0].to(self.weight.device)
        weight = self.weight.detach()
        for name in reversed(self.merged):
            weight = self._take_out(weight, self.adapters[name])
        return weight

    def _take_out(self, weight: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        delta = self.delta_weight(adapter).to(weight.device)
        if adapter.magnitude is not None:
            return (weight / adapter.merged_scale - delta).to(weight.dtype)
        return (weight - delta).to(weight.dtype)

    def merge(self, names: list[str], keep_original: bool = False) -> None:
        names = [n for n in names if n not in self.merged]
        if not names:
            return
        problem = self.merge_problem(names, keep_original)
        if problem:
            raise ValueError(f"cannot merge: {problem}")
        if keep_original and self.original_weights is None:
            self._keep_original()
        weight, bias = self.merged_weights(names)
        self._write(weight, bias, f"merging {names}")
        self.merged.extend(names)

    def unmerge(self, names: list[str] | None = None) -> None:
        names = list(self.merged) if names is None else [n for n in self.merged if n in names]
        if not names:
            return
        remaining = [n for n in self.merged if n not in names]
        if self.original_weights is not None:
            # Exact: rebuild from the kept original instead of subtracting rounded deltas.
            self._restore_original()
            self.merged = []
            if remaining:
                self.merge(remaining)
            else:
                self.original_weights = None
            return
        weight, bias = self._dense_weight(), None if self.bias is None else self.bias.detach()
        with torch.no_grad():
            for name in reversed(names):  # LIFO, as peft
                adapter = self.adapters[name]
                weight = self._take_out(weight, adapter)
                adapter.merged_scale = None
                if adapter.lora_bias is not None:
                    bias = (bias - adapter.scaling * adapter.lora_bias).to(self.bias.dtype)
        self._write(weight, bias, f"unmerging {names}")
        self.merged = remaining

    # The storage of the weight, which the quantized layers replace.
    def _dense_weight(self) -> torch.Tensor:
        """The weight as the dense tensor merges compute with: here, the stored weight itself."""
        return self.weight.detach()

    def _write(self, weight: torch.Tensor, bias: torch.Tensor | None, what: str) -> None:
        """Store a merged or unmerged weight and bias (``what`` names the operation)."""
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)

    def _keep_original(self) -> None:
        self.original_weights = (self.weight.detach().to("cpu", copy=True),
                                 None if self.bias is None else self.bias.detach().to("cpu", copy=True))

    def _restore_original(self) -> None:
        weight, bias = self.original_weights
        self._write(weight, bias, "restoring the original weight")

    # ------------------------------------------------------------ unload
    def unwrap(self) -> nn.Module:
        """The plain base module, holding this layer's current weight and bias."""
        return give_back_parameters(self)

    def extra_repr(self) -> str:
        return f"{type(self.base_layer).__name__}, active={list(self.active)}, merged={self.merged}"

    # ------------------------------------------------------------ per kind
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def base_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def lora_term(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, adapter: LoraAdapter) -> torch.Tensor:
        raise NotImplementedError

    def dora_norm(self, adapter: LoraAdapter) -> torch.Tensor:
        """‖W + s·B·A‖ per output from the low-rank identity (``ops.dora_norm``), detached,
        shaped like ``adapter.magnitude``."""
        return ops.dora_norm(self.weight, adapter.lora_A, adapter.lora_B, adapter.scaling,
                             transposed=self.transposed).view(self.magnitude_shape())


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear``: x (..., in) -> (..., out); weight (out, in)."""

    in_features = _from_base("in_features")
    out_features = _from_base("out_features")
    #: whether one live adapter may run through ``ops.lora_linear`` / ``ops.dora_linear``, which
    #: take an (out, in) plain weight: subclasses with another weight layout say False.
    fused = True

    def factor_shapes(self, r):
        out_features, in_features = self.weight.shape
        return (r, in_features), (out_features, r)

    def base_forward(self, x, bias=True):
        return F.linear(x, self.weight, self.bias if bias else None)

    def lora_term(self, adapter, x):
        return ops.lora_branch(x, adapter.lora_A, adapter.lora_B, adapter.scaling, lora_bias=adapter.lora_bias)

    def forward(self, x):
        # The hot path: one live adapter goes through ops.lora_linear (Triton kernels on CUDA).
        live = self._live
        if self.fused and len(live) == 1 and not self.disabled and self.row_adapters is None:
            adapter = self.adapters[live[0]]
            if adapter.magnitude is not None:
                # DoRA without dropout, one dtype: x Wᵀ + s·x Aᵀ Bᵀ through the same path, then the
                # column scale; otherwise peft's order of operations in dora_step.
                if (adapter.dropout == 0.0 or not self.training) and \
                        x.dtype == self.weight.dtype == adapter.lora_A.dtype and \
                        not torch.is_autocast_enabled(x.device.type):
                    return ops.dora_linear(x, self.weight, self.bias, adapter.lora_A, adapter.lora_B,
                                           adapter.scaling, adapter.magnitude, self.dora_norm(adapter))
            elif adapter.lora_bias is None:
                return ops.lora_linear(x, self.weight, self.bias, adapter.lora_A, adapter.lora_B,
                                       adapter.scaling, adapter.dropout, self.training)
        return super().forward(x)

    def delta_weight(self, adapter):
        return ops.lora_delta(adapter.lora_A, adapter.lora_B, adapter.scaling, merge_dtype(self.weight.dtype),
                              transposed=self.transposed)

    def stacked_adapters(self):
        """The adapters without DoRA or lora_bias, stacked by ``ops.stack_lora`` (None when they
        do not share one dtype, or when a gradient to them is wanted: the stack is detached).

        Rebuilt only when they change: the key holds each factor's identity, storage and version
        counter (bumped by every in-place write: load_adapter, an optimizer step) and the scaling.
        Memory: one more copy of these factors, zero-padded to the largest rank.
        """
        plain = [(n, a) for n, a in self.adapters.items() if a.magnitude is None and a.lora_bias is None]
        if not plain or len({a.lora_A.dtype for _, a in plain} | {a.lora_B.dtype for _, a in plain}) > 1:
            return None
        if torch.is_grad_enabled() and any(a.lora_A.requires_grad or a.lora_B.requires_grad for _, a in plain):
            return None
        # A scaling held as a tensor (prepare_for_hotswap) changes in place: its version, not its value
        # (reading it would wait for the device).
        key = tuple((n, *((id(t), t.device, t.data_ptr(), t._version) for t in (a.lora_A, a.lora_B)),
                     (id(a.scaling), a.scaling._version) if isinstance(a.scaling, torch.Tensor) else a.scaling)
                    for n, a in plain)
        cached = self.__dict__.get("_stack")
        if cached is None or cached[0] != key:
            cached = (key, ops.stack_lora([n for n, _ in plain],
                                          [(a.lora_A.detach(), a.lora_B.detach(), a.scaling) for _, a in plain]))
            self.__dict__["_stack"] = cached
        return cached[1]


class LoraConv1D(LoraLinear):
    """LoRA on transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""

    nf = _from_base("nf")  # out
    nx = _from_base("nx")  # in
    in_features = _from_base("nx")  # peft's names for them
    out_features = _from_base("nf")
    transposed = True
    fused = False  # the kernels take an (out, in) weight

    def factor_shapes(self, r):
        in_features, out_features = self.weight.shape
        return (r, in_features), (out_features, r)

    def base_forward(self, x, bias=True):
        # Same op as Conv1D.forward, so results match the unwrapped layer bit for bit.
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(self.bias, flat, self.weight) if bias else flat @ self.weight
        return out.view(*x.shape[:-1], self.weight.shape[-1])


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ids (...) -> (..., dim); A (r, num), B (dim, r). A starts at zero
    and B random; dropout (on integer ids) is not applied."""

    init_on_A = False
    transposed = True  # DoRA's outputs are the embedding dims: the norm runs over tokens
    num_embeddings = _from_base("num_embeddings")
    embedding_dim = _from_base("embedding_dim")
    padding_idx = _from_base("padding_idx")
    max_norm = _from_base("max_norm")
    norm_type = _from_base("norm_type")
    scale_grad_by_freq = _from_base("scale_grad_by_freq")
    sparse = _from_base("sparse")
    in_features = _from_base("num_embeddings")  # peft's names for them
    out_features = _from_base("embedding_dim")

    def factor_shapes(self, r):
        num, dim = self.weight.shape
        return (r, num), (dim, r)

    def _embed(self, ids, table):
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def base_forward(self, x, bias=True):
        return self._embed(x, self.weight)

    def branch(self, adapter, x):  # integer ids: no cast, no dropout
        return self.lora_term(adapter, x)

    def lora_term(self, adapter, x):
        out = self._embed(x, adapter.lora_A.T) @ adapter.lora_B.T * adapter.scaling
        return out if adapter.lora_bias is None else out + adapter.lora_bias * adapter.scaling

    def dora_step(self, adapter, x, y):
        """peft's DoRA for embeddings: g ⊙ (y + s · embed(x, Aᵀ) Bᵀ), g = m / ‖Wᵀ + sBA‖ per dim."""
        g = adapter.magnitude / self.dora_norm(adapter)
        return g * y + g * self.lora_term(adapter, x)

    def delta_weight(self, adapter):
        return ops.lora_delta(adapter.lora_A, adapter.lora_B, adapter.scaling, merge_dtype(self.weight.dtype),
                              transposed=True)


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base's kernel, stride, padding, dilation
    and padding mode; B is a 1x.. conv with the base's groups. Weight (out, in // groups, *kernel)."""

    in_channels = _from_base("in_channels")
    out_channels = _from_base("out_channels")
    kernel_size = _from_base("kernel_size")
    stride = _from_base("stride")
    padding = _from_base("padding")
    dilation = _from_base("dilation")
    transposed = _from_base("transposed")
    output_padding = _from_base("output_padding")
    groups = _from_base("groups")
    padding_mode = _from_base("padding_mode")
    in_features = _from_base("in_channels")  # peft's names for them
    out_features = _from_base("out_channels")

    def rank_groups(self):
        return self.base_layer.groups

    @staticmethod
    def rank_problem(base, r):
        if r % base.groups:
            return (f"r={r} is not a multiple of the conv's groups={base.groups} (B is a grouped 1x1 conv, "
                    "as in peft); choose r divisible by groups")
        return None

    def merge_problem(self, names, keep_original=False):
        return ops.grouped_merge_problem(self.base_layer.groups) or super().merge_problem(names, keep_original)

    def factor_shapes(self, r):
        base = self.base_layer
        ones = (1,) * (self.weight.dim() - 2)
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r // base.groups, *ones)

    def _conv(self, x, weight, bias, groups, full_geometry=True):
        base = self.base_layer
        conv = _CONV_FN[self.weight.dim() - 2]
        if not full_geometry:  # the 1x1 B conv
            return conv(x, weight, bias, 1, 0, 1, groups)
        padding = base.padding
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        return conv(x, weight, bias, base.stride, padding, base.dilation, groups)

    def base_forward(self, x, bias=True):
        return self._conv(x, self.weight, self.bias if bias else None, self.base_layer.groups)

    def output_bias(self):
        return None if self.bias is None else self.bias.view(1, -1, *(1,) * (self.weight.dim() - 2))

    def magnitude_shape(self):
        return (1, self.weight.shape[0], *(1,) * (self.weight.dim() - 2))

    def dora_norm(self, adapter):
        if self.base_layer.groups > 1:
            return self.dora_direct_norm(adapter, self.weight.detach()).detach()
        flat = ops.dora_norm(self.weight.flatten(1), adapter.lora_A.flatten(1), adapter.lora_B.flatten(1),
                             adapter.scaling)
        return flat.view(self.magnitude_shape())

    def dora_direct_norm(self, adapter, weight):
        if self.base_layer.groups == 1:
            return super().dora_direct_norm(adapter, weight)
        # A grouped conv's LoRA (A mixes all channels) has no weight of the base's shape: the norm
        # reads B (out, r/g) as (out/g, r), times A (r, in·k), reshaped to the weight's shape.
        dtype = merge_dtype(weight.dtype)
        r = adapter.lora_A.shape[0]
        lora = (adapter.lora_B.to(dtype).reshape(-1, r) @ adapter.lora_A.to(dtype).reshape(r, -1))
        merged = weight.to(dtype) + adapter.scaling * lora.reshape(weight.shape)
        return torch.linalg.vector_norm(merged.flatten(1), dim=1).view(self.magnitude_shape())

    def lora_term(self, adapter, x):
        hidden = self._conv(x, adapter.lora_A, None, 1)
        return self._conv(hidden, adapter.lora_B, adapter.lora_bias, self.base_layer.groups,
                          full_geometry=False) * adapter.scaling

    def delta_weight(self, adapter):
        problem = self.merge_problem([])
        if problem:
            raise ValueError(problem)
        return ops.lora_delta(adapter.lora_A, adapter.lora_B, adapter.scaling, merge_dtype(self.weight.dtype))


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoraMultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention`` with q, k and v of one size: A (r, E), B (3E, r) on the packed
    ``in_proj_weight`` (3E, E), and a :class:`LoraLinear` on ``out_proj`` with the same adapters (an
    inner host: merges, saving and trainability treat it as a layer of its own, ``<name>.out_proj``).

    nn.MultiheadAttention hands its raw weights to ``F.multi_head_attention_forward`` and never
    calls ``out_proj``, so there is no branch to add: forward runs the base module with each weight
    replaced by W + Σ s·B·A (``delta_weight``, rounded to W's dtype as ``merged_weights`` rounds)
    through ``torch.func.functional_call``. Nothing is written, autograd reaches the factors, and a
    merged layer computes with the same bits as an unmerged one. ``lora_dropout`` has no input to
    act on and is not used. The base's keys stay: ``in_proj_weight``, ``in_proj_bias``, ``bias_k``,
    ``bias_v``, ``out_proj.weight``, ``out_proj.bias``.
    """

    supports_dora = False
    #: in_proj_bias is not LoRA's to change: merges leave it; bias="lora_only" trains out_proj's bias.
    bias = None
    embed_dim = _from_base("embed_dim")
    num_heads = _from_base("num_heads")
    head_dim = _from_base("head_dim")
    kdim = _from_base("kdim")
    vdim = _from_base("vdim")
    dropout = _from_base("dropout")
    batch_first = _from_base("batch_first")
    add_zero_attn = _from_base("add_zero_attn")
    _qkv_same_embed_dim = _from_base("_qkv_same_embed_dim")
    in_features = _from_base("embed_dim")  # peft's names: (E, 3E)

    @property
    def out_features(self) -> int:
        return 3 * self.base_layer.embed_dim

    @property
    def weight(self) -> nn.Parameter:
        """The packed (3E, E) ``in_proj_weight``: the weight LoraLayer's merges work on."""
        return self.in_proj_weight

    def __setattr__(self, name: str, value: Any) -> None:
        # LoraLayer code assigns ``weight`` (merge unties a shared one): it is in_proj_weight here.
        super().__setattr__("in_proj_weight" if name == "weight" else name, value)

    def _take_parameters(self, base):
        for tensor_name in _MHA_TENSORS:
            if base._parameters.get(tensor_name) is not None:
                self.register_parameter(tensor_name, base._parameters[tensor_name])
                base._parameters[tensor_name] = None
        self.out_proj = LoraLinear(base.out_proj)

    @staticmethod
    def target_problem(base, config):
        if not base._qkv_same_embed_dim:
            return (f"its kdim={base.kdim} / vdim={base.vdim} differ from embed_dim={base.embed_dim}, so q, k and v "
                    "have separate weights; LoRA on nn.MultiheadAttention needs the packed in_proj_weight (kdim = "
                    "vdim = embed_dim), as in peft. Exclude it")
        if config.use_dora:
            return "DoRA on nn.MultiheadAttention is not supported (nor by peft); set use_dora=False or exclude it"
        if config.lora_bias:
            return ("lora_bias=True on nn.MultiheadAttention is not supported: its LoRA goes into the weights, where "
                    "a bias on B has no place; set lora_bias=False or exclude it")
        return None

    def inner_hosts(self) -> dict[str, AdapterHost]:
        return {"out_proj": self.out_proj}

    def add_adapter(self, name: str, **kwargs: Any) -> LoraAdapter:
        """Add adapter ``name`` to in_proj and to out_proj (same arguments as LoraLayer's)."""
        self.out_proj.add_adapter(name, **kwargs)
        return super().add_adapter(name, **kwargs)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.out_proj.adapters:
            self.out_proj.delete_adapter(name)

    def train(self, mode: bool = True):
        # The base module runs the attention and reads its own flag (attention dropout, fast path).
        self.base_layer.train(mode)
        return super().train(mode)

    # in_proj_weight (3E, E) is a Linear's (out, in) weight: the same factors and delta
    factor_shapes = LoraLinear.factor_shapes
    delta_weight = LoraLinear.delta_weight

    def _run_weight(self, layer: LoraLayer) -> torch.Tensor:
        """``layer``'s weight plus its live adapters, added and rounded as ``merged_weights`` does."""
        if self.disabled:
            if layer.merged:
                raise merged_while_disabled(layer.merged)
            return layer.weight
        weight = layer.weight
        for name in layer._live:
            weight = (weight + layer.delta_weight(layer.adapters[name]).to(weight.device)).to(layer.weight.dtype)
        return weight

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """nn.MultiheadAttention's forward (same arguments, same (output, weights)) with LoRA."""
        if self.row_adapters is not None:
            raise ValueError("per_sample_adapters: LoRA on nn.MultiheadAttention is added to its weights, one set "
                             "for the whole batch, so rows cannot have different adapters; run them in separate "
                             "batches (minilora.set_adapter)")
        tensors = dict(self._parameters, in_proj_weight=self._run_weight(self))
        tensors["out_proj.weight"] = self._run_weight(self.out_proj)
        if self.out_proj.bias is not None:
            tensors["out_proj.bias"] = self.out_proj.bias
        out, weights = torch.func.functional_call(self.base_layer, tensors, (query, key, value, *args), kwargs)
        # Autocast may have run the projections in a lower dtype: answer in the query's.
        return out.to(query.dtype), None if weights is None else weights.to(query.dtype)

    def unwrap(self) -> nn.Module:
        base = self.base_layer
        for tensor_name, tensor in self._parameters.items():
            base._parameters[tensor_name] = tensor
        base.out_proj = self.out_proj.unwrap()
        return base


#: nn.MultiheadAttention's own tensors (out_proj's are its LoraLinear's); absent ones stay unset.
_MHA_TENSORS = ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v")


# ---------------------------------------------------------------- initialisation schemes
def _init_default(layer: LoraLayer, adapter: LoraAdapter, gaussian: bool = False) -> None:
    # The large factor random (kaiming, or gaussian with std 1/r), the other zero.
    if not layer.init_on_A:
        nn.init.normal_(adapter.lora_B)
    elif gaussian:
        nn.init.normal_(adapter.lora_A, std=1 / adapter.r)
    else:
        nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
    nn.init.zeros_(adapter.lora_B if layer.init_on_A else adapter.lora_A)


def _init_random(layer: LoraLayer, adapter: LoraAdapter) -> None:
    # init_lora_weights=False: both factors random, so the adapter is not a no-op (for tests).
    nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
    nn.init.kaiming_uniform_(adapter.lora_B, a=math.sqrt(5))


def _base_matrix(layer: LoraLayer, scheme: str) -> torch.Tensor:
    """The base weight as an (out, in) fp32 matrix (a Conv1D's stored (in, out) weight transposed)."""
    if not isinstance(layer, LoraLinear):
        raise ValueError(f"init_lora_weights={scheme!r} needs a linear layer; this one wraps "
                         f"{type(layer.base_layer).__name__}")
    weight = layer.weight.detach().float()
    return weight.T if layer.transposed else weight


def _init_pissa(layer: LoraLayer, adapter: LoraAdapter, niter: int | None = None) -> None:
    # Principal singular directions go into the adapter; the base keeps the residual. With niter,
    # the r leading ones of a randomized SVD (torch.svd_lowrank, peft's "pissa_niter_<n>").
    weight = _base_matrix(layer, "pissa")
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, : adapter.r], S[: adapter.r], Vh[: adapter.r]
    else:
        U, S, V = torch.svd_lowrank(weight, adapter.r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / adapter.scaling)
    _set_factors_and_residual(layer, adapter, root[:, None] * Vh, U * root, weight)


def _init_olora(layer: LoraLayer, adapter: LoraAdapter) -> None:
    # Orthonormal Q columns as B, R rows as A.
    weight = _base_matrix(layer, "olora")
    Q, R = torch.linalg.qr(weight)
    A, B = R[: adapter.r], Q[:, : adapter.r]
    if A.shape != adapter.lora_A.shape or B.shape != adapter.lora_B.shape:
        raise ValueError(f"init_lora_weights='olora' cannot initialise a {type(layer.base_layer).__name__} "
                         f"of weight shape {tuple(layer.weight.shape)} with r={adapter.r}")
    _set_factors_and_residual(layer, adapter, A, B, weight)


def _init_orthogonal(layer: LoraLayer, adapter: LoraAdapter) -> None:
    # A from the even rows of one random orthogonal r x r basis, B from the odd ones: their rows
    # are orthogonal, so B A = 0 and the adapter starts as a no-op with neither factor zero (peft's
    # scheme, its random draws in its order; inject checks r is even and the layer linear).
    half = adapter.r // 2
    Q, _ = torch.linalg.qr(torch.randn(adapter.r, adapter.r))
    (_, n_in), (n_out, _) = adapter.lora_A.shape, adapter.lora_B.shape
    with torch.no_grad():
        adapter.lora_A.copy_(torch.randn(n_in, half).mm(Q[0::2]).T / 10)
        adapter.lora_B.copy_(torch.randn(half, n_out).T.mm(Q[1::2]) / 10)


def _set_factors_and_residual(layer, adapter, A, B, weight):
    with torch.no_grad():
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
        residual = weight - adapter.scaling * B @ A
        layer.weight.copy_(residual.T if layer.transposed else residual)


_INIT: dict[bool | str, Callable[[LoraLayer, LoraAdapter], None]] = {
    True: _init_default, "gaussian": functools.partial(_init_default, gaussian=True), False: _init_random,
    "pissa": _init_pissa, "olora": _init_olora, "orthogonal": _init_orthogonal,
}


def _scheme(init: bool | str) -> Callable[[LoraLayer, LoraAdapter], None]:
    niter = pissa_iterations(init)
    if niter is not None:
        return functools.partial(_init_pissa, niter=niter)
    return _INIT[init if isinstance(init, str) else bool(init)]


def init_adapter(adapter: LoraAdapter, init: bool | str) -> None:
    """Initialise the factors of an adapter shaped like a linear layer's (A the large factor) by
    scheme ``init``: True, "gaussian", False or "orthogonal"; the schemes that read a base weight
    need a layer."""
    if decomposes(init):
        raise ValueError(f"init_lora_weights={init!r} decomposes a layer's weight; init_adapter has none")
    _scheme(init)(LoraLinear, adapter)  # reads init_on_A only


# ---------------------------------------------------------------- which layer for which module
def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a supported base type must still not be wrapped, or None.

    An ``nn.Linear`` subclass whose weight is not a plain floating-point tensor is a quantized
    layer minilora does not know (GPTQ, HQQ, torchao, ...): LoRA's plain path would run
    ``F.linear`` on packed integers. bitsandbytes' layers have their own LoRA classes.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor) or _quantized_class(module):
        return None  # (an adapted layer's base module has handed its weight to the LoRA layer: None)
    # A Parameter's .data is a plain Tensor unless the values live in a tensor subclass (torchao's
    # AffineQuantizedTensor, ...), which may even report a floating dtype.
    if type(weight.data) is not torch.Tensor or not weight.is_floating_point():
        kind = f"{type(weight.data).__name__} of {weight.dtype}"
        return (f"it is a {type(module).__name__} whose weight is a {kind}, not a plain floating-point tensor: a "
                "quantized layer minilora does not support (it adapts bitsandbytes' Linear4bit and Linear8bitLt)")
    return None


def _quantized_class(module: nn.Module) -> type[LoraLayer] | None:
    # A model with bitsandbytes layers has imported bitsandbytes; never import it just to look.
    if "bitsandbytes" not in sys.modules:
        return None
    from minilora.quantized import quantized_layer_class
    return quantized_layer_class(module)


def lora_layer_class(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class for a base module, or None when its type is not supported."""
    quantized = _quantized_class(module)
    if quantized is not None:
        return quantized
    if unsupported_reason(module) is not None:
        return None
    # A model holding a Conv1D has imported transformers already; never import it just to look.
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", ())
    for types, cls in ((nn.Linear, LoraLinear), (nn.Embedding, LoraEmbedding),
                       (nn.MultiheadAttention, LoraMultiheadAttention), ((nn.Conv1d, nn.Conv2d, nn.Conv3d), LoraConv),
                       (conv1d, LoraConv1D)):
        if isinstance(module, types):
            return cls
    return None
