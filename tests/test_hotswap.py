"""Hot-swapping (``prepare_for_hotswap``, ``hotswap_adapter``): padding changes no output, a swapped
adapter gives what loading it fresh gives (eager and compiled, with no recompilation), a
peft-saved adapter swapped in gives peft's outputs, saving after a swap writes the swapped-in
adapter's own tensors, and every refusal leaves the model exactly as it was.

Tolerances. Comparisons of two paths run in float64 on both sides (as in test_equivalence_peft):
a swapped adapter and a fresh load compute the same exact function in other orders (zero-padded
ranks lengthen each A x and B h sum by zeros, the held scaling multiplies the (M, r) product
instead of being addmm_'s alpha), so they differ by rounding only: a sum of n terms is off by at
most n·u·Σ|terms| in any order (Higham, ch. 4), u = 2⁻⁵³, n <= 48 here (the tiny Llama's widest
sum), values O(1) after RMSNorm, two layers and the head compound it: ~1e-13 relative to the
output's largest value. FP64_TOL = 1e-9 sits far above that and far below any real difference:
``test_tolerance_catches_a_scaling_off_by_one_part_in_a_million`` shows a scaling off by 1e-6
relative fails it. The bf16 test bounds a bf16 layer against a float64 reference instead.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from safetensors.torch import load_file, save_file

import minilora
from minilora import ops
from minilora.inject import lora_layers
from tiny_models import assert_unchanged, build, copy_to_peft, example_inputs, output_of, randomize_adapters, snapshot

FP64_TOL = 1e-9
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"

# kind -> (targets, extra config fields, the adapters' (r, lora_alpha, extra fields)): the first
# adapter is loaded, the others are swapped in; ranks go down and up, alphas vary, and the
# per-module patterns and rsLoRA change the scaling per layer.
CASES = {
    "llama": (["q_proj", "v_proj", "up_proj"], {},
              [(8, 16, {}), (2, 3, {}), (5, 20, {"use_rslora": True}),
               (4, 8, {"rank_pattern": {"v_proj": 8}, "alpha_pattern": {"up_proj": 1}})]),
    "embed_conv1d": (["emb", "c_fc", "c_proj"], {"fan_in_fan_out": True},
                     [(6, 12, {}), (2, 5, {}), (6, 1, {}), (3, 7, {})]),
    "conv2d_grouped_lora_bias": (["conv0", "conv1"], {"lora_bias": True},
                       [(4, 8, {}), (2, 6, {}), (8, 3, {}), (6, 6, {})]),
    "mlp_dora": (["lin0", "lin1", "head"], {"use_dora": True},
                           [(4, 8, {}), (2, 3, {}), (6, 12, {}), (1, 1, {})]),
    "mha": (["mha", "lin0"], {}, [(4, 8, {}), (2, 3, {}), (6, 12, {"rank_pattern": {"lin0": 1}}), (1, 1, {})]),
}


def _build(case):
    kind = "conv2d" if case.startswith("conv2d") else "mlp" if case.startswith("mlp") else case
    return build(kind, groups=2) if case.startswith("conv2d_grouped") else build(kind)


def _kind(case):
    return "conv2d" if case.startswith("conv2d") else "mlp" if case.startswith("mlp") else case


def _save_adapters(case, folder, seed=10):
    """Save the case's adapters (random values) as folder/a0, a1, ...; their paths."""
    targets, fields, adapters = CASES[case]
    paths = []
    for i, (r, alpha, extra) in enumerate(adapters):
        model = minilora.inject(_build(case).double(), targets=targets, r=r, lora_alpha=alpha, **fields, **extra)
        randomize_adapters(model, seed=seed + i)
        paths.append(os.path.join(folder, f"a{i}"))
        minilora.save_adapter(model, paths[-1])
    return paths


def _fresh(case, path):
    return minilora.load_adapter(_build(case).double(), path)


def _inputs(case, model):
    return {k: v.double() if v.is_floating_point() else v for k, v in example_inputs(_kind(case), model).items()}


def _out(model, inputs):
    with torch.no_grad():
        return output_of(model(**inputs)).double()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _max_rank(case):
    return max(max([r, *extra.get("rank_pattern", {}).values()]) for r, _, extra in CASES[case][2])


