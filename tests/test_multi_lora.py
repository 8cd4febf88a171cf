"""Mixed batches through the stacked factors (``ops.StackedLora``, ``ops.multi_lora_add``).

The PyTorch path is checked against a float64 reference built from each adapter alone, and against
the per-adapter loop it replaces; the stack's cache against every way the adapters can change.

Tolerances: a float64 model's rows sum the same K and r terms in another order, so they agree to
a few float64 roundings per sum (FP64_TOL, relative to the output, far below any wrong scaling or
dropped term, which moves outputs by O(1)). Lower precisions: see ``_bound``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import minilora
from minilora import ops
from minilora.inject import lora_layers, lora_state
from minilora.layers import LoraLinear
from tiny_models import build, example_inputs, output_of, randomize_adapters

FP64_TOL = 1e-10
U32 = 2.0**-24  # float32 unit roundoff


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _out(model, inputs):
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return output_of(model(**inputs))


def _row_reference(model, inputs, name):
    """The output with one adapter (or none) for the whole model, by switching it."""
    if name == "__base__":
        with minilora.disable_adapters(model):
            return _out(model, inputs)
    active = lora_state(model).active
    minilora.set_adapter(model, name)
    try:
        return _out(model, inputs)
    finally:
        minilora.set_adapter(model, active)


def _mixed(model, inputs, names):
    with minilora.per_sample_adapters(model, names):
        return _out(model, inputs)


def _assert_rows_match(model, inputs, names, tol=FP64_TOL):
    mixed = _mixed(model, inputs, names)
    refs = {n: _row_reference(model, inputs, n) for n in set(names)}
    for i, name in enumerate(names):
        assert _rel(mixed[i], refs[name][i]) <= tol, (i, name)
    return mixed


@pytest.fixture
def count_stacks(monkeypatch):
    """Counts ops.stack_lora calls (the layers look it up through the module)."""
    calls = []
    real = ops.stack_lora

    def counting(names, factors):
        calls.append(tuple(names))
        return real(names, factors)

    monkeypatch.setattr(ops, "stack_lora", counting)
    return calls


# e's lora_bias on a layer without bias cannot be merged: inject warns, this file does not merge.
pytestmark = pytest.mark.filterwarnings("ignore:lora_bias=True on")


def _llama_with_adapters():
    """float64 tiny Llama, four adapters: ranks 1..7, different alphas and targets (c does not
    touch q_proj, d is a DoRA adapter, e has a lora_bias: both take the loop beside the stack)."""
    model = build("llama").double()
    cfgs = {
        "a": dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8),
        "b": dict(target_modules=["q_proj", "up_proj", "down_proj"], r=1, lora_alpha=3),
        "c": dict(target_modules=["v_proj", "up_proj"], r=7, lora_alpha=2),
        "d": dict(target_modules=["q_proj"], r=2, lora_alpha=4, use_dora=True),
        "e": dict(target_modules=["up_proj"], r=3, lora_alpha=5, lora_bias=True),
    }
    for name, cfg in cfgs.items():
        minilora.inject(model, minilora.LoraConfig(**cfg, init_lora_weights=False), adapter_name=name)
    randomize_adapters(model)
    return model.eval()


NAMES = ["b", "__base__", "a", "c", "b", "d", "e", "a", "c", "c"]


def test_rows_match_each_adapter_alone_and_the_loop():
    model = _llama_with_adapters()
    inputs = example_inputs("llama", model, batch=len(NAMES))
    mixed = _assert_rows_match(model, inputs, NAMES)
    # the same as the per-adapter loop the stack replaces
    saved = LoraLinear.stacked_adapters
    LoraLinear.stacked_adapters = lambda self: None
    try:
        looped = _mixed(model, inputs, NAMES)
    finally:
        LoraLinear.stacked_adapters = saved
    assert _rel(mixed, looped) <= FP64_TOL
    # every row of one adapter, and one row only
    for names in (["c"] * 4, ["a"], ["__base__", "b"]):
        _assert_rows_match(model, example_inputs("llama", model, batch=len(names)), names)


def test_stack_holds_plain_adapters_with_padding_and_scalings(count_stacks):
    model = _llama_with_adapters()
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():  # (with gradients on, trainable factors take the loop: no stack)
        stack = layer.stacked_adapters()
    assert stack.names == ("a", "b", "c")  # d (DoRA) and e (lora_bias) are not stacked
    assert stack.A.shape == (3, 7, layer.in_features) and stack.B.shape == (3, layer.out_features, 7)
    for i, name in enumerate(stack.names):
        adapter = layer.adapters[name]
        assert torch.equal(stack.A[i, : adapter.r], adapter.lora_A) and not stack.A[i, adapter.r:].any()
        assert torch.equal(stack.B[i, :, : adapter.r], adapter.lora_B) and not stack.B[i, :, adapter.r:].any()
        assert stack.scaling[i].item() == adapter.scaling
    assert len(count_stacks) == 1


def test_stack_is_rebuilt_only_when_adapters_change(count_stacks, tmp_path):
    model = _llama_with_adapters()
    inputs = example_inputs("llama", model, batch=len(NAMES))
    with torch.no_grad():
        stacked_layers = sum(1 for _, layer in lora_layers(model) if layer.stacked_adapters() is not None)
    assert len(count_stacks) == stacked_layers  # built once each
    count_stacks.clear()
    _assert_rows_match(model, inputs, NAMES)
    _assert_rows_match(model, inputs, list(reversed(NAMES)))  # another batch: same stacks
    assert count_stacks == []

    def rebuilt_after(change, names=NAMES):
        count_stacks.clear()
        change()
        _assert_rows_match(model, example_inputs("llama", model, batch=len(names)), names)
        return len(count_stacks)

    q0 = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # an in-place write to one factor of one layer: that layer only
        assert rebuilt_after(lambda: q0.adapters["a"].lora_B.mul_(-2)) == 1
    minilora.save_adapter(model, tmp_path, adapter_name="c")
    assert rebuilt_after(lambda: minilora.load_adapter(model, tmp_path / "c", adapter_name="c2"),
                         NAMES + ["c2"]) == sum(1 for _, layer in lora_layers(model) if "c2" in layer.adapters)
    names = ["a", "c2", "__base__", "d", "c", "e", "a"]
    had_b = sum(1 for _, layer in lora_layers(model) if "b" in layer.adapters and {"a", "c", "c2"} & set(layer.adapters))
    assert rebuilt_after(lambda: minilora.delete_adapter(model, "b"), names) == had_b
    # a new scaling (set by a hot swap or by hand) is part of the key
    assert rebuilt_after(lambda: setattr(q0.adapters["a"], "scaling", 0.25), names) == 1
    # reassigning a parameter (load_state_dict(assign=True), to_empty) is seen too
    assert rebuilt_after(lambda: setattr(q0.adapters["a"], "lora_A",
                                         nn.Parameter(torch.randn_like(q0.adapters["a"].lora_A))), names) == 1
    assert rebuilt_after(lambda: None, names) == 0


def test_gradients_to_adapters_take_the_loop():
    """The stack is detached: with gradients on and trainable factors, the loop runs, and the
    factors get their gradients (per_sample_adapters refuses training mode, not autograd)."""
    model = nn.Sequential(nn.Linear(12, 10)).double()
    minilora.inject(model, targets=["0"], r=3, init_lora_weights=False, adapter_name="a")
    minilora.inject(model, targets=["0"], r=5, init_lora_weights=False, adapter_name="b")
    randomize_adapters(model)
    model.eval()
    for p in model[0].adapters.parameters():
        p.requires_grad_(True)
    x = torch.randn(4, 12, dtype=torch.float64)
    names = ["a", "b", "b", "__base__"]
    with minilora.per_sample_adapters(model, names):
        assert model[0].stacked_adapters() is None
        out = model(x)
        out.sum().backward()
        with torch.no_grad():
            assert model[0].stacked_adapters() is not None
            assert _rel(model(x), out.detach()) <= FP64_TOL
    assert model[0].adapters["a"].lora_A.grad is not None and model[0].adapters["b"].lora_B.grad is not None


def _bound(dtype, chain):
    """Elementwise bound in units of mag = |x Wᵀ| + s·|x||Aᵀ||Bᵀ| (same formula on absolute values):
    the base output rounded to the compute dtype c once, the sum rounded once more, and ``chain``
    float32 roundings along the sums over K and r (any order: Higham ch. 3)."""
    return 2 * torch.finfo(dtype).eps / 2 + chain * U32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tokens", [1, 9], ids=["decode", "prefill"])
def test_lower_precision_against_float64(dtype, tokens):
    K, N = 48, 40
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N, bias=False)).to(dtype)  # fp32 adapters over it, as inject makes them
    ranks, alphas = [1, 16, 5, 64, 3, 8, 2, 33, 7], [1, 32, 7, 16, 9, 8, 1, 40, 3]
    for i, (r, alpha) in enumerate(zip(ranks, alphas)):
        minilora.inject(model, targets=["0"], r=r, lora_alpha=alpha, init_lora_weights=False, adapter_name=f"a{i}")
    layer = model[0]
    assert {a.lora_A.dtype for a in layer.adapters.values()} == {torch.float32}
    model.eval()
    names = [f"a{i % 9}" for i in range(20)] + ["__base__"] * 3
    x = torch.randn(len(names), tokens, K).to(dtype)
    with torch.no_grad(), minilora.per_sample_adapters(model, names):
        out = model(x)
    assert out.dtype == dtype
    W = layer.weight.double()
    ref, mag = x.double() @ W.T, x.double().abs() @ W.abs().T
    for i, name in enumerate(names):
        if name != "__base__":
            a = layer.adapters[name]
            A, B = a.lora_A.double(), a.lora_B.double()
            ref[i] += a.scaling * (x[i].double() @ A.T) @ B.T
            mag[i] += a.scaling * (x[i].double().abs() @ A.abs().T) @ B.abs().T
    used = ((out.double() - ref).abs() / (_bound(dtype, K + 64 + 3) * mag)).max().item()
    assert used <= 1, used
    base_rows = slice(20, None)
    assert torch.equal(out[base_rows], layer.base_forward(x[base_rows]))  # untouched, bit for bit


def test_forced_triton_backend_refuses_on_cpu():
    model = nn.Sequential(nn.Linear(8, 6))
    minilora.inject(model, targets=["0"], r=2, init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        stack = model[0].stacked_adapters()
    x, y = torch.randn(2, 8), torch.randn(2, 6)
    with torch.no_grad():
        assert ops.backend_for_rows(x, y, stack) == "torch"
        with pytest.raises(RuntimeError, match="backend 'triton' was forced for a mixed batch.*CUDA device"):
            ops.backend_for_rows(x, y, stack, "triton")
    with pytest.raises(ValueError, match="must be one of"):
        ops.backend_for_rows(x, y, stack, "cuda")
