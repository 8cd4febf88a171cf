"""Triton kernels for mixed batches: every row of a batch runs its own LoRA adapter.

    y_i += s_j · (x_i A_jᵀ) B_jᵀ   for every row i whose adapter sits in slot j of the stack

    x: (R, T, K)   y: (R, T, N)   A: (n, r, K)   B: (n, N, r)   s: (n,)   (r: the stack's padded rank)

Rows come grouped by slot (``minilora.rows.RowSlots``: ``sorted_rows``, and per group g its slot
``seg_slot[g]`` and rows ``sorted_rows[seg_start[g]:seg_start[g + 1]]``), so each program works
for one adapter, and its tokens share A_j or B_j tiles (the SGMV layout of Punica / S-LoRA):

1. ``_shrink_kernel``, grid (groups, token blocks): S = s_j · x A_jᵀ, fp32 accumulation, stored in
   the compute dtype c (one rounding; the S of a row without adapter is never written or read).
2. ``_expand_kernel``, grid (groups, token blocks, N blocks): y += S B_jᵀ, in place: the base
   output is read once and written once, in fp32 then rounded to c.

Two kernels, not one fused into the base GEMM: the base GEMM stays cuBLAS's (the bulk of the
FLOPs), and the LoRA work is two thin passes whose cost grows with the adapter factors read
(n·r·(K + N) elements), not with the base weight. Rounding points (c = x's dtype): A and B cast
to c on load, S stored in c, y rounded once on store: four c roundings per output plus fp32 sums
over K and r. Inference only: no backward (``ops.backend_for_rows`` takes this path with
gradients off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minilora.kernels import COMPUTE_DTYPES, MAX_RANK
from minilora.kernels.lora_matmul import INTERPRET, check_device, dot_precision, rank_block

# ------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of one launch (no autotune: every config the GPU runs is compiled in the tests)."""

    block_m: int  # tokens of one group
    block_kn: int  # K tile (shrink) or N tile (expand)
    num_warps: int = 4
    num_stages: int = 3


#: The largest tokens-per-group for which 16-token tiles are used (decode: a few rows per adapter);
#: above it, 64-token tiles (prefill), the smallest M for Hopper's wgmma. Guesses; tune on the GPU.
SMALL_M = 16
# Elements of a tile that spans the rank (A and B tiles shrink as the rank grows).
_RANK_TILE_BUDGET = 8192
if INTERPRET:  # small tiles: the interpreter runs programs one by one through numpy
    SHRINK, EXPAND = Tiles(16, 32), Tiles(16, 32)
    #: token counts per group, one per config bucket, for the sm_90 compile test
    CONFIG_MS = (1,)
else:
    SHRINK, EXPAND = Tiles(64, 128), Tiles(64, 128)
    CONFIG_MS = (1, 128)


