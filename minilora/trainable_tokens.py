"""Trainable tokens: new values for chosen rows of an embedding (and of a head tied to it).

``LoraConfig(trainable_token_indices=[...])`` trains k rows of a (num, dim) embedding: the
trainable state is one (k, dim) tensor per adapter, never a tensor of the embedding's size (nor a
gradient of that size). A module that shares the embedding's weight Parameter (a tied
``lm_head``) follows the same rows, so the pair stays tied.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora.ops import merge_dtype
from minilora.tree import AdapterHost, give_back_parameters, merged_while_disabled, take_parameters, walk

__all__ = ["TokenRows", "TrainableTokens", "TokenEmbedding", "TokenHead", "token_hosts", "token_host_class"]


class TokenRows(nn.Module):
    """One adapter's rows: ``delta`` (k, dim), the rows' trained values (not a difference: peft's
    name), in ``ops.merge_dtype`` of the weight; ``indices`` (k,) int64, the row numbers.

    ``delta`` starts as the current rows, so a new adapter changes nothing.
    """

    def __init__(self, weight: torch.Tensor, indices: Sequence[int]) -> None:
        super().__init__()
        self.index_list = tuple(int(i) for i in indices)  # the same, for checks without a device sync
        idx = torch.tensor(self.index_list, dtype=torch.long, device=weight.device)
        # fp32 rows over a bf16/fp16 weight, as LoRA factors (and peft's autocast of adapters).
        self.delta = nn.Parameter(weight.detach()[idx].to(merge_dtype(weight.dtype)))
        self.register_buffer("indices", idx, persistent=False)
        # Sorted row numbers and their position in ``delta``, for the lookup of ids in forward.
        order = torch.argsort(idx)
        self.register_buffer("sorted_indices", idx[order], persistent=False)
        self.register_buffer("order", order, persistent=False)
        # The rows a merge overwrote, (k, dim) in the weight dtype; None while not merged.
        self.kept: torch.Tensor | None = None

    def slots(self, ids: torch.Tensor) -> torch.Tensor:
        """For token ids (...), their row in ``delta``, or k where the id is not one of ours."""
        k = self.indices.numel()
        ids = ids.long()
        pos = torch.searchsorted(self.sorted_indices, ids).clamp_(max=k - 1)
        hit = self.sorted_indices[pos] == ids
        return torch.where(hit, self.order[pos], k)

    def extra_repr(self) -> str:
        return f"rows={self.indices.numel()}, dim={self.delta.shape[1]}"


class TrainableTokens(AdapterHost):
    """Base class: hosts per-adapter :class:`TokenRows` over one module, keeps the module's
    ``weight`` (and ``bias``) under their own names, merges rows into the weight.

    A host that ``follows`` another (a head tied to the embedding) holds the same ``TokenRows``
    objects outside its state dict and never writes the shared weight itself.
    """

    def __init__(self, base: nn.Module, follows: TrainableTokens | None = None) -> None:
        super().__init__()
        take_parameters(self, base)
        # (after the parameters: __getattr__ reads missing names from base_layer)
        object.__setattr__(self, "base_layer", base)  # kept out of the module tree, as in LoraLayer
        object.__setattr__(self, "follows", follows)
        if follows is None:
            self.tokens = nn.ModuleDict()
        else:  # the owner's rows, not registered here: one state-dict key, one parameter
            object.__setattr__(self, "tokens", nn.ModuleDict())
        self.merged: list[str] = []
        self.train(base.training)

    def add_rows(self, name: str, indices: Sequence[int] | None = None) -> TokenRows:
        """Give adapter ``name`` rows ``indices`` (an owner) or the owner's rows (a follower)."""
        rows = self.follows.tokens[name] if self.follows is not None else TokenRows(self.weight, indices)
        self.tokens[name] = rows
        return rows

    def adapter_modules(self) -> nn.ModuleDict:
        return self.tokens

    def __getattr__(self, name: str) -> Any:
        # Code written for the plain module reads its hyper-parameters (num_embeddings, padding_idx,
        # in_features, ...) through the host.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "base_layer" not in self.__dict__:  # (during __init__)
                raise
            return getattr(self.__dict__["base_layer"], name)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.disabled:
            if self.merged:
                raise merged_while_disabled(self.merged)
            return out
        if self.row_adapters is not None:
            return self._forward_rows(x, out)
        for name in self.active:
            if name not in self.merged:
                out = self.with_rows(self.tokens[name], x, out)
        return out

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Mixed batch: the rows of batch entry i are those of adapter ``row_adapters[i]``."""
        names = self.row_adapters
        if x.dim() == 0 or x.shape[0] != len(names):
            raise ValueError(f"per-row adapters: this layer got an input of shape {tuple(x.shape)}, but "
                             f"{len(names)} row adapters were given; dim 0 must be the batch")
        for name in names.distinct():
            if name in self.tokens:
                index = names.index(names.rows_of(name), x.device)
                part = self.with_rows(self.tokens[name], x.index_select(0, index), out.index_select(0, index))
                out = out.index_copy(0, index, part)
        return out

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def with_rows(self, rows: TokenRows, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the base output for input ``x``) as it is with ``rows`` in the weight."""
        raise NotImplementedError

    # ------------------------------------------------------------ merge
    def merge_problem(self, names: list[str], keep_original: bool = False) -> str | None:
        """Why ``names`` cannot be merged here, or None: rows claimed by two adapters (as peft)."""
        seen: dict[int, str] = {}
        for name in [*self.merged, *names]:
            for i in self.tokens[name].index_list:
                if seen.setdefault(i, name) != name:
                    return (f"adapters {seen[i]!r} and {name!r} both train token row {i}; merging both has no "
                            "defined result (as in peft): merge one of them")
        return None

    def merged_weights(self, names: list[str]) -> tuple[torch.Tensor, None]:
        """The weight with the rows of ``names`` written in (rounded to its dtype), and no bias."""
        weight = self.weight.detach()
        for name in names:
            rows = self.tokens[name]
            weight = weight.index_copy(0, rows.indices, rows.delta.detach().to(weight.dtype))
        return weight, None

    def merged_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``merged_weights`` by tensor name, as every merging host gives it (merge's safe check)."""
        return {"weight": self.merged_weights(names)[0]}

    def merge(self, names: list[str], keep_original: bool = False) -> None:
        """Write the rows of ``names`` into the weight, keeping the rows they replace: unmerge is
        always exact (``keep_original`` changes nothing here). A follower writes nothing."""
        names = [n for n in names if n not in self.merged]
        problem = self.merge_problem(names)
        if problem:
            raise ValueError(f"cannot merge: {problem}")
        for name in names:
            rows = self.tokens[name]
            if self.follows is None:
                with torch.no_grad():
                    rows.kept = self.weight[rows.indices].clone()
                    self.weight.index_copy_(0, rows.indices, rows.delta.to(self.weight.dtype))
            self.merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """Put the kept rows back, last merged first."""
        names = list(self.merged) if names is None else [n for n in self.merged if n in names]
        for name in reversed(names):
            rows = self.tokens[name]
            if self.follows is None:
                with torch.no_grad():
                    self.weight.index_copy_(0, rows.indices, rows.kept.to(self.weight.device))
                rows.kept = None
            self.merged.remove(name)

    def unmerged_weight(self) -> torch.Tensor:
        """The weight without merged rows (the kept ones put back, last merged first), detached."""
        weight = self.weight.detach()
        if not self.merged:
            return weight
        weight = weight.clone()
        for name in reversed(self.merged):
            rows = self.tokens[name]
            weight.index_copy_(0, rows.indices, rows.kept.to(weight.device))
        return weight

    # ------------------------------------------------------------ unload
    def unwrap(self) -> nn.Module:
        """The plain base module, holding this host's current weight and bias."""
        return give_back_parameters(self)

    def extra_repr(self) -> str:
        follows = ", tied" if self.follows is not None else ""
        return f"{type(self.base_layer).__name__}, active={list(self.active)}, merged={self.merged}{follows}"


class TokenEmbedding(TrainableTokens):
    """Trainable rows of an ``nn.Embedding``: ids (...) -> (..., dim)."""

    def _embed(self, ids: torch.Tensor, table: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, padding_idx, None, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def base_forward(self, x):
        return self._embed(x, self.weight, self.base_layer.padding_idx)

    def with_rows(self, rows, x, out):
        slots = rows.slots(x)  # (...): row of delta, or k
        k, pad = rows.indices.numel(), self.base_layer.padding_idx
        # One extra row k for ids that are not ours (masked out below). The padding id, when it is
        # one of ours, reads a detached copy there: like the base's padding row it gets no gradient.
        extra = rows.delta.new_zeros(1, rows.delta.shape[1])
        if pad is not None and pad in rows.index_list:
            mine = rows.index_list.index(pad)
            extra = rows.delta[mine].detach()[None]
            hit = (slots < k) | (x == pad)
            slots = torch.where(x == pad, k, slots)
        else:
            hit = slots < k
        table = torch.cat([rows.delta, extra]).to(self.weight.dtype)  # (k + 1, dim), rows rounded as merged
        return torch.where(hit.unsqueeze(-1), self._embed(slots, table, None), out)


class TokenHead(TrainableTokens):
    """Trainable rows of an ``nn.Linear`` (an output head): x (..., in) -> (..., out); the chosen
    rows of the weight are output columns, computed from ``delta`` alone."""

    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def with_rows(self, rows, x, out):
        bias = None if self.bias is None else self.bias[rows.indices]
        cols = F.linear(x, rows.delta.to(self.weight.dtype), bias)  # (..., k)
        return out.index_copy(-1, rows.indices, cols.to(out.dtype))


def token_host_class(module: nn.Module) -> type[TrainableTokens] | None:
    """The host class for a module whose rows can be trained, or None."""
    if isinstance(module, nn.Embedding):
        return TokenEmbedding
    if isinstance(module, nn.Linear) and type(module.weight.data) is torch.Tensor:  # not a quantized Linear
        return TokenHead
    return None


def token_hosts(model: nn.Module) -> Iterator[tuple[str, TrainableTokens]]:
    """(name, host) for every trainable-tokens host in the model."""
    return ((n, m) for n, m in walk(model) if isinstance(m, TrainableTokens))
