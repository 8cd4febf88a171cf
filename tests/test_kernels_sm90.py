"""Every kernel configuration the H100 would run compiles for sm_90, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) on the CPU. For each kernel, compute dtype,
padded rank and M bucket we check that it compiles, that the shared memory it needs fits an H100
block (227 KB of dynamic shared memory), and that the tensor-core kernels use Hopper's ``wgmma``.

The compile runs in a spawned child with TRITON_INTERPRET unset: triton fixes interpreted or
compiled when a kernel is defined, and the interpreter tests may run in the same pytest worker.
The signature mimics what ``JITFunction.run`` would specialize for contiguous inputs with
16-aligned sizes: unit strides become the constant 1, pointers and other strides are marked
divisible by 16.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

H100_MAX_SHARED = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on the H100
# bf16 with dropout (the superset of the code) compiles every padded rank; fp16 has the same
# tiles as bf16 and fp32 has its own (FMA dots, slow to compile), the K tile being the only
# thing the rank changes in them: one rank each checks their codegen, to keep CI near 2 minutes.
ALL_RANK_BLOCKS = (16, 32, 64, 128, 256)

# Per kernel variant: the kernel, its pointer dtypes ("c" = compute dtype), the strides that are 1
# for contiguous inputs, and the flags compiled (sizes other than M are taken as 16-aligned).
# "gemm_fwd" is x W0ᵀ + S Bᵀ; "gemm_dx" is dY W0 + keep ⊙ (dU A) on transposed views of W0 and A.
VARIANTS = {
    "fused": dict(
        kernel="_fused_forward_kernel",
        ptrs=dict(x_ptr="c", w_ptr="c", a_ptr="fp32", b_ptr="fp32", bias_ptr="c", y_ptr="c",
                  s_ptr="c", seed_ptr="i64"),
        unit=("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_sr"),
        flags=dict(FUSE_BASE=True, HAS_BIAS=True)),
    "shrink": dict(
        kernel="_fused_forward_kernel",
        ptrs=dict(x_ptr="c", w_ptr="c", a_ptr="fp32", b_ptr="fp32", bias_ptr="c", y_ptr="c",
                  s_ptr="c", seed_ptr="i64"),
        unit=("stride_xk", "stride_ak", "stride_sr"),
        flags=dict(FUSE_BASE=False, HAS_BIAS=False)),
    "gemm_fwd": dict(
        kernel="_seeded_gemm_kernel",
        ptrs=dict(x_ptr="c", w_ptr="c", s_ptr="c", t_ptr="fp32", bias_ptr="c", out_ptr="c",
                  seed_ptr="i64"),
        unit=("stride_xk", "stride_wk", "stride_sr", "stride_tr", "stride_on"),
        flags=dict(HAS_BIAS=True, MASK_SEED=False)),
    "gemm_dx": dict(
        kernel="_seeded_gemm_kernel",
        ptrs=dict(x_ptr="c", w_ptr="c", s_ptr="c", t_ptr="fp32", bias_ptr="c", out_ptr="c",
                  seed_ptr="i64"),
        unit=("stride_xk", "stride_wn", "stride_sr", "stride_tn", "stride_on"),
        flags=dict(HAS_BIAS=False, MASK_SEED=True)),
    "grad_s": dict(
        kernel="_grad_s_kernel",
        ptrs=dict(dy_ptr="c", b_ptr="fp32", s_ptr="c", du_ptr="c", db_ptr="fp32"),
        unit=("stride_dyn", "stride_br", "stride_sr", "stride_dur", "stride_dbr"),
        flags=dict(ATOMIC=True)),
    "grad_s_deterministic": dict(
        kernel="_grad_s_kernel",
        ptrs=dict(dy_ptr="c", b_ptr="fp32", s_ptr="c", du_ptr="c", db_ptr="fp32"),
        unit=("stride_dyn", "stride_br", "stride_sr", "stride_dur", "stride_dbr"),
        flags=dict(ATOMIC=False)),
    "grad_a": dict(
        kernel="_grad_a_kernel",
        ptrs=dict(x_ptr="c", du_ptr="c", da_ptr="fp32", seed_ptr="i64"),
        unit=("stride_xk", "stride_dur", "stride_dak"),
        flags=dict()),
}
# Which config_for() kernel each variant launches with, and for which M it is used.
CONFIG_KERNEL = {"fused": "fused", "shrink": "shrink", "gemm_fwd": "gemm", "gemm_dx": "gemm",
                 "grad_s": "grad_s", "grad_s_deterministic": "grad_s", "grad_a": "grad_a"}
HAS_DROPOUT = ("fused", "shrink", "gemm_dx", "grad_a")


def _used_ms(variant, lm):
    if variant == "fused":
        return [m for m in lm.CONFIG_MS if m <= lm.FUSED_MAX_M]
    if variant in ("shrink", "gemm_fwd"):  # the split forward path
        return [m for m in lm.CONFIG_MS if m > lm.FUSED_MAX_M]
    return list(lm.CONFIG_MS)



def _signature(fn, spec: dict, constexprs: dict, dtype: str, unaligned: tuple[str, ...]) -> tuple[dict, dict]:
    """A jit kernel's compile signature as the launcher would bind it: constexprs (unset unit ones
    as 1), pointers to ``dtype`` (kind "c") or their own type, fp32 scalars ``scale`` / ``p``, i32
    sizes and strides, all 16-divisible but ``unaligned``. Fills ``constexprs`` in place."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in spec["unit"]:
            signature[name] = "constexpr"
            constexprs.setdefault(name, 1)
        elif name in spec["ptrs"]:
            kind = spec["ptrs"][name]
            signature[name] = "*" + (dtype if kind == "c" else kind)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("scale", "p"):
            signature[name] = "fp32"
        else:  # sizes and strides
            signature[name] = "i32"
            if name not in unaligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs

