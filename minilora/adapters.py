"""Several adapters on one model: switch, delete, combine, and one adapter per batch row.

    set_adapter(model, "b")                    # b alone
    set_adapter(model, ["a", "b"])             # a's and b's deltas add up
    add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], "ab", combination_type="cat")
    with per_sample_adapters(model, ["a", "__base__", "b"]):
        logits = model(input_ids)              # row 0 with a, row 1 without adapter, row 2 with b
    delete_adapter(model, "ab")
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from minilora.config import LoraConfig
from minilora.inject import BASE_ADAPTER, adapter_name_problem, lora_layers, require_state, unload, update_trainable
from minilora.layers import LoraConv, LoraLayer
from minilora.merge import mergeable
from minilora.modules_to_save import ModulesToSave
from minilora.rows import RowAdapters
from minilora.trainable_tokens import token_hosts
from minilora.tree import hosts, set_active, swap, walk

__all__ = ["set_adapter", "delete_adapter", "add_weighted_adapter", "per_sample_adapters", "COMBINATIONS"]


def _merged_layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    return [(name, list(layer.merged)) for name, layer in mergeable(model) if layer.merged]


def _apply_active(model: nn.Module, active: tuple[str, ...]) -> None:
    set_active(model, active)
    update_trainable(model)


# ---------------------------------------------------------------- switching and deleting
def set_adapter(model: nn.Module, name_or_names: str | Sequence[str]) -> nn.Module:
    """Make ``name_or_names`` the active adapter(s); several add their deltas.

    The active adapters' parameters become trainable (unless an active config has
    ``inference_mode``), all others frozen. modules_to_save wrappers run the copy of the active
    adapter that has one.

    Raises:
        ValueError: an unknown or empty name list; two active adapters with their own copy of the
            same modules_to_save module, or token rows of the same module (only one can run, as
            in peft); merged adapters
            (their deltas sit in the weights whichever adapter is active: unmerge first).
    """
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    state = require_state(model, "set_adapter", names)
    if not names:
        raise ValueError("set_adapter: give at least one adapter name (to run the base model, use "
                         "minilora.disable_adapters(model))")
    merged = _merged_layers(model)
    if merged:
        raise ValueError(f"set_adapter: adapters {merged[0][1]} are merged into {merged[0][0]!r}; "
                         "call minilora.unmerge(model) before switching adapters")
    _copy_owners(model, names, "set_adapter", "only one copy can run; activate one of them")
    for layer_name, host in token_hosts(model):
        owners = [a for a in names if a in host.tokens]
        if len(owners) > 1:
            raise ValueError(f"set_adapter: adapters {owners} each train token rows of {layer_name!r} "
                             "(trainable_token_indices); only one of them can be active there (as in peft)")
    state.active = tuple(dict.fromkeys(names))
    _apply_active(model, state.active)
    return model


def _copy_owners(model: nn.Module, names, caller: str, why: str) -> list[tuple[ModulesToSave, str]]:
    """(wrapper, adapter) for each modules_to_save wrapper that one of ``names`` has a copy in;
    raises when two of them have a copy of the same module."""
    found = []
    for name, wrapper in walk(model):
        if isinstance(wrapper, ModulesToSave):
            owners = [a for a in names if a in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ValueError(f"{caller}: adapters {owners} each have their own copy of {name!r} "
                                 f"(modules_to_save), {why}")
            if owners:
                found.append((wrapper, owners[0]))
    return found


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove an adapter: its factors, its modules_to_save copies and its config.

    A LoRA layer (or modules_to_save wrapper) left with no adapter is replaced by the plain base
    module, so deleting every adapter gives back the model's original module tree and state-dict
    keys. If the deleted adapter was active, the other active ones stay; if none is left, the first
    remaining adapter becomes active.

    Raises:
        ValueError: unknown adapter, or the adapter is merged into the weights (unmerge first).
    """
    state = require_state(model, "delete_adapter", [name])
    merged = [layer_name for layer_name, names in _merged_layers(model) if name in names]
    if merged:
        raise ValueError(f"delete_adapter: adapter {name!r} is merged into {merged[0]!r} (and {len(merged) - 1} "
                         f"other layers); call minilora.unmerge(model, {name!r}) first")
    swaps: dict[int, nn.Module] = {}
    for _, host in list(hosts(model)):
        if name in host.adapter_modules():
            host.delete_adapter(name)
            if not host.adapter_modules():
                swaps[id(host)] = host.unwrap()
    swap(model, swaps)
    del state.configs[name]
    if not state.configs:
        unload(model)  # nothing left to put back; drops the minilora state (and its hooks)
        update_trainable(model)
        return model
    active = tuple(n for n in state.active if n != name) or (next(iter(state.configs)),)
    state.active = active
    _apply_active(model, active)
    return model


