"""DoRA (``use_dora=True``) against peft on the same weights.

Every case builds one base model and deep-copies it into ``minilora.inject`` and
``peft.get_peft_model`` with the same config, with ``init_lora_weights=False`` (A and B both
random, so s·B·A != 0). Freshly initialised DoRA is plain LoRA (m = ‖W + sBA‖, so the factor
g = m / ‖W + sBA‖ is 1); minilora's magnitudes are therefore multiplied by random factors in
[0.6, 1.4] first, and then minilora's factors *and* magnitudes are copied into peft. Each
comparison also checks that what it compares is not trivially equal (g != 1, adapters change the
output), so a DoRA that silently degrades to LoRA, or to the base model, fails.

peft's DoRA, which minilora copies (peft/tuners/lora/variants.py, dora.py), per active adapter:
    y <- y + (g - 1)·(y - bias) + g·s·B(A(x))              (eval, or no dropout)
    y <- y + (g - 1)·(x' Wᵀ) + g·s·B(A(x')),  x' = dropout(x)   (training with dropout)
    Embedding: y <- g·y + g·s·embed(x, Aᵀ)Bᵀ
with g = m / ‖W + sBA‖ per output, the norm detached; merging writes g ⊙ (W + sBA), the norm from
the unmerged weight.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilora
from minilora.inject import lora_layers
from minilora.layers import LoraConv, LoraConv1D, LoraEmbedding, LoraLinear
from minilora.modules_to_save import ModulesToSave
from tiny_models import LLAMA_TARGETS, build, copy_to_peft, example_inputs, output_of

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")  # peft's many warnings (grouped conv, fan_in_fan_out, ...)

# ---------------------------------------------------------------- tolerances
# float64, as a fraction of the compared tensor's largest value (gradients: of the largest
# gradient of the model). Both libraries compute the same real-number function; they differ in
# summation order (minilora: x Wᵀ + s·(x Aᵀ)Bᵀ in one addmm then one column scale, ‖W + sBA‖ from
# the low-rank identity ‖W_i‖² + 2s B_i·(A W_iᵀ) + s²‖(BA)_i‖²; peft: (g-1)·(y - b) and g·s·B A x
# added to the base output, the norm of the formed W + sBA). A sum of n terms in any order is off
# by at most ~n·u·Σ|terms|, u = 2^-53 ≈ 1.1e-16 (Higham, ch. 4); here n <= 1536 (MiniLM's FFN),
# values O(1) after the norms, <= 6 layers forward and back: ~6·1536·1.1e-16 ≈ 1e-12. The norm
# identity adds at most (r+4)·u·(‖W_i‖ + s·Σ|B_ik|‖A_k‖)² / ‖W_i + sΔ_i‖², kept <= 4·(r+4)·u by
# minilora's fallback (rows where W and sΔ nearly cancel are recomputed directly). (transformers'
# RMSNorm runs in float32 even in a float64 Llama; a 1e-16 difference crosses one of its fp32
# rounding boundaries with probability ~1e-16/6e-8 per element: never in practice.)
# Measured (also with ATEN_CPU_CAPABILITY=default, OMP_NUM_THREADS=1): outputs and merged weights
# <= 4e-15, gradients <= 4e-15, 4 training steps <= 2e-14; the single-layer property test with
# near-cancelling rows (see there): outputs <= 6e-14.
# A real bug (a missing magnitude, a wrong scaling, the bias inside the scaled term, a norm over the
# wrong axis, another dropout mask) moves outputs by the order of g - 1 or of the adapter effect,
# which every case checks is > 0.1 (measured >= 0.3). FP64_TOL sits far from both.
FP64_TOL = 1e-9

# bf16 base (weights and activations), fp32 adapters and magnitudes, as peft keeps them. The two
# libraries run the bf16 base layer identically (same F.linear / conv on the same bf16 tensors) and
# the adapter math in fp32; their fp32 results differ by ~1e-6 relative (fp32 summation order, as
# above with u = 2^-24). Each layer's output is rounded to bf16 (8 significant bits: spacing
# <= 2^-7 relative). Two fp32 values 1e-6 apart round to the same bf16 number unless a rounding
# boundary falls between them; then they differ by one spacing, <= 2^-7·max|y|. LayerNorm/RMSNorm
# and the residual stream carry such a difference forward without growing it much, but later layers
# may flip further roundings, so over a few layers a handful of spacings can accumulate. Bound:
# 4 spacings of the output scale, 4·2^-7 ≈ 0.031·max|y|. Measured: 0 for all four models on AVX-512
# (every rounding agreed); MiniLM 0.0114 (1.5 spacings) with ATEN_CPU_CAPABILITY=default, 0.0052
# with other input ids. A missing magnitude (g = 1) or a doubled scaling moves the output by >= 0.47
# resp. >= 0.18 of max|y| (measured); the test asserts both stay above twice the bound, on a mutated
# peft model.
BF16_SPACING = 2.0 ** -7
BF16_TOL = 4 * BF16_SPACING
# Gradients in bf16 flow back through the same bf16 activations plus the backward's own bf16
# matmuls (one more rounding per layer and direction): twice the forward bound. Measured
# (relative to the largest gradient): <= 3e-7 for the 2-layer models; MiniLM's 6 layers 0.0082,
# 0.023 with ATEN_CPU_CAPABILITY=default, 0.019 with other input ids.
BF16_GRAD_TOL = 2 * BF16_TOL
# Magnitude initialisation over a bf16 weight: minilora forms W (bf16, exact in fp32) + s·BA in fp32
# and takes the fp32 row norm: one rounding per element (u32 = 2^-24) and a sum of n <= 1536
# squares: relative error <= ~n·2^-24 ≈ 9e-5. Measured: <= 3e-7 (also pissa's fp32 SVD: 1.1e-7).
FP32_NORM_TOL = 1e-4
# peft initialises DoRA over a bf16 base *in bf16*: get_peft_model casts the new factors to the base
# dtype, computes m = ‖W + s·BA‖ from bf16 tensors (BA, s·BA, the sum and the norm each rounded to
# 8 bits, u = 2^-8), and only then upcasts factors and magnitudes to fp32 (autocast_adapter_dtype).
# minilora computes the norm in fp32. Per output, peft's value is then within
# ~(2 + 2·‖sBA_i‖/‖V_i‖)·2^-8 of the exact one; with ‖sBA_i‖ <= 3‖V_i‖ that is 8·2^-8 = 2^-5. (At the
# default init B = 0: the final rounding (<= 2^-8) and the bf16 norm's own, <= 2·2^-8 = 2^-7.)
# Measured: 0.0041 with random factors, 0.0034 at the default init.
PEFT_BF16_INIT_TOL = 2.0 ** -5
PEFT_BF16_DEFAULT_INIT_TOL = 2.0 ** -7


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread_per_xdist_worker():
    """Under pytest-xdist each worker would run torch with one intra-op thread per core: on 2 cores,
    2 workers x 2 threads oversubscribe them and OpenMP's spin-waits made this file ~10x slower
    (94 s instead of 9 s). Restored afterwards, so other modules in the worker are unaffected."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- cases