def compile_variant(variant: str, dtype: str, dropout: bool) -> list[dict]:
    """Compile one kernel variant for every (M bucket, padded rank); one result dict each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minilora.kernels import lora_matmul as lm

    assert not lm.INTERPRET
    spec = VARIANTS[variant]
    fn = getattr(lm, spec["kernel"])
    target = GPUTarget("cuda", 90, 32)
    results, seen = [], set()
    for m in _used_ms(variant, lm):
        full = dtype == "bf16" and (dropout or variant not in HAS_DROPOUT)
        for block_r in ALL_RANK_BLOCKS if full else (16,):
            cfg = lm.config_for(CONFIG_KERNEL[variant], m, block_r, 4 if dtype == "fp32" else 2)
            key = (cfg, block_r)
            if key in seen:
                continue
            seen.add(key)
            constexprs = dict(spec["flags"], DOT_PRECISION="ieee")  # as dot_precision (no TF32)
            if "DROPOUT" in fn.arg_names:
                constexprs["DROPOUT"] = dropout
            if variant == "gemm_dx":
                constexprs["MASK_SEED"] = dropout
            tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n or 16, BLOCK_K=cfg.block_k,
                         BLOCK_R=block_r, GROUP_M=cfg.group_m)
            if spec["kernel"] == "_seeded_gemm_kernel":
                tiles["BLOCK_R"] = lm.seed_rank_block(block_r)
            constexprs.update({k: v for k, v in tiles.items() if k in fn.arg_names})
            signature, attrs = _signature(fn, spec, constexprs, dtype, unaligned=("M",))
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=target, options=dict(
                num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            ptx = compiled.asm["ptx"]
            results.append(dict(variant=variant, dtype=dtype, m=m, block_r=block_r,
                                config=cfg, shared=compiled.metadata.shared,
                                wgmma="wgmma" in ptx, cubin=bool(compiled.asm.get("cubin"))))
    return results


def _compiler_init():
    os.environ.pop("TRITON_INTERPRET", None)


def _run_in_child(fn, *args):
    import traceback

    try:
        return fn(*args)
    except BaseException:
        raise AssertionError(traceback.format_exc()) from None


@pytest.fixture(scope="module")
def compiler():
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:  # fail, not skip: a silent skip would stop proving the H100 build
        raise AssertionError(f"triton {triton.__version__} has no ASTSource/GPUTarget compile API; "
                             "update this test to the new ahead-of-time compile entry point") from err
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_compiler_init) as pool:
        yield lambda *args: pool.submit(_run_in_child, *args).result(timeout=900)


# wgmma needs a warpgroup-sized tile (BLOCK_M >= 64 rows per dot) and 16-bit inputs here
# (fp32 runs IEEE dots, which are FMA loops on every GPU).
def _expects_wgmma(result) -> bool:
    if result["dtype"] == "fp32":
        return False
    if result["variant"] in ("gemm_fwd", "gemm_dx", "grad_s", "grad_s_deterministic"):
        return True
    if result["variant"] == "grad_a":  # computes dAᵀ: BLOCK_K is the MMA's M dimension
        return result["config"].block_k >= 64
    return result["config"].block_m >= 64


# Kernels with dropout compile with it (the superset of their code) in every dtype, and without
# it in bf16; the others in every dtype.
CASES = ([(v, dt, True) for v in HAS_DROPOUT for dt in ("bf16", "fp16", "fp32")]
         + [(v, "bf16", False) for v in ("fused",)]
         + [(v, dt, False) for v in VARIANTS if v not in HAS_DROPOUT
            for dt in ("bf16", "fp16", "fp32")])


@pytest.mark.parametrize("variant,dtype,dropout", CASES,
                         ids=[f"{v}-{dt}-{'drop' if d else 'nodrop'}" for v, dt, d in CASES])
def test_compiles_for_h100(compiler, variant, dtype, dropout):
    results = compiler(compile_variant, variant, dtype, dropout)
    assert results
    for res in results:
        where = f"{variant} {dtype} M={res['m']} BLOCK_R={res['block_r']} {res['config']}"
        assert res["cubin"], f"no cubin for {where}"
        assert res["shared"] <= H100_MAX_SHARED, f"{res['shared']} B of shared memory: {where}"
        if _expects_wgmma(res):
            assert res["wgmma"], f"no wgmma in the PTX of {where}"


def _check_cpu_tensors_rejected():
    import torch

    from minilora.kernels import lora_matmul as lm

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        lm.forward(x, w, None, A, B, 1.0)


def test_compiled_mode_rejects_cpu_tensors(compiler):
    compiler(_check_cpu_tensors_rejected)


# ------------------------------------------------------------------ mixed batches (multi_lora.py)
# Pointer dtypes ("c" = compute dtype; the stack's factors and scalings are fp32 over a bf16/fp16
# model) and the strides that are 1 for the contiguous tensors ops.multi_lora_add passes.
MULTI_VARIANTS = {
    "multi_shrink": dict(kernel="_shrink_kernel",
                         ptrs=dict(x_ptr="c", a_ptr="fp32", scale_ptr="fp32", s_ptr="c", rows_ptr="i32",
                                   seg_slot_ptr="i32", seg_start_ptr="i32"),
                         unit=("stride_xk", "stride_ak", "stride_sr")),
    "multi_expand": dict(kernel="_expand_kernel",
                         ptrs=dict(s_ptr="c", b_ptr="fp32", y_ptr="c", rows_ptr="i32", seg_slot_ptr="i32",
                                   seg_start_ptr="i32"),
                         unit=("stride_sr", "stride_br", "stride_yn")),
}
# Tokens per row and rank are not 16-aligned in general: no divisibility hint for them.
_UNALIGNED = ("T", "R")


def compile_multi_variant(variant: str, dtype: str) -> list[dict]:
    """Compile a multi_lora kernel for every token bucket and padded rank the GPU would launch
    (bf16: every padded rank; fp16 and fp32: rank 16, their tiles differ from bf16 only there)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minilora.kernels import multi_lora as ml

    assert not ml.INTERPRET
    spec = MULTI_VARIANTS[variant]
    fn = getattr(ml, spec["kernel"])
    results = []
    # decode (one token per row) specializes T to the constant 1: compiled on its own
    launches = [(m, block_r, decode) for m in ml.CONFIG_MS for decode in ((False, True) if m == 1 else (False,))
                for block_r in (ALL_RANK_BLOCKS if dtype == "bf16" else (16,))]
    for m, block_r, decode in launches:
        cfg = ml.tiles_for(variant.removeprefix("multi_"), m, block_r)
        constexprs = dict(DOT_PRECISION="ieee", BLOCK_M=cfg.block_m, BLOCK_R=block_r)
        if decode:
            constexprs["T"] = 1
        constexprs["BLOCK_K" if variant == "multi_shrink" else "BLOCK_N"] = cfg.block_kn
        signature, attrs = _signature(fn, spec, constexprs, dtype, unaligned=_UNALIGNED)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        ptx = compiled.asm["ptx"]
        results.append(dict(m=m, decode=decode, block_r=block_r, config=cfg, shared=compiled.metadata.shared,
                            wgmma="wgmma" in ptx, cubin=bool(compiled.asm.get("cubin"))))
    return results


MULTI_CASES = [(v, dt) for v in MULTI_VARIANTS for dt in ("bf16", "fp16", "fp32")]


@pytest.mark.parametrize("variant,dtype", MULTI_CASES, ids=[f"{v}-{dt}" for v, dt in MULTI_CASES])
def test_multi_lora_compiles_for_h100(compiler, variant, dtype):
    results = compiler(compile_multi_variant, variant, dtype)
    assert results
    for res in results:
        where = f"{variant} {dtype} tokens={res['m']} BLOCK_R={res['block_r']} {res['config']}"
        assert res["cubin"], f"no cubin for {where}"
        assert res["shared"] <= H100_MAX_SHARED, f"{res['shared']} B of shared memory: {where}"
        # wgmma: 16-bit inputs and a warpgroup-sized token tile (the prefill bucket)
        if dtype != "fp32" and res["config"].block_m >= 64:
            assert res["wgmma"], f"no wgmma in the PTX of {where}"