# ---------------------------------------------------------------- combining
def _combine_cat(sources, weights, rank):
    # Exact: B' A' = sum_i B_i (w_i s_i A_i); ranks concatenate, zero rows/cols pad to `rank`.
    B = torch.cat([b for b, _, _ in sources], dim=1)
    A = torch.cat([w * s * a for (_, a, s), w in zip(sources, weights)], dim=0)
    return B, A


def _combine_linear(sources, weights, rank):
    # peft's "linear": sqrt(|w s|) on each factor, the sign on A. Not the weighted sum of deltas
    # (cross terms B_i A_j appear); same ranks required.
    ranks = {a.shape[0] for _, a, _ in sources}
    if len(ranks) > 1:
        raise ValueError(f"combination_type='linear' needs equal ranks in every layer, got ranks {sorted(ranks)}; "
                         "use 'cat' or 'svd'")
    roots = [math.sqrt(abs(w * s)) for (_, _, s), w in zip(sources, weights)]
    signs = [1.0 if w * s >= 0 else -1.0 for (_, _, s), w in zip(sources, weights)]
    B = sum(root * b for root, (b, _, _) in zip(roots, sources))
    A = sum(sign * root * a for sign, root, (_, a, _) in zip(signs, roots, sources))
    return B, A


def _combine_svd(sources, weights, rank, clamp=None):
    # Truncated SVD of the weighted delta sum_i w_i s_i B_i A_i: the best rank-`rank` approximation.
    delta = sum(w * s * (b @ a) for (b, a, s), w in zip(sources, weights))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    B, A = U[:, :rank] * S[:rank], Vh[:rank]
    if clamp is not None:
        limit = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-limit, limit), A.clamp(-limit, limit)
    return B, A


#: combination_type -> how the new factors are built (see each function).
COMBINATIONS = {"cat": _combine_cat, "linear": _combine_linear, "svd": _combine_svd}


def _new_rank(configs: list[LoraConfig], combination_type: str, svd_rank: int | None) -> int:
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) > 1:
            raise ValueError(f"combination_type='linear' needs adapters of one rank, got {ranks}; use 'cat' or 'svd'")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank={svd_rank!r} is invalid: a positive integer, or None for the largest source rank")
    return svd_rank or max(ranks)


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None) -> nn.Module:
    """Add ``adapter_name`` = the weighted combination of existing adapters (inactive, as peft).

    On every layer that carries any of ``adapters`` (a source absent from a layer contributes
    nothing there), with s_i each source's scaling:

    - ``"cat"``: B' = [B_1 ... B_n], A' = [w_1 s_1 A_1; ...]: exactly Σ w_i s_i B_i A_i; rank = Σ r_i.
    - ``"linear"``: B' = Σ sqrt|w_i s_i| B_i, A' = Σ sign(w_i s_i) sqrt|w_i s_i| A_i (peft's
      formula; an approximation with cross terms); ranks must be equal.
    - ``"svd"``: the rank-``svd_rank`` truncated SVD of Σ w_i s_i B_i A_i (default: the largest
      source rank); ``svd_clamp`` clamps the factors at that quantile, as peft.

    With one source adapter, peft always uses "linear"; so does this. The new adapter has
    r = lora_alpha = its rank (scaling 1, also with rsLoRA), factors zero-padded to that rank,
    and targets exactly the layers it was built on. A lora_bias combines exactly
    (Σ w_i s_i b_i). Each modules_to_save module gets a copy of the one source adapter that
    trained it.

    Raises:
        ValueError: unknown adapters, an existing or invalid ``adapter_name`` (as inject: empty,
            with a dot, or ``"__base__"``), weights not matching the adapters or not finite, an
            unknown combination_type, unequal ranks for "linear", two sources with their own copy
            of the same modules_to_save module (as peft), trainable token rows, a grouped conv (its B cannot hold
            concatenated ranks), mixed list/regex targets, DoRA adapters (no defined combined
            magnitude).
    """
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    state = require_state(model, "add_weighted_adapter", adapters)
    weights = [weights] if isinstance(weights, (int, float)) else list(weights)
    configs = [state.configs[a] for a in adapters]
    _check_request(model, configs, adapters, weights, adapter_name, combination_type)
    combination_type = "linear" if len(adapters) == 1 else combination_type
    rank = _new_rank(configs, combination_type, svd_rank)

    # Plan: read everything, raise before changing anything.
    layers = [(name, layer) for name, layer in lora_layers(model) if any(a in layer.adapters for a in adapters)]
    for name, layer in layers:
        if isinstance(layer, LoraConv) and layer.base_layer.groups > 1:
            raise ValueError(f"add_weighted_adapter: {name!r} is a grouped conv (groups={layer.base_layer.groups}); "
                             "its B factor cannot hold a combined rank")
    wrappers = _copy_owners(model, adapters, "add_weighted_adapter", "which cannot be combined (as in peft)")
    extra = {"clamp": svd_clamp} if combination_type == "svd" else {}
    with torch.no_grad():
        results = [(layer, *_combine_layer(layer, adapters, weights, COMBINATIONS[combination_type], rank, extra))
                   for _, layer in layers]

    # Apply.
    inner = {id(h) for _, layer in layers for h in layer.inner_hosts().values()}  # come with their outer layer
    config = _combined_config(configs, rank, [name for name, layer in layers if id(layer) not in inner],
                              lora_bias=any(bias is not None for *_, bias in results))
    for layer, B, A, bias in results:
        _add_combined(layer, adapter_name, config, B, A, bias)
    memo: dict[int, object] = {}  # one memo: tied copies (embed_tokens / lm_head) stay tied
    for wrapper, owner in wrappers:
        wrapper.modules_to_save[adapter_name] = copy.deepcopy(wrapper.modules_to_save[owner], memo)
    state.configs[adapter_name] = config
    _apply_active(model, state.active)
    return model