# id -> (model kind, LoraConfig fields besides use_dora/init_lora_weights, build overrides)
CASES = {
    # every linear of the blocks, plus the input embedding and the output head (Embedding and Linear DoRA)
    "llama": ("llama", dict(target_modules=LLAMA_TARGETS + ["embed_tokens", "lm_head"], r=4, lora_alpha=8), {}),
    "llama-rslora-patterns-save": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                                                 r=8, lora_alpha=16, use_rslora=True,
                                                 rank_pattern={"q_proj": 2, r"model\.layers\.1\.mlp\..*": 4},
                                                 alpha_pattern={"v_proj": 32, "embed_tokens": 3},
                                                 modules_to_save=["lm_head"]), {}),
    "llama-layers": ("llama", dict(target_modules=["q_proj", "up_proj", "down_proj"], layers_to_transform=[1],
                                   layers_pattern="layers", r=4, lora_alpha=4), {}),
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True), {}),
    "embed_conv1d": ("embed_conv1d", dict(target_modules=["emb", "c_fc", "c_proj"], r=4, lora_alpha=6,
                                          fan_in_fan_out=True), {}),
    # real MiniLM weights (6 layers), its embedding cut to BERT_VOCAB rows (make_base)
    "bert": ("bert", dict(target_modules=["query", "key", "value", "dense"], exclude_modules=["pooler.dense"],
                          r=4, lora_alpha=8), {}),
    "conv1d": ("conv1d", dict(target_modules=["conv0", "conv1"], r=4, lora_alpha=6), {}),
    "conv2d": ("conv2d", dict(target_modules=["conv0", "conv1"], r=4, lora_alpha=6), {}),
    "conv3d": ("conv3d", dict(target_modules=["conv0", "conv1"], r=2, lora_alpha=5), {}),
    # peft accepts DoRA on a grouped conv (forward only; both refuse to merge it)
    "conv2d-grouped": ("conv2d", dict(target_modules=["conv0", "conv1"], r=4, lora_alpha=6), dict(groups=2)),
}
BERT_VOCAB = 512
MERGEABLE = [c for c in CASES if c != "conv2d-grouped"]
BF16_CASES = ["llama", "gpt2", "bert", "conv2d"]


# ---------------------------------------------------------------- helpers
def dora(fields: dict, **more) -> dict:
    return {"use_dora": True, "init_lora_weights": False, **fields, **more}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero), computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale else diff


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def peft_modules(pm) -> dict[str, nn.Module]:
    return dict(pm.base_model.model.named_modules())


def peft_lora_names(pm) -> list[str]:
    return sorted(n for n, m in peft_modules(pm).items() if isinstance(m, PeftLoraLayer))


def perturb_magnitudes(model: nn.Module, seed: int = 3, adapters: tuple[str, ...] | None = None) -> None:
    """m <- m · U(0.6, 1.4) per element, so g = m / ‖W + sBA‖ is no longer 1 (DoRA is not LoRA);
    modules_to_save copies get noise too (so a copy not carried over shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name, adapter in layer.adapters.items():
                if adapter.magnitude is not None and (adapters is None or name in adapters):
                    factor = 0.6 + 0.8 * torch.rand(adapter.magnitude.shape, generator=g, dtype=torch.float64)
                    adapter.magnitude.mul_(factor.to(adapter.magnitude.dtype))
        for m in model.modules():
            if isinstance(m, ModulesToSave):
                for name, copy_ in m.modules_to_save.items():
                    if adapters is None or name in adapters:
                        for p in copy_.parameters():
                            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)


def copy_dora_to_peft(ours: nn.Module, pm, adapter: str = "default") -> None:
    """minilora's factors, magnitudes and modules_to_save copies into peft."""
    copy_to_peft(ours, pm, adapter)
    modules = peft_modules(pm)
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            ad = layer.adapters[adapter] if adapter in layer.adapters else None
            if ad is not None and ad.magnitude is not None:
                theirs = modules[name].lora_magnitude_vector[adapter].weight
                assert theirs.shape == ad.magnitude.shape, name
                theirs.copy_(ad.magnitude)


def copy_factors_from_peft(pm, ours: nn.Module, adapter: str = "default") -> None:
    """peft's A and B into minilora (not the magnitude)."""
    modules = peft_modules(pm)
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            ad, target = layer.adapters[adapter], modules[name]
            if isinstance(layer, LoraEmbedding):
                ad.lora_A.copy_(target.lora_embedding_A[adapter])
                ad.lora_B.copy_(target.lora_embedding_B[adapter])
            else:
                ad.lora_A.copy_(target.lora_A[adapter].weight)
                ad.lora_B.copy_(target.lora_B[adapter].weight)


def peft_magnitude(pm, name: str, adapter: str = "default") -> torch.Tensor:
    return peft_modules(pm)[name].lora_magnitude_vector[adapter].weight


