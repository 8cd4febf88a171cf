"""DoRA's row norms (``minilora.ops``: ``dora_norm``, ``dora_merge_norm``, ``row_blocks``) against
float64, with tolerances from rounding-error bounds, never from one machine's output.

Notation (Higham, Accuracy and Stability of Numerical Algorithms, ch. 2-3): u is the unit roundoff
of the dtype the norm is computed in (``merge_dtype``: fp32 for fp16/bf16/fp32 weights, fp64 for
fp64 ones), γ_n = n·u/(1-n·u). A dot product of n terms, summed in any order (blocked GEMM,
pairwise, FMA or not), is within γ_n·Σ|x_j||y_j| of the exact one; a sum of n nonnegative terms
(squares) within γ_n relative. For output row i, with K = in and r the rank:

    N_i = ‖W_i + s·B_i A‖                      the true norm
    c = dora_dot_chunk(K)                      the columns of one chunk of W Aᵀ (256 up to K = 8192)
    m = K + ⌈K/c⌉ + r + 6
    S_i² = ‖W_i‖² + κ·2|s|·‖W_i‖·β_i + ρ·s²·|B_i|(|A||A|ᵀ)|B_i|ᵀ, β_i = Σ_k |B_ik|·‖A_k‖,
           κ = (c + ⌈K/c⌉ + r + 4)/m, ρ = (u'/u)·(K+2r+5)/m, u' = float64's u (ρ = (K+2r+5)/m
           for fp64 weights)               the identity's rounding scale (dora_norm's `scale`)
    m_i = ‖ |W_i| + |s|·|B_i| |A| ‖            the direct computation's rounding scale

Identity rows (not recomputed). ‖W_i‖² and the chunks of W Aᵀ are sums in fp32, the chunks added
in float64, and the rest is float64 (u' <= u, so every float64 rounding is counted below as one of
u; γ_a <= (a/m)·γ_m for a <= m). ‖W_i‖² (squares and sums, in blocks added in float64, the last
addition): γ_{K+2}·‖W_i‖². A W_iᵀ: γ_c·‖A_k‖‖W_i‖ per entry within a chunk (Cauchy–Schwarz),
⌈K/c⌉ chunk sums, the r-term sum with B_i, fl(2s), the product and the two additions: within
2|s|·γ_{c+⌈K/c⌉+r+4}·‖W_i‖β_i <= γ_m·κ·2|s|·‖W_i‖β_i. The Gram term, from fp32 values exact in
float64 (Gram matrix γ'_K, B_i·G γ'_r, ·B_i γ'_r, fl(s²), the product, the last addition):
γ'_{K+2r+5}·s²·|B_i|(|A||A|ᵀ)|B_i|ᵀ <= γ_m·ρ·s²·|B_i|(|A||A|ᵀ)|B_i|ᵀ. So |norm2 - N²| <= γ_m·S²
(sqrt of the float64 norm² and its cast to fp32: below). The computed
scale is >= S²·(1-γ_s), γ_s = γ_{2K+2r+9} (generous: ‖A_k‖ within γ_{K+1}, r-term GEMV, fl(|s|),
product, ‖W_i‖ from its square, the sum). A row is kept only if norm2·T >= scale with
T = DORA_FALLBACK·(K+2r+5)/m (the error bound γ_m·S² at most DORA_FALLBACK·γ_{K+2r+5}·norm², up to
the γ's denominators and the rounding of T itself: (1-u) below), so N² >= S²·((1-γ_s)(1-u)/T - γ_m),
and |norm2 - N²| <= ρ₂·N² with ρ₂ = γ_m/((1-γ_s)(1-u)/T - γ_m) ≈ DORA_FALLBACK·γ_{K+2r+5}; the
final sqrt halves that (|√x̂ - √x| = |x̂-x|/(√x̂+√x)) and the cast to fp32 adds one rounding:
    |N̂ - N| <= N·(ρ₂/(1+√(1-ρ₂)) + u·√(1+ρ₂)).
Recomputed rows are formed in float64 (``WIDE``; W, A, B are exact there):
fl(W + s·fl(B_i A)) is off by γ'_{r+2}·m_ij per entry (γ' with u' = 2⁻⁵³; s is exact), so its norm
by γ'_{r+2}·m_i; the sum of squares, sqrt and square add γ'_{K+3} relative on the norm, the cast of
norm² to fp32 and the final sqrt γ_2:
    |N̂ - N| <= γ'_{r+2}·m_i + (γ'_{K+3} + γ_2)·(N + γ'_{r+2}·m_i)   ≈ 1.5·u·N even where N ≪ m_i.
The test does not know which branch a row took, so it allows the larger of the two (both are tight:
see test_bound_catches_mutations), plus the float64 reference's own error (the direct bound with
u = 2⁻⁵³, s exact: γ_{r+2}, γ_{K+1}), which matters only for fp64 weights.

fp16/bf16 weights are exact in fp32 and the factors are fp32, so the same fp32 bound holds against
the float64 norm of the fp16/bf16 values.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora.ops as ops
from minilora.ops import dora_merge_norm, dora_norm, merge_dtype, row_blocks

U = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
U64 = U[torch.float64]
#: the dtype dora_norm recomputes cancelling rows in, on CPU and CUDA
WIDE = torch.float64

common = settings(max_examples=60, deadline=None, derandomize=True)

#: (weight dtype, factor dtype)
KINDS = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.float32),
         "fp16": (torch.float16, torch.float32), "fp64": (torch.float64, torch.float64),
         "bf16-factors": (torch.bfloat16, torch.bfloat16)}


def gamma(n: int, u: float) -> float:
    assert n * u < 1
    return n * u / (1 - n * u)


def rows_of(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.T if transposed else weight


def keep_ratio(K: int, r: int, fallback: float | None = None) -> tuple[float, int]:
    """(T, m): a row keeps the identity where norm2·T >= scale; γ_m·S² bounds its error."""
    m = K + -(-K // ops.dora_dot_chunk(K)) + r + 6
    return (ops.DORA_FALLBACK if fallback is None else fallback) * (K + 2 * r + 5) / m, m


def dora_bound(weight, A, B, s, transposed, fallback=None):
    """(float64 reference ‖W_i + s·B_i A‖, per-row tolerance): the module docstring's bound."""
    rows = rows_of(weight, transposed).double()
    Ad, Bd = A.double(), B.double()
    K, r = rows.shape[1], Ad.shape[0]
    u = U[merge_dtype(weight.dtype)]
    ref = torch.linalg.vector_norm(rows + s * (Bd @ Ad), dim=1)
    m = torch.linalg.vector_norm(rows.abs() + abs(s) * (Bd.abs() @ Ad.abs()), dim=1)
    # the reference's own error, and an upper bound on the true norm
    g_rk, g_ref = gamma(r + 2, U64), gamma(K + 1, U64)
    N = ref / (1 - g_ref) + g_rk * m
    tol_ref = g_ref * (N + g_rk * m) + g_rk * m
    # identity rows
    T, m = keep_ratio(K, r, fallback)
    gm, gs = gamma(m, u), gamma(2 * K + 2 * r + 9, u)
    rho = gm / ((1 - gs) * (1 - u) / T - gm)
    assert 0 < rho < 1
    tol_identity = N * (rho / (1 + math.sqrt(1 - rho)) + u * math.sqrt(1 + rho))
    # recomputed rows
    uw = U[WIDE]
    g_d = gamma(r + 2, uw)
    tol_direct = g_d * m + (gamma(K + 3, uw) + gamma(2, u)) * (N + g_d * m)
    return ref, torch.maximum(tol_identity, tol_direct) + tol_ref