def _adapter_attrs(model):
    """What snapshot() does not see: each adapter's rank, alpha, scaling, dropout and factor shapes."""
    return [(n, a, ad.r, ad.alpha, float(ad.scaling), type(ad.scaling), ad.dropout, tuple(ad.lora_A.shape),
             tuple(ad.lora_B.shape)) for n, layer in lora_layers(model) for a, ad in layer.adapters.items()]


# ---------------------------------------------------------------- prepare_for_hotswap
@pytest.mark.parametrize("case", sorted(CASES))
def test_prepare_pads_and_changes_no_output_nor_file(case, tmp_path):
    first = _save_adapters(case, tmp_path)[0]
    model = _fresh(case, first)
    inputs = _inputs(case, model)
    before, saved = _out(model, inputs), minilora.adapter_state_dict(model)
    assert (before - _out(_build(case).double(), inputs)).abs().max() > 1e-2  # the adapter matters
    room = _max_rank(case) + 2
    minilora.prepare_for_hotswap(model, target_rank=room)
    for name, layer in lora_layers(model):
        adapter = layer.adapters["default"]
        assert adapter.lora_A.shape[0] == room and isinstance(adapter.scaling, torch.Tensor), name
        assert adapter.scaling.dtype == torch.float64  # merge_dtype of float64 factors
    assert _rel(_out(model, inputs), before) <= FP64_TOL
    after = minilora.adapter_state_dict(model)  # saved at the adapter's own rank
    assert after.keys() == saved.keys() and all(torch.equal(after[k], saved[k]) for k in saved)
    if not case.startswith("conv2d_grouped"):  # a grouped conv's LoRA is never merged
        minilora.merge(model)
        assert _rel(_out(model, inputs), before) <= FP64_TOL


def test_held_scaling_keeps_its_precision_through_casts(tmp_path):
    model = minilora.inject(build("mlp"), targets=["lin0"], r=3, lora_alpha=16)
    minilora.prepare_for_hotswap(model)
    adapter = model.lin0.adapters["default"]
    model.to(torch.bfloat16)  # would round 16/3 to 8 bits
    assert adapter.scaling.dtype == torch.float32 and adapter.scaling.item() == torch.tensor(16 / 3).item()
    assert adapter.lora_A.dtype == torch.bfloat16


# ---------------------------------------------------------------- swaps equal fresh loads
@pytest.mark.parametrize("case", sorted(CASES))
def test_swaps_equal_fresh_loads_and_save_what_was_swapped_in(case, tmp_path):
    paths = _save_adapters(case, tmp_path)
    model = _fresh(case, paths[0])
    inputs = _inputs(case, model)
    minilora.prepare_for_hotswap(model, target_rank=_max_rank(case))
    outputs = []
    for path in paths[1:]:
        minilora.hotswap_adapter(model, path)
        want = _out(_fresh(case, path), inputs)
        assert _rel(_out(model, inputs), want) <= FP64_TOL, path
        outputs.append(want)
        for name, layer in lora_layers(model):  # the room beyond the rank is zero (also for gradients)
            for param in ("lora_A", "lora_B"):
                tensor = getattr(layer.adapters["default"], param)
                assert tensor.count_nonzero() == layer.unpadded("default", param, tensor).count_nonzero(), (name, param)
        minilora.save_adapter(model, tmp_path / "again")
        got, source = load_file(tmp_path / "again" / WEIGHTS), load_file(os.path.join(path, WEIGHTS))
        assert got.keys() == source.keys() and all(torch.equal(got[k], source[k]) for k in source)
        with open(os.path.join(path, CONFIG)) as source_config:
            assert json.loads((tmp_path / "again" / CONFIG).read_text()) == json.load(source_config)
    assert min(_rel(a, b) for a, b in zip(outputs, outputs[1:])) > 1e-3  # the adapters differ


