"""Correctness of the Triton fused LoRA linear: forward and every gradient against float64.

On the CPU the kernels run under the Triton interpreter. Triton decides interpreted-or-compiled
when a kernel is defined, so a process can hold only one kind: the interpreter cases run in one
spawned child process per pytest worker with TRITON_INTERPRET=1, and this process never imports
triton. bf16 is checked only on a GPU (the interpreter returns garbage for bf16). When CUDA is
present the same cases also run in-process on the GPU, bf16 included.

Outputs the kernels must write are allocated filled with NaN (``lora_matmul._new_output`` is
replaced), so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

MAIN_SHAPE = (40, 72)  # (K, N): not multiples of any block size
U32 = 2.0**-24  # float32 unit roundoff


def _bound(dtype: torch.dtype, chain: int) -> float:
    """Elementwise error bound of a kernel output, in units of its mag: the same float64 formula
    on absolute values (for a gradient, the backward of that formula with |dY|).

    Every rounding is off by at most u·(its value) <= u·mag, and a sum of n products is n float32
    roundings whatever the order (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3),
    so the bound holds for any blocking, on any CPU (the interpreter's numpy) or GPU. Each output
    meets at most four roundings to the compute dtype c (docs/kernels.md: A and B cast on load, S
    or dU stored in c, the result stored) and ``chain`` float32 ones. The LoRA branch is as large as
    the base term in these inputs, so a wrong scale, a missing term or a wrong dropout mask is an
    error of order mag (one mask element: mag / K), far above u·chain.
    """
    return 4 * torch.finfo(dtype).eps / 2 + chain * U32


# --------------------------------------------------------------------------------------------
# The cases: plain functions so they run in the interpreter child or in-process on a GPU.
# --------------------------------------------------------------------------------------------


def _poison_outputs():
    from minilora.kernels import lora_matmul

    def nan_output(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 7
        return torch.full(shape, fill, dtype=dtype, device=device)

    lora_matmul._new_output = nan_output
    return lora_matmul


def _used(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, bound: float) -> float:
    """max |out - ref| / (bound · mag): the fraction of the error bound used (<= 1 passes)."""
    assert out.shape == ref.shape == mag.shape, (tuple(out.shape), tuple(ref.shape), tuple(mag.shape))
    assert torch.isfinite(out).all(), "non-finite values: an element was not written"
    diff = (out.double() - ref).abs()
    if (diff[mag == 0] > 0).any():
        return float("inf")
    return (diff / (bound * mag).clamp_min(1e-300)).max().item() if diff.numel() else 0.0


def _inputs(M, K, N, r, dtype, adapter_dtype, bias, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    A = (torch.randn(r, K, generator=g) / K**0.5).to(device, adapter_dtype)
    B = (torch.randn(N, r, generator=g) / r**0.5).to(device, adapter_dtype)
    return x, w, b, A, B


def _reference(x, w, b, A, B, scaling, keep, p, absolute=False):
    """float64 forward and gradients of the same inputs (as rounded to their dtypes).
    absolute=True: the same formula on |inputs|, whose forward and backward (with |dY|) give the
    mag of each output for ``_bound``."""
    f = torch.abs if absolute else (lambda t: t)
    leaves = [f(t.detach().double()).requires_grad_() if t is not None else None
              for t in (x, b, A, B)]
    xd, bd, Ad, Bd = leaves
    y = xd @ f(w.double()).T + scaling / (1 - p) * ((xd * keep) @ Ad.T) @ Bd.T
    if bd is not None:
        y = y + bd
    return y, leaves


def check_forward_backward(M, K, N, r, dtype, adapter_dtype, bias, p, path, device="cpu",
                           x_layout="contiguous"):
    """Forward and dX, dA, dB, dbias of the fused kernels against float64."""
    from minilora.kernels import fused_lora_linear

    lora_matmul = _poison_outputs()
    scaling, seed = 1.7, 1234
    x, w, b, A, B = _inputs(M, K, N, r, dtype, adapter_dtype, bias, device)
    if x_layout == "strided":  # (M, K) view with column stride 2
        x = torch.repeat_interleave(x, 2, dim=1)[:, ::2]
        assert not x.is_contiguous()
    elif x_layout == "3d-transposed":  # (2, M, K) from a transposed buffer: reshape must copy
        x = torch.stack([x, x.flip(0)]).transpose(0, 1).contiguous().transpose(0, 1)
    x.requires_grad_()
    for t in (b, A, B):
        if t is not None:
            t.requires_grad_()

    y = fused_lora_linear(x, w, b, A, B, scaling, p, True, seed=seed, path=path)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], N)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    y.backward(dy)

    x2, dy2 = x.detach().reshape(-1, K), dy.reshape(-1, N)
    if p > 0:
        keep = lora_matmul.dropout_keep_mask(torch.tensor([seed], device=device), x2.shape[0], K, p)
        keep = keep.double()
    else:
        keep = torch.ones(x2.shape, dtype=torch.float64, device=device)
    ref, (xd, bd, Ad, Bd) = _reference(x2, w, b, A, B, scaling, keep, p)
    ref.backward(dy2.double())
    mag, (xm, bm, Am, Bm) = _reference(x2, w, b, A, B, scaling, keep, p, absolute=True)
    mag.backward(dy2.double().abs())

    rows = x2.shape[0]
    errors = {  # float32 roundings along each output's longest chain of sums (K, N, rows, r terms)
        "y": _used(y.reshape(-1, N), ref, mag, _bound(dtype, K + r + 3)),
        "dx": _used(x.grad.reshape(-1, K), xd.grad, xm.grad, _bound(dtype, N + r + 3)),
        "dA": _used(A.grad, Ad.grad, Am.grad, _bound(dtype, N + rows + 2)),
        "dB": _used(B.grad, Bd.grad, Bm.grad, _bound(dtype, K + rows + 2))}
    if bias:
        errors["dbias"] = _used(b.grad, bd.grad, bm.grad, _bound(dtype, rows + 1))
        assert b.grad.dtype == b.dtype
    assert A.grad.dtype == A.dtype and B.grad.dtype == B.dtype and x.grad.dtype == x.dtype
    bad = {k: v for k, v in errors.items() if not v <= 1}
    assert not bad, f"errors above their bound (fraction of it used): {bad}"


def check_backward_modes(dtype, p, device="cpu"):
    """Atomic and deterministic dB agree; need_dx=False skips dX but keeps dA and dB."""
    lora_matmul = _poison_outputs()
    M, K, N, r = 33, 40, 72, 8
    x, w, _, A, B = _inputs(M, K, N, r, dtype, torch.float32, False, device)
    seed = torch.tensor([99], device=device)
    y, s = lora_matmul.forward(x, w, None, A, B, 0.5, p, seed, "split")
    dy = torch.randn_like(y)
    full = lora_matmul.backward(dy, x, w, A, B, s, 0.5, p, seed, True, deterministic=True)
    atomic = lora_matmul.backward(dy, x, w, A, B, s, 0.5, p, seed, True, deterministic=False)
    no_dx = lora_matmul.backward(dy, x, w, A, B, s, 0.5, p, seed, False)
    assert no_dx[0] is None
    # Both are within _bound of the exact gradients, so within twice that of each other. Their
    # mags: the formula on absolute values (scale s' = 0.5) with every element kept (an upper bound).
    kept = torch.ones(M, K, dtype=torch.float64, device=device)
    mag, (xm, _, Am, Bm) = _reference(x, w, None, A, B, 0.5, kept, 0.0, absolute=True)
    mag.backward(dy.double().abs())
    chains = (N + r + 3, N + M + 2, K + M + 2)  # dX, dA, dB
    for a, b, m, chain in zip(full, atomic, (xm.grad, Am.grad, Bm.grad), chains):
        assert _used(a, b.double(), m, 2 * _bound(dtype, chain)) <= 1
    for a, b in zip(full[1:], no_dx[1:]):
        assert torch.equal(a, b)


def check_dropout_mask(device="cpu"):
    """The mask keeps about 1 - p, depends on the seed, and is not periodic in the tiles."""
    lora_matmul = _poison_outputs()
    seed = torch.tensor([5], device=device)
    for p in (0.1, 0.5):
        keep = lora_matmul.dropout_keep_mask(seed, 128, 96, p)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.02  # 4.4 sigma of 12288 draws; seeded
    a = lora_matmul.dropout_keep_mask(seed, 64, 64, 0.5)
    b = lora_matmul.dropout_keep_mask(torch.tensor([6], device=device), 64, 64, 0.5)
    assert not torch.equal(a, b)
    assert not torch.equal(a[:16], a[16:32]) and not torch.equal(a[:, :32], a[:, 32:])
    # same seed -> same mask, and the forward is reproducible
    assert torch.equal(a, lora_matmul.dropout_keep_mask(seed, 64, 64, 0.5))


def check_eval_and_empty(device="cpu"):
    """training=False ignores dropout; an empty batch gives an empty output."""
    from minilora.kernels import fused_lora_linear
    from minilora.ops import lora_linear_reference

    _poison_outputs()
    x, w, b, A, B = _inputs(9, 40, 72, 4, torch.float32, torch.float32, True, device)
    y = fused_lora_linear(x, w, b, A, B, 2.0, 0.5, False)
    ref = lora_linear_reference(x.double(), w.double(), b.double(), A.double(), B.double(), 2.0)
    mag = lora_linear_reference(*(t.double().abs() for t in (x, w, b, A, B)), 2.0)
    assert _used(y, ref, mag, _bound(torch.float32, 40 + 4 + 3)) <= 1
    empty = fused_lora_linear(x[:0], w, b, A, B, 2.0)
    assert empty.shape == (0, 72)


def check_torch_compile(device="cpu"):
    """torch.compile traces the custom ops with fullgraph=True; results match eager."""
    from minilora.kernels import fused_lora_linear

    x, w, b, A, B = _inputs(17, 40, 72, 8, torch.float32, torch.float32, True, device)
    A.requires_grad_()
    B.requires_grad_()

    def f(x, A, B):
        return fused_lora_linear(x, w, b, A, B, 0.5, 0.0, True)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y_eager = f(x, A, B)
    ga = torch.autograd.grad(y_eager.sum(), (A, B))
    y_comp = compiled(x, A, B)
    gc = torch.autograd.grad(y_comp.sum(), (A, B))
    # The same custom ops on the same inputs: bit-identical (allclose's default 1e-5 is slack).
    assert torch.allclose(y_eager, y_comp) and all(map(torch.allclose, ga, gc))


def check_dora_layer(dtype, bias, device="cpu"):
    """A DoRA LoraLinear whose x Wᵀ + s·x Aᵀ Bᵀ runs through the kernels (ops.backend_for forced
    to "triton"): forward and the gradients of x, A, B and the magnitude against float64.

    The kernels compute the unscaled sum with bias=None; the column scale g = m / ‖W + sBA‖ and
    the bias are one addcmul after them. The norm is fp32 for fp16/fp32 weights (merge_dtype),
    so its error is fp32-level; g's error in units of |g| adds a few float32 roundings to the
    chain. A kernel path that dropped the scale, or added the bias before it, is off by O(mag).
    """
    import minilora
    from minilora import ops
    from minilora.inject import lora_layers

    _poison_outputs()
    K, N, M, r = 40, 72, 13, 8
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(K, N, bias=bias))
    minilora.inject(model, targets=["0"], r=r, lora_alpha=13.6, use_dora=True, init_lora_weights=False)
    model.to(device, dtype)
    (_, layer), = lora_layers(model)
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.magnitude.mul_(torch.linspace(0.5, 1.5, N, device=device).to(dtype))
    x = torch.randn(M, K, device=device).to(dtype).requires_grad_()
    leaves = [x, adapter.lora_A, adapter.lora_B, adapter.magnitude]
    asked = []
    real = ops.backend_for

    def kernels_on_cpu(x, weight, backend=None, rank=1):  # the interpreter runs them on the CPU
        asked.append(backend)
        return "triton"

    ops.backend_for = kernels_on_cpu
    try:
        y = layer(x)
    finally:
        ops.backend_for = real
    assert asked == [None], "the DoRA fast path did not go through ops.lora_linear's dispatch"
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grads = torch.autograd.grad(y, leaves, dy)

    def formula(f):
        xd, Ad, Bd, md = (f(t.detach().double()).requires_grad_() for t in leaves)
        W = layer.weight.double()
        norm = torch.linalg.vector_norm(W + adapter.scaling * adapter.lora_B.double() @ adapter.lora_A.double(),
                                        dim=1)
        out = (md / norm) * (xd @ f(W).T + adapter.scaling * (xd @ Ad.T) @ Bd.T)
        if bias:
            out = out + f(layer.bias.double())
        return out, (xd, Ad, Bd, md)

    ref, ref_leaves = formula(lambda t: t)
    ref.backward(dy.double())
    mag, mag_leaves = formula(torch.abs)
    mag.backward(dy.double().abs())
    chain = K + r + 8  # the kernels' sums plus the norm's and the scale's roundings
    errors = {"y": _used(y, ref, mag, _bound(dtype, chain))}
    for name, got, want, m in zip(("dx", "dA", "dB", "dm"), grads, ref_leaves, mag_leaves):
        errors[name] = _used(got, want.grad, m.grad, _bound(dtype, max(K, N, M) + r + 8))
    bad = {k: v for k, v in errors.items() if not v <= 1}
    assert not bad, f"errors above their bound (fraction of it used): {bad}"


ERROR_CASES = {
    # name: (kwargs overrides, expected message regex)
    "dtype": (dict(w=lambda w: w.half()), "x and weight must share one dtype"),
    "k_mismatch": (dict(A=lambda A: A[:, :-1]), "in_features mismatch"),
    "b_shape": (dict(B=lambda B: B[:-1]), r"B must have shape \(out_features, r\)"),
    "bias_shape": (dict(b=lambda b: b[:-1]), r"bias must have shape \(72,\)"),
    "rank": (dict(A=lambda A: A.repeat(65, 1), B=lambda B: B.repeat(1, 65)),
             "rank r=260 is outside the supported range"),
    "device": (dict(A=lambda A: A.to("meta")), "A is on meta but x is on cpu"),
    "int_adapter": (dict(A=lambda A: A.to(torch.int32)), "A must be fp16, bf16 or fp32"),
    "frozen": (dict(w=lambda w: w.requires_grad_()), "treat weight as frozen"),
    "path": (dict(path="fast"), "path must be 'auto', 'fused' or 'split'"),
    "dropout": (dict(p=1.0), r"dropout_p must be in \[0, 1\)"),
}


def check_error(name):
    from minilora.kernels import fused_lora_linear

    overrides, message = ERROR_CASES[name]
    x, w, b, A, B = _inputs(5, 40, 72, 4, torch.float32, torch.float32, True, "cpu")
    args = dict(x=x, w=w, b=b, A=A, B=B, path="auto", p=0.0)
    for key, change in overrides.items():
        args[key] = change(args[key]) if callable(change) else change
    with pytest.raises(ValueError, match=message):
        fused_lora_linear(args["x"], args["w"], args["b"], args["A"], args["B"], 1.0,
                          args["p"], True, path=args["path"])


def _assert_interpreted():
    from minilora.kernels import lora_matmul

    assert lora_matmul.INTERPRET, "the interpreter child imported triton without TRITON_INTERPRET"


def _run_in_child(fn, *args, **kwargs):
    """Run a case; any failure comes back as a picklable AssertionError with its traceback."""
    import traceback

    try:
        fn(*args, **kwargs)
    except BaseException:  # pytest's Failed/Skipped exceptions cannot be pickled
        raise AssertionError(traceback.format_exc()) from None


def _interpreter_init():
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Interpreter runs (CPU, fp32 and fp16)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpret():
    """Run a case in a spawned child whose triton runs kernels through the interpreter."""
    pytest.importorskip("triton")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_interpreter_init) as pool:
        pool.submit(_assert_interpreted).result(timeout=300)
        yield lambda *args, **kw: pool.submit(_run_in_child, *args, **kw).result(timeout=300)


INTERPRET_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("r", [1, 8, 16, 33])
@pytest.mark.parametrize("M", [1, 3, 17, 64])
def test_forward_backward(interpret, M, r, bias, p, dtype, path):
    # fp16 bases carry fp32 adapters, the library's default
    interpret(check_forward_backward, M, *MAIN_SHAPE, r, dtype, torch.float32, bias, p, path)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32),
                                                 (torch.float16, torch.float16)],
                         ids=["fp32", "fp16-fp16adapters"])
@pytest.mark.parametrize("K,N", [(19, 33), (128, 96), (64, 64), (1, 5)])
def test_shapes(interpret, K, N, dtype, adapter_dtype, path):
    interpret(check_forward_backward, 21, K, N, 5, dtype, adapter_dtype, True, 0.25, path)


@pytest.mark.parametrize("x_layout", ["strided", "3d-transposed"])
@pytest.mark.parametrize("path", ["fused", "split"])
def test_non_contiguous_x(interpret, x_layout, path):
    interpret(check_forward_backward, 7, 40, 72, 8, torch.float32, torch.float32, True, 0.25,
              path, "cpu", x_layout)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=["fp32", "fp16"])
def test_backward_modes(interpret, dtype, p):
    interpret(check_backward_modes, dtype, p)


def test_dropout_mask(interpret):
    interpret(check_dropout_mask)


def test_eval_and_empty(interpret):
    interpret(check_eval_and_empty)


def test_torch_compile_fullgraph(interpret):
    interpret(check_torch_compile)


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_launcher_errors(interpret, name):
    interpret(check_error, name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=["fp32", "fp16"])
def test_dora_layer_through_kernels(interpret, dtype, bias):
    interpret(check_dora_layer, dtype, bias)


def test_ops_never_picks_triton_on_cpu():
    from minilora import ops

    x, w = torch.randn(2, 4), torch.randn(3, 4)
    assert ops.backend_for(x, w) == "torch"
    with pytest.raises(RuntimeError, match="backend 'triton' was forced"):
        ops.backend_for(x, w, "triton")


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, minilora.kernels, minilora.ops; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------
# The same cases on a real GPU (compiled kernels; bf16 included)
# --------------------------------------------------------------------------------------------

on_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="needs a CUDA device (and TRITON_INTERPRET unset)")
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@on_gpu
@pytest.mark.parametrize("path", ["fused", "split", "auto"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("r", [1, 8, 16, 33, 256])
@pytest.mark.parametrize("M", [1, 3, 17, 64, 300, 2048])
def test_gpu_forward_backward(M, r, bias, p, dtype, path):
    check_forward_backward(M, 520, 328, r, dtype, torch.float32, bias, p, path, "cuda")


@on_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("x_layout", ["contiguous", "strided", "3d-transposed"])
def test_gpu_shapes_and_layouts(dtype, x_layout):
    for K, N in [(19, 33), (4096, 1000), (1, 5)]:
        check_forward_backward(37, K, N, 16, dtype, dtype, True, 0.1, "auto", "cuda", x_layout)


@on_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_gpu_backward_modes(dtype):
    check_backward_modes(dtype, 0.25, "cuda")


@on_gpu
def test_gpu_autocast_of_another_dtype_takes_the_reference_path():
    """An fp32 model under bf16 autocast: autocast decides the precision (as for peft), so the
    reference runs; a bf16 model under bf16 autocast keeps the kernels."""
    from minilora import ops

    x, w = torch.randn(4, 32, device="cuda"), torch.randn(16, 32, device="cuda")
    assert ops.backend_for(x, w) == "triton"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert ops.backend_for(x, w) == "torch"
        assert ops.backend_for(x.bfloat16(), w.bfloat16()) == "triton"
        with pytest.raises(RuntimeError, match="autocast"):
            ops.backend_for(x, w, "triton")
        A, B = torch.randn(4, 32, device="cuda"), torch.randn(16, 4, device="cuda")
        got = ops.lora_linear(x, w, None, A, B, 2.0)
        want = ops.lora_linear_reference(x, w, None, A, B, 2.0)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@on_gpu
def test_gpu_dropout_mask_and_compile():
    check_dropout_mask("cuda")
    check_eval_and_empty("cuda")
    check_torch_compile("cuda")


@on_gpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_gpu_dora_layer(dtype, bias):
    check_dora_layer(dtype, bias, device="cuda")