def ratio(got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """|got - ref| / tol per row (inf where got is NaN); <= 1 passes."""
    err = (got.double() - ref).abs().nan_to_num(math.inf)
    return err / tol.clamp_min(1e-300)


def assert_within(got, ref, tol, what=""):
    q = ratio(got, ref, tol)
    worst = int(q.argmax()) if q.numel() else 0
    assert bool((q <= 1).all()), (f"{what}: row {worst} off by {q[worst]:.3g}× the bound "
                                  f"(got {got[worst].item()!r}, ref {ref[worst].item()!r})")


def raw_identity(weight, A, B, s, transposed, cross=2.0, s_power=2):
    """norm² from the identity alone (no fallback), computed as dora_norm does (‖W_i‖² and chunks
    of W Aᵀ in fp32, float64 after); ``cross`` and ``s_power`` build the mutants the bound must
    reject."""
    dt = merge_dtype(weight.dtype)
    rows, A, B = rows_of(weight, transposed), A.to(dt), B.to(dt)
    K = rows.shape[1]
    c = ops.dora_dot_chunk(K)
    WA = sum((rows[:, j:j + c].to(dt) @ A[:, j:j + c].T).double() for j in range(0, K, c))
    w2 = torch.linalg.vector_norm(rows.to(dt), dim=1).double().square()
    Ad, Bd = A.double(), B.double()
    return w2 + (cross * s) * (Bd * WA).sum(1) + (s**s_power) * ((Bd @ (Ad @ Ad.T)) * Bd).sum(1)


def scale_of(weight, A, B, s, transposed):
    """S_i² in float64."""
    rows, Ad, Bd = rows_of(weight, transposed).double(), A.double(), B.double()
    K, r = rows.shape[1], Ad.shape[0]
    c, m = ops.dora_dot_chunk(K), keep_ratio(K, r)[1]
    kappa, rho = (c + -(-K // c) + r + 4) / m, U64 / U[merge_dtype(weight.dtype)] * (K + 2 * r + 5) / m
    w = rows.norm(dim=1)
    return w.square() + kappa * 2 * abs(s) * w * (Bd.abs() @ Ad.norm(dim=1)) \
        + rho * s * s * ((Bd.abs() @ (Ad.abs() @ Ad.abs().T)) * Bd.abs()).sum(1)


def make_case(out, n_in, r, s, wdtype, fdtype, transposed, size=1.0, eps=None, seed=0):
    """Random W (rows of norm ≈ 1), A (rows of norm ≈ 1) and B with ‖s·B_i A‖ ≈ ``size``.
    ``eps`` (out,) float64: rows where it is finite get W_i = -s·B_i A + eps_i·‖s·B_i A‖·(unit
    noise), so that W_i and s·(BA)_i cancel to a relative eps_i (0: up to W's rounding)."""
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(r, n_in, generator=g, dtype=torch.float64) / math.sqrt(max(n_in, 1))).to(fdtype)
    B = (torch.randn(out, r, generator=g, dtype=torch.float64) * (size / (abs(s) * math.sqrt(r)))).to(fdtype)
    W = torch.randn(out, n_in, generator=g, dtype=torch.float64) / math.sqrt(max(n_in, 1))
    if eps is not None:
        delta = s * (B.double() @ A.double())
        noise = torch.randn(out, n_in, generator=g, dtype=torch.float64)
        noise /= noise.norm(dim=1, keepdim=True).clamp_min(1e-300)
        sel = eps.isfinite()
        W[sel] = -delta[sel] + (eps[sel, None] * delta[sel].norm(dim=1, keepdim=True)) * noise[sel]
    W = W.to(wdtype)
    return (W.T.contiguous() if transposed else W), A, B


# ---------------------------------------------------------------- 1. dora_norm vs float64
@common
@given(out=st.integers(1, 300), n_in=st.integers(1, 300), r=st.integers(1, 64),
       alpha=st.sampled_from([1, 8, 16, 32, 3.5]), rslora=st.booleans(), negative=st.booleans(),
       kind=st.sampled_from(sorted(KINDS)), transposed=st.booleans(),
       size=st.sampled_from([0.01, 0.3, 1.0, 5.0]), cancel=st.booleans(), seed=st.integers(0, 2**16))
def test_dora_norm_matches_float64(out, n_in, r, alpha, rslora, negative, kind, transposed, size,
                                   cancel, seed):
    """Random rows, and (``cancel``) about a quarter of rows that cancel to a relative 10^-U(0,7),
    so both branches run. A negative scaling is the same formula (|s| in the scale)."""
    s = (alpha / math.sqrt(r) if rslora else alpha / r) * (-1 if negative else 1)
    wdtype, fdtype = KINDS[kind]
    eps = None
    if cancel:
        g = torch.Generator().manual_seed(seed + 1)
        eps = 10.0 ** -(7 * torch.rand(out, generator=g, dtype=torch.float64))
        eps[torch.rand(out, generator=g) < 0.75] = math.nan
    weight, A, B = make_case(out, n_in, r, s, wdtype, fdtype, transposed, size, eps, seed)
    got = dora_norm(weight, A, B, s, transposed=transposed)
    assert got.dtype == merge_dtype(wdtype) and got.shape == (out,)
    ref, tol = dora_bound(weight, A, B, s, transposed)
    assert_within(got, ref, tol, kind)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("s", [2.0, 16 / math.sqrt(8), 0.25])
def test_bound_catches_mutations(s, transposed, monkeypatch):
    """The tolerance is tight enough to catch a factor 1 (not 2) on the cross term, s (not s²) on
    the quadratic term, and a dropped fallback; the unmutated identity passes on the rows the
    identity is kept for."""
    out, n_in, r = 96, 128, 8
    eps = torch.full((out,), math.nan, dtype=torch.float64)
    eps[::3] = 10.0 ** -torch.arange(out // 3, dtype=torch.float64).remainder(7)  # 1 .. 1e-6
    # ‖s·B_i A‖ = 0.1·‖W_i‖: with a larger delta most random rows have S² > T·N² and are recomputed
    weight, A, B = make_case(out, n_in, r, s, torch.float32, torch.float32, transposed, 0.1, eps, seed=7)
    ref, tol = dora_bound(weight, A, B, s, transposed)
    assert_within(dora_norm(weight, A, B, s, transposed=transposed), ref, tol, "dora_norm")

    kept = ~eps.isfinite() & (scale_of(weight, A, B, s, transposed) * 1.01 < keep_ratio(n_in, r)[0] * ref**2)
    assert kept.sum() > out // 3
    mirror = raw_identity(weight, A, B, s, transposed).clamp_min(0).sqrt()
    assert_within(mirror[kept], ref[kept], tol[kept], "identity mirror")
    for mutant in (dict(cross=1.0), dict(s_power=1)):
        q = ratio(raw_identity(weight, A, B, s, transposed, **mutant).clamp_min(0).sqrt(), ref, tol)
        assert q[kept].max() > 10, mutant

    monkeypatch.setattr(ops, "DORA_FALLBACK", math.inf)  # only negative norm² rows are recomputed
    q = ratio(dora_norm(weight, A, B, s, transposed=transposed), ref, tol)
    assert q.max() > 10


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
@pytest.mark.parametrize("size", [0.1, 1.15, 4.0])
def test_large_adapters_keep_the_identity(kind, size, monkeypatch):
    """in = 2048 (8 fp32 chunks of 256), r = 16: for rows that do not cancel, whatever the size of
    ‖s·B_i A‖ against ‖W_i‖ (0.1: trained; 1.15: random factors as in benchmarks/bench_dora.py), the
    identity's bound stays under its threshold, so no row is recomputed (a full fallback would
    double the forward's cost), and every norm is within the bound. With a single fp32 sum over
    2048 columns and the Gram term in fp32 (the bound's scale without chunks), most rows of the
    two larger adapters would be recomputed."""
    wdtype, fdtype = KINDS[kind]
    out, n_in, r, s = 256, 2048, 16, 2.0
    weight, A, B = make_case(out, n_in, r, s, wdtype, fdtype, False, size, seed=5)
    recomputed = []
    direct = ops._direct_norm2
    monkeypatch.setattr(ops, "_direct_norm2", lambda rows, *args: recomputed.append(len(rows)) or direct(rows, *args))
    got = dora_norm(weight, A, B, s)
    ref, tol = dora_bound(weight, A, B, s, False)
    assert_within(got, ref, tol, kind)
    assert sum(recomputed) == 0
    # the single-sum bound (scale with the Gram term at full weight, threshold DORA_FALLBACK)
    rows, Ad, Bd = weight.double(), A.double(), B.double()
    w = rows.norm(dim=1)
    single = w.square() + 2 * s * w * (Bd.abs() @ Ad.norm(dim=1)) \
        + s * s * ((Bd.abs() @ (Ad.abs() @ Ad.abs().T)) * Bd.abs()).sum(1)
    flagged = (single > ops.DORA_FALLBACK * ref**2).float().mean().item()
    assert flagged > 0.5 if size > 1 else flagged < 0.01, flagged


# ---------------------------------------------------------------- 2. cancellation
EPS_LEVELS = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 0.0]


def dyadic_case(out_per_level, n_in, r, s, wdtype, transposed, seed):
    """W = -s·B0 A0 exactly (small dyadics: exact in bf16), B = B0 + eps_i·noise in fp32: row i
    cancels to a relative eps_i (exactly 0 where eps_i = 0)."""
    assert math.log2(abs(s)).is_integer()
    g = torch.Generator().manual_seed(seed)
    out = out_per_level * len(EPS_LEVELS)
    A0 = torch.randint(-3, 4, (r, n_in), generator=g).double() / 4
    B0 = torch.randint(-3, 4, (out, r), generator=g).double() / 4
    B0[B0.abs().sum(1) == 0, 0] = 0.5
    W = -s * (B0 @ A0)  # |entries| <= r·9/16·|s|, a multiple of |s|/16: exact in 8 bits for r <= 8
    assert r <= 8 and torch.equal(W.to(wdtype).double(), W)
    eps = torch.tensor(EPS_LEVELS, dtype=torch.float64).repeat_interleave(out_per_level)
    noise = torch.randn(out, r, generator=g, dtype=torch.float64)
    B = (B0 + eps[:, None] * B0.norm(dim=1, keepdim=True) * noise / noise.norm(dim=1, keepdim=True)).float()
    W = W.to(wdtype)
    return (W.T.contiguous() if transposed else W), A0.float(), B, eps


def dense_case(out_per_level, n_in, r, s, wdtype, transposed, seed):
    """Gaussian factors, W = fl(-s·B A + eps_i·‖s·B_i A‖·noise)."""
    eps = torch.tensor(EPS_LEVELS, dtype=torch.float64).repeat_interleave(out_per_level)
    weight, A, B = make_case(len(eps), n_in, r, s, wdtype, torch.float32, transposed, 1.0, eps, seed)
    return weight, A, B, eps


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("case,wdtype", [(dense_case, torch.float32), (dyadic_case, torch.float32),
                                         (dyadic_case, torch.bfloat16)],
                         ids=["dense-fp32", "dyadic-fp32", "dyadic-bf16"])
@pytest.mark.parametrize("s,r", [(2.0, 8), (-2.0, 8), (-0.5, 1)])
def test_cancellation(case, wdtype, transposed, s, r, monkeypatch):
    """Rows where W_i ≈ -s·(BA)_i: dora_norm stays within the direct computation's bound relative
    to the true norm (with the float64 recomputation, ≈ 1.5·u·N however deep the cancellation),
    while the identity alone (computed here as dora_norm computes it) is far off on them, some of
    its norm² even negative; with the fallback dropped, dora_norm fails too."""
    weight, A, B, eps = case(24, 96, r, s, wdtype, transposed, seed=3)
    got = dora_norm(weight, A, B, s, transposed=transposed)
    assert got.isfinite().all() and (got >= 0).all()
    ref, tol = dora_bound(weight, A, B, s, transposed)
    assert_within(got, ref, tol, "cancelling rows")

    raw = raw_identity(weight, A, B, s, transposed)
    small = (eps > 0) & (eps <= 1e-4)  # the identity's error ~u·S²/N² relative: ≳ 1e-1 here
    assert (raw[small] < 0).any(), "sanity: the identity gives a negative norm² on some rows"
    raw_q = ratio(raw.clamp_min(0).sqrt(), ref, tol)
    assert raw_q[small].median() > 10, "sanity: without the fallback the identity would be far off"
    tiny = (eps > 0) & (eps <= 1e-5)
    raw_rel = (raw.clamp_min(0).sqrt().double() - ref).abs() / ref
    assert raw_rel[tiny].median() >= 1  # 0 for a negative norm², or worse

    monkeypatch.setattr(ops, "DORA_FALLBACK", math.inf)  # fallback only where norm² < 0
    dropped = dora_norm(weight, A, B, s, transposed=transposed)
    assert dropped.isfinite().all() and (dropped >= 0).all()  # the clamp: no NaN even so
    # Dyadic rows are exact in fp32 up to B's noise, so what the identity gets wrong there is mostly a
    # negative norm², which the clamp sends to the fallback even so: the rows left still break the
    # bound (measured 2.2x), dense rows by far more.
    assert ratio(dropped, ref, tol)[small].max() > (10 if case is dense_case else 1)


# ---------------------------------------------------------------- 3. exact zeros
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("s", [2.0, 0.5, -1.0, 4.0])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp16", "fp64"])
def test_exact_zero_rows(kind, s, transposed):
    """Rows with W_i = -s·b·A_k (one power-of-two entry b in B_i, every value representable) or
    with W_i = 0 and B_i = 0 have norm exactly 0, not NaN. Why exactly: the identity's norm² is
    within γ_m·S² of 0, under scale/T, so such a row is recomputed (W_i = 0 = B_i: scale is 0 and so
    is every term); B_i A is then exact (one nonzero product per entry, the rest ±0), so are its
    power-of-two scaling and the sum, which is 0."""
    wdtype, fdtype = KINDS[kind]
    out, n_in, r = 40, 64, 6
    g = torch.Generator().manual_seed(11)
    # A: 8 significant bits, exponents in fp16's normal range (exact in bf16 and fp16)
    A = torch.randn(r, n_in, generator=g, dtype=torch.float64).to(torch.bfloat16).double()
    A[A.abs() < 2.0**-10] = 0.375
    B = torch.randn(out, r, generator=g, dtype=torch.float64) / math.sqrt(r)
    W = torch.randn(out, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)
    zero = torch.zeros(out, dtype=torch.bool)
    for i in range(0, out, 3):  # W_i = -s·b·A_k
        k, b = i % r, 2.0 ** (i % 5 - 2)
        B[i] = 0
        B[i, k] = b
        W[i] = -s * b * A[k]
        zero[i] = True
    for i in range(1, out, 7):  # W_i = 0, B_i = 0
        W[i], B[i] = 0, 0
        zero[i] = True
    W[2] = 0  # and a zero W row with a non-zero B row: norm |s|·‖B_2 A‖
    weight, A, B = W.to(wdtype), A.to(fdtype), B.to(fdtype)
    assert torch.equal(weight.double()[zero], W[zero])
    weight = weight.T.contiguous() if transposed else weight
    got = dora_norm(weight, A, B, s, transposed=transposed)
    assert got.isfinite().all()
    assert (got[zero] == 0).all(), got[zero]
    ref, tol = dora_bound(weight, A, B, s, transposed)
    assert_within(got, ref, tol, kind)


def test_overflowing_cancelling_row_is_not_nan():
    # ‖W_i‖² overflows fp32 (‖W_i‖ > ~1.8e19): the identity gives inf - inf = NaN, which must
    # send the row to the float64 recomputation (exactly 0 here), not through.
    W = torch.full((1, 4), 1e20)
    A, B = torch.ones(1, 4), torch.full((1, 1), -1e20)  # W + B A = 0 exactly
    assert dora_norm(W, A, B, 1.0).tolist() == [0.0]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp64"])
def test_empty_dims(kind, transposed):
    wdtype, fdtype = KINDS[kind]
    for out, n_in in [(0, 5), (5, 0), (0, 0)]:
        weight = torch.ones(out, n_in, dtype=wdtype)
        weight = weight.T.contiguous() if transposed else weight
        A, B = torch.ones(3, n_in, dtype=fdtype), torch.ones(out, 3, dtype=fdtype)
        got = dora_norm(weight, A, B, 2.0, transposed=transposed)
        assert got.dtype == merge_dtype(wdtype) and torch.equal(got, torch.zeros(out, dtype=got.dtype))


# ---------------------------------------------------------------- 6. no gradient
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp64"])
def test_dora_norm_is_detached(kind, transposed):
    wdtype, fdtype = KINDS[kind]
    eps = torch.full((20,), math.nan, dtype=torch.float64)
    eps[::4] = 1e-6  # a fallback row too
    weight, A, B = make_case(20, 30, 4, 2.0, wdtype, fdtype, transposed, eps=eps, seed=5)
    for t in (weight, A, B):
        t.requires_grad_(True)
    with torch.enable_grad():
        got = dora_norm(weight, A, B, 2.0, transposed=transposed)
    assert not got.requires_grad and got.grad_fn is None
    assert weight.requires_grad and A.requires_grad and B.requires_grad  # inputs untouched


# ---------------------------------------------------------------- 4. dora_merge_norm, row_blocks
def merge_norm_bound(V: torch.Tensor, transposed: bool):
    """(float64 norm of each output, tolerance): each output is a sum of n squares (n = the
    row's other elements, or the rows when transposed), in any order and over any blocks: γ_n
    relative, and the sqrt: γ_{n+1} on the norm; plus the float64 reference's own γ_{n+1}."""
    Vd = V.double()
    ref = torch.linalg.vector_norm(Vd, dim=0) if transposed else torch.linalg.vector_norm(Vd.flatten(1), dim=1)
    n = V.shape[0] if transposed else math.prod(V.shape[1:])
    N = ref / (1 - gamma(n + 1, U64))
    return ref, (gamma(n + 1, U[V.dtype]) + gamma(n + 1, U64)) * N


@common
@given(rows=st.integers(0, 700), cols=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       transposed=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       block_elements=st.sampled_from([1, 5000, 1 << 20]), seed=st.integers(0, 2**16))
def test_dora_merge_norm(rows, cols, transposed, dtype, block_elements, seed):
    """Against float64 within the summation bound, on one block and on ``row_blocks`` (a smaller
    block budget: several blocks); the two within the sum of their bounds of each other; the same
    blocks twice give the same bits."""
    if transposed:
        cols = cols[:1]  # (in, out): Conv1D, fan_in_fan_out, Embedding
    g = torch.Generator().manual_seed(seed)
    shape = (rows, *cols)
    # magnitudes spread over 2^±20: the bound is relative, so it must not care
    V = (torch.randn(shape, generator=g, dtype=torch.float64)
         * 2.0 ** torch.randint(-20, 21, shape, generator=g)).to(dtype)
    ref, tol = merge_norm_bound(V, transposed)
    whole = dora_merge_norm([V], transposed)
    with mock.patch.object(ops, "_BLOCK_ELEMENTS", block_elements):
        slices = row_blocks(tuple(V.shape))
    blocks = [V[sl] for sl in slices]
    parted = dora_merge_norm(blocks, transposed)
    for got in (whole, parted):
        assert got.dtype == dtype and got.shape == ref.shape
        assert_within(got, ref, tol, f"{len(blocks)} blocks")
    assert ((whole.double() - parted.double()).abs() <= 2 * tol).all()
    assert torch.equal(dora_merge_norm((b for b in blocks), transposed), parted)  # any iterable
    assert torch.equal(dora_merge_norm(blocks, transposed), parted)


def test_dora_merge_norm_several_blocks_are_exercised():
    """The hypothesis test's partitions really have several blocks (with a budget of 1 element a
    block is the 256-row floor)."""
    with mock.patch.object(ops, "_BLOCK_ELEMENTS", 1):
        assert len(row_blocks((700, 3))) == 3


@settings(max_examples=200, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(0, 5000), min_size=1, max_size=4),
       block_elements=st.sampled_from([1, 1000, 65536, 1 << 20]), small=st.booleans())
def test_row_blocks(shape, block_elements, small):
    if small:
        shape = [shape[0]] + [min(d, 3) for d in shape[1:]]
    shape = tuple(shape)
    with mock.patch.object(ops, "_BLOCK_ELEMENTS", block_elements):
        blocks = row_blocks(shape)
    rows, per_row = shape[0], math.prod(shape[1:])
    assert blocks and all(isinstance(b, slice) and b.step is None for b in blocks)
    # every row exactly once, in order
    assert blocks[0].start == 0 and blocks[-1].stop == rows
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    covered = [i for b in blocks for i in range(rows)[b]]
    assert covered == list(range(rows))
    if rows == 0:
        assert blocks == [slice(0, 0)]
    else:
        assert all(b.stop > b.start for b in blocks)
    # the 256-row floor (all but the last), and about block_elements elements a block
    assert all(b.stop - b.start >= ops._MIN_BLOCK_ROWS for b in blocks[:-1])
    assert all((b.stop - b.start) * per_row <= max(block_elements, ops._MIN_BLOCK_ROWS * per_row)
               for b in blocks)


def test_row_blocks_1d_and_default_budget():
    assert row_blocks((0,)) == [slice(0, 0)]
    assert row_blocks((10,)) == [slice(0, 10)]
    n = (1 << 20) + 5
    assert row_blocks((n,)) == [slice(0, 1 << 20), slice(1 << 20, n)]
    assert row_blocks((1000, 4096)) == [slice(i, min(i + 256, 1000)) for i in range(0, 1000, 256)]
    assert row_blocks((300, 0)) == [slice(0, 300)]