def test_tolerance_catches_a_scaling_off_by_one_part_in_a_million(tmp_path):
    paths = _save_adapters("llama", tmp_path)
    model = _fresh("llama", paths[0])
    inputs = _inputs("llama", model)
    minilora.prepare_for_hotswap(model, target_rank=8)
    minilora.hotswap_adapter(model, paths[1])
    want = _out(_fresh("llama", paths[1]), inputs)
    assert _rel(_out(model, inputs), want) <= FP64_TOL
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    adapter.set_scaling(float(adapter.scaling) * (1 + 1e-6))
    assert _rel(_out(model, inputs), want) > FP64_TOL


def test_swap_without_prepare_goes_down_and_up_in_rank(tmp_path):
    # Eager use needs no preparation: a smaller rank is padded into the factors, a larger one gets
    # new factor Parameters; the scalings stay Python numbers.
    paths = _save_adapters("llama", tmp_path)
    model = _fresh("llama", paths[1])  # r=2
    inputs = _inputs("llama", model)
    for path in (paths[0], paths[3], paths[1]):  # r=8; r=4 with v_proj at 8; r=2 again
        minilora.hotswap_adapter(model, path)
        assert _rel(_out(model, inputs), _out(_fresh("llama", path), inputs)) <= FP64_TOL
    assert isinstance(model.model.layers[0].self_attn.q_proj.adapters["default"].scaling, float)
    assert model.model.layers[0].self_attn.v_proj.adapters["default"].lora_A.shape[0] == 8


def test_fewer_targets_and_modules_to_save_act_as_absent(tmp_path):
    # The new adapter leaves v_proj and lm_head alone: zero factors there add nothing, and the
    # trained lm_head copy goes back to the original values.
    wide = minilora.inject(build("llama").double(), targets=["q_proj", "v_proj"], r=4, lora_alpha=8,
                           modules_to_save=["lm_head"])
    randomize_adapters(wide)
    minilora.save_adapter(wide, tmp_path / "wide")
    narrow = minilora.inject(build("llama").double(), targets=["q_proj"], r=2, lora_alpha=8)
    randomize_adapters(narrow, seed=7)
    minilora.save_adapter(narrow, tmp_path / "narrow")
    model = minilora.load_adapter(build("llama").double(), tmp_path / "wide")
    inputs = _inputs("llama", model)
    minilora.hotswap_adapter(model, tmp_path / "narrow")
    assert _rel(_out(model, inputs), _out(narrow, inputs)) <= FP64_TOL
    minilora.hotswap_adapter(model, tmp_path / "wide")  # and back: modules_to_save trained again
    assert _rel(_out(model, inputs), _out(wide, inputs)) <= FP64_TOL


# ---------------------------------------------------------------- under torch.compile
@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", ["llama", "conv2d_grouped_lora_bias", "mlp_dora", "mha"])
def test_compiled_model_swaps_three_adapters_without_recompiling(case, tmp_path, _fresh_dynamo):
    paths = _save_adapters(case, tmp_path)
    model = _fresh(case, paths[0])
    inputs = _inputs(case, model)
    minilora.prepare_for_hotswap(model, target_rank=_max_rank(case))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=case != "llama")
    assert _rel(_out(compiled, inputs), _out(_fresh(case, paths[0]), inputs)) <= FP64_TOL
    frames = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        for path in paths[1:]:  # three adapters: other ranks, alphas, patterns
            minilora.hotswap_adapter(compiled, path)
            assert _rel(_out(compiled, inputs), _out(_fresh(case, path), inputs)) <= FP64_TOL, path
    assert counter.frame_count == frames


def test_the_counter_sees_the_recompile_prepare_avoids(tmp_path, _fresh_dynamo):
    # Control: without prepare_for_hotswap the scaling is a Python float baked into the graph, so a
    # swap to another alpha recompiles; the counter of the test above would have seen it.
    paths = _save_adapters("llama", tmp_path)
    model = _fresh("llama", paths[0])
    inputs = _inputs("llama", model)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    _out(compiled, inputs)
    frames = counter.frame_count
    minilora.hotswap_adapter(compiled, paths[1])
    assert _rel(_out(compiled, inputs), _out(_fresh("llama", paths[1]), inputs)) <= FP64_TOL
    assert counter.frame_count > frames