def reference_adapted_weight(layer, adapter) -> tuple[torch.Tensor, tuple[int, ...]]:
    """V = W + s·BA in float64 in the weight's stored layout, and the axes the DoRA norm sums over
    (written here from the definitions, independent of minilora's code)."""
    W = layer.weight.detach().double()
    A, B, s = adapter.lora_A.detach().double(), adapter.lora_B.detach().double(), adapter.scaling
    if isinstance(layer, LoraEmbedding):  # W (num, dim), A (r, num), B (dim, r): outputs are the dims
        return W + s * (B @ A).T, (0,)
    if isinstance(layer, LoraConv1D):  # W stored (in, out)
        return W + s * (B @ A).T, (0,)
    if isinstance(layer, LoraLinear):
        return W + s * (B @ A), (1,)
    assert isinstance(layer, LoraConv)
    r = A.shape[0]
    if layer.base_layer.groups == 1:
        delta = torch.einsum("or,r...->o...", B.flatten(1), A)
    else:  # peft's definition for a grouped conv: B read as (out/g, r) times A (r, in·k)
        delta = (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(W.shape)
    return W + s * delta, tuple(range(1, W.dim()))


def reference_norm(layer, adapter) -> torch.Tensor:
    """‖W + sBA‖ per output in float64, shaped like the magnitude."""
    V, axes = reference_adapted_weight(layer, adapter)
    return torch.linalg.vector_norm(V, dim=axes).view(adapter.magnitude.shape)


def reference_merged_weight(layer, adapter) -> torch.Tensor:
    """g ⊙ (W + sBA) in float64, g = m / ‖W + sBA‖, in the stored layout."""
    V, axes = reference_adapted_weight(layer, adapter)
    g = adapter.magnitude.detach().double().flatten() / torch.linalg.vector_norm(V, dim=axes).flatten()
    if axes == (0,):
        return V * g[None, :]
    return V * g.view(-1, *(1,) * (V.dim() - 1))


def peft_key(ours_name: str, lora_modules: dict) -> str:
    """Our parameter name -> peft's (``X.adapters.a.lora_A`` -> ``X.lora_A.a.weight``,
    ``X.adapters.a.magnitude`` -> ``X.lora_magnitude_vector.a.weight``)."""
    prefix = "base_model.model."
    if ".adapters." in ours_name:
        module, rest = ours_name.split(".adapters.", 1)
        adapter, leaf = rest.split(".")
        if leaf == "magnitude":
            return f"{prefix}{module}.lora_magnitude_vector.{adapter}.weight"
        if isinstance(lora_modules[module], LoraEmbedding):
            return f"{prefix}{module}.lora_embedding_{leaf[-1]}.{adapter}"
        return f"{prefix}{module}.{leaf}.{adapter}.weight"
    module, _, leaf = ours_name.rpartition(".")
    if module in lora_modules:
        return f"{prefix}{module}.base_layer.{leaf}"
    return prefix + ours_name


def trainable_pairs(ours: nn.Module, pm) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(peft name, ours, peft's) for every trainable parameter; the two trainable sets must be equal."""
    lora_modules = dict(lora_layers(ours))
    theirs = dict(pm.named_parameters(remove_duplicate=False))
    mapped = {peft_key(n, lora_modules): p for n, p in ours.named_parameters() if p.requires_grad}
    peft_trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert set(mapped) == peft_trainable, sorted(set(mapped) ^ peft_trainable)
    return [(n, p, theirs[n]) for n, p in sorted(mapped.items())]


def make_base(case: str, dtype: torch.dtype) -> nn.Module:
    """The base model of a CASES entry in ``dtype``. MiniLM keeps its real weights but only the
    first BERT_VOCAB rows of its 30522-token embedding (the inputs use ids below it): the float64
    copies of the full table made every BERT case take seconds."""
    kind, _, overrides = CASES[case]
    model = build(kind, **overrides)
    if kind == "bert":
        model.resize_token_embeddings(BERT_VOCAB)
    return model.to(dtype)


def build_pair(case: str, dtype: torch.dtype = torch.float64, **more):
    """(base, ours, peft model, inputs) for a CASES entry, ``dtype`` base, identical adapters."""
    kind, fields, _ = CASES[case]
    fields = dora(fields, **more)
    base = make_base(case, dtype)
    ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    perturb_magnitudes(ours)
    copy_dora_to_peft(ours, pm)
    return base, ours, pm, cast_inputs(example_inputs(kind, base), dtype)


def run(model, inputs, train: bool = False, seed: int = 0) -> torch.Tensor:
    """The main output (BERT: with the pooler output appended, so every layer gets gradients)."""
    model.train(train)
    torch.manual_seed(seed)  # the same dropout masks in both models: they draw in the same order
    result = model(**inputs)
    pooled = getattr(result, "pooler_output", None)
    out = output_of(result)
    return out if pooled is None else torch.cat([out.flatten(1), pooled], dim=1)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64).to(torch.float32)
    return (out.float() * weights).sum() if out.dtype != torch.float64 else (out * weights.double()).sum()


def grad_errors(pairs) -> dict[str, float]:
    """Per trainable tensor: max |ours' grad - peft's grad| / the largest gradient of the model
    (so a gradient that is ~0 in exact arithmetic is not judged on its own rounding noise)."""
    for name, mine, theirs in pairs:
        assert mine.grad is not None and theirs.grad is not None, name
    scale = max(theirs.grad.abs().max().item() for _, _, theirs in pairs)
    assert scale > 0
    return {name: (mine.grad - theirs.grad).abs().max().item() / scale for name, mine, theirs in pairs}


def assert_grads_close(pairs, tol: float) -> None:
    errors = grad_errors(pairs)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (worst, errors[worst])


def assert_dora_not_a_noop(ours: nn.Module, min_dev: float = 0.1) -> None:
    """Every DoRA adapter has some g = m / ‖W + sBA‖ far from 1: a comparison that ignores the
    magnitude (or computes plain LoRA) cannot pass by accident."""
    for name, layer in lora_layers(ours):
        for adapter in layer.adapters.values():
            if adapter.magnitude is not None:
                g = adapter.magnitude.detach().double() / reference_norm(layer, adapter)
                assert (g - 1).abs().max().item() > min_dev, name


def file_keys(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ---------------------------------------------------------------- 1 + 2: modules, counts, outputs, gradients
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_peft_float64(case):
    base, ours, pm, inputs = build_pair(case)
    # 1. the same modules adapted, the same trainable parameters (names, shapes, count)
    assert sorted(minilora.adapted_modules(ours)) == peft_lora_names(pm)
    assert minilora.trainable_parameters(ours) == pm.get_nb_trainable_parameters()
    pairs = trainable_pairs(ours, pm)
    assert any(".lora_magnitude_vector." in n for n, _, _ in pairs)
    for name, mine, theirs in pairs:
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, name
    assert_dora_not_a_noop(ours)

    # 2. outputs
    base_out = run(base, inputs)
    y_ours, y_peft = run(ours, inputs), run(pm, inputs)
    assert max_rel_err(y_ours, y_peft) <= FP64_TOL
    assert max_rel_err(y_ours, base_out) > 0.1, "the adapters have no effect: the comparison proves nothing"

    # ... and the gradient of every trainable tensor, magnitudes included
    loss_of(y_ours).backward()
    loss_of(y_peft).backward()
    assert_grads_close(pairs, FP64_TOL)
    magnitudes = [(n, m) for n, m, _ in pairs if ".lora_magnitude_vector." in n]
    assert all(m.grad.abs().max() > 0 for _, m in magnitudes)


def test_norm_is_detached_as_in_peft():
    """The gradient of A and B treats ‖W + sBA‖ as a constant (DoRA paper, section 4.3; peft
    detaches it). A norm left in the graph changes A's and B's gradients, not the output."""
    _, ours, _, inputs = build_pair("conv2d")
    layer = ours.conv0
    adapter = layer.adapters["default"]
    x = inputs["x"]
    # float64 autograd reference with the norm detached, and one with it attached
    grads = {}
    for detach in (True, False):
        A = adapter.lora_A.detach().clone().requires_grad_(True)
        B = adapter.lora_B.detach().clone().requires_grad_(True)
        W, b, s = layer.weight.detach(), layer.bias.detach(), adapter.scaling
        V = W + s * torch.einsum("or,r...->o...", B.flatten(1), A)
        norm = torch.linalg.vector_norm(V.flatten(1), dim=1)
        g = adapter.magnitude.detach().flatten() / (norm.detach() if detach else norm)
        y = F.conv2d(x, W, None, 1, 2) + s * F.conv2d(F.conv2d(x, A, None, 1, 2), B)
        out = g.view(1, -1, 1, 1) * y + b.view(1, -1, 1, 1)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        grads[detach] = (A.grad, B.grad, out.detach())
    ours.train(False)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    assert max_rel_err(out, grads[True][2]) <= FP64_TOL
    assert max_rel_err(adapter.lora_A.grad, grads[True][0]) <= FP64_TOL
    assert max_rel_err(adapter.lora_B.grad, grads[True][1]) <= FP64_TOL
    assert max_rel_err(grads[False][0], grads[True][0]) > 1e-3  # the check can tell them apart


# ---------------------------------------------------------------- bf16
@pytest.mark.parametrize("case", BF16_CASES)
def test_outputs_and_gradients_match_peft_bf16(case):
    base, ours, pm, inputs = build_pair(case, dtype=torch.bfloat16)
    pairs = trainable_pairs(ours, pm)
    for name, mine, theirs in pairs:  # fp32 adapters and magnitudes over the bf16 base, as peft
        assert mine.dtype == theirs.dtype == torch.float32, name
    assert all(layer.weight.dtype == torch.bfloat16 for _, layer in lora_layers(ours))
    y_ours, y_peft = run(ours, inputs), run(pm, inputs)
    assert y_ours.dtype == y_peft.dtype == torch.bfloat16
    assert max_rel_err(y_ours, y_peft) <= BF16_TOL
    loss_of(y_ours).backward()
    loss_of(y_peft).backward()
    assert_grads_close(pairs, BF16_GRAD_TOL)

    # The bound still catches a missing magnitude or a wrong scaling: peft with its own
    # (unperturbed) magnitudes, i.e. g = 1, and peft with the LoRA term doubled.
    kind, fields, _ = CASES[case]
    with torch.no_grad():
        no_magnitude = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**dora(fields)))
        copy_to_peft(ours, no_magnitude)
        for name, layer in lora_layers(ours):  # m = ‖W + sBA‖: g = 1, plain LoRA
            adapter = layer.adapters["default"]
            peft_magnitude(no_magnitude, name).copy_(reference_norm(layer, adapter))
        assert max_rel_err(run(no_magnitude, inputs), y_peft) > 2 * BF16_TOL
        for module in peft_modules(pm).values():
            if isinstance(module, PeftLoraLayer):
                module.scaling["default"] *= 2
        assert max_rel_err(run(pm, inputs), y_peft) > 2 * BF16_TOL