def _check_request(model: nn.Module, configs: list[LoraConfig], adapters: list[str], weights: list, adapter_name: str,
                   combination_type: str) -> None:
    """add_weighted_adapter's arguments and source configs, checked before any layer is read."""
    if not adapters:
        raise ValueError("add_weighted_adapter: give at least one source adapter")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"add_weighted_adapter: adapters {adapters} name one adapter twice")
    if len(weights) != len(adapters) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                and math.isfinite(w) for w in weights):
        raise ValueError(f"add_weighted_adapter: weights={weights} must be one finite number per adapter "
                         f"({len(adapters)} adapters)")
    problem = adapter_name_problem(model, adapter_name)
    if problem:
        raise ValueError(f"add_weighted_adapter: {problem}")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"add_weighted_adapter: combination_type={combination_type!r} is not supported; "
                         f"choose one of {sorted(COMBINATIONS)}")
    if len({isinstance(c.target_modules, str) for c in configs}) > 1:
        raise ValueError("add_weighted_adapter: the adapters mix list and regex target_modules "
                         "(as peft, not supported)")
    tokens = [a for a, c in zip(adapters, configs) if c.trainable_token_indices]
    if tokens:
        raise ValueError(f"add_weighted_adapter: {tokens} train token rows (trainable_token_indices), which have no "
                         "weighted combination (each row holds values, not a low-rank delta); combine adapters "
                         "without them")
    on_params = [a for a, c in zip(adapters, configs) if c.target_parameters]
    if on_params:
        raise ValueError(f"add_weighted_adapter: {on_params} adapt parameters (target_parameters), which cannot "
                         "be combined (as in peft); combine adapters on target_modules only, or merge these in turn")
    dora = [a for a, c in zip(adapters, configs) if c.use_dora]
    if dora:
        # A combination given fresh magnitudes would be unrelated to the sources' trained ones.
        raise ValueError(f"add_weighted_adapter: {dora} use DoRA; their magnitude vectors are normalised against "
                         "each adapter's own W + sBA, so a weighted combination has no defined magnitude. "
                         "Combine plain LoRA adapters, or merge the DoRA adapters in turn (minilora.merge)")