# ---------------------------------------------------------------- against peft
def test_peft_saved_adapter_swapped_in_gives_peft_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    source = minilora.inject(build("llama").double(), targets=["q_proj", "v_proj"], r=3, lora_alpha=5,
                             use_rslora=True, alpha_pattern={"v_proj": 2})
    randomize_adapters(source, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build("llama").double(), peft.LoraConfig(
            target_modules=["q_proj", "v_proj"], r=3, lora_alpha=5, use_rslora=True, alpha_pattern={"v_proj": 2}))
    copy_to_peft(source, theirs)
    theirs.eval().save_pretrained(tmp_path / "peft")
    first = _save_adapters("llama", tmp_path)[0]
    model = _fresh("llama", first)
    minilora.prepare_for_hotswap(model, target_rank=8)
    minilora.hotswap_adapter(model, tmp_path / "peft")
    inputs = _inputs("llama", model)
    want = _out(theirs, inputs)
    assert _rel(want, _out(build("llama").double(), inputs)) > 1e-2
    assert _rel(_out(model, inputs), want) <= FP64_TOL


# ---------------------------------------------------------------- bf16 against float64
def test_bf16_layer_swapped_is_within_its_rounding_bound(tmp_path):
    """One bf16 Linear (K = 64 inputs) with fp32 adapters, swapped from r=16 to r=5, against the
    float64 formula. The branch runs in fp32 (the adapters' dtype) and the sum is rounded once to
    bf16: |y - ref| <= (u_bf16 + u_bf16 + (K + r + 2)·u_fp32) · mag, with mag the same formula on
    absolute values (the two bf16 roundings: the base output and the final cast; the fp32 chain:
    K + r products summed, the scaling, the add). A scaling off by 10% fails it (checked below);
    1% would hide under bf16's own 2⁻⁸ rounding of each output."""
    K, N = 64, 24
    layers = []
    for r, alpha, seed in ((16, 16, 0), (5, 12, 1)):
        torch.manual_seed(seed)
        layer = minilora.inject(torch.nn.Sequential(torch.nn.Linear(K, N)).to(torch.bfloat16), targets=["0"], r=r,
                                lora_alpha=alpha, init_lora_weights=False)
        minilora.save_adapter(layer, tmp_path / str(r))
        layers.append(layer)
    model = layers[0]
    minilora.prepare_for_hotswap(model)
    minilora.hotswap_adapter(model, tmp_path / "5")
    x = torch.randn(32, K).to(torch.bfloat16)
    src, lin = layers[1][0], model[0]
    s = 12 / 5

    def formula(x, W, b, A, B):
        return x @ W.T + b + s * (x @ A.T) @ B.T

    args = [t.detach().double() for t in (x, lin.weight, lin.bias, src.adapters["default"].lora_A,
                                          src.adapters["default"].lora_B)]
    ref, mag = formula(*args), formula(*[a.abs() for a in args])
    tol = 2 * 2.0**-8 + (K + 5 + 2) * 2.0**-24
    with torch.no_grad():
        y = model(x).double()
        assert ((y - ref).abs() <= tol * mag).all()
        model[0].adapters["default"].set_scaling(s * 1.1)
        assert not ((model(x).double() - ref).abs() <= tol * mag).all()


# ---------------------------------------------------------------- refusals leave the model as it was
def _break_rank(folder):  # rank 16: above the room of 8
    model = minilora.inject(build("llama").double(), targets=["q_proj", "v_proj", "up_proj"], r=16, lora_alpha=8)
    minilora.save_adapter(model, folder)


def _break_targets(folder):  # k_proj: a layer the loaded adapter does not touch
    model = minilora.inject(build("llama").double(), targets=["q_proj", "k_proj"], r=2, lora_alpha=8)
    minilora.save_adapter(model, folder)


def _break_dora(folder):
    model = minilora.inject(build("llama").double(), targets=["q_proj"], r=2, use_dora=True)
    minilora.save_adapter(model, folder)


def _break_bias(folder):
    model = minilora.inject(build("llama").double(), targets=["q_proj"], r=2, bias="all")
    minilora.save_adapter(model, folder)


