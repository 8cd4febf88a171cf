"""The LoRA math, once, and the one place that picks how to run it.

``lora_linear_reference`` is the definition every other path is checked against::

    y = x W0ᵀ + bias + s · (dropout(x) Aᵀ) Bᵀ

    x: (..., K)   W0: (N, K)   bias: (N,) or None   A: (r, K)   B: (N, r)   s = scaling

The adapter factors may be in a wider dtype than the base (fp32 adapters over a bf16 base, as
peft does): the LoRA branch runs in the adapter dtype and the sum is cast back to the base dtype,
in the same order of operations as peft so that both give bit-identical results.

``lora_linear`` dispatches: the fused Triton kernels (``minilora.kernels``) when x is on CUDA,
Triton imports and the dtype is supported; otherwise the reference. The kernels run the LoRA
branch in the base dtype with fp32 accumulation (fp32 adapters are cast to bf16 on load, as
autocast would), so over a bf16 base they match peft within bf16 rounding, not bit for bit;
docs/kernels.md gives the bounds. Inside an autocast region whose dtype is not the base
weight's (an fp32 model under bf16 autocast), the reference runs, so autocast decides the
precision exactly as it does for peft. ``MINILORA_BACKEND=torch``
or ``=triton`` in the environment (read once, at import), ``set_backend(...)`` later, or
``backend=`` per call, forces a path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = ["lora_linear", "lora_linear_reference", "lora_branch", "backend_for", "set_backend", "merge_dtype",
           "row_blocks", "dora_norm", "dora_merge_norm", "dora_linear"]

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


def lora_branch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False,
                lora_bias: torch.Tensor | None = None) -> torch.Tensor:
    """s · (B(A(dropout(x))) + lora_bias) in the adapter dtype.

    Args:
        x: (..., K) input, any float dtype; cast to A's dtype first (as peft).
        A: (r, K). B: (N, r). lora_bias: (N,) or None (peft's ``lora_bias=True``).
    Returns:
        (..., N) in A's dtype.
    """
    x = x.to(A.dtype)
    if dropout_p > 0.0 and training:
        x = F.dropout(x, p=dropout_p, training=True)
    return F.linear(F.linear(x, A), B, lora_bias) * scaling


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          A: torch.Tensor, B: torch.Tensor, scaling: float,
                          dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """The pure-PyTorch LoRA linear: (..., K) -> (..., N) in the base dtype."""
    result = F.linear(x, weight, bias)
    # Adding the (possibly fp32) branch promotes; the single cast back is peft's rounding point.
    return (result + lora_branch(x, A, B, scaling, dropout_p, training)).to(result.dtype)


#: the largest rank the fused kernels take (the rank is padded to a power of two inside).
MAX_KERNEL_RANK = 256


def _autocast_recasts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True inside an autocast region that would run F.linear in another dtype than the weight's:
    the custom op has no autocast rule, so the kernels would silently compute in the model dtype."""
    device = x.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != weight.dtype


def backend_for(x: torch.Tensor, weight: torch.Tensor, backend: str | None = None,
                rank: int = 1) -> str:
    """Which path ``lora_linear`` takes for these tensors: "torch" or "triton"."""
    choice = backend or _backend
    if choice not in _BACKENDS:
        raise ValueError(f"MINILORA_BACKEND / backend must be one of {_BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    # The kernels compute in the base dtype and treat the base weight as frozen.
    usable = (x.is_cuda and weight.dtype in (torch.float16, torch.bfloat16, torch.float32)
              and x.dtype == weight.dtype and not weight.requires_grad and rank <= MAX_KERNEL_RANK
              and not _autocast_recasts(x, weight))
    if usable:
        try:
            from minilora.kernels import available
            usable = available()
        except ImportError:
            usable = False
    if choice == "triton" and not usable:
        raise RuntimeError(
            "backend 'triton' was forced but cannot run here: it needs x on a CUDA device, "
            "x and a frozen (requires_grad=False) weight of one dtype among fp16/bf16/fp32 "
            "(and, inside autocast, the autocast dtype), "
            f"a rank of at most {MAX_KERNEL_RANK}, "
            "and an importable triton (pip install minilora[triton])")
    return "triton" if usable else "torch"


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor, B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False,
                backend: str | None = None) -> torch.Tensor:
    """LoRA linear through the fastest available path; same contract as the reference."""
    if backend_for(x, weight, backend, rank=A.shape[0]) == "triton":
        from minilora.kernels import fused_lora_linear
        return fused_lora_linear(x, weight, bias, A, B, scaling, dropout_p, training)
    return _lora_linear_torch(x, weight, bias, A, B, scaling, dropout_p, training)


def _lora_linear_torch(x, weight, bias, A, B, scaling, dropout_p, training):
    """The PyTorch path: the reference, except when everything shares one dtype, where the
    branch goes straight into the base output with one in-place ``addmm_`` (scale folded into
    the GEMM's alpha): no (M, N) temporaries for B·S, its scaling and the sum. Differs from the
    reference only by fp rounding (GEMM order), within 1 ulp-ish of fp32."""
    # Under autocast F.linear runs in bf16/fp16 while addmm_ would not: use the reference there.
    if not (x.dtype == weight.dtype == A.dtype == B.dtype) or torch.is_autocast_enabled(x.device.type):
        return lora_linear_reference(x, weight, bias, A, B, scaling, dropout_p, training)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])  # 2-D, so the in-place add is not on a view (no CopySlices)
    out = F.linear(x, weight, bias)  # (M, N)
    if dropout_p > 0.0 and training:
        x = F.dropout(x, p=dropout_p, training=True)
    out.addmm_(F.linear(x, A), B.t(), alpha=scaling)  # += s · (x Aᵀ) Bᵀ
    return out.view(*lead, out.shape[-1])


