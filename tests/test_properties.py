"""Property tests (hypothesis): every LoRA layer kind against a float64 reference over random
shapes, ranks, alphas, rsLoRA and base dtypes; merge∘unmerge with keep_original is bit-exact;
merged forward equals unmerged forward within the dtype's tolerance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import minilora

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U32 = 2.0**-24  # float32 unit roundoff


def tol(dtype: torch.dtype, fp32_roundings: int) -> float:
    """Elementwise |y - ref| <= tol · mag, where mag is the same float64 formula on absolute values
    (Σ|x||W| + |b| + s·Σ|x||A||B|): the scale of a floating-point error bound, so a near-cancelling
    output gets no looser a test than any other. The base runs in its dtype, the adapters in fp32:
    at most two roundings to the base dtype (its output; the cast of the sum with the fp32 branch),
    each off by u·|value| <= u·mag, plus ``fp32_roundings`` float32 ones along the longest chain (a
    sum of n products is n of them in any order: Higham, Accuracy and Stability of Numerical
    Algorithms, ch. 3). So the bound holds on every CPU, whatever order its kernels sum in."""
    return 2 * torch.finfo(dtype).eps / 2 + fp32_roundings * U32

common = settings(max_examples=30, deadline=None, derandomize=True)


def close(y: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, tol: float) -> bool:
    assert y.shape == ref.shape == mag.shape
    return bool(((y.double() - ref).abs() <= tol * mag + 1e-12).all())


def ref_and_mag(formula, *tensors):
    """(formula(tensors), formula(|tensors|)) in float64."""
    tensors = [None if t is None else t.detach().double() for t in tensors]
    return formula(*tensors), formula(*[None if t is None else t.abs() for t in tensors])


def fill(model: nn.Module, seed: int) -> None:
    """Random base weights and non-zero adapters (LoRA B would otherwise start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5).to(p.dtype))


def inject_one(module: nn.Module, dtype, r, alpha, rslora, seed) -> nn.Module:
    model = nn.Sequential(module).to(dtype)
    minilora.inject(model, targets=["0"], r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False,
                    fan_in_fan_out=type(module).__name__ == "Conv1D")
    fill(model, seed)
    return model


