"""Triton kernels for the fused LoRA linear, and the launchers that check inputs and build grids.

    y = x W0ᵀ + bias + S Bᵀ,   S = s' · (keep ⊙ x) Aᵀ,   s' = s / (1 - p) when dropout is on, else s

    x: (M, K)   W0: (N, K)   A: (r, K)   B: (N, r)   S: (M, r)   keep: (M, K) booleans

Forward, two paths (``forward(path=...)``; "auto" picks by M, see ``FUSED_MAX_M``):

* "fused" (small M, memory-bound): one kernel. Each x tile is loaded once per K step and feeds two
  dots: with W0ᵀ into the (BLOCK_M, BLOCK_N) accumulator and with Aᵀ into a (BLOCK_M, BLOCK_R)
  rank accumulator. Epilogue: acc += S Bᵀ with S = (s' · rank acc) cast to the compute dtype, add
  bias, store once. The programs of the first N block also store S (kept for backward).
* "split" (large M, compute-bound): the same kernel without the base GEMM (``FUSE_BASE=False``)
  writes S, then ``_seeded_gemm_kernel`` computes x W0ᵀ with its accumulator seeded by S Bᵀ.

Backward, three steps (W0 is frozen, so the only large GEMM is dY W0):

1. ``_grad_s_kernel``: one pass over dY gives dU = s' · dY B (stored in the compute dtype) and
   dB = dYᵀ S (fp32: atomics, or one partial per M block summed afterwards when torch's
   deterministic mode is on).
2. ``_grad_a_kernel``: dA = dUᵀ (keep ⊙ x), fp32 partials over a few row splits, summed after.
3. ``_seeded_gemm_kernel`` again: dX = dY W0 + keep ⊙ (dU A): the seed is dU A, masked.

Dropout: keep(m, k) = uniform(philox(seed, counter=(k, m))) >= p. It depends only on the seed and
the element's coordinates, never on the tiling, so forward (x tiles) and backward (x tiles in
step 2, dX tiles in step 3) regenerate the same mask without storing it. The 1/(1-p) factor is
folded into s', so masking is a select, not a multiply: no extra rounding.

Rounding points (compute dtype c = dtype of x and W0; all dots accumulate in fp32):
A and B are cast to c when loaded; S and dU are rounded to c once (they feed tensor-core dots);
y and dX are rounded to c on store; dA and dB are summed in fp32 and stored in A's and B's dtype.
fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from minilora.kernels import COMPUTE_DTYPES, MAX_RANK

# ------------------------------------------------------------------------------------- configs
# Fixed, chosen per kernel and M bucket (no autotune, so every config used on the GPU is known and
# compiled for sm_90 in the tests). The H100 numbers are starting points, untuned.


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of one kernel launch."""

    block_m: int
    block_n: int  # 0 where the kernel has no N tile
    block_k: int  # 0 where the kernel has no K tile
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Largest M for which "auto" takes the single fused forward kernel (guess; tune on the GPU).
FUSED_MAX_M = 64

# SMs assumed where no CUDA device can be asked: under the interpreter (CPU tensors) the launch
# shapes then match those of an H100 SXM, the GPU the configs were written for.
FALLBACK_SM_COUNT = 132

if INTERPRET:  # small tiles: the interpreter runs programs one by one through numpy
    FUSED_CONFIGS = ((64, Config(16, 32, 32)),)
    SHRINK_CONFIG = Config(16, 0, 32)
    GEMM_CONFIGS = ((1 << 62, Config(32, 32, 32, group_m=2)),)
    CONFIG_MS = (1,)
    GRAD_S_CONFIG = Config(16, 32, 0)
    GRAD_A_CONFIG = Config(16, 0, 32)
else:
    # (largest M, config): the first bucket with M <= largest M is used.
    FUSED_CONFIGS = (
        (16, Config(16, 32, 256, num_warps=4, num_stages=4)),
        (1 << 62, Config(64, 64, 128, num_warps=4, num_stages=4)),
    )
    SHRINK_CONFIG = Config(64, 0, 128, num_warps=4, num_stages=3)
    GEMM_CONFIGS = (
        (1024, Config(128, 128, 64, num_warps=4, num_stages=4)),
        (1 << 62, Config(128, 256, 64, num_warps=8, num_stages=3)),
    )
    GRAD_S_CONFIG = Config(64, 128, 0, num_warps=4, num_stages=3)
    GRAD_A_CONFIG = Config(64, 0, 128, num_warps=4, num_stages=3)
    # One M per bucket, for the sm_90 compile test: every config used on the GPU is
    # config_for(kernel, m, block_r) for some m in CONFIG_MS and block_r in 16, 32, ..., 256.
    CONFIG_MS = (1, 64, 1024, 4096)


