"""torch.compile of injected models: one graph (forward and backward), same numbers as eager, no
recompiles on repeat, and merge / unmerge / disable / optimizer steps after compiling are seen.

CPU inductor takes ~30 s per compile here, so graph checks use backend "eager"/"aot_eager"
(aot_eager traces the backward too) and one test runs inductor.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import minilora
import tiny_models
from minilora import ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(kind: str, targets, **fields):
    model = tiny_models.build(kind)
    minilora.inject(model, targets=targets, r=4, lora_alpha=8, init_lora_weights=False, **fields)
    return model.train()


def _forward_backward(fn, model, inputs):
    model.zero_grad(set_to_none=True)
    out = tiny_models.output_of(fn(**inputs))
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# Every LoRA layer kind: Linear (one adapter: the addmm_ fast path), Conv1D, Embedding, Conv2d,
# and a Linear with two active adapters (the generic path).
CASES = {
    "linear": ("mlp", ["lin0", "lin1", "head"], {}),
    "conv1d_embedding": ("embed_conv1d", ["emb", "c_fc", "c_proj"], {"fan_in_fan_out": True}),
    "conv2d": ("conv2d", ["conv0", "conv1"], {}),
    # DoRA: the fast path (Linear: one addcmul after lora_linear), peft's order in dora_step
    # (Conv1D, Embedding, Conv2d), and the norm's torch.cond fallback, all in one graph.
    "dora_linear": ("mlp", ["lin0", "lin1", "head"], {"use_dora": True}),
    "dora_conv1d_embedding": ("embed_conv1d", ["emb", "c_fc", "c_proj"], {"fan_in_fan_out": True, "use_dora": True}),
    "dora_conv2d": ("conv2d", ["conv0", "conv1"], {"use_dora": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fullgraph_forward_backward_equals_eager(case):
    kind, targets, fields = CASES[case]
    model = _model(kind, targets, **fields)
    inputs = tiny_models.example_inputs(kind, model)
    want_out, want_grads = _forward_backward(model, model, inputs)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # any graph break raises
    for _ in range(3):  # repeated calls reuse the graph
        out, grads = _forward_backward(compiled, model, inputs)
    assert counter.frame_count == 1
    # aot_eager runs the same aten kernels on the same values: bit-identical in practice. 1e-6
    # (~16 float32 roundings of these O(1) values) only allows a decomposition to split a fused op.
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    assert sorted(grads) == sorted(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_two_active_adapters_and_dropout_compile_to_one_graph():
    model = _model("mlp", ["lin0", "lin1"], lora_dropout=0.3)
    minilora.inject(model, targets=["lin0", "lin1"], adapter_name="second", r=2, init_lora_weights=False)
    minilora.set_adapter(model, ["default", "second"])
    x = tiny_models.example_inputs("mlp", model)["x"]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().mean().backward()
    model.eval()  # no dropout: the numbers must be eager's (same kernels; see the test above)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_llama_dora_compiles_to_one_graph(mode):
    # explain() counts the torch.cond branches of DoRA's norm as extra graphs; fullgraph=True
    # raises on any graph break instead.
    model = _model("llama", tiny_models.LLAMA_TARGETS, use_dora=True)
    model.train(mode == "train")
    ids = tiny_models.example_inputs("llama", model)["input_ids"]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    out = tiny_models.output_of(torch.compile(model, backend=counter, fullgraph=True)(input_ids=ids))
    assert counter.frame_count == 1
    if mode == "train":
        out.float().square().mean().backward()
    else:
        torch.testing.assert_close(out, tiny_models.output_of(model(input_ids=ids)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_llama_has_no_graph_breaks(mode):
    model = _model("llama", tiny_models.LLAMA_TARGETS, lora_dropout=0.1)
    model.train(mode == "train")
    ids = tiny_models.example_inputs("llama", model)["input_ids"]
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    # In training, minilora's input-grad hook on the embedding (requires_grad_ on an intermediate)
    # used to split the graph in three; it steps aside under compile.
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_merge_unmerge_disable_switch_and_steps_after_compiling_are_seen():
    model = _model("mlp", ["lin0", "lin1", "head"])
    x = tiny_models.example_inputs("mlp", model)["x"]
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        adapted = model(x)
        with minilora.disable_adapters(model):
            base = model(x)
            torch.testing.assert_close(compiled(x), base, rtol=0, atol=0)
        torch.testing.assert_close(compiled(x), adapted, rtol=0, atol=0)
        minilora.merge(model, keep_original=True)
        merged = compiled(x)  # the LoRA branch is skipped, the weight holds it
        torch.testing.assert_close(merged, model(x), rtol=0, atol=0)
        # Merged vs unmerged float32: per layer <= K + r + 5 roundings (K <= 20, r = 4) of values
        # and weights O(1), three layers: < 100·2**-24 ~ 6e-6 < 1e-5; a merge missing its scale or
        # a term is off by the adapters' effect (O(1) here: B is random, not zero).
        torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
        assert not torch.equal(merged, base)
        minilora.unmerge(model)
        torch.testing.assert_close(compiled(x), adapted, rtol=0, atol=0)  # no stale merged weight
        # Switching the active adapter after compiling: the compiled model follows.
        minilora.inject(model, targets=["lin0"], adapter_name="other", r=2, init_lora_weights=False)
        minilora.set_adapter(model, "other")
        other = compiled(x)
        torch.testing.assert_close(other, model(x), rtol=0, atol=0)
        assert not torch.allclose(other, adapted)
        minilora.set_adapter(model, "default")
        torch.testing.assert_close(compiled(x), adapted, rtol=0, atol=0)
    # An optimizer step changes the adapter in place: the compiled model must use the new values.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    compiled(x).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        stepped = compiled(x)
        torch.testing.assert_close(stepped, model(x), rtol=0, atol=0)
        assert not torch.allclose(stepped, adapted)


def test_backend_switch_recompiles_instead_of_going_stale():
    model = _model("mlp", ["lin0", "lin1"])
    x = tiny_models.example_inputs("mlp", model)["x"]
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    compiled(x)
    compiled(x)
    assert counter.frame_count == 1
    try:
        # Eager raises for a forced Triton path on CPU; the compiled model must too, not keep the
        # path it traced (it did when the choice was read from os.environ on every call).
        ops.set_backend("triton")
        with pytest.raises(RuntimeError, match="backend 'triton' was forced"):
            model(x)
        with pytest.raises(RuntimeError, match="backend 'triton' was forced"):
            compiled(x)
    finally:
        ops.set_backend("auto")
    with pytest.raises(ValueError, match="must be one of"):
        ops.set_backend("cuda")


def test_inductor_forward_backward_matches_eager(monkeypatch):
    # Inductor's caches (generated C++, precompiled headers) are not keyed by ATEN_CPU_CAPABILITY:
    # code cached under one capability fails to compile under another ('at::vec' undeclared).
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    capability = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", f"{cache_dir()}-{capability.lower()}")
    model = _model("mlp", ["lin0", "lin1"])
    inputs = tiny_models.example_inputs("mlp", model)
    want_out, want_grads = _forward_backward(model, model, inputs)
    compiled = torch.compile(model, fullgraph=True)  # inductor: generated C++ kernels
    out, grads = _forward_backward(compiled, model, inputs)
    # Inductor may fuse and reorder fp32 sums: a few ulps, far below a wrong scaling (1e-1).
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