# ---------------------------------------------------------------- 3: magnitude initialisation
@pytest.mark.parametrize("case", ["llama", "gpt2", "embed_conv1d", "conv2d", "conv2d-grouped"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_default_init_magnitude_is_the_row_norm_of_W_as_peft(case, dtype):
    """B = 0 (Embedding: A = 0) at the default init, so m = ‖W‖ per output, whatever the factors."""
    kind, fields, _ = CASES[case]
    base = make_base(case, dtype)
    ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields, use_dora=True))  # minilora's default
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields, use_dora=True))  # peft's default
    tol = FP64_TOL if dtype == torch.float64 else FP32_NORM_TOL
    peft_tol = FP64_TOL if dtype == torch.float64 else PEFT_BF16_DEFAULT_INIT_TOL
    for name, layer in lora_layers(ours):
        adapter = layer.adapters["default"]
        zero = adapter.lora_A if isinstance(layer, LoraEmbedding) else adapter.lora_B
        assert not zero.any(), name
        W = layer.weight.detach().double()
        axes = (0,) if isinstance(layer, (LoraEmbedding, LoraConv1D)) else tuple(range(1, W.dim()))
        row_norm = torch.linalg.vector_norm(W, dim=axes).view(adapter.magnitude.shape)
        theirs = peft_magnitude(pm, name)
        assert adapter.magnitude.dtype == theirs.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        assert max_rel_err(adapter.magnitude, row_norm) <= tol, name
        assert max_rel_err(theirs, row_norm) <= peft_tol, name
    # and the model starts as the base model (DoRA at init is a no-op; the fast path too)
    inputs = cast_inputs(example_inputs(kind, base), dtype)
    want = run(base, inputs)
    got = run(ours, inputs)
    assert max_rel_err(got, want) <= (FP64_TOL if dtype == torch.float64 else BF16_TOL)