# Elements of a tile that spans the rank: tiles shrink as the rank grows so that the pipelined
# A / B / dU tiles and the fp32 rank accumulators fit in shared memory and registers.
_RANK_TILE_BUDGET = 4096


@functools.cache  # per device (a tensor's device always has its index); asked on every backward
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; ``FALLBACK_SM_COUNT`` for a non-CUDA device."""
    if device.type != "cuda":
        return FALLBACK_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def rank_block(r: int) -> int:
    """The rank padded for tensor-core dots: max(16, next power of two)."""
    return max(16, triton.next_power_of_2(r))


def seed_rank_block(block_r: int) -> int:
    """The rank chunk of the seeded GEMM's seed loop (S Bᵀ or dU A): 64 ranks at a time, 16 under
    the interpreter, so that small test ranks already take several chunks."""
    return min(block_r, 16 if INTERPRET else 64)


def config_for(kernel: str, m: int, block_r: int, elem_bytes: int = 2) -> Config:
    """The launch config of ``kernel`` ("fused", "shrink", "gemm", "grad_s", "grad_a").

    m: rows (tokens); block_r: the padded rank; elem_bytes: 2 for fp16/bf16, 4 for fp32, whose
    IEEE dots are FMA loops (no tensor cores): half the K tile, and a smaller GEMM tile.
    """
    if kernel == "fused":
        cfg = next(c for largest_m, c in FUSED_CONFIGS if m <= largest_m)
    elif kernel == "gemm":
        cfg = next(c for largest_m, c in GEMM_CONFIGS if m <= largest_m)
    else:
        cfg = {"shrink": SHRINK_CONFIG, "grad_s": GRAD_S_CONFIG, "grad_a": GRAD_A_CONFIG}[kernel]
    rank_tile = max(32, _RANK_TILE_BUDGET // block_r)  # the tile side that meets the rank
    if kernel in ("fused", "shrink"):  # (BLOCK_K, BLOCK_R) tiles of A
        cfg = replace(cfg, block_k=min(cfg.block_k, rank_tile))
    elif kernel == "grad_a":  # (BLOCK_K, BLOCK_R) dAᵀ; BLOCK_K is the MMA's M: >= 64 for wgmma
        cfg = replace(cfg, block_k=min(cfg.block_k, max(64, rank_tile)))
    elif kernel == "grad_s":  # (BLOCK_N, BLOCK_R) tiles of B and of dB
        cfg = replace(cfg, block_n=min(cfg.block_n, rank_tile))
    if block_r >= 128 and not INTERPRET:
        cfg = replace(cfg, num_warps=max(8, cfg.num_warps))  # the fp32 rank accumulators
    if elem_bytes == 4 and not INTERPRET:
        if kernel == "gemm":
            cfg = replace(cfg, block_m=64, block_n=128, block_k=32, num_warps=4)
        elif cfg.block_k:
            cfg = replace(cfg, block_k=max(32, cfg.block_k // 2))
    return cfg


# ------------------------------------------------------------------------------------- kernels


@triton.jit
def _keep(seed, rows, cols, p):
    """Dropout keep-mask of the tile (rows × cols) of x: True with probability 1 - p.

    rows: (BM,) row indices m, cols: (BK,) column indices k -> (BM, BK) booleans. The Philox
    counter is (k, m, 0, 0): the mask of x[m, k] depends on (seed, m, k) only.
    """
    c0 = (cols[None, :] + rows[:, None] * 0).to(tl.uint32)
    c1 = (rows[:, None] + cols[None, :] * 0).to(tl.uint32)
    zero = tl.zeros_like(c0)
    bits, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return tl.random.uint_to_uniform_float(bits) >= p


@triton.jit
def _keep_mask_kernel(
    keep_ptr, seed_ptr,
    M, K,
    stride_km, stride_kk,
    p,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """keep[M, K] (int8) = the dropout mask the other kernels regenerate (for tests and debugging)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(tl.load(seed_ptr), offs_m, offs_k, p)
    ptrs = keep_ptr + offs_m[:, None] * stride_km + offs_k[None, :] * stride_kk
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


