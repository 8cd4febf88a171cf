"""The LoRA math, once, and the one place that picks how to run it.

``lora_linear_reference`` is the definition every other path is checked against::

    y = x W0ᵀ + bias + s · (dropout(x) Aᵀ) Bᵀ

    x: (..., K)   W0: (N, K)   bias: (N,) or None   A: (r, K)   B: (N, r)   s = scaling

s is a number, or a 0-dim tensor once ``minilora.prepare_for_hotswap`` holds it as a buffer (so that
torch.compile reads it as an input, not a constant); every function here takes either.

Adapters may be wider than the base (fp32 over bf16): the branch runs in the adapter dtype and
the sum is cast back to the base dtype once. ``lora_linear`` runs the fused Triton kernels
(``minilora.kernels``: the branch in the base dtype, fp32 accumulation; docs/kernels.md gives the
bounds) where ``backend_for`` allows them, else the reference. ``MINILORA_BACKEND=torch|triton``
(read once, at import), ``set_backend(...)`` or ``backend=`` per call forces a path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from minilora import kernels

if TYPE_CHECKING:
    from minilora.rows import RowSlots

__all__ = ["lora_linear", "lora_linear_reference", "lora_branch", "backend_for", "set_backend", "merge_dtype",
           "lora_delta", "param_delta", "param_weight", "expert_factors", "grouped_merge_problem", "row_blocks",
           "dora_norm", "dora_dot_chunk", "dora_merge_norm", "dora_linear", "StackedLora", "stack_lora",
           "multi_lora_reference", "multi_lora_add", "backend_for_rows"]

_BACKENDS = ("auto", "torch", "triton")
# Read once: torch.compile bakes an os.environ lookup into the graph without a guard, so a later
# change would reach eager calls but not compiled ones. A module global is guarded: after
# set_backend, a compiled model recompiles on its next call.
_backend = os.environ.get("MINILORA_BACKEND", "auto")


def set_backend(name: str) -> None:
    """Force the path of every later ``lora_linear`` call: "auto", "torch" or "triton"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def lora_branch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor,
                dropout_p: float = 0.0, training: bool = False,
                lora_bias: torch.Tensor | None = None) -> torch.Tensor:
    """s · (B(A(dropout(x))) + lora_bias) in the adapter dtype.

    Args:
        x: (..., K) input, any float dtype; cast to A's dtype first.
        A: (r, K). B: (N, r). lora_bias: (N,) or None (peft's ``lora_bias=True``).
    Returns:
        (..., N) in A's dtype.
    """
    x = x.to(A.dtype)
    if dropout_p > 0.0 and training:
        x = F.dropout(x, p=dropout_p, training=True)
    return F.linear(F.linear(x, A), B, lora_bias) * scaling


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor,
                          dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """The pure-PyTorch LoRA linear: (..., K) -> (..., N) in the base dtype."""
    result = F.linear(x, weight, bias)
    # Adding the (possibly fp32) branch promotes; the single cast back is the one rounding point.
    return (result + lora_branch(x, A, B, scaling, dropout_p, training)).to(result.dtype)