# ---------------------------------------------------------------- merging and DoRA
def merge_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a delta s·B·A is computed in before W + delta is rounded once to the weight's
    dtype: fp32 for bf16/fp16/fp32 weights, fp64 for fp64 ones (fp32 would throw away precision)."""
    return torch.promote_types(weight_dtype, torch.float32)


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
        (out,) in the blocks' dtype. The in-memory and the offline merge both sum over the same
        blocks in the same order, so they get the same bits.
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


#: Rows whose low-rank norm² is under 1/DORA_FALLBACK of its rounding scale are recomputed directly:
#: there W_i and s·(BA)_i nearly cancel, and the identity's error grows by that ratio.
DORA_FALLBACK = 4.0
_FALLBACK_ELEMENTS = 1 << 18


@torch.no_grad()
def dora_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, *,
              transposed: bool = False) -> torch.Tensor:
    """‖W_i + s·(B A)_i‖ for every output row i, without building an (out, in) temporary.

    Uses ‖W_i + sΔ_i‖² = ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ: one (r, out) product A Wᵀ
    and an (r, r) Gram matrix. A fp16/bf16 weight is read in blocks of rows cast to fp32.
    The identity's rounding error is at most about (K+2r+5)·u times its terms over absolute values,
    ‖W_i‖² + 2|s|·‖W_i‖·Σ_k |B_ik|·‖A_k‖ + s²·|B_i| (|A||A|ᵀ) |B_i|ᵀ (Cauchy–Schwarz on A W_iᵀ),
    which matters only where that scale dwarfs the result: W_i and s·Δ_i nearly cancel. Those rows (scale > DORA_FALLBACK × result) are recomputed
    directly from W_i + s·B_i A in float64, so every norm is about as accurate as its inputs
    allow (peft's fp32 sum is not). Deciding that is one ``.any()``: a host sync on CUDA.

    Under torch.compile every row is formed directly instead, in blocks of rows (no branch on
    data, so the model stays one graph; inductor fuses each block's add, square and sum): the
    same cost as the identity, as accurate as peft's fp32 sum.

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
    if weight.dtype == dtype:
        AW = A @ rows.T  # (r, out)
        w2 = torch.linalg.vector_norm(rows, dim=1).square()
    else:  # cast blockwise: a whole-matrix cast is the (out, in) temporary this function avoids
        AW = A.new_empty(A.shape[0], rows.shape[0])
        w2 = A.new_empty(rows.shape[0])
        for part in row_blocks(tuple(rows.shape)):
            block = rows[part].to(dtype)
            AW[:, part] = A @ block.T
            w2[part] = torch.linalg.vector_norm(block, dim=1).square()
    cross = (B * AW.T).sum(1)  # B_i · (A W_iᵀ)
    quad = ((B @ (A @ A.T)) * B).sum(1)  # ‖(BA)_i‖²
    norm2 = w2 + (2 * scaling) * cross + (scaling * scaling) * quad
    # Each term's rounding error is at most γ_K times the same term over absolute values:
    # |A W_iᵀ| <= ‖A_k‖‖W_i‖ (Cauchy–Schwarz) and |A Aᵀ| <= |A||A|ᵀ (r x r, cheap).
    absB = B.abs()
    scale = w2 + (2 * abs(scaling)) * w2.sqrt() * (absB @ torch.linalg.vector_norm(A, dim=1)) \
        + (scaling * scaling) * ((absB @ (A.abs() @ A.abs().T)) * absB).sum(1)
    bad = ~(norm2 * DORA_FALLBACK >= scale)  # also NaN (an overflowing ‖W_i‖²)
    if bad.any():
        # The cancellation that made these rows bad costs fp32 the digits DoRA needs: float64
        # (MPS has none: fp32 there), a block of rows at a time.
        # Blocks of at most 1/8 of the weight (and 256K elements): large adapters (‖sΔ_i‖ ≳ 0.3‖W_i‖
        # at r = 16) flag many rows without any cancellation, since the bound is a worst case.
        wide = torch.float32 if weight.device.type == "mps" else torch.float64
        idx = bad.nonzero().squeeze(1)
        step = max(1, min(_FALLBACK_ELEMENTS, rows.numel() // 8) // max(rows.shape[1], 1))
        for start in range(0, len(idx), step):
            part = idx[start:start + step]
            norm2[part] = _direct_norm2(rows[part], A, B[part], scaling, wide).to(dtype)
    return norm2.clamp_min(0).sqrt()


def _direct_norm2(rows: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """‖W_i + s·B_i A‖² of every row of ``rows`` (k, in), formed in ``dtype`` block by block."""
    A, B = A.to(dtype), B.to(dtype)
    parts = [torch.linalg.vector_norm(rows[part].to(dtype) + scaling * (B[part] @ A), dim=1).square()
             for part in row_blocks(tuple(rows.shape))]
    return torch.cat(parts)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, magnitude: torch.Tensor, norm: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
    """DoRA linear without dropout, all tensors of one dtype: (m / ‖W + sBA‖) ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + bias.

    The unscaled sum comes from ``lora_linear`` (the fused kernels on CUDA, unchanged), and the
    column scale is one ``addcmul`` after it, so the kernels need no DoRA variant to be right.
    Equal, in real arithmetic, to peft's ``result + (g - 1)·(result - bias) + g·s·lora``.

    Args:
        x: (..., K). weight: (N, K). bias: (N,) or None. A: (r, K). B: (N, r).
        magnitude: (N,) trainable. norm: (N,) from ``dora_norm`` (detached).
    """
    out = lora_linear(x, weight, None, A, B, scaling, backend=backend)
    scale = (magnitude / norm).to(out.dtype)
    return out * scale if bias is None else torch.addcmul(bias, out, scale)