@triton.jit
def _fused_forward_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_sm, stride_sr,
    scale, p,
    FUSE_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """S = scale · (keep ⊙ x) Aᵀ, and with FUSE_BASE also y = x W0ᵀ + S Bᵀ + bias.

    x: (M, K)  w = W0: (N, K)  a = A: (R, K)  b = B: (N, R)  bias: (N,)  y: (M, N)  s = S: (M, R)
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)) with FUSE_BASE, else (cdiv(M, BLOCK_M), 1).
    Programs with pid_n == 0 store S (in y's dtype: the compute dtype).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = offs_r < R
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if FUSE_BASE:
            w_t = tl.load(w_ptr + ks[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                          mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BK, BN) of W0ᵀ
            acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
        if DROPOUT:
            x = tl.where(_keep(seed, offs_m, ks, p), x, 0.0)
        a_t = tl.load(a_ptr + ks[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                      mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # (BK, BR) of Aᵀ
        acc_r = tl.dot(x, a_t.to(x.dtype), acc_r, input_precision=DOT_PRECISION)

    s = (acc_r * scale).to(y_ptr.dtype.element_ty)  # rounding point: S in the compute dtype
    if pid_n == 0:
        tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, s,
                 mask=m_ok[:, None] & r_ok[None, :])
    if FUSE_BASE:
        b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                      mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # (BR, BN) of Bᵀ
        acc = tl.dot(s, b_t.to(s.dtype), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _seeded_gemm_kernel(
    x_ptr, w_ptr, s_ptr, t_ptr, bias_ptr, out_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_tn, stride_tr,
    stride_om, stride_on,
    p,
    HAS_BIAS: tl.constexpr, MASK_SEED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = x wᵀ + keep ⊙ (s tᵀ) + bias, the accumulator seeded with the low-rank term.

    x: (M, K)  w: (N, K)  s: (M, R)  t: (N, R)  bias: (N,)  out: (M, N)  keep(m, n) for MASK_SEED.
    Forward:  x = x, w = W0, s = S, t = B, no mask.
    Backward: x = dY (M, N0), w = W0ᵀ (K0, N0) by strides, s = dU, t = Aᵀ (K0, R) by strides,
              mask on: out = dX = dY W0 + keep ⊙ (dU A).
    BLOCK_R is the rank chunk of the seed loop (not the whole padded rank).
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped GROUP_M row blocks at a time for L2 reuse.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r0 = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):  # the seed, BLOCK_R ranks at a time
        offs_r = r0 + offs_r0
        r_ok = offs_r < R
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        t_t = tl.load(t_ptr + offs_r[:, None] * stride_tr + offs_n[None, :] * stride_tn,
                      mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(s, t_t.to(s.dtype), acc, input_precision=DOT_PRECISION)
    if MASK_SEED:
        acc = tl.where(_keep(tl.load(seed_ptr), offs_m, offs_n, p), acc, 0.0)

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + ks[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                      mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grad_s_kernel(
    dy_ptr, b_ptr, s_ptr, du_ptr, db_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dum, stride_dur,
    stride_dbp, stride_dbn, stride_dbr,
    scale,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Backward step 1, one pass over dY: dU = scale · dY B and dB = dYᵀ S.

    dy: (M, N)  b = B: (N, R)  s = S: (M, R)  du = dU: (M, R) in dY's dtype
    db: fp32; ATOMIC: (N, R) accumulated with atomics; else (cdiv(M, BLOCK_M), N, R) partials,
    one slice per program (stride_dbp), summed by the launcher: deterministic.
    Grid: (cdiv(M, BLOCK_M),).
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    r_ok = offs_r < R

    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_n0
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dy, b.to(dy.dtype), acc, input_precision=DOT_PRECISION)
        db = tl.dot(tl.trans(dy), s, input_precision=DOT_PRECISION)  # (BN, BR) fp32
        db_ptrs = db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
        db_mask = n_ok[:, None] & r_ok[None, :]
        if ATOMIC:
            tl.atomic_add(db_ptrs, db, mask=db_mask)
        else:
            tl.store(db_ptrs + pid_m * stride_dbp, db, mask=db_mask)

    tl.store(du_ptr + offs_m[:, None] * stride_dum + offs_r[None, :] * stride_dur,
             (acc * scale).to(du_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _grad_a_kernel(
    x_ptr, du_ptr, da_ptr, seed_ptr,
    M, K, R, rows_per_split,
    stride_xm, stride_xk, stride_dum, stride_dur, stride_dap, stride_dar, stride_dak,
    p,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Backward step 2: dA = dUᵀ (keep ⊙ x), over this program's rows, as an fp32 partial.

    x: (M, K)  du = dU: (M, R)  da: (splits, R, K) fp32, summed over splits by the launcher.
    Program (pid_k, split) covers columns [pid_k·BLOCK_K, +BLOCK_K) and rows
    [split·rows_per_split, +rows_per_split); rows_per_split is a multiple of BLOCK_M.
    Computed as dAᵀ = (keep ⊙ x)ᵀ dU so the long side (BLOCK_K) is the MMA's M dimension.
    Grid: (cdiv(K, BLOCK_K), splits).
    """
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    offs_m0 = tl.arange(0, BLOCK_M)
    k_ok = offs_k < K
    r_ok = offs_r < R
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    row0 = split * rows_per_split
    for m0 in range(row0, row0 + rows_per_split, BLOCK_M):
        offs_m = m0 + offs_m0
        m_ok = offs_m < M
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep(seed, offs_m, offs_k, p), x, 0.0)
        du = tl.load(du_ptr + offs_m[:, None] * stride_dum + offs_r[None, :] * stride_dur,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(x), du, acc, input_precision=DOT_PRECISION)

    tl.store(da_ptr + split * stride_dap + offs_r[None, :] * stride_dar
             + offs_k[:, None] * stride_dak, acc, mask=k_ok[:, None] & r_ok[None, :])