def scaling(r, alpha, rslora) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def check_merge(model: nn.Module, run, dtype, mag, fp32_roundings) -> None:
    """merge∘unmerge (keep_original) is bit-exact; merged output close to unmerged: each is within
    tol(dtype, fp32_roundings) of the exact value (merged: W + s·B·A in fp32, r + 2 roundings, cast
    to the dtype, then the product with x), so the two within twice that."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = run()
        minilora.merge(model, keep_original=True)
        merged = run()
        minilora.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert close(merged, unmerged.double(), mag, 2 * tol(dtype, fp32_roundings))


ranks = st.integers(1, 16)
alphas = st.sampled_from([1, 4, 8, 16, 32, 3.5])
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**16)


@common
@given(n_in=st.integers(1, 64), n_out=st.integers(1, 64), lead=st.lists(st.integers(1, 4), max_size=2),
       r=ranks, alpha=alphas, rslora=st.booleans(), bias=st.booleans(), dtype=dtypes, seed=seeds)
def test_linear_matches_float64(n_in, n_out, lead, r, alpha, rslora, bias, dtype, seed):
    model = inject_one(nn.Linear(n_in, n_out, bias=bias), dtype, r, alpha, rslora, seed)
    layer, ad = model[0], model[0].adapters["default"]
    assert ad.lora_A.dtype == torch.float32
    x = torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with torch.no_grad():
        y = model(x)
    s = scaling(r, alpha, rslora)
    ref, mag = ref_and_mag(lambda x, W, b, A, B: x @ W.T + (0 if b is None else b) + s * (x @ A.T) @ B.T,
                           x, layer.weight, layer.bias, ad.lora_A, ad.lora_B)
    assert y.dtype == dtype and y.shape == (*lead, n_out)
    depth = n_in + r + 4  # x·Aᵀ (n_in), ·Bᵀ (r), scale, sums with the product x·Wᵀ and the bias
    assert close(y, ref, mag, tol(dtype, depth))
    check_merge(model, lambda: model(x), dtype, mag, depth)


@common
@given(n_in=st.integers(1, 48), n_out=st.integers(1, 48), batch=st.integers(1, 3), r=ranks, alpha=alphas,
       rslora=st.booleans(), dtype=dtypes, seed=seeds)
def test_conv1d_transformers_matches_float64(n_in, n_out, batch, r, alpha, rslora, dtype, seed):
    from transformers.pytorch_utils import Conv1D
    model = inject_one(Conv1D(n_out, n_in), dtype, r, alpha, rslora, seed)
    layer, ad = model[0], model[0].adapters["default"]
    x = torch.randn(batch, 3, n_in, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with torch.no_grad():
        y = model(x)
    s = scaling(r, alpha, rslora)
    ref, mag = ref_and_mag(lambda x, W, b, A, B: x @ W + b + s * (x @ A.T) @ B.T,  # W stored (in, out)
                           x, layer.weight, layer.bias, ad.lora_A, ad.lora_B)
    depth = n_in + r + 4  # as for nn.Linear
    assert close(y, ref, mag, tol(dtype, depth))
    check_merge(model, lambda: model(x), dtype, mag, depth)


@common
@given(num=st.integers(2, 64), dim=st.integers(1, 32), r=ranks, alpha=alphas, rslora=st.booleans(),
       padding_idx=st.sampled_from([None, 0]), dtype=dtypes, seed=seeds)
def test_embedding_matches_float64(num, dim, r, alpha, rslora, padding_idx, dtype, seed):
    model = inject_one(nn.Embedding(num, dim, padding_idx=padding_idx), dtype, r, alpha, rslora, seed)
    layer, ad = model[0], model[0].adapters["default"]
    ids = torch.randint(0, num, (2, 5), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        y = model(ids)
    s = scaling(r, alpha, rslora)
    ref, mag = ref_and_mag(lambda W, A, B: W[ids] + s * A.T[ids] @ B.T, layer.weight, ad.lora_A, ad.lora_B)
    depth = r + 4  # lookups are exact: ·Bᵀ (r), scale, sum
    assert close(y, ref, mag, tol(dtype, depth))
    check_merge(model, lambda: model(ids), dtype, mag, depth)


@common
@given(c_in=st.integers(1, 5), c_out=st.integers(1, 5), k=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.integers(0, 2), dilation=st.integers(1, 2), r=st.integers(1, 6), alpha=alphas,
       rslora=st.booleans(), mode=st.sampled_from(["zeros", "reflect", "circular"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=seeds)
def test_conv2d_matches_float64(c_in, c_out, k, stride, padding, dilation, r, alpha, rslora, mode, dtype, seed):
    base = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    model = inject_one(base, dtype, r, alpha, rslora, seed)
    layer, ad = model[0], model[0].adapters["default"]
    x = torch.randn(2, c_in, 7, 6, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with torch.no_grad():
        y = model(x)
    # float64: one conv with W0 + s·B·A (B (out, r, 1, 1), A (r, in, k, k))
    s = scaling(r, alpha, rslora)

    def formula(x, W0, b, A, B):
        W = W0 + s * torch.einsum("or,rikl->oikl", B.flatten(1), A)
        if mode != "zeros":
            return F.conv2d(F.pad(x, (padding,) * 4, mode=mode), W, b, stride, 0, dilation)
        return F.conv2d(x, W, b, stride, padding, dilation)

    ref, mag = ref_and_mag(formula, x, layer.weight, layer.bias, ad.lora_A, ad.lora_B)
    depth = c_in * k * k + r + 4  # as for nn.Linear, with c_in·k·k products per output
    assert close(y, ref, mag, tol(dtype, depth))
    check_merge(model, lambda: model(x), dtype, mag, depth)


@pytest.mark.parametrize("dtype,off", [(torch.float32, 1e-4), (torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_tolerances_catch_a_wrong_scaling(dtype, off):
    """The tolerances above notice a scaling off by ``off`` (bf16 rounds its output to ~0.4%)."""
    model = inject_one(nn.Linear(32, 32), dtype, 8, 16, False, seed=0)
    layer, ad = model[0], model[0].adapters["default"]
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        y = model(x)
    for s, ok in ((2.0, True), (2.0 * (1 + off), False), (2.0 / (1 + off), False)):
        ref, mag = ref_and_mag(lambda x, W, b, A, B: x @ W.T + b + s * (x @ A.T) @ B.T,
                               x, layer.weight, layer.bias, ad.lora_A, ad.lora_B)
        assert close(y, ref, mag, tol(dtype, 32 + 8 + 4)) == ok