def _choose(backend: str | None, usable: Callable[[], bool], what: str, needs: str) -> str:
    """"torch" or "triton": ``backend`` or the global switch, "triton" only where ``usable()``.
    Forcing "triton" where it is not usable raises, naming what the kernels need."""
    choice = backend or _backend
    if choice not in _BACKENDS:
        raise ValueError(f"MINILORA_BACKEND / backend must be one of {_BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    ok = usable()
    if choice == "triton" and not ok:
        raise RuntimeError(f"backend 'triton' was forced{what} but cannot run here: it needs {needs}, and an "
                           "importable triton (pip install minilora[triton])")
    return "triton" if ok else "torch"


def backend_for(x: torch.Tensor, weight: torch.Tensor, backend: str | None = None,
                rank: int = 1) -> str:
    """Which path ``lora_linear`` takes for these tensors: "torch" or "triton"."""
    # The kernels compute in the base dtype and treat the base weight as frozen. The custom op has
    # no autocast rule: under autocast to another dtype they would silently compute in the model's.
    device = x.device.type
    return _choose(backend, lambda: (
        x.is_cuda and weight.dtype in kernels.COMPUTE_DTYPES and x.dtype == weight.dtype and not weight.requires_grad
        and rank <= kernels.MAX_RANK
        and not (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != weight.dtype)
        and kernels.available()),  # finds triton without importing it
        "", "x on a CUDA device, x and a frozen (requires_grad=False) weight of one dtype among "
        f"fp16/bf16/fp32 (and, inside autocast, the autocast dtype), a rank of at most {kernels.MAX_RANK}")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor,
                dropout_p: float = 0.0, training: bool = False,
                backend: str | None = None) -> torch.Tensor:
    """LoRA linear through the fastest available path; same contract as the reference. A scaling
    held as a tensor (``prepare_for_hotswap``) takes the PyTorch path: the kernels take s as a
    number, and reading one from a tensor would be a host sync and, compiled, a graph break."""
    if isinstance(scaling, torch.Tensor):
        if (backend or _backend) == "triton":
            raise RuntimeError("backend 'triton' was forced but this adapter's scaling is held as a tensor "
                               "(prepare_for_hotswap), which the kernels do not take; use backend 'auto' or 'torch'")
        return _lora_linear_torch(x, weight, bias, A, B, scaling, dropout_p, training)
    if backend_for(x, weight, backend, rank=A.shape[0]) == "triton":
        return kernels.fused_lora_linear(x, weight, bias, A, B, scaling, dropout_p, training)
    return _lora_linear_torch(x, weight, bias, A, B, scaling, dropout_p, training)


def _lora_linear_torch(x, weight, bias, A, B, scaling, dropout_p, training):
    """The reference, except when everything shares one dtype: then one in-place ``addmm_`` (scale
    as alpha) adds the branch, without (M, N) temporaries; differs only by GEMM-order rounding."""
    # Under autocast F.linear runs in bf16/fp16 while addmm_ would not: use the reference there.
    if not (x.dtype == weight.dtype == A.dtype == B.dtype) or torch.is_autocast_enabled(x.device.type):
        return lora_linear_reference(x, weight, bias, A, B, scaling, dropout_p, training)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])  # 2-D, so the in-place add is not on a view (no CopySlices)
    out = F.linear(x, weight, bias)  # (M, N)
    if dropout_p > 0.0 and training:
        x = F.dropout(x, p=dropout_p, training=True)
    if isinstance(scaling, torch.Tensor):  # alpha= takes a number: scale the (M, r) product instead
        out.addmm_(F.linear(x, A) * scaling, B.t())  # += (s · x Aᵀ) Bᵀ
    else:
        out.addmm_(F.linear(x, A), B.t(), alpha=scaling)  # += s · (x Aᵀ) Bᵀ
    return out.view(*lead, out.shape[-1])


# ---------------------------------------------------------------- many adapters in one batch
@dataclass(frozen=True)
class StackedLora:
    """The plain LoRA adapters of one layer, stacked for mixed batches (``per_sample_adapters``).

    names: the adapters, in slot order. A: (n, r_max, K). B: (n, N, r_max). scaling: (n,). Ranks
    below r_max are zero-padded: the padded terms add exact zeros. All in the adapters' dtype,
    detached (the stacked path runs without gradients to the factors).
    """

    names: tuple[str, ...]
    A: torch.Tensor
    B: torch.Tensor
    scaling: torch.Tensor