def _edit_tensors(folder, fn):
    tensors = load_file(os.path.join(folder, WEIGHTS))
    fn(tensors)
    save_file(tensors, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(100)


KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
REFUSALS = {
    "rank_above_room": (_break_rank, ValueError, "has room for rank 8.*prepare_for_hotswap"),
    "new_target": (_break_targets, ValueError, r"touches \['model.layers.0.self_attn.k_proj'"),
    "use_dora_differs": (_break_dora, ValueError, "use_dora=True in the new adapter"),
    "trains_biases": (_break_bias, ValueError, "bias='all'"),
    "missing_key": (lambda f: _edit_tensors(f, lambda t: t.pop(KEY_A)), minilora.AdapterFileError, "lacks 1 key"),
    "wrong_shape": (lambda f: _edit_tensors(f, lambda t: t.update({KEY_A: t[KEY_A][:, :-1].clone()})),
                    minilora.AdapterFileError, "has shape"),
    "wrong_dtype": (lambda f: _edit_tensors(f, lambda t: t.update({KEY_A: t[KEY_A].to(torch.int32)})),
                    minilora.AdapterFileError, "dtype torch.int32"),
    "non_finite": (lambda f: _edit_tensors(f, lambda t: t[KEY_A].__setitem__((0, 0), float("nan"))),
                   minilora.AdapterFileError, "not finite|NaN|inf"),
    "corrupt_file": (lambda f: _truncate(os.path.join(f, WEIGHTS)), minilora.AdapterFileError, "truncated or corrupt"),
    "no_config": (lambda f: os.remove(os.path.join(f, CONFIG)), minilora.AdapterFileError, "is missing"),
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refusal_leaves_the_model_exactly_as_it_was(refusal, tmp_path):
    paths = _save_adapters("llama", tmp_path)
    model = _fresh("llama", paths[0])
    minilora.prepare_for_hotswap(model, target_rank=8)
    breaker, error, message = REFUSALS[refusal]
    builds_its_own = refusal in ("rank_above_room", "new_target", "use_dora_differs", "trains_biases")
    bad = str(tmp_path / "bad") if builds_its_own else paths[1]
    breaker(bad)
    before, attrs = snapshot(model), _adapter_attrs(model)
    with pytest.raises(error, match=message):
        minilora.hotswap_adapter(model, bad)
    assert_unchanged(model, before)
    assert _adapter_attrs(model) == attrs


def test_merged_or_unknown_adapter_is_refused(tmp_path):
    paths = _save_adapters("llama", tmp_path)
    model = _fresh("llama", paths[0])
    before = snapshot(model)
    with pytest.raises(ValueError, match="unknown adapter"):
        minilora.hotswap_adapter(model, paths[1], adapter_name="other")
    minilora.merge(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="is merged into.*unmerge"):
        minilora.hotswap_adapter(model, paths[1])
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad, message", [(0, "integer from 1"), (4, "below the rank 8"), (True, "integer")])
def test_prepare_refuses_bad_target_rank_untouched(bad, message, tmp_path):
    model = _fresh("llama", _save_adapters("llama", tmp_path)[0])
    before, attrs = snapshot(model), _adapter_attrs(model)
    with pytest.raises(ValueError, match=message):
        minilora.prepare_for_hotswap(model, target_rank=bad)
    assert_unchanged(model, before)
    assert _adapter_attrs(model) == attrs


def test_prepare_refuses_rank_not_multiple_of_conv_groups(tmp_path):
    model = _fresh("conv2d_grouped_lora_bias", _save_adapters("conv2d_grouped_lora_bias", tmp_path)[0])
    attrs = _adapter_attrs(model)
    with pytest.raises(ValueError, match="not a multiple of the groups=2"):
        minilora.prepare_for_hotswap(model, target_rank=7)
    assert _adapter_attrs(model) == attrs


def test_held_scaling_takes_the_pytorch_path():
    x, w, A, B, s = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2), torch.tensor(1.5)
    with pytest.raises(RuntimeError, match="held as a tensor"):
        ops.lora_linear(x, w, None, A, B, s, backend="triton")
    torch.testing.assert_close(ops.lora_linear(x, w, None, A, B, s), ops.lora_linear_reference(x, w, None, A, B, 1.5))


def test_same_swap_in_peft_gives_the_same_outputs_and_peft_refuses_what_minilora_allows(tmp_path):
    # The same files through peft's own hot-swap: equal outputs where peft swaps; an adapter that
    # turns on rsLoRA is refused by peft's config check and swapped by minilora.
    peft = pytest.importorskip("peft")
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap, prepare_model_for_compiled_hotswap
    paths = _save_adapters("llama", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build("llama").double(), paths[0]).eval()
        prepare_model_for_compiled_hotswap(theirs, target_rank=8)
        peft_hotswap(theirs, paths[1], adapter_name="default", torch_device="cpu")
    ours = _fresh("llama", paths[0])
    minilora.prepare_for_hotswap(ours, target_rank=8)
    minilora.hotswap_adapter(ours, paths[1])
    inputs = _inputs("llama", ours)
    assert _rel(_out(ours, inputs), _out(theirs, inputs)) <= FP64_TOL
    with pytest.raises(ValueError, match="use_rslora"):
        peft_hotswap(theirs, paths[2], adapter_name="default", torch_device="cpu")
    minilora.hotswap_adapter(ours, paths[2])
    assert _rel(_out(ours, inputs), _out(_fresh("llama", paths[2]), inputs)) <= FP64_TOL


def test_mixed_batch_after_a_swap_uses_the_swapped_scaling(tmp_path):
    """per_sample_adapters stacks each layer's adapters once and keeps the stack while they do not
    change; a swap into a prepared model writes the factors and the held scaling in place, so the
    stack must see both (the scaling by its tensor's version) and the rows get the new adapter."""
    paths = _save_adapters("llama", tmp_path)
    model = _fresh("llama", paths[0])
    minilora.load_adapter(model, paths[1], adapter_name="other")
    minilora.prepare_for_hotswap(model, target_rank=_max_rank("llama"))
    model.eval()
    inputs = _inputs("llama", model)
    rows = inputs["input_ids"].shape[0]
    names = ["default" if i % 2 == 0 else "other" for i in range(rows)]
    with torch.no_grad(), minilora.per_sample_adapters(model, names):
        _out(model, inputs)  # builds and caches the stacks
    minilora.hotswap_adapter(model, paths[3], "default")  # same rank as a3's room, another alpha
    with torch.no_grad(), minilora.per_sample_adapters(model, names):
        mixed = _out(model, inputs)
    expected = _out(_fresh("llama", paths[3]).eval(), inputs)
    for i in range(0, rows, 2):
        assert _rel(mixed[i], expected[i]) <= FP64_TOL, i


class _WithParameter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Module()
        self.inner.w = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))

    def forward(self, x):
        return x @ self.inner.w.T