# ------------------------------------------------------------------------------------- launchers
# Check inputs, allocate outputs, build grids.



def _new_output(shape, dtype, device) -> torch.Tensor:
    """Allocation of every output the kernels must fully write (tests replace it with NaN fills)."""
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """The dots' input precision for this compute dtype: IEEE fp32 unless TF32 is allowed."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def check_device(**tensors: torch.Tensor | None) -> None:
    """Raise unless the given tensors (None skipped) share one device the kernels can run on."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: "
                             "all inputs of the fused LoRA kernels must be on one device")
    if not INTERPRET and first.device.type != "cuda":
        raise ValueError(f"the fused LoRA kernels need CUDA tensors, got {first_name} on "
                         f"{first.device} (set TRITON_INTERPRET=1 to run them on the CPU)")


def _check_forward_inputs(x, weight, bias, A, B, seed) -> None:
    check_device(x=x, weight=weight, bias=bias, A=A, B=B, seed=seed)
    if x.dim() != 2 or weight.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"expected 2-D x, weight, A, B; got shapes {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(A.shape)}, {tuple(B.shape)}")
    if x.dtype not in COMPUTE_DTYPES or x.dtype != weight.dtype:
        raise ValueError(f"x and weight must share one dtype among fp16/bf16/fp32, got "
                         f"x {x.dtype} and weight {weight.dtype}")
    for name, t in (("A", A), ("B", B), ("bias", bias)):
        if t is not None and t.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    (_, K), (N, K_w), (r, K_a), (N_b, r_b) = x.shape, weight.shape, A.shape, B.shape
    if K_w != K or K_a != K:
        raise ValueError(f"in_features mismatch: x has K={K}, weight {tuple(weight.shape)} "
                         f"and A {tuple(A.shape)} must have K columns")
    if N_b != N or r_b != r:
        raise ValueError(f"B must have shape (out_features, r) = ({N}, {r}), got {tuple(B.shape)}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank r={r} is outside the supported range 1..{MAX_RANK}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
            B: torch.Tensor, scale: float, p: float = 0.0, seed: torch.Tensor | None = None,
            path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W0ᵀ + bias + S Bᵀ and S = scale · (keep ⊙ x) Aᵀ.

    Args:
        x: (M, K), any strides. weight: (N, K) in x's dtype. bias: (N,) or None.
        A: (r, K), B: (N, r), any float dtype (cast to x's dtype in the kernel).
        scale: s' (the LoRA scaling, already divided by 1 - p when dropout is on).
        p: dropout probability; 0 turns dropout off. seed: int64 tensor of 1 element (if p > 0).
        path: "auto", "fused" or "split".
    Returns:
        y: (M, N) and S: (M, r), both in x's dtype.
    Raises:
        ValueError: on devices, dtypes or shapes the kernels do not take.
    """
    _check_forward_inputs(x, weight, bias, A, B, seed)
    if p > 0.0 and seed is None:
        raise ValueError("dropout p > 0 needs a seed tensor")
    (M, K), N, r = x.shape, weight.shape[0], A.shape[0]
    y = _new_output((M, N), x.dtype, x.device)
    s = _new_output((M, r), x.dtype, x.device)
    if M == 0:
        return y, s
    seed_arg = seed if seed is not None else x
    precision = dot_precision(x.dtype)
    common = dict(DROPOUT=p > 0.0, DOT_PRECISION=precision, BLOCK_R=rank_block(r))
    if path not in ("auto", "fused", "split"):
        raise ValueError(f"path must be 'auto', 'fused' or 'split', got {path!r}")
    if path == "fused" or (path == "auto" and M <= FUSED_MAX_M):  # one kernel, else shrink + GEMM
        cfg = config_for("fused", M, rank_block(r), x.element_size())
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n))
        _fused_forward_kernel[grid](
            x, weight, A, B, bias if bias is not None else x, y, s, seed_arg,
            M, N, K, r,
            *x.stride(), *weight.stride(), *A.stride(), *B.stride(), *y.stride(), *s.stride(),
            scale, p,
            FUSE_BASE=True, HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **common)
        return y, s
    _shrink(x, A, s, scale, p, seed_arg, **common)
    _gemm(x, weight, s, B, bias, y, p=0.0, seed=seed_arg, mask_seed=False)
    return y, s


def _shrink(x, A, s, scale, p, seed, **common) -> None:
    """S = scale · (keep ⊙ x) Aᵀ into s: the forward kernel without the base GEMM."""
    (M, K), r = x.shape, A.shape[0]
    cfg = config_for("shrink", M, rank_block(r), x.element_size())
    _fused_forward_kernel[(triton.cdiv(M, cfg.block_m), 1)](
        x, x, A, A, x, s, s, seed,
        M, 0, K, r,
        *x.stride(), 0, 0, *A.stride(), 0, 0, 0, 0, *s.stride(),
        scale, p,
        FUSE_BASE=False, HAS_BIAS=False, BLOCK_M=cfg.block_m, BLOCK_N=16,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)


def _gemm(x, w, s, t, bias, out, p, seed, mask_seed) -> None:
    """out = x wᵀ + keep ⊙ (s tᵀ) + bias (w and t may be transposed views: strides only)."""
    (M, K), N, r = x.shape, w.shape[0], s.shape[1]
    cfg = config_for("gemm", M, rank_block(r), x.element_size())
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _seeded_gemm_kernel[grid](
        x, w, s, t, bias if bias is not None else x, out, seed,
        M, N, K, r,
        *x.stride(), *w.stride(), *s.stride(), *t.stride(), *out.stride(),
        p,
        HAS_BIAS=bias is not None, MASK_SEED=mask_seed, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=seed_rank_block(rank_block(r)), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, s: torch.Tensor, scale: float, p: float = 0.0,
             seed: torch.Tensor | None = None, need_dx: bool = True,
             deterministic: bool | None = None,
             ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """dX, dA, dB of y = x W0ᵀ + S Bᵀ with S = scale · (keep ⊙ x) Aᵀ (see ``forward``).

    Args:
        dy: (M, N) in x's dtype, any strides. s: the (M, r) S saved by ``forward``.
        need_dx: skip step 3 (the big GEMM) when x needs no gradient.
        deterministic: dB without atomics; default: torch.are_deterministic_algorithms_enabled().
    Returns:
        dx (M, K) in x's dtype or None, dA (r, K) in A's dtype, dB (N, r) in B's dtype.
    """
    _check_backward_inputs(dy, x, weight, A, B, s, seed)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if x.shape[0] == 0:
        dx = torch.zeros_like(x) if need_dx else None
        return dx, torch.zeros_like(A), torch.zeros_like(B)
    seed_arg = seed if seed is not None else x
    du, db = _grad_s(dy, B, s, scale, deterministic)
    da = _grad_a(x, du, A, p, seed_arg)
    dx = None
    if need_dx:  # (3) dX = dY W0 + keep ⊙ (dU A): the forward GEMM on transposed views
        dx = _new_output(x.shape, x.dtype, x.device)
        _gemm(dy, weight.t(), du, A.t(), None, dx, p=p, seed=seed_arg, mask_seed=p > 0.0)
    return dx, da, db


def _check_backward_inputs(dy, x, weight, A, B, s, seed) -> None:
    _check_forward_inputs(x, weight, None, A, B, seed)
    check_device(x=x, dy=dy, s=s)
    (M, _), N, r = x.shape, weight.shape[0], A.shape[0]
    if tuple(dy.shape) != (M, N) or dy.dtype != x.dtype:
        raise ValueError(f"dy must be ({M}, {N}) {x.dtype}, got {tuple(dy.shape)} {dy.dtype}")
    if tuple(s.shape) != (M, r) or s.dtype != x.dtype:
        raise ValueError(f"s must be ({M}, {r}) {x.dtype}, got {tuple(s.shape)} {s.dtype}")


def _grad_s(dy, B, s, scale, deterministic) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward step 1: dU = scale · dY B (M, r) in dY's dtype, and dB = dYᵀ S (N, r) in B's."""
    (M, N), r = dy.shape, B.shape[1]
    cfg = config_for("grad_s", M, rank_block(r), dy.element_size())
    grid_m = triton.cdiv(M, cfg.block_m)
    du = _new_output((M, r), dy.dtype, dy.device)
    if deterministic:  # one fp32 partial per M block, summed below in a fixed order
        db32 = _new_output((grid_m, N, r), torch.float32, dy.device)
    else:  # fp32 atomics into one zeroed (N, r)
        db32 = torch.zeros((N, r), dtype=torch.float32, device=dy.device)
    _grad_s_kernel[(grid_m,)](
        dy, B, s, du, db32,
        M, N, r,
        *dy.stride(), *B.stride(), *s.stride(), *du.stride(),
        db32.stride(0) if deterministic else 0, db32.stride(-2), db32.stride(-1),
        scale,
        ATOMIC=not deterministic, DOT_PRECISION=dot_precision(dy.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=rank_block(r),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return du, (db32.sum(0) if deterministic else db32).to(B.dtype)


def _grad_a(x, du, A, p, seed) -> torch.Tensor:
    """Backward step 2: dA = dUᵀ (keep ⊙ x) (r, K) in A's dtype, from fp32 partials over row
    splits: enough programs for about two waves on the device's SMs, summed afterwards."""
    (M, K), r = x.shape, A.shape[0]
    cfg = config_for("grad_a", M, rank_block(r), x.element_size())
    grid_k = triton.cdiv(K, cfg.block_k)
    blocks_m = triton.cdiv(M, cfg.block_m)
    splits = max(1, min(blocks_m, 2 * sm_count(x.device) // grid_k))
    rows_per_split = triton.cdiv(blocks_m, splits) * cfg.block_m
    splits = triton.cdiv(M, rows_per_split)
    da32 = _new_output((splits, r, K), torch.float32, x.device)
    _grad_a_kernel[(grid_k, splits)](
        x, du, da32, seed,
        M, K, r, rows_per_split,
        *x.stride(), *du.stride(), *da32.stride(),
        p,
        DROPOUT=p > 0.0, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=rank_block(r),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return da32.sum(0).to(A.dtype)


def dropout_keep_mask(seed: torch.Tensor, m: int, k: int, p: float) -> torch.Tensor:
    """The (m, k) boolean keep-mask the kernels use for this seed (for tests and debugging)."""
    keep = _new_output((m, k), torch.int8, seed.device)
    grid = (triton.cdiv(m, 16), triton.cdiv(k, 32))
    _keep_mask_kernel[grid](keep, seed, m, k, *keep.stride(), p, BLOCK_M=16, BLOCK_K=32)
    return keep.bool()