@pytest.mark.parametrize("case", ["llama-rslora-patterns-save", "gpt2", "embed_conv1d", "bert", "conv3d",
                                  "conv2d-grouped"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_init_magnitude_with_random_factors_matches_peft(case, dtype):
    """init_lora_weights=False: B·A != 0 and m = ‖W + sBA‖ (DoRA starts as LoRA). Each library draws
    its own factors, so peft's A and B are copied into minilora and minilora's norm functions are
    compared with peft's magnitude; minilora's own magnitude is compared with a float64 reference."""
    kind, fields, _ = CASES[case]
    base = make_base(case, dtype)
    ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**dora(fields)))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**dora(fields)))
    tol = FP64_TOL if dtype == torch.float64 else FP32_NORM_TOL
    for name, layer in lora_layers(ours):
        adapter = layer.adapters["default"]
        # inject used the adapter's own (random) factors, and the scaling (rslora, patterns)
        ref = reference_norm(layer, adapter)
        assert max_rel_err(adapter.magnitude, ref) <= tol, name
        W = layer.weight.detach().double()
        axes = (0,) if isinstance(layer, (LoraEmbedding, LoraConv1D)) else tuple(range(1, W.dim()))
        assert max_rel_err(ref, torch.linalg.vector_norm(W, dim=axes).view(ref.shape)) > 1e-3, \
            f"{name}: B·A is too small to tell ‖W + sBA‖ from ‖W‖"
    copy_factors_from_peft(pm, ours)
    peft_tol = FP64_TOL if dtype == torch.float64 else PEFT_BF16_INIT_TOL
    for name, layer in lora_layers(ours):
        adapter = layer.adapters["default"]
        theirs = peft_magnitude(pm, name).detach()
        ref = reference_norm(layer, adapter)  # of peft's factors now
        direct = layer.dora_direct_norm(adapter, layer.weight.detach())
        forward = layer.dora_norm(adapter)  # the norm forward divides by (low-rank identity)
        assert direct.shape == forward.shape == theirs.shape, name
        assert max_rel_err(direct, ref) <= tol, name
        assert max_rel_err(forward, ref) <= tol, name
        assert max_rel_err(theirs, ref) <= peft_tol, name
        assert max_rel_err(direct, theirs) <= peft_tol, name


def test_pissa_init_magnitude_matches_peft():
    """pissa moves W to the residual before the magnitude is taken: m = ‖residual + sBA‖ = ‖W‖
    (up to the fp32 SVD), as peft computes it after its pissa init."""
    kind, fields = "llama", dict(target_modules=["q_proj", "up_proj"], r=4, lora_alpha=8, use_dora=True,
                                 init_lora_weights="pissa")
    base = build(kind)  # float32: peft refuses pissa on float64 weights
    ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    original = dict(base.named_modules())
    for name, layer in lora_layers(ours):
        m = layer.adapters["default"].magnitude
        row_norm = torch.linalg.vector_norm(original[name].weight.detach(), dim=1)
        assert max_rel_err(m, row_norm) <= FP32_NORM_TOL, name  # the SVD runs in fp32 in both
        assert max_rel_err(m, peft_magnitude(pm, name)) <= FP32_NORM_TOL, name


# ---------------------------------------------------------------- 4: training in lockstep
@pytest.mark.parametrize("case,optimizer,dropout", [
    ("llama", "adamw", 0.0), ("gpt2", "sgd", 0.1), ("conv2d", "adamw", 0.2), ("embed_conv1d", "sgd", 0.0),
])
def test_training_steps_in_lockstep(case, optimizer, dropout):
    _, ours, pm, inputs = build_pair(case, lora_dropout=dropout)
    pairs = trainable_pairs(ours, pm)
    make = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)}[optimizer]
    opt_ours, opt_peft = make([p for _, p, _ in pairs]), make([p for _, _, p in pairs])
    start = {n: p.detach().clone() for n, p, _ in pairs}
    for step in range(4):
        outs = []
        for model, opt in ((ours, opt_ours), (pm, opt_peft)):
            opt.zero_grad()
            out = run(model, inputs, train=True, seed=step)
            loss_of(out).backward()
            opt.step()
            outs.append(out.detach())
        assert max_rel_err(*outs) <= FP64_TOL, step
        for name, mine, theirs in pairs:
            assert max_rel_err(mine, theirs) <= FP64_TOL, (step, name)
    moved = [n for n, p, _ in pairs if max_rel_err(p, start[n]) > 1e-4]
    assert any(".lora_magnitude_vector." in n for n in moved)  # the magnitudes train
    assert any(".lora_A." in n or "lora_embedding_A" in n for n in moved)


# ---------------------------------------------------------------- 5: dropout
@pytest.mark.parametrize("case", ["gpt2", "llama", "conv2d"])
def test_dropout_in_training_matches_peft_with_the_same_seed(case):
    _, ours, pm, inputs = build_pair(case, lora_dropout=0.3)
    pairs = trainable_pairs(ours, pm)
    y_ours, y_peft = run(ours, inputs, train=True, seed=7), run(pm, inputs, train=True, seed=7)
    assert max_rel_err(y_ours, y_peft) <= FP64_TOL
    loss_of(y_ours).backward()
    loss_of(y_peft).backward()
    assert_grads_close(pairs, FP64_TOL)
    # the dropout acts (another seed, another output), and eval mode switches it off
    assert max_rel_err(run(ours, inputs, train=True, seed=8), y_ours) > 1e-3
    assert max_rel_err(run(ours, inputs, train=False), run(pm, inputs, train=False)) <= FP64_TOL


def _single(kind: str) -> nn.Module:
    torch.manual_seed(11)
    if kind == "linear":
        return nn.Sequential(nn.Linear(10, 7)).double()
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D
        return nn.Sequential(Conv1D(7, 10)).double()
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)).double()