@pytest.mark.parametrize("kind", ["target_parameters", "trainable_token_indices"])
def test_hosts_a_swap_does_not_write_are_refused_unchanged(kind, tmp_path):
    """A swap writes LoRA layers and modules_to_save copies only: LoRA on parameters or token rows
    are refused by name before anything is written (before: they kept the old adapter's values)."""
    if kind == "target_parameters":
        build_one = lambda: (torch.manual_seed(0), _WithParameter())[1]  # noqa: E731
        fields = dict(target_modules=[], target_parameters=["inner.w"])
    else:
        build_one = lambda: build("llama").double()  # noqa: E731
        fields = dict(target_modules=["q_proj"], trainable_token_indices=[1, 2])
    for i, alpha in enumerate((4, 8)):
        model = minilora.inject(build_one(), r=2, lora_alpha=alpha, init_lora_weights=False, **fields)
        minilora.save_adapter(model, tmp_path / f"a{i}")
    model = minilora.load_adapter(build_one(), tmp_path / "a0")
    before, attrs = snapshot(model), _adapter_attrs(model)
    with pytest.raises(ValueError, match=r"a swap writes only LoRA layers and modules_to_save copies.*use load_adapter"):
        minilora.hotswap_adapter(model, tmp_path / "a1")
    assert_unchanged(model, before)
    assert _adapter_attrs(model) == attrs