def tiles_for(kernel: str, tokens: int, block_r: int) -> Tiles:
    """The launch tiles of ``kernel`` ("shrink" or "expand") for the largest group's ``tokens``."""
    base = SHRINK if kernel == "shrink" else EXPAND
    block_m = base.block_m if INTERPRET or tokens > SMALL_M else SMALL_M
    side = min(base.block_kn, max(32, _RANK_TILE_BUDGET // block_r))
    return Tiles(block_m, side, base.num_warps, base.num_stages)


# ------------------------------------------------------------------------------------- kernels


@triton.jit
def _group_tokens(rows_ptr, seg_start_ptr, g, pid_m, T, BLOCK_M: tl.constexpr):
    """This program's tokens of group g: (row, token in row, in range), and whether any is."""
    start = tl.load(seg_start_ptr + g)
    n_tok = (tl.load(seg_start_ptr + g + 1) - start) * T
    j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = j < n_tok
    row = tl.load(rows_ptr + start + j // T, mask=ok, other=0).to(tl.int64)
    return row, (j % T).to(tl.int64), ok, pid_m * BLOCK_M < n_tok


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, scale_ptr, s_ptr, rows_ptr, seg_slot_ptr, seg_start_ptr,
    T, K, R,
    stride_xr, stride_xt, stride_xk, stride_an, stride_ar, stride_ak, stride_sm, stride_sr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """S[row·T + t] = scale[j] · x[row, t] A_jᵀ for the tokens of group g (slot j).

    x: (R_rows, T, K)  a = A: (n, R, K)  scale: (n,)  s = S: (R_rows·T, R)
    Grid: (groups, cdiv(largest group's tokens, BLOCK_M)); programs past their group's end skip.
    """
    g = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + g).to(tl.int64)
    row, t, m_ok, busy = _group_tokens(rows_ptr, seg_start_ptr, g, tl.program_id(1), T, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_ok = offs_r < R
    x_rows = x_ptr + row[:, None] * stride_xr + t[:, None] * stride_xt
    a_slot = a_ptr + slot * stride_an
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, tl.where(busy, K, 0), BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a_t = tl.load(a_slot + ks[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                      mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # (BK, BR) of A_jᵀ
        acc = tl.dot(x, a_t.to(x.dtype), acc, input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr + slot).to(tl.float32)
    tok = row * T + t
    tl.store(s_ptr + tok[:, None] * stride_sm + offs_r[None, :] * stride_sr,
             (acc * scale).to(s_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(
    s_ptr, b_ptr, y_ptr, rows_ptr, seg_slot_ptr, seg_start_ptr,
    T, N, R,
    stride_sm, stride_sr, stride_bn_slot, stride_bn, stride_br, stride_yr, stride_yt, stride_yn,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[row, t] += S[row·T + t] B_jᵀ for the tokens of group g (slot j), one N block.

    s = S: (R_rows·T, R)  b = B: (n, N, R)  y: (R_rows, T, N)
    Grid: (groups, cdiv(largest group's tokens, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    g = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + g).to(tl.int64)
    row, t, m_ok, busy = _group_tokens(rows_ptr, seg_start_ptr, g, tl.program_id(1), T, BLOCK_M)
    if busy:
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        n_ok = offs_n < N
        r_ok = offs_r < R
        tok = row * T + t
        s = tl.load(s_ptr + tok[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + slot * stride_bn_slot + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                      mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # (BR, BN) of B_jᵀ
        acc = tl.dot(s, b_t.to(s.dtype), input_precision=DOT_PRECISION)
        mask = m_ok[:, None] & n_ok[None, :]
        y_ptrs = y_ptr + row[:, None] * stride_yr + t[:, None] * stride_yt + offs_n[None, :] * stride_yn
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------- launcher



def _new_output(shape, dtype, device) -> torch.Tensor:
    """Allocation of the buffer the shrink must write where it is read (tests fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(y, x, A, B, scaling, sorted_rows, seg_slot, seg_start) -> None:
    check_device(y=y, x=x, A=A, B=B, scaling=scaling, sorted_rows=sorted_rows, seg_slot=seg_slot,
                 seg_start=seg_start)
    if y.dim() != 3 or x.dim() != 3 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"expected y (R, T, N), x (R, T, K), A (n, r, K), B (n, N, r); got shapes "
                         f"{tuple(y.shape)}, {tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}")
    if x.dtype not in COMPUTE_DTYPES or x.dtype != y.dtype:
        raise ValueError(f"x and y must share one dtype among fp16/bf16/fp32, got x {x.dtype} and y {y.dtype}")
    for name, t in (("A", A), ("B", B), ("scaling", scaling)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    (R, T, N), (n, r, K) = y.shape, A.shape
    if x.shape != (R, T, K):
        raise ValueError(f"x must have shape (R, T, K) = {(R, T, K)} (y's rows and tokens, A's K), "
                         f"got {tuple(x.shape)}")
    if B.shape != (n, N, r) or scaling.shape != (n,):
        raise ValueError(f"B must have shape (n, N, r) = {(n, N, r)} and scaling ({n},); got "
                         f"{tuple(B.shape)} and {tuple(scaling.shape)}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank r={r} is outside the supported range 1..{MAX_RANK}")
    for name, t in (("sorted_rows", sorted_rows), ("seg_slot", seg_slot), ("seg_start", seg_start)):
        if t.dtype != torch.int32 or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if seg_start.numel() != seg_slot.numel() + 1:
        raise ValueError(f"seg_start must have one entry more than seg_slot ({seg_slot.numel() + 1}), "
                         f"got {seg_start.numel()}")


def shrink_expand(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor,
                  sorted_rows: torch.Tensor, seg_slot: torch.Tensor, seg_start: torch.Tensor,
                  max_rows: int) -> None:
    """y[i] += scaling[j] · (x[i] A[j]ᵀ) B[j]ᵀ in place for the rows i of every group (slot j).

    Args:
        y: (R, T, N), x: (R, T, K): one dtype among fp16/bf16/fp32, any strides.
        A: (n, r, K), B: (n, N, r), scaling: (n,): any float dtype (cast to x's in the kernels).
        sorted_rows, seg_slot, seg_start: int32, the rows grouped by slot (``RowSlots``); the slots
            and row numbers must be in range (not checked: that would read them back to the host).
        max_rows: the largest group's row count (sizes the grid).
    Raises:
        ValueError: on devices, dtypes or shapes the kernels do not take.
    """
    _check_inputs(y, x, A, B, scaling, sorted_rows, seg_slot, seg_start)
    _launch(y, x, A, B, scaling, sorted_rows, seg_slot, seg_start, max_rows)


def _launch(y, x, A, B, scaling, sorted_rows, seg_slot, seg_start, max_rows: int) -> None:
    """``shrink_expand`` on checked inputs."""
    (R, T, N), (n, r, K) = y.shape, A.shape
    groups, tokens = seg_slot.numel(), max_rows * T
    if groups == 0 or tokens == 0 or N == 0:
        return
    block_r, precision = rank_block(r), dot_precision(x.dtype)
    s = _new_output((R * T, r), x.dtype, x.device)
    cfg = tiles_for("shrink", tokens, block_r)
    _shrink_kernel[(groups, triton.cdiv(tokens, cfg.block_m))](
        x, A, scaling, s, sorted_rows, seg_slot, seg_start, T, K, r,
        *x.stride(), *A.stride(), *s.stride(),
        DOT_PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_kn, BLOCK_R=block_r,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cfg = tiles_for("expand", tokens, block_r)
    _expand_kernel[(groups, triton.cdiv(tokens, cfg.block_m), triton.cdiv(N, cfg.block_kn))](
        s, B, y, sorted_rows, seg_slot, seg_start, T, N, r,
        *s.stride(), *B.stride(), *y.stride(),
        DOT_PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_kn, BLOCK_R=block_r,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ------------------------------------------------------------------------------------- the op


@torch.library.custom_op("minilora::multi_lora_add_", mutates_args=("y",))
def _multi_lora_op(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor,
                   sorted_rows: torch.Tensor, seg_slot: torch.Tensor, seg_start: torch.Tensor,
                   max_rows: int) -> None:
    # multi_lora_add_ checked the inputs before dispatch: once per call on this hot path.
    _launch(y, x, A, B, scaling, sorted_rows, seg_slot, seg_start, max_rows)


@_multi_lora_op.register_fake
def _(y, x, A, B, scaling, sorted_rows, seg_slot, seg_start, max_rows):
    return None


def multi_lora_add_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor,
                    where) -> torch.Tensor:
    """y += each row's LoRA branch, in place, through the kernels; returns y.

    Args:
        y: (R, T, N) base output, x: (R, T, K) input (one dtype among fp16/bf16/fp32).
        A: (n, r, K), B: (n, N, r), scaling: (n,): a stack (``minilora.ops.StackedLora``).
        where: the rows grouped by slot (``minilora.rows.RowSlots``); rows not in it keep y.
    Raises:
        ValueError: as ``shrink_expand``.
    """
    args = (y, x, A, B, scaling, where.sorted_rows, where.seg_slot, where.seg_start)
    _check_inputs(*args)  # before dispatch: a meta or mixed-device input would reach the fake impl
    _multi_lora_op(*args, where.max_rows)
    return y