def _peft_dropout_reference(layer, adapter, x: torch.Tensor, seed: int, recompute: bool = True) -> torch.Tensor:
    """peft's DoRA forward in training with dropout, written out in float64 (variants.py
    DoraLinearVariant.forward + dora.py DoraLinearLayer.forward):
        x' = dropout(x);  y = base(x) + (g - 1)·base_nobias(x') + g·s·B(A(x'))
    recompute=False gives the formula without dropout semantics (base term from y - bias), which
    is what a wrong implementation would compute."""
    W, b, s = layer.weight.detach(), layer.bias.detach(), adapter.scaling
    A, B = adapter.lora_A.detach(), adapter.lora_B.detach()
    g = adapter.magnitude.detach() / reference_norm(layer, adapter)
    torch.manual_seed(seed)
    xd = F.dropout(x, adapter.dropout, training=True)  # the one random draw, as nn.Dropout makes it
    if isinstance(layer, LoraConv):
        lin = lambda t, w: F.conv2d(t, w, None, 1, 1)  # noqa: E731
        lora = s * F.conv2d(lin(xd, A), B)
        bias = b.view(1, -1, 1, 1)
    else:
        Wt = W.T if isinstance(layer, LoraConv1D) else W  # (out, in)
        lin = lambda t, w: F.linear(t, Wt)  # noqa: E731
        lora = s * F.linear(F.linear(xd, A), B)
        bias = b
        g = g.view(-1)
    base_full = lin(x, W) + bias
    base_term = lin(xd, W) if recompute else lin(x, W)
    return base_full + (g - 1) * base_term + g * lora


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_dropout_semantics_against_a_float64_reference(kind):
    model = _single(kind)
    fields = dict(target_modules=["0"], r=3, lora_alpha=6, lora_dropout=0.4, use_dora=True, init_lora_weights=False)
    ours = minilora.inject(copy.deepcopy(model), minilora.LoraConfig(**fields))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    perturb_magnitudes(ours)
    copy_dora_to_peft(ours, pm)
    layer = ours[0]
    adapter = layer.adapters["default"]
    torch.manual_seed(2)
    x = torch.randn(4, 10, dtype=torch.float64) if kind != "conv2d" else torch.randn(2, 3, 6, 6, dtype=torch.float64)
    ref = _peft_dropout_reference(layer, adapter, x, seed=5)
    ours.train()
    pm.train()
    torch.manual_seed(5)
    got = ours(x)
    torch.manual_seed(5)
    theirs = pm(x)
    assert max_rel_err(got, ref) <= FP64_TOL
    assert max_rel_err(theirs, ref) <= FP64_TOL
    # the reference tells the semantics apart: base term from the dropped-out input, without bias
    assert max_rel_err(_peft_dropout_reference(layer, adapter, x, seed=5, recompute=False), ref) > 1e-3
    # without dropout (eval) it is the closed form g ⊙ (W + sBA) x + bias
    ours.eval()
    merged = reference_merged_weight(layer, adapter)
    if kind == "conv2d":
        want = F.conv2d(x, merged, layer.bias.detach(), 1, 1)
    else:
        want = F.linear(x, merged.T if kind == "conv1d" else merged, layer.bias.detach())
    assert max_rel_err(ours(x), want) <= FP64_TOL


# ---------------------------------------------------------------- 6: merge
@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_matches_peft_float64(case):
    base, ours, pm, inputs = build_pair(case)
    layers = dict(lora_layers(ours))
    modules = peft_modules(pm)
    with torch.no_grad():
        unmerged = run(ours, inputs)
        originals = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        references = {n: reference_merged_weight(layer, layer.adapters["default"]) for n, layer in layers.items()}
        minilora.merge(ours, keep_original=True)
        pm.merge_adapter()
        for name, layer in layers.items():
            theirs = modules[name].base_layer.weight
            assert max_rel_err(layer.weight, theirs) <= FP64_TOL, name
            assert max_rel_err(layer.weight, references[name]) <= FP64_TOL, name
            assert max_rel_err(layer.weight, originals[name]) > 1e-2, name
        merged_ours, merged_peft = run(ours, inputs), run(pm, inputs)
        assert max_rel_err(merged_ours, unmerged) <= FP64_TOL
        assert max_rel_err(merged_ours, merged_peft) <= FP64_TOL

        # unmerge with keep_original: the original weights and outputs come back bit for bit
        minilora.unmerge(ours)
        for name, layer in layers.items():
            assert torch.equal(layer.weight, originals[name]), name
        assert torch.equal(run(ours, inputs), unmerged)

        # merge without keep_original, unmerge by division as peft: equal to peft's unmerge
        minilora.merge(ours)
        minilora.unmerge(ours)
        pm.unmerge_adapter()
        for name, layer in layers.items():
            assert max_rel_err(layer.weight, originals[name]) <= FP64_TOL, name
            assert max_rel_err(layer.weight, modules[name].base_layer.weight) <= FP64_TOL, name
        assert max_rel_err(run(ours, inputs), unmerged) <= FP64_TOL

        # merge_and_unload: plain modules, the same state dict as peft's, the same outputs
        plain_ours = minilora.merge_and_unload(ours)
        plain_peft = pm.merge_and_unload()
        assert [type(m) for m in plain_ours.modules()] == [type(m) for m in plain_peft.modules()]
        sd_ours, sd_peft = plain_ours.state_dict(), plain_peft.state_dict()
        assert list(sd_ours) == list(sd_peft) == list(base.state_dict())
        for key in sd_ours:
            assert max_rel_err(sd_ours[key], sd_peft[key]) <= FP64_TOL, key
        assert max_rel_err(run(plain_ours, inputs), unmerged) <= FP64_TOL


def test_grouped_conv_merge_is_refused_by_both():
    _, ours, pm, inputs = build_pair("conv2d-grouped")
    before = run(ours, inputs)
    with pytest.raises(ValueError, match=r"grouped conv \(groups=2\) cannot be merged"):
        minilora.merge(ours)
    with pytest.raises(ValueError, match=r"grouped conv"):
        minilora.merge_and_unload(ours)
    assert torch.equal(run(ours, inputs), before)  # nothing half merged
    with pytest.raises(NotImplementedError):
        pm.merge_adapter()


def test_merge_of_bf16_weights_matches_peft():
    """bf16 weight: both compute g ⊙ (W + sBA) in fp32 and round once to bf16. The fp32 values
    differ by ~1e-6 relative (summation order), so a rounding can go the other way: at most one
    bf16 spacing, and rarely."""
    _, ours, pm, inputs = build_pair("llama", dtype=torch.bfloat16)
    modules = peft_modules(pm)
    with torch.no_grad():
        minilora.merge(ours)
        pm.merge_adapter()
    differing = total = 0
    for name, layer in lora_layers(ours):
        mine, theirs = layer.weight.double(), modules[name].base_layer.weight.double()
        assert layer.weight.dtype == torch.bfloat16
        spacing = theirs.abs() * BF16_SPACING
        assert ((mine - theirs).abs() <= spacing).all(), name
        differing += (mine != theirs).sum().item()
        total += mine.numel()
    assert differing <= 0.01 * total