@torch.no_grad()
def stack_lora(names: Sequence[str], factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> StackedLora:
    """Stack (A (r_i, K), B (N, r_i), s_i) of one dtype and device into a ``StackedLora``."""
    A0, B0, _ = factors[0]
    r_max = max(A.shape[0] for A, _, _ in factors)
    A = A0.new_zeros(len(factors), r_max, A0.shape[1])
    B = B0.new_zeros(len(factors), B0.shape[0], r_max)
    for i, (a, b, _) in enumerate(factors):
        A[i, : a.shape[0]] = a
        B[i, :, : b.shape[1]] = b
    # A scaling held as a tensor (prepare_for_hotswap) stays on its device: float() would wait for it.
    scaling = torch.stack([s.to(A0.device, A0.dtype) if isinstance(s, torch.Tensor)
                           else torch.tensor(s, dtype=torch.float64).to(A0.device, A0.dtype) for _, _, s in factors])
    return StackedLora(tuple(names), A, B, scaling)


def _multi_shrink(x: torch.Tensor, stack: StackedLora, where: RowSlots) -> torch.Tensor:
    """S = s_j · x_i A_jᵀ for the rows with a slot, one batched product over chunks of rows sharing
    a slot (``RowSlots``: no factor copied per row). (chunks, chunk·T, r_max), chunk layout."""
    K = x.shape[-1]
    x = x.to(stack.A.dtype)
    if where.chunk_rows is not None:
        x = x.index_select(0, where.chunk_rows)
    A, s = stack.A, stack.scaling
    if where.chunk_slots is not None:
        A, s = A.index_select(0, where.chunk_slots), s.index_select(0, where.chunk_slots)
    return torch.bmm(x.view(A.shape[0], -1, K), A.transpose(1, 2)).mul_(s[:, None, None])


def _in_row_order(t: torch.Tensor, T: int, where: RowSlots) -> torch.Tensor:
    """A chunk-layout (chunks, chunk·T, d) result as (R', T, d) in row order."""
    t = t.view(-1, T, t.shape[-1])
    return t if where.pos is None else t.index_select(0, where.pos)


def _expand_per_row(T: int, r: int) -> bool:
    """Whether the expand gathers B per row (R'·N·r elements) rather than gathering its grouped
    result back into row order (about 2·R'·T·N): per row from T >= r/2 on (prefill, not decode)."""
    return 2 * T >= r


def multi_lora_reference(x: torch.Tensor, stack: StackedLora, where: RowSlots) -> torch.Tensor:
    """Every row's LoRA branch with its own adapter, in the adapters' dtype: for row i with slot
    j, s_j · (x_i A_jᵀ) B_jᵀ, as two batched products (the FLOPs of one product per slot).

    Args:
        x: (R, T, K) (rows, tokens per row, features). where: the rows' slots in ``stack``.
    Returns:
        (R', T, N) for the rows with a slot (``where.rows``), in row order. Each sums over the same
        K and r_max terms as ``lora_branch`` (the padding adds zeros), in another order: within
        the same fp rounding bounds.
    """
    T = x.shape[1]
    S = _multi_shrink(x, stack, where)
    if _expand_per_row(T, stack.A.shape[1]):
        return torch.bmm(_in_row_order(S, T, where), stack.B.index_select(0, where.row_slots).transpose(1, 2))
    B = stack.B if where.chunk_slots is None else stack.B.index_select(0, where.chunk_slots)
    return _in_row_order(torch.bmm(S, B.transpose(1, 2)), T, where)


def backend_for_rows(x: torch.Tensor, y: torch.Tensor, stack: StackedLora, backend: str | None = None) -> str:
    """Which path ``multi_lora_add`` takes: "torch" or "triton" (same switches as ``backend_for``)."""
    # The kernels write into y in place and have no backward: inference only.
    return _choose(backend, lambda: (
        x.is_cuda and x.dtype == y.dtype and x.dtype in kernels.COMPUTE_DTYPES
        and stack.A.shape[1] <= kernels.MAX_RANK and not torch.is_grad_enabled() and kernels.available()),
        " for a mixed batch", "x on a CUDA device, x and the base output of one dtype among fp16/bf16/fp32, "
        f"ranks of at most {kernels.MAX_RANK}, gradients off (torch.no_grad() or torch.inference_mode())")


def multi_lora_add(y: torch.Tensor, x: torch.Tensor, stack: StackedLora, where: RowSlots,
                   backend: str | None = None) -> torch.Tensor:
    """y plus every row's LoRA branch with its own adapter: the mixed-batch forward.

    Args:
        y: (R, ..., N) the base output, consumed: both paths add into it in place when they can
            (pass a tensor nothing else reads, as a layer's fresh base output).
        x: (R, ..., K) the layer input.
        where: each row's slot in ``stack`` (``RowAdapters.slots``); rows without one keep y.
    Returns:
        (R, ..., N) in y's dtype. The PyTorch path adds the branch (adapter dtype) to y and rounds
        once, as the per-adapter loop does; the Triton path (``minilora.kernels.multi_lora``)
        runs the branch in y's dtype with fp32 accumulation.
    """
    R, N = y.shape[0], y.shape[-1]
    x3 = x.reshape(R, -1, x.shape[-1])
    if backend_for_rows(x, y, stack, backend) == "triton":
        y = y.contiguous()  # the kernels add into a view of it
        kernels.multi_lora_add_(y.view(R, -1, N), x3, stack.A, stack.B, stack.scaling, where)
        return y
    T, r = x3.shape[1], stack.A.shape[1]
    if where.rows is None and y.dtype == stack.A.dtype and _expand_per_row(T, r):
        # The add fused into the expand, in place: y += S B_iᵀ, one pass over the output. y is the
        # layer's fresh base output (as for the kernels).
        S = _in_row_order(_multi_shrink(x3, stack, where), T, where)
        B = stack.B.index_select(0, where.row_slots)
        y = y.contiguous()
        y.view(R, T, N).baddbmm_(S, B.transpose(1, 2))
        return y
    delta = multi_lora_reference(x3, stack, where)
    out = y.reshape(R, -1, N).to(torch.promote_types(y.dtype, delta.dtype))
    out = out + delta if where.rows is None else out.index_add(0, where.rows, delta)
    return out.to(y.dtype).view(y.shape)


# ---------------------------------------------------------------- merging and DoRA
def merge_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a delta s·B·A is computed in before W + delta is rounded once to the weight's
    dtype: fp32 for bf16/fp16/fp32 weights, fp64 for fp64 ones (fp32 would throw away precision)."""
    return torch.promote_types(weight_dtype, torch.float32)


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor, dtype: torch.dtype, *,
               transposed: bool = False, rows: slice = slice(None)) -> torch.Tensor:
    """s·B@A in ``dtype``, in the weight's stored layout: the one formula of every merge (whole, or
    one ``row_blocks`` block at a time by the offline merge: the same bits, see row_blocks).

    Args:
        A: (r, in) for Linear / Conv1D / Embedding; (r, in, *kernel) for a ConvNd.
        B: (out, r); (out, r, 1, ...) for a ConvNd.
        transposed: the weight is stored (in, out) (Conv1D, fan_in_fan_out, Embedding).
        rows: which stored rows to compute (default all).
    Returns:
        (out, in), (out, in, *kernel), or (in, out) when ``transposed``, restricted to ``rows``;
        a transposed result is a column-major view.
    """
    A, B = A.to(dtype), B.to(dtype)
    if transposed:
        return (B @ A[:, rows]).mul_(scaling).T
    if A.dim() > 2:  # ConvNd: B (out, r, 1, ...) read as (out, r)
        return torch.einsum("or,r...->o...", B.flatten(1)[rows], A).mul_(scaling)
    return (B[rows] @ A).mul_(scaling)


def param_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype, shape: tuple[int, ...],
                *, transposed: bool = False, rows: slice = slice(None)) -> torch.Tensor:
    """The delta of a LoRA on a parameter (``target_parameters``) in ``dtype``, in the parameter's
    stored layout: the one formula of its merges, whole or one block of dim 0 at a time.

    A 2-D parameter (out, in) is a plain linear weight: ``lora_delta``. A 3-D stack of E experts
    gives each expert e its own rank-r pair, held in two matrices: expert e's A_e is rows
    e·r .. e·r+r-1 of A, and its B_e is the columns e, E+e, 2E+e, ... of B (B's columns run
    rank-major). Then delta[e] = s·B_e @ A_e, stored (out, in), or (in, out) when ``transposed``.
    Merging only (a loop over experts); the forward uses ``param_weight``.

    Args:
        A: (r, in) for 2-D; (E·r, in) for 3-D.
        B: (out, r) for 2-D; (out, E·r) for 3-D.
        shape: the parameter's shape: (out, in), (E, out, in), or (E, in, out) when ``transposed``.
        transposed: a 3-D stack stored (experts, in, out).
        rows: which slice of dim 0 (rows of a 2-D parameter, experts of a 3-D one); default all.
    Returns:
        ``shape`` restricted to ``rows`` along dim 0, contiguous.
    """
    if len(shape) == 2:
        return lora_delta(A, B, scaling, dtype, rows=rows)
    if len(shape) != 3:
        raise ValueError(f"LoRA on a parameter needs a 2-D or 3-D one, got shape {tuple(shape)}")
    # One expert at a time, each by ``lora_delta``: the offline merge computes an expert stored as
    # separate tensors in blocks of its rows with the same call, and a batched product over several
    # experts need not give the same bits as one expert's (measured: it does not, for some shapes).
    A3, B3 = expert_factors(A, B, shape[0])
    experts = range(shape[0])[rows]
    return torch.stack([lora_delta(A3[e], B3[e], scaling, dtype, transposed=transposed) for e in experts])


def expert_factors(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of each expert's factors: A (E·r, in) -> (E, r, in); B (out, E·r) -> (E, out, r)."""
    return A.unflatten(0, (experts, -1)), B.unflatten(1, (-1, experts)).permute(2, 0, 1)