def _combine_layer(layer: LoraLayer, adapters: list[str], weights: list[float], combine, rank: int,
                   extra: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer's combined (B (out, rank'), A (rank', in...), lora_bias or None), in fp32 or wider.
    Conv factors are combined as matrices."""
    present = [(a, layer.adapters[a], w) for a, w in zip(adapters, weights) if a in layer.adapters]
    dtype = torch.promote_types(present[0][1].lora_B.dtype, torch.float32)
    # Each source at its own rank (without hot-swap padding), its scaling a number (also when held as a tensor).
    sources = [(layer.unpadded(a, "lora_B", ad.lora_B).flatten(1).to(dtype),
                layer.unpadded(a, "lora_A", ad.lora_A).flatten(1).to(dtype), float(ad.scaling)) for a, ad, _ in present]
    B, A = combine(sources, [w for _, _, w in present], rank, **extra)
    biases = [w * float(ad.scaling) * ad.lora_bias.to(dtype) for _, ad, w in present if ad.lora_bias is not None]
    return B, A, sum(biases) if biases else None


def _combined_config(configs: list[LoraConfig], rank: int, targets: list[str], lora_bias: bool) -> LoraConfig:
    """The new adapter's config: the first source's, with scaling 1 at ``rank`` on exactly ``targets``."""
    saves = sorted({m for c in configs for m in (c.modules_to_save or [])})
    return configs[0].replace(r=rank, lora_alpha=rank, target_modules=targets, exclude_modules=None,
                              layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={},
                              use_rslora=False, bias="none", lora_bias=lora_bias, modules_to_save=saves or None)


def _add_combined(layer: LoraLayer, name: str, config: LoraConfig, B: torch.Tensor, A: torch.Tensor,
                  bias: torch.Tensor | None) -> None:
    """Add adapter ``name`` holding B, A (zero-padded to the config's rank) and the bias."""
    adapter = layer.add_adapter(name, r=config.r, alpha=config.r, scaling=1.0, dropout=config.lora_dropout,
                                lora_bias=bias is not None, init=False)
    with torch.no_grad():
        adapter.lora_A.zero_()
        adapter.lora_B.zero_()
        adapter.lora_A.flatten(1)[: A.shape[0]].copy_(A)
        adapter.lora_B.flatten(1)[:, : B.shape[1]].copy_(B)
        if bias is not None:
            adapter.lora_bias.copy_(bias)


# ---------------------------------------------------------------- one adapter per row
@contextlib.contextmanager
def per_sample_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block, batch row i runs with adapter ``names[i]`` (``"__base__"``: none).

    Every row gets what that adapter alone would give (mixed-batch serving), DoRA adapters
    included. modules_to_save modules run each adapter's copy on its rows and the original
    module on the others (also for an adapter without a copy). The model's state comes back on
    exit, also when the block raises.

    Raises:
        ValueError: unknown names; merged adapters (their deltas would reach every row); the
            model in training mode (dropout and gradients per row are not supported); on a
            forward call, a batch whose size is not ``len(names)``.
    """
    names = [names] if isinstance(names, str) else list(names)
    require_state(model, "per_sample_adapters", [n for n in names if n != BASE_ADAPTER])
    if not names:
        raise ValueError("per_sample_adapters: give one adapter name per batch row")
    merged = _merged_layers(model)
    if merged:
        raise ValueError(f"per_sample_adapters: adapters {merged[0][1]} are merged into {merged[0][0]!r}, so "
                         "they would apply to every row; call minilora.unmerge(model) first")
    if model.training:
        raise ValueError("per_sample_adapters runs inference only; call model.eval() first")

    def check_batch(module, args, kwargs):
        if module.training:
            raise ValueError("per_sample_adapters runs inference only; the model was put in training mode inside "
                             "the block: call model.eval()")
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if first is not None and (first.dim() == 0 or first.shape[0] != len(names)):
            found = "a scalar" if first.dim() == 0 else f"a batch of {first.shape[0]} rows"
            k = first.shape[0] // len(names) if first.dim() and first.shape[0] % len(names) == 0 else 0
            hint = (f" (if this is generate with num_beams or num_return_sequences = {k}, which repeats each row "
                    f"{k} times in place, give each name {k} times: [n for n in names for _ in range({k})])"
                    if k > 1 else "")
            raise ValueError(f"per_sample_adapters got {len(names)} adapter names but the model input is {found}; "
                             f"give exactly one name per row{hint}")

    modules = [host for _, host in hosts(model)]
    before = [m.row_adapters for m in modules]
    handle = model.register_forward_pre_hook(check_batch, with_kwargs=True)
    try:
        rows = RowAdapters(names)  # one set of index tensors for all layers
        for m in modules:
            m.row_adapters = rows
        yield model
    finally:
        handle.remove()
        for m, previous in zip(modules, before):
            m.row_adapters = previous