@pytest.mark.parametrize("how", ["together", "one-by-one", "one-by-one-keep-original"])
@pytest.mark.parametrize("order", [("default", "other"), ("other", "default")], ids=["d-o", "o-d"])
def test_merging_two_active_dora_adapters_matches_peft(order, how):
    """Each adapter's norm is taken from the unmerged weight (as forward sees it), not from the weight
    that already holds the adapter merged before it; also when they are merged in separate calls."""
    base, ours, pm, inputs = _two_adapters("llama")
    minilora.set_adapter(ours, list(order))
    pm.base_model.set_adapter(list(order))
    modules = peft_modules(pm)
    layers = dict(lora_layers(ours))
    with torch.no_grad():
        originals = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        unmerged = run(ours, inputs)
        assert max_rel_err(unmerged, run(pm, inputs)) <= FP64_TOL
        if how == "together":
            minilora.merge(ours)
            pm.merge_adapter(list(order))
        else:
            for name in order:
                minilora.merge(ours, adapter_names=name, keep_original=how.endswith("keep-original"))
                pm.merge_adapter([name])
        both = [n for n, layer in layers.items() if len(layer.merged) == 2]
        assert both  # layers holding both adapters: where the norm's weight matters
        for name, layer in layers.items():
            assert max_rel_err(layer.weight, modules[name].base_layer.weight) <= FP64_TOL, name
            assert max_rel_err(layer.weight, originals[name]) > 1e-2, name
        # merged and unmerged Llama outputs agree bit for bit here: its RMSNorm rounds the float64
        # hidden states to float32 (see FP64_TOL), so compare one merged layer directly too
        layer = layers[both[0]]
        x = torch.randn(3, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        merged_out = layer(x)
        minilora.unmerge(ours)
        assert max_rel_err(merged_out, layer(x)) <= FP64_TOL
        minilora.merge(ours)
        assert max_rel_err(run(ours, inputs), unmerged) <= FP64_TOL
        assert max_rel_err(run(pm, inputs), unmerged) <= FP64_TOL
        minilora.unmerge(ours)
        assert max_rel_err(run(ours, inputs), unmerged) <= FP64_TOL


# ---------------------------------------------------------------- 7: save / load, both ways
SAVE_CASES = ["llama-rslora-patterns-save", "gpt2", "embed_conv1d", "conv2d", "conv2d-grouped"]


def _peft_only_extra(fields) -> set[str]:
    # peft's save_embedding_layers="auto" also writes the base weight of a LoRA-adapted embedding
    return {"base_model.model.model.embed_tokens.base_layer.weight"} if "embed_tokens" in fields["target_modules"] \
        else set()


@pytest.mark.parametrize("case", SAVE_CASES)
def test_minilora_save_loads_in_peft(case, tmp_path):
    base, ours, pm, inputs = build_pair(case)
    kind, fields, _ = CASES[case]
    want = run(ours, inputs)
    minilora.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    keys, peft_keys = file_keys(tmp_path / "ours"), file_keys(tmp_path / "peft")
    for key in _peft_only_extra(fields):
        peft_keys.pop(key)
    assert keys == peft_keys
    for name, layer in lora_layers(ours):
        magnitude = layer.adapters["default"].magnitude
        assert keys[f"base_model.model.{name}.lora_magnitude_vector"] == tuple(magnitude.shape), name
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["lora_bias"] is False

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    got = run(loaded, inputs)
    assert max_rel_err(got, want) <= FP64_TOL
    assert max_rel_err(want, run(base, inputs)) > 0.1
    for name, layer in lora_layers(ours):  # the magnitudes arrive unchanged (not recomputed by peft's init)
        assert torch.equal(peft_magnitude(loaded, name), layer.adapters["default"].magnitude), name


@pytest.mark.parametrize("case", SAVE_CASES)
def test_peft_save_loads_in_minilora(case, tmp_path):
    base, ours, pm, inputs = build_pair(case)
    pm.save_pretrained(tmp_path)
    assert all(f"base_model.model.{name}.lora_magnitude_vector" in file_keys(tmp_path)
               for name in peft_lora_names(pm))
    want = run(pm, inputs)
    loaded = minilora.load_adapter(copy.deepcopy(base), tmp_path)
    assert max_rel_err(run(loaded, inputs), want) <= FP64_TOL
    for name, layer in lora_layers(loaded):
        assert torch.equal(layer.adapters["default"].magnitude, peft_magnitude(pm, name)), name
    # trainable load: the same trainable-parameter count as peft's is_trainable=True
    trainable = minilora.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert minilora.trainable_parameters(trainable)[0] == n_theirs > 0
    assert all(layer.adapters["default"].magnitude.requires_grad for _, layer in lora_layers(trainable))


# ---------------------------------------------------------------- 8: several adapters, mixes, disabling
def _two_adapters(kind: str, second_dora: bool = True, first_dora: bool = True, dropout: float = 0.0):
    """Adapters "default" and "other" on overlapping module sets, in both libraries, same weights."""
    first = dict(target_modules=["q_proj", "v_proj", "embed_tokens", "down_proj"], r=4, lora_alpha=8,
                 lora_dropout=dropout, use_dora=first_dora, init_lora_weights=False)
    second = dict(target_modules=["q_proj", "up_proj", "down_proj"], r=2, lora_alpha=3, use_rslora=True,
                  lora_dropout=dropout, use_dora=second_dora, init_lora_weights=False)
    base = build(kind).double()
    ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**first))
    minilora.inject(ours, minilora.LoraConfig(**second), adapter_name="other")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**first))
    pm.add_adapter("other", peft.LoraConfig(**second))
    perturb_magnitudes(ours)
    for name in ("default", "other"):
        copy_dora_to_peft(ours, pm, name)
    return base, ours, pm, example_inputs(kind, base)


def _compare_active(ours, pm, inputs, train: bool = False) -> torch.Tensor:
    pairs = trainable_pairs(ours, pm)
    for _, mine, theirs in pairs:
        mine.grad = theirs.grad = None
    y_ours, y_peft = run(ours, inputs, train, seed=3), run(pm, inputs, train, seed=3)
    assert max_rel_err(y_ours, y_peft) <= FP64_TOL
    loss_of(y_ours).backward()
    loss_of(y_peft).backward()
    assert_grads_close(pairs, FP64_TOL)
    return y_ours.detach()


@pytest.mark.parametrize("kinds", [(True, True), (False, True), (True, False)], ids=["dora+dora", "lora+dora",
                                                                                     "dora+lora"])
def test_two_adapters_switching_and_both_active(kinds):
    first_dora, second_dora = kinds
    base, ours, pm, inputs = _two_adapters("llama", first_dora=first_dora, second_dora=second_dora)
    outputs = {}
    for active in (["default"], ["other"], ["default", "other"], ["other", "default"]):
        minilora.set_adapter(ours, active)
        pm.base_model.set_adapter(active)
        outputs[tuple(active)] = _compare_active(ours, pm, inputs)
    base_out = run(base, inputs)
    assert max_rel_err(outputs[("default",)], base_out) > 0.1 and max_rel_err(outputs[("other",)], base_out) > 0.1
    # a later DoRA adapter rescales what the earlier ones added: the order of the active adapters matters
    assert max_rel_err(outputs[("default", "other")], outputs[("other", "default")]) > 1e-2
    # ... and both active is neither one alone
    assert max_rel_err(outputs[("default", "other")], outputs[("default",)]) > 1e-2
    assert max_rel_err(outputs[("default", "other")], outputs[("other",)]) > 1e-2