def param_weight(weight: torch.Tensor, adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float]], *,
                 transposed: bool = False) -> torch.Tensor:
    """The adapted parameter W + Σ s·B_e @ A_e that a module's forward reads in place of W, with
    autograd to the factors: one ``addmm`` (2-D) or ``baddbmm`` over all experts (3-D) per adapter,
    no loop over experts. Computed in the wider of W's and the factors' dtypes (fp32 factors over a
    bf16 W: fp32) and rounded once to W's dtype; autocast off, as the module expects W's dtype.

    Args:
        weight: (out, in), or (E, out, in) / (E, in, out) when ``transposed``, as ``param_delta``.
        adapters: (A, B, scaling) per adapter, factors shaped as in ``param_delta``.
    Returns:
        ``weight``'s shape and dtype.
    """
    dtype = torch.promote_types(weight.dtype, adapters[0][0].dtype)
    with torch.autocast(weight.device.type, enabled=False):
        out = weight.to(dtype)
        for A, B, scaling in adapters:
            A, B = A.to(dtype), B.to(dtype)
            if weight.dim() == 2:
                out = torch.addmm(out, B, A, alpha=scaling)
                continue
            A3, B3 = expert_factors(A, B, weight.shape[0])
            if transposed:
                out = torch.baddbmm(out, A3.transpose(1, 2), B3.transpose(1, 2), alpha=scaling)
            else:
                out = torch.baddbmm(out, B3, A3, alpha=scaling)
        return out.to(weight.dtype)


