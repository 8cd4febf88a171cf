"""merge / unmerge / merge_and_unload / unload / disable_adapters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import minilora
from minilora.inject import lora_layers, lora_state
from tiny_models import (assert_unchanged, build, copy_to_peft, example_inputs, output_of,
                         randomize_adapters, snapshot)

peft = pytest.importorskip("peft")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U32 = 2.0**-24  # float32 unit roundoff


def rounding_bound(dtype: torch.dtype, low: int, fp32: int) -> float:
    """Bound on |computed - exact| / mag for ``low`` roundings to ``dtype`` and ``fp32`` float32
    roundings along the longest chain, where mag is the same formula evaluated in float64 on
    absolute values. Each rounding is off by at most u·(its value) <= u·mag, and a sum of n terms
    is n - 1 roundings in any order (Higham, Accuracy and Stability of Numerical Algorithms,
    ch. 3-4): the bound holds for every summation order, so on every CPU."""
    return low * torch.finfo(dtype).eps / 2 + fp32 * U32


# Whole models merged in float64: the delta s·B·A is formed in float64 too (merge_dtype; it was
# float32, off by (r + 2)·U32 ~ 3.6e-7), so every rounding is float64's: ~n·2**-53·Σ|terms| with
# n <= 64 terms per dot product and <= 2 layers (Higham ch. 3-4, any summation order), i.e. about
# 1e-14 relative. A wrong merge is of the order of the adapters' effect (> 1e-3, checked): 1e-10
# sits far from both.
MODEL_MERGE_TOL = 1e-10


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def as64(inputs: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def one_layer(dtype, out_features=1024, in_features=512, r=8, seed=0):
    """peft's own bf16 example shape: a 1024x512 Linear, r=8, random (non-zero) adapters."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features)).to(dtype)
    minilora.inject(model, targets=["0"], r=r, lora_alpha=16)
    randomize_adapters(model, seed=seed)
    with torch.no_grad():  # small adapters, as after real training: delta << W
        for p in model[0].adapters.parameters():
            p.mul_(0.1)
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_twice_changes_nothing(dtype):
    model = one_layer(dtype)
    minilora.merge(model)
    once = weights(model)
    minilora.merge(model)
    minilora.merge(model, keep_original=True)
    assert_same(weights(model), once)
    assert model[0].merged == ["default"]