def test_two_dora_adapters_with_dropout_draw_one_mask_each_as_peft():
    _, ours, pm, inputs = _two_adapters("llama", dropout=0.3)
    minilora.set_adapter(ours, ["default", "other"])
    pm.base_model.set_adapter(["default", "other"])
    _compare_active(ours, pm, inputs, train=True)


@pytest.mark.parametrize("case", ["llama", "gpt2", "conv2d-grouped"])
def test_disable_adapters_gives_the_base_model(case):
    base, ours, pm, inputs = build_pair(case)
    want = run(base, inputs)
    with torch.no_grad():
        adapted = run(ours, inputs)
        with minilora.disable_adapters(ours):
            assert torch.equal(run(ours, inputs), want)
        with pm.disable_adapter():
            assert torch.equal(run(pm, inputs), want)
        assert torch.equal(run(ours, inputs), adapted)
        assert max_rel_err(adapted, want) > 0.1


def test_lora_bias_with_dora_is_refused_by_inject_like_peft():
    base = build("mlp")
    with pytest.raises(ValueError, match="lora_bias.*use_dora|use_dora.*lora_bias"):
        minilora.inject(copy.deepcopy(base), target_modules=["lin0"], use_dora=True, lora_bias=True)
    with pytest.raises(ValueError):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["lin0"], use_dora=True,
                                                                   lora_bias=True))
    assert not any(isinstance(m, LoraLinear) for m in base.modules())


# ---------------------------------------------------------------- property: one layer, any shape
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d_in=st.integers(1, 9), d_out=st.integers(1, 9), r=st.integers(1, 5), alpha=st.sampled_from([1, 3, 16]),
       rslora=st.booleans(), bias=st.booleans(), kind=st.sampled_from(["linear", "conv1d"]),
       cancel=st.sampled_from([None, 1e-2, 1e-5]), seed=st.integers(0, 2**16))
def test_single_layer_matches_peft_property(d_in, d_out, r, alpha, rslora, bias, kind, cancel, seed):
    """One Linear / Conv1D of any small shape and rank (also r > min(in, out)), with and without a
    bias, compared with peft: output, gradients, merged weight.

    ``cancel``: output 0 of W is set to -s·(BA)_0 + cancel·‖s·(BA)_0‖·(unit noise), so W_0 and s·(BA)_0
    cancel to a relative size 1/κ = cancel (κ up to 1e5), where the low-rank norm identity is off by
    ~(r+4)·u·κ² (1e-5 relative at κ = 1e5) and minilora must fall back to the direct norm (whose
    error is ~√n·u·κ ≈ 3e-11): the forward norm is checked per output against a float64 reference.
    Outputs stay well conditioned there (that output's adapted part is m_0·(V_0·x)/‖V_0‖ with
    m_0 ~ ‖V_0‖ tiny), but gradients do not: dL/dm_0 = Σ_b dL/dy_b0 · (V_0·x_b)/‖V_0‖, and
    V_0·x_b = W_0·x_b + s·(BA)_0·x_b carries ~u·κ relative rounding in either library, which a sum
    over the batch that happens to cancel amplifies further (hypothesis found κ = 1e5 with a
    1500-fold cancelling batch: 1.7e-8). So gradients are compared only without ``cancel``."""
    torch.manual_seed(seed)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).double()
    else:
        from transformers.pytorch_utils import Conv1D
        model = nn.Sequential(Conv1D(d_out, d_in)).double()  # Conv1D always has a bias
    fields = dict(target_modules=["0"], r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=True,
                  init_lora_weights=False)
    ours = minilora.inject(copy.deepcopy(model), minilora.LoraConfig(**fields))
    layer = ours[0]
    adapter = layer.adapters["default"]
    if cancel is not None:
        with torch.no_grad():
            delta = adapter.scaling * (adapter.lora_B[0] @ adapter.lora_A)
            noise = torch.randn(d_in, dtype=torch.float64)
            row = -delta + cancel * delta.norm() * noise / noise.norm()
            for target in (layer.weight, model[0].weight):
                if kind == "linear":
                    target[0] = row
                else:
                    target[:, 0] = row
            adapter.magnitude.copy_(layer.dora_direct_norm(adapter, layer.weight))
    reference = reference_norm(layer, adapter)
    per_output = ((layer.dora_norm(adapter) - reference).abs() / reference).max().item()
    assert per_output <= FP64_TOL
    perturb_magnitudes(ours, seed=seed)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    copy_dora_to_peft(ours, pm)
    x = torch.randn(3, d_in, dtype=torch.float64)
    y_ours, y_peft = ours(x), pm(x)
    # Both libraries sum the same terms in other orders, so they differ by ~n·u·Σ|terms|, not by
    # u·|y|: with ``cancel`` the base term W_0·x and the LoRA term cancel (1/κ), and an output can
    # also come out near zero (bias against the adapted part). The scale is that of the terms.
    with torch.no_grad():
        w = layer.weight if kind == "linear" else layer.weight.T  # (out, in)
        g = (adapter.magnitude / layer.dora_norm(adapter)).abs().max()
        terms = x.abs() @ w.abs().T + adapter.scaling * (x.abs() @ adapter.lora_A.abs().T) @ adapter.lora_B.abs().T
        bias_size = 0.0 if layer.bias is None else layer.bias.abs().max().item()
        scale = max(y_peft.abs().max().item(), (max(g.item(), 1.0) * terms.max()).item() + bias_size)
    assert (y_ours - y_peft).abs().max().item() <= FP64_TOL * scale
    if cancel is None:
        y_ours.square().sum().backward()
        y_peft.square().sum().backward()
        assert_grads_close(trainable_pairs(ours, pm), FP64_TOL)
    with torch.no_grad():
        merged = reference_merged_weight(layer, adapter)
        minilora.merge(ours)
        pm.merge_adapter()
        assert max_rel_err(layer.weight, merged) <= FP64_TOL
        assert max_rel_err(layer.weight, peft_modules(pm)["0"].base_layer.weight) <= FP64_TOL