def grouped_merge_problem(groups: int) -> str | None:
    """Why a LoRA on a conv with ``groups`` cannot be merged into its weight, or None."""
    if groups > 1:
        return (f"LoRA on a grouped conv (groups={groups}) cannot be merged: A mixes channels across groups, "
                "which a grouped weight cannot hold. Use it unmerged")
    return None


# Rows per block of a merge: about 1M elements (4 MiB as fp32), never fewer than 256 rows. The floor
# keeps each block's s·B@A on a GEMM kernel like the whole product's (a handful of rows goes down a
# GEMV path whose summation order differs), so the offline merge's bits equal merge_and_unload's
# wherever the BLAS sums a block as it sums the whole (not MKL limited to AVX2: there, within fp32
# rounding). DoRA's merged row norms are summed over these same blocks by both merges.
_BLOCK_ELEMENTS, _MIN_BLOCK_ROWS = 1 << 20, 256


def row_blocks(shape: tuple[int, ...]) -> list[slice]:
    """Consecutive slices of dim 0 covering a tensor of ``shape``, each about 1M elements."""
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:])
    step = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // max(per_row, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


def dora_merge_norm(blocks: Iterable[torch.Tensor], transposed: bool) -> torch.Tensor:
    """‖V_i‖ for every output i of a merged weight V = W + s·B·A given as its ``row_blocks``.

    Args:
        blocks: consecutive blocks of V's stored rows, in ``merge_dtype``. Stored (out, ...) for
            Linear and ConvNd; (in, out) when ``transposed`` (Conv1D, fan_in_fan_out, Embedding,
            whose outputs are the embedding dims).
    Returns:
        (out,) in the blocks' dtype; the same bits for the same blocks in the same order.
    """
    parts: list[torch.Tensor] = []
    total = None
    for block in blocks:
        # Row-major first: the sums' order follows the memory layout, and the offline merge's
        # transposed-layout blocks arrive as column-major views.
        squares = block.contiguous().flatten(1).square()
        if transposed:  # every block holds a part of every output's column
            part = squares.sum(0)
            total = part if total is None else total + part
        else:
            parts.append(squares.sum(1))
    return (total if transposed else torch.cat(parts)).sqrt()


#: Rows whose low-rank norm² may be off by more than DORA_FALLBACK times the worst case of a plain
#: fp32 sum are recomputed directly: there W_i and s·(BA)_i nearly cancel.
DORA_FALLBACK = 4.0
#: A W_iᵀ and ‖W_i‖² are summed over column chunks of at least this many (at most _MAX_CHUNKS
#: chunks): fp32 rounds within a chunk, the chunks are added in float64.
DORA_DOT_CHUNK, _MAX_CHUNKS = 256, 32
_SMALL_BLOCK_ELEMENTS = 1 << 18