def test_unmerge_without_merge_is_a_no_op():
    model = one_layer(torch.bfloat16)
    before = weights(model)
    minilora.unmerge(model)
    assert_same(weights(model), before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_original_makes_unmerge_bit_exact(dtype):
    model = one_layer(dtype)
    before = weights(model)
    minilora.merge(model, keep_original=True)
    assert not torch.equal(model[0].weight, before["0.weight"])
    minilora.unmerge(model)
    assert_same(weights(model), before)
    assert model[0].merged == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_unmerge_is_not_exact_in_low_precision(dtype):
    """peft's W - delta round trip (the default without keep_original) moves low-precision weights;
    a test that pretended otherwise would hide peft issue #3498. The drift stays within a few ulps."""
    model = one_layer(dtype)
    before = model[0].weight.detach().clone()
    minilora.merge(model)
    minilora.unmerge(model)
    after = model[0].weight.detach()
    changed = (after != before).float().mean().item()
    assert changed > 0.01  # many elements moved
    # two roundings, of W + delta and of the result - delta: at most eps/2 of each magnitude
    delta = model[0].delta_weight(model[0].adapters["default"])
    bound = torch.finfo(dtype).eps * (before.float().abs() + delta.abs()) + torch.finfo(dtype).tiny
    assert ((after.float() - before.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_forward_equals_unmerged(dtype):
    model = one_layer(dtype)
    layer, ad = model[0], model[0].adapters["default"]
    x = torch.randn(4, 3, 512, generator=torch.Generator().manual_seed(1)).to(dtype)
    K, r, s = 512, 8, ad.scaling
    x64, W, b, A, B = (t.detach().double() for t in (x, layer.weight, layer.bias, ad.lora_A, ad.lora_B))
    # mag of y = x W^T + b + s (x A^T) B^T: the scale of every rounding error in either path
    mag = x64.abs() @ W.abs().T + b.abs() + s * (x64.abs() @ A.abs().T) @ B.abs().T
    with torch.no_grad():
        unmerged = model(x)
        minilora.merge(model)
        merged = model(x)
    W_merged = layer.weight.detach().double()
    ref = x64 @ W_merged.T + b  # the merged weight as stored, float64
    assert merged.dtype == unmerged.dtype == dtype
    # Merged: the product with the stored weight, K + 1 float32 roundings and, in bf16/fp16, one
    # rounding of the output; its own mag is x64.abs() @ |W_merged|^T + |b|.
    merged_mag = x64.abs() @ W_merged.abs().T + b.abs()
    assert ((merged.double() - ref).abs() <= rounding_bound(dtype, 1, K + 1) * merged_mag).all()
    # Each path is within 2 roundings to the dtype (the merged weight or the base output; the
    # output) and K + r + 5 float32 roundings (products of length K and r, delta, scale, bias,
    # sums) of the exact y: the two within twice that. Catches a merge off by 0.2% (fp32), 6%
    # (fp16) of the delta; bf16 only a grossly wrong one (its rounding is 0.4%).
    bound = 2 * rounding_bound(dtype, 2, K + r + 5)
    assert ((merged.double() - unmerged.double()).abs() <= bound * mag).all()


@pytest.mark.parametrize("kind,targets,overrides", [
    ("conv2d", ["conv0", "conv1"], {}),
    ("conv2d", ["conv0", "conv1"], dict(dilation=2)),
    ("conv1d", ["conv0", "conv1"], dict(padding_mode="reflect")),
    ("conv3d", ["conv0", "conv1"], {}),
    ("embed_conv1d", ["emb", "c_fc", "c_proj"], {}),
    ("gpt2", ["c_attn", "c_proj", "wte"], {}),
])
def test_merge_conv_embedding_conv1d(kind, targets, overrides):
    base = build(kind, **overrides).double()  # float64: see MODEL_MERGE_TOL
    model = minilora.inject(copy.deepcopy(base), targets=targets, r=4, lora_alpha=8, fan_in_fan_out=kind != "conv2d")
    randomize_adapters(model)
    inputs = as64(example_inputs(kind, base))
    with torch.no_grad():
        unmerged = output_of(model(**inputs))
        assert rel_err(unmerged, output_of(base(**inputs))) > 1e-3
        before = weights(model)
        minilora.merge(model, keep_original=True)
        assert rel_err(output_of(model(**inputs)), unmerged) <= MODEL_MERGE_TOL
        minilora.unmerge(model)
        assert_same(weights(model), before)
        plain = minilora.merge_and_unload(model)
        assert rel_err(output_of(plain(**inputs)), unmerged) <= MODEL_MERGE_TOL
        assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
        assert list(plain.state_dict()) == list(base.state_dict())


class ConvThenGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(4, 8, 3)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)

    def forward(self, x):
        return self.grouped(self.plain(x))


def test_grouped_conv_merge_refused_before_any_change():
    torch.manual_seed(0)
    model = minilora.inject(ConvThenGrouped(), targets=["plain", "grouped"], r=4)
    randomize_adapters(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot merge into 'grouped': LoRA on a grouped conv \(groups=2\)"):
        minilora.merge(model)
    with pytest.raises(ValueError, match=r"grouped conv"):
        minilora.merge_and_unload(model)
    assert_unchanged(model, before)  # 'plain' was not merged either
    assert all(not layer.merged for _, layer in lora_layers(model))


def test_lora_bias_without_base_bias_merge_refused_before_any_change():
    model = build("mlp")
    with pytest.warns(UserWarning, match="cannot be merged"):
        minilora.inject(model, targets=["lin0", "lin1"], lora_bias=True)
    randomize_adapters(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot merge into 'lin1': adapter 'default' has a lora_bias but the base layer has no bias"):
        minilora.merge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_with_non_finite_adapter_leaves_all_weights(bad):
    model = minilora.inject(build("llama"), targets=["q_proj", "v_proj"])
    randomize_adapters(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B[0, 0] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"into 'model\.layers\.1\.self_attn\.v_proj' gives non-finite values in "
                                         r"its weight; nothing was merged"):
        minilora.merge(model, safe=True)
    assert_unchanged(model, before)
    assert all(not layer.merged for _, layer in lora_layers(model))


def test_disable_adapters_gives_base_output_and_restores_even_on_error():
    base = build("llama")
    model = minilora.inject(copy.deepcopy(base), targets=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    randomize_adapters(model)
    inputs = example_inputs("llama", base)
    with torch.no_grad():
        expected, adapted = output_of(base(**inputs)), output_of(model(**inputs))
        assert rel_err(adapted, expected) > 1e-3
        with minilora.disable_adapters(model):
            assert torch.equal(output_of(model(**inputs)), expected)
        assert torch.equal(output_of(model(**inputs)), adapted)
        with pytest.raises(KeyError, match="boom"):
            with minilora.disable_adapters(model):
                raise KeyError("boom")
        assert torch.equal(output_of(model(**inputs)), adapted)
        assert not any(getattr(m, "disabled", False) for m in model.modules())


def test_disable_while_merged_is_refused():
    model = one_layer(torch.float32)
    minilora.merge(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot disable adapters while they are merged \(e\.g\. in '0'\); "
                                         r"call minilora\.unmerge\(model\) first"):
        with minilora.disable_adapters(model):
            pass
    assert_unchanged(model, before)
    assert not model[0].disabled


@pytest.mark.parametrize("kind, config", [
    ("mlp", dict(target_modules=["lin0"])),
    ("llama", dict(target_modules=["q_proj"], trainable_token_indices=[3, 5])),  # token rows run first
    ("mha", dict(target_modules=["mha"])),
    ("mlp", dict(target_modules=[], target_parameters=["lin0.weight"])),
])
def test_merging_inside_disable_adapters_then_running_is_refused_by_every_host(kind, config):
    """Inside disable_adapters the plain module's output is asked for; merged adapters took it
    away, so each kind of host refuses with one message, and runs again once unmerged."""
    model = minilora.inject(build(kind), minilora.LoraConfig(**config, init_lora_weights=False))
    inputs = example_inputs(kind, model)
    with torch.no_grad():
        with minilora.disable_adapters(model):
            plain = output_of(model(**inputs))
            minilora.merge(model)
            with pytest.raises(RuntimeError, match=r"adapters \['default'\] are merged into the weights, so they "
                                                   r"cannot be disabled; call minilora.unmerge\(model\) first"):
                model(**inputs)
            minilora.unmerge(model)  # W + delta - delta in fp32: a rounding of |W + delta| per weight
            torch.testing.assert_close(output_of(model(**inputs)), plain, rtol=1e-5, atol=1e-6)


def test_merge_on_a_model_without_adapters_is_refused():
    model = build("mlp")
    with pytest.raises(ValueError, match=r"merge: this model has no minilora adapters; call minilora\.inject"):
        minilora.merge(model)
    with pytest.raises(ValueError, match=r"merge: unknown adapter\(s\) \['nope'\]; this model has \['default'\]"):
        minilora.merge(minilora.inject(model, targets=["lin0"]), adapter_names="nope")


def test_merge_and_unload_gives_plain_base_layers():
    base = build("llama").double()  # float64: see MODEL_MERGE_TOL
    model = minilora.inject(copy.deepcopy(base), targets=["q_proj", "down_proj", "embed_tokens"],
                            modules_to_save=["lm_head"])
    randomize_adapters(model)
    inputs = example_inputs("llama", base)
    with torch.no_grad():
        adapted = output_of(model(**inputs))
        plain = minilora.merge_and_unload(model)
        assert plain is model and not hasattr(plain, "minilora_state")
        assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
        assert list(plain.state_dict()) == list(base.state_dict())
        assert rel_err(output_of(plain(**inputs)), adapted) <= MODEL_MERGE_TOL


def test_unload_puts_base_layers_back_and_keeps_trained_copies_as_peft():
    base = build("llama")
    fields = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
    randomize_adapters(model)
    trained_head = model.lm_head.modules_to_save["default"].weight.detach().clone()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    copy_to_peft(model, pm)
    inputs = example_inputs("llama", base)
    with torch.no_grad():
        plain, theirs = minilora.unload(model), pm.unload()
        assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
        # LoRA gone, but lm_head is the trained copy (not the original), as in peft
        assert torch.equal(plain.lm_head.weight, trained_head)
        expected = copy.deepcopy(base)
        expected.lm_head.weight.copy_(trained_head)
        assert torch.equal(output_of(plain(**inputs)), output_of(expected(**inputs)))
        assert torch.equal(output_of(plain(**inputs)), output_of(theirs(**inputs)))
        sd, theirs_sd = plain.state_dict(), theirs.state_dict()
        assert list(sd) == list(theirs_sd)
        assert all(torch.equal(sd[k], theirs_sd[k]) for k in sd)


def test_merge_unties_a_shared_embedding_and_exact_unmerge_ties_it_again():
    """LoRA on GPT-2's wte, which lm_head shares: merging must not change lm_head, and an exact
    unmerge (keep_original) restores the tie and the config flag; an inexact one leaves them
    untied, with the flag saying so."""
    model = build("gpt2")
    with pytest.warns(UserWarning):
        minilora.inject(model, targets=["wte", "c_attn"], r=4)
    randomize_adapters(model)
    wte, head = model.transformer.wte, model.lm_head
    shared = head.weight.detach().clone()
    assert head.weight is wte.weight and model.config.tie_word_embeddings

    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match="untied before merging"):
        minilora.merge(model, keep_original=True)
    assert list(model.state_dict()) == keys  # no stray key for the remembered shared weight
    assert head.weight is not wte.weight and not model.config.tie_word_embeddings
    assert lora_state(model).untied["transformer.wte"].shared is head.weight  # remembered by the model
    assert torch.equal(head.weight, shared)  # lm_head kept its weight
    assert not torch.equal(wte.weight, shared)  # the embedding got the delta

    minilora.unmerge(model)
    assert head.weight is wte.weight and model.config.tie_word_embeddings and not lora_state(model).untied

    with pytest.warns(UserWarning, match="untied before merging"):
        minilora.merge(model)
    minilora.unmerge(model)  # W - delta in fp32 is not bit-exact: stays untied, flag false
    assert head.weight is not wte.weight and not model.config.tie_word_embeddings


def test_dry_run_clone_copies_no_real_memory():
    """load_adapter's dry run clones the model on the meta device; tensors held as plain
    attributes (keep_original's CPU copies, an untied embedding's shared weight) must not be
    deep-copied with real memory either."""
    from minilora.checkpoint import meta_clone

    model = build("gpt2")
    with pytest.warns(UserWarning):
        minilora.inject(model, targets=["wte", "c_attn"], r=4)
    with pytest.warns(UserWarning, match="untied before merging"):
        minilora.merge(model, keep_original=True)
    assert lora_state(model).untied and model.transformer.wte.original_weights is not None
    clone = meta_clone(model)
    seen = 0
    for module in clone.modules():
        for value in [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]:
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    assert t.device.type == "meta", type(module).__name__
                    seen += 1
    assert seen > 20
    assert lora_state(clone).untied["transformer.wte"].shared is clone.lm_head.weight  # the tie survives the clone


def test_keep_original_after_a_plain_merge_is_refused_and_model_unchanged():
    model = minilora.inject(build("mlp"), targets=["lin0"], r=4, init_lora_weights=False)
    minilora.inject(model, targets=["lin0"], r=4, init_lora_weights=False, adapter_name="b")
    minilora.merge(model, adapter_names="default")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already merged without it"):
        minilora.merge(model, keep_original=True, adapter_names="b")
    assert_unchanged(model, before)


def test_keep_original_refusal_on_a_later_layer_leaves_earlier_layers_unmerged():
    """Adapter b sits on lin1 only and is merged there without keep_original; merging "default"
    (on lin0 and lin1) with keep_original must be refused before lin0 is touched."""
    model = minilora.inject(build("mlp"), targets=["lin0", "lin1"], r=4, init_lora_weights=False)
    minilora.inject(model, targets=["lin1"], r=4, init_lora_weights=False, adapter_name="b")
    minilora.merge(model, adapter_names="b")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot merge into 'lin1': keep_original=True while \['b'\] are already"):
        minilora.merge(model, keep_original=True, adapter_names="default")
    assert_unchanged(model, before)
    assert model.lin0.merged == [] and model.lin0.original_weights is None


def test_fp32_model_under_autocast_matches_the_reference():
    model = minilora.inject(build("mlp"), targets=["lin0", "lin1"], r=4, init_lora_weights=False)
    x = torch.randn(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    with torch.no_grad():
        ref = model(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 0.05 * ref.abs().max()