def _small_blocks(shape: tuple[int, int], rows: int | None = None) -> list[slice]:
    """Slices covering ``rows`` (default shape[0]) rows of a 2-D weight of ``shape``, each at most
    1/8 of that weight and 256K elements (one row at least): dora_norm's casts and recomputations,
    never a weight-sized temporary."""
    step = max(1, min(_SMALL_BLOCK_ELEMENTS, shape[0] * shape[1] // 8) // max(shape[1], 1))
    return [slice(i, i + step) for i in range(0, shape[0] if rows is None else rows, step)]


def dora_dot_chunk(K: int) -> int:
    """Columns per chunk of ``dora_norm``'s fp32 products over K inputs (c in its bound)."""
    return max(1, min(DORA_DOT_CHUNK, K), -(-K // _MAX_CHUNKS))


@torch.no_grad()
def dora_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor, *,
              transposed: bool = False) -> torch.Tensor:
    """‖W_i + s·(B A)_i‖ for every output row i, without building an (out, in) temporary.

    Uses ‖W_i + sΔ_i‖² = ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ. The two weight-sized reads
    are fp32: ‖W_i‖², and W Aᵀ (out, r) as one batched product over chunks of c =
    ``dora_dot_chunk(in)`` columns whose sums are added in float64, like everything after them
    ((out, r)- and (r, r)-sized work). A fp16/bf16 weight is cast a block of rows at a time. The
    result is within γ_m = m·u/(1-m·u) (u: fp32's unit roundoff, m = in + ⌈in/c⌉ + r + 6) times
        scale_i = ‖W_i‖² + κ·2|s|·‖W_i‖·Σ_k |B_ik|·‖A_k‖ + ρ·s²·|B_i| (|A||A|ᵀ) |B_i|ᵀ
    (Cauchy–Schwarz on A W_iᵀ; κ = (c + ⌈in/c⌉ + r + 4)/m: chunks round less than one long sum;
    ρ = 2⁻²⁹·(in+2r+5)/m: the Gram term is rounded in float64 only). A row keeps that result when
    the bound is at most DORA_FALLBACK·γ_{in+2r+5} of its norm²: within 4× the worst case of a
    plain fp32 sum of that length. Otherwise W_i and s·Δ_i nearly cancel, and the row is
    recomputed directly from W_i + s·B_i A in float64, so every norm is about as accurate as its
    inputs allow. Deciding that is one ``.any()``: a host sync on CUDA. Under torch.compile every
    row is formed directly in ``merge_dtype``, blocks of rows at a time (no branch on data: one graph).

    Args:
        weight: (out, in), or (in, out) stored when ``transposed``. A: (r, in). B: (out, r).
    Returns:
        (out,) in ``merge_dtype(weight.dtype)``, detached (DoRA treats the norm as a constant).
    """
    dtype = merge_dtype(weight.dtype)
    A, B = A.to(dtype), B.to(dtype)
    rows = weight.T if transposed else weight  # (out, in) view
    if torch.compiler.is_compiling():
        return _direct_norm2(rows, A, B, scaling, dtype).sqrt()
    wide = torch.float32 if weight.device.type == "mps" else torch.float64  # MPS has no float64
    n_out, K = rows.shape
    r, c = A.shape[0], dora_dot_chunk(K)
    WA = B.new_empty(n_out, r, dtype=wide)  # W Aᵀ
    # cast blockwise: a whole-matrix cast is the (out, in) temporary this function avoids
    for part in [slice(None)] if weight.dtype == dtype else _small_blocks(tuple(rows.shape)):
        WA[part] = _chunked_product(rows[part].to(dtype), A, c).to(wide).sum(0)
    w2 = _row_norms2(weight, transposed, dtype).to(wide)  # off by γ_{K+2} relative
    A, B = A.to(wide), B.to(wide)
    quad = ((B @ (A @ A.T)) * B).sum(1)  # ‖(BA)_i‖²
    norm2 = w2 + (2 * scaling) * (B * WA).sum(1) + (scaling * scaling) * quad
    # ‖W_i‖² is off by γ_{K+2} relative; each chunk's entry of W Aᵀ by γ_c·Σ|W_ik||A_jk| <=
    # γ_c·‖W_i‖‖A_j‖; the rest is rounded in `wide`, whose unit roundoff is eps_ratio of fp32's.
    m = K + -(-K // c) + r + 6
    absB, absA = B.abs(), A.abs()
    eps_ratio = torch.finfo(wide).eps / torch.finfo(dtype).eps
    kappa, rho = (c + -(-K // c) + r + 4) / m, eps_ratio * (K + 2 * r + 5) / m
    scale = w2 + (kappa * 2 * abs(scaling)) * w2.sqrt() * (absB @ torch.linalg.vector_norm(A, dim=1)) \
        + (rho * scaling * scaling) * ((absB @ (absA @ absA.T)) * absB).sum(1)
    # keep where γ_m·scale <= DORA_FALLBACK·γ_{K+2r+5}·norm²; also flags NaN, and a ‖W_i‖² whose fp32
    # sum of squares overflowed (float64 holds the row's norm)
    bad = ~(norm2 * (DORA_FALLBACK * (K + 2 * r + 5) / m) >= scale) | w2.isinf()
    if bad.any():
        # These rows cancel: their digits come from forming W_i + s·B_i A itself, in float64.
        idx = bad.nonzero().squeeze(1)
        for part in _small_blocks(tuple(rows.shape), len(idx)):
            norm2[idx[part]] = _direct_norm2(rows[idx[part]], A, B[idx[part]], scaling, wide)
    return norm2.clamp_min(0).sqrt().to(dtype)


def _row_norms2(weight: torch.Tensor, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """‖W_i‖² (out,) as float64, from fp32 sums over ``_small_blocks`` of stored rows, each cast on its
    own. A ``transposed`` weight's blocks are summed down their columns: a reduction across the inner
    dim is ~40x slower on the CPU than along it."""
    if weight.dtype == dtype and not transposed:
        return torch.linalg.vector_norm(weight, dim=1).square().double()
    sums = []
    for part in _small_blocks(tuple(weight.shape)):
        block = weight[part].to(dtype)
        sums.append(block.square().sum(0) if transposed else torch.linalg.vector_norm(block, dim=1).square())
    if not sums:
        return weight.new_zeros(weight.shape[1] if transposed else 0, dtype=torch.float64)
    return torch.stack(sums).double().sum(0) if transposed else torch.cat(sums).double()


def _chunked_product(rows: torch.Tensor, A: torch.Tensor, c: int) -> torch.Tensor:
    """(n, k, r), n = ⌈K/c⌉: rows (k, K) @ A (r, K)ᵀ summed over each chunk of c columns separately
    (the last one shorter when c does not divide K), one batched GEMM over views of rows: no copy."""
    K = rows.shape[1]
    n, whole = -(-K // c), K - K % c
    out = rows.new_empty(n, rows.shape[0], A.shape[0])
    if whole:
        torch.bmm(rows[:, :whole].unflatten(1, (whole // c, c)).transpose(0, 1),
                  A[:, :whole].unflatten(1, (whole // c, c)).permute(1, 2, 0), out=out[:whole // c])
    if whole < K:
        torch.mm(rows[:, whole:], A[:, whole:].T, out=out[-1])
    return out


def _direct_norm2(rows: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float | torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """‖W_i + s·B_i A‖² of every row of ``rows`` (k, in), formed in ``dtype`` block by block."""
    A, B = A.to(dtype), B.to(dtype)
    parts = [torch.linalg.vector_norm(rows[part].to(dtype) + scaling * (B[part] @ A), dim=1).square()
             for part in row_blocks(tuple(rows.shape))]
    return torch.cat(parts)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float | torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
    """DoRA linear without dropout, all tensors of one dtype: (m / ‖W + sBA‖) ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + bias.

    The unscaled sum comes from ``lora_linear`` (the fused kernels on CUDA), the column scale from
    one ``addcmul`` after it: the kernels need no DoRA variant.

    Args:
        x: (..., K). weight: (N, K). bias: (N,) or None. A: (r, K). B: (N, r).
        magnitude: (N,) trainable. norm: (N,) from ``dora_norm`` (detached).
    """
    out = lora_linear(x, weight, None, A, B, scaling, backend=backend)
    scale = (magnitude / norm).to(out.dtype)
    return out * scale if bias is None else torch.addcmul(bias, out, scale)
