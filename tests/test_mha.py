"""LoRA on ``nn.MultiheadAttention`` against peft on the same weights.

The models and configs are peft's two "MHA" cases of tests/test_custom_models.py (``ModelMha``:
an ``nn.MultiheadAttention(10, 2)``, then ``lin0 = nn.Linear(10, 2)`` and a LogSoftmax; targets
``["mha"]`` and ``["mha", "lin0"]``), plus variants with ``batch_first``, a ``key_padding_mask``,
``need_weights=False`` and ``add_bias_kv``.

peft 0.21.2 adds out_proj's delta twice: its ``MultiheadAttention.merge`` writes W + ΔW into
out_proj and then calls ``out_proj.merge``, which adds ΔW again (huggingface/peft#3774, open), in
every forward and in merge_and_unload, while autograd sees ΔW once. minilora adds it once, so the
reference here is peft with that second addition turned off (``fixed_peft``);
``test_peft_0_21_doubles_out_proj_delta`` pins down what unfixed peft computes instead.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import minilora
from minilora.inject import lora_layers
from minilora.layers import LoraLinear, LoraMultiheadAttention
from minilora.model_config import adaptable_modules
from minilora.offline_merge import merge_checkpoint
from tiny_models import ModelMha, randomize_adapters

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402
from peft.tuners.lora.layer import MultiheadAttention as PeftMha  # noqa: E402

PREFIX = "base_model.model."
# peft's two MHA cases (TEST_CASES of its tests/test_custom_models.py); random factors, alpha != r.
PEFT_CASES = {"MHA 1 LoRA": dict(target_modules=["mha"]), "MHA 2 LoRA": dict(target_modules=["mha", "lin0"])}
# (batch_first, key_padding_mask, need_weights, add_bias_kv); "peft" is peft's own model and input shape.
VARIANTS = {"peft": (False, False, True, False), "batch_first-mask": (True, True, True, False),
            "seq_first-mask-noweights-biaskv": (False, True, False, True)}

# float64: two correct implementations differ by rounding only. The longest sums are over E = 10
# inputs or S = 7 keys; a handful of stages (projections, softmax, attention, out_proj, lin0,
# log-softmax) and their backward: ~10 · 10 · 2^-53 ~ 1e-14 relative. A dropped term or wrong
# scaling moves outputs by the adapters' effect, asserted > 1e-2 below. 1e-10 sits between.
FP64_TOL = 1e-10
# float32: the same argument with u = 2^-24: ~10 · 10 · 6e-8 = 6e-6; 3e-5 leaves 5x for the
# compounding through 3 optimizer steps. Still 300x below the adapters' effect.
FP32_TOL = 3e-5
# bf16 (fp32 adapters, as peft): peft rounds ΔW to bf16 before adding it to W, minilora rounds
# W + ΔW once, so a few weight elements differ by one bf16 spacing (2^-7 relative at most); every
# activation is rounded to bf16 too. As tests/test_dora_peft.py argues: a few spacings of the
# output scale, 4 · 2^-7; gradients pass the same roundings once more backwards: twice that.
BF16_SPACING = 2.0 ** -7
BF16_TOL = 4 * BF16_SPACING
BF16_GRAD_TOL = 2 * BF16_TOL


def make_base(variant: str = "peft", dtype: torch.dtype = torch.float64) -> tuple[nn.Module, dict]:
    """The base model and its inputs: peft's unbatched (9, 10), or a batch of 3 sequences of 7."""
    batch_first, masked, need_weights, bias_kv = VARIANTS[variant]
    torch.manual_seed(0)
    base = ModelMha(batch_first=batch_first, add_bias_kv=bias_kv).to(dtype).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    if variant == "peft":
        return base, dict(X=torch.randn(9, 10, generator=g, dtype=torch.float64).to(dtype))
    x = torch.randn(3, 7, 10, generator=g, dtype=torch.float64).to(dtype)
    inputs = dict(X=x if batch_first else x.transpose(0, 1), need_weights=need_weights)
    if masked:  # the last positions of two sequences are padding
        mask = torch.zeros(3, 7, dtype=torch.bool)
        mask[0, 5:] = mask[2, 3:] = True
        inputs["key_padding_mask"] = mask
    return base, inputs


def fixed_peft(pm):
    """peft with out_proj's delta added once: out_proj's own merge/unmerge keep the books only
    (peft's MultiheadAttention.merge has already written W + ΔW into out_proj, with its graph)."""
    for module in pm.modules():
        if isinstance(module, PeftMha):
            out = module.base_layer.out_proj
            out.merge = lambda safe_merge=False, adapter_names=None, out=out: out.merged_adapters.extend(
                n for n in (out.active_adapters if adapter_names is None else adapter_names)
                if n not in out.merged_adapters)
            out.unmerge = lambda out=out: out.merged_adapters.clear()
    return pm


def peft_name(ours: str) -> str:
    """``mha.out_proj.adapters.default.lora_A`` -> peft's ``mha.base_layer.out_proj.lora_A.default.weight``."""
    module, rest = ours.split(".adapters.")
    adapter, leaf = rest.split(".")
    module = module.replace("mha.out_proj", "mha.base_layer.out_proj")
    return f"{PREFIX}{module}.{leaf}.{adapter}.weight"


def build_pair(fields: dict, variant: str = "peft", dtype: torch.dtype = torch.float64):
    """(base, ours, fixed peft model, inputs) with identical random factors, copied into peft through
    the adapter's file keys (so the keys are checked too)."""
    base, inputs = make_base(variant, dtype)
    fields = dict(fields, lora_alpha=16)  # scaling 2: a wrong scaling shows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
        pm = fixed_peft(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields)))
    randomize_adapters(ours)
    ours_sd = minilora.adapter_state_dict(ours)
    theirs_sd = peft.get_peft_model_state_dict(pm)
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in theirs_sd.items()}
    result = peft.set_peft_model_state_dict(pm, ours_sd)
    assert not result.unexpected_keys
    return base, ours, pm, inputs


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def outputs(model, inputs) -> torch.Tensor:
    """Log-probs and attention weights (when asked for) as one tensor."""
    y, w = model(**inputs)
    return y.flatten() if w is None else torch.cat([y.flatten(), w.flatten()])


def loss_of(out: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).to(out.dtype)
    return (out * weights).sum()


def trainable_pairs(ours, pm) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    theirs = dict(pm.named_parameters())
    mine = {peft_name(n): p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == {n for n, p in theirs.items() if p.requires_grad}
    return [(n, p, theirs[n]) for n, p in mine.items()]


def assert_grads_close(pairs, tol: float) -> None:
    scale = max(theirs.grad.abs().max().item() for _, _, theirs in pairs)
    for name, mine, theirs in pairs:
        assert (mine.grad - theirs.grad).abs().max().item() <= tol * scale, name


def merged_reference(layer, adapter: str = "default") -> torch.Tensor:
    """W + s·B@A in float64 from the stored values."""
    ad = layer.adapters[adapter]
    return layer.weight.detach().double() + ad.scaling * (ad.lora_B.double() @ ad.lora_A.double())


def assert_rounded_once(merged: torch.Tensor, ref: torch.Tensor, ad) -> None:
    """merged (the weight's dtype) is ref rounded once, up to the fp32 rounding of s·B@A (r terms):
    |merged - ref| <= u·|ref| + (u32 + γ_r)·(|ref| + s·|B||A|), u the weight dtype's unit roundoff."""
    u = torch.finfo(merged.dtype).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2 if merged.dtype != torch.float64 else u
    spread = ad.scaling * (ad.lora_B.double().abs() @ ad.lora_A.double().abs())
    bound = u * ref.abs() + (ad.r + 2) * u32 * (ref.abs() + spread)
    assert ((merged.double() - ref).abs() <= bound).all()


# ---------------------------------------------------------------- peft's two cases, and variants
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(PEFT_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_matches_peft(case, variant, dtype):
    fields = PEFT_CASES[case]
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    base, ours, pm, inputs = build_pair(fields, variant, dtype)
    names = sorted(n.removeprefix(PREFIX).replace(".base_layer", "") for n, m in pm.named_modules()
                   if isinstance(m, PeftLoraLayer))
    assert sorted(minilora.adapted_modules(ours)) == names
    assert minilora.find_targets(base, minilora.LoraConfig(**fields)) == fields["target_modules"]
    assert minilora.trainable_parameters(ours) == pm.get_nb_trainable_parameters()
    assert set(base.state_dict()) <= set(ours.state_dict())  # the base keys did not move
    for key, tensor in base.state_dict().items():
        assert ours.state_dict()[key] is not None and torch.equal(ours.state_dict()[key], tensor), key

    base_out = outputs(base, inputs)
    y_ours, y_peft = outputs(ours, inputs), outputs(pm, inputs)
    assert max_rel_err(y_ours, y_peft) <= tol
    assert max_rel_err(y_ours, base_out) > 1e-2, "adapters had no effect: the comparison proves nothing"
    pairs = trainable_pairs(ours, pm)
    loss_of(y_ours).backward()
    loss_of(y_peft).backward()
    assert all(mine.grad is not None and mine.grad.abs().max() > 0 for _, mine, _ in pairs)
    assert_grads_close(pairs, tol)

    # three lockstep SGD steps (peft's own MHA tests use lr=1e-3: attention logits grow fast)
    opt_ours = torch.optim.SGD([p for _, p, _ in pairs], lr=1e-3)
    opt_peft = torch.optim.SGD([p for _, _, p in pairs], lr=1e-3)
    for _ in range(3):
        for opt, model in ((opt_ours, ours), (opt_peft, pm)):
            opt.zero_grad()
            loss_of(outputs(model, inputs)).backward()
            opt.step()
        for name, mine, theirs in pairs:
            assert max_rel_err(mine, theirs) <= tol, name
    assert max_rel_err(outputs(ours, inputs), outputs(pm, inputs)) <= tol
    for key, tensor in base.state_dict().items():  # training wrote nothing into the base weights
        assert torch.equal(ours.state_dict()[key], tensor), key
    # eval under inference_mode without weights: nn.MultiheadAttention's fast path, where it applies
    ours.eval()
    pm.eval()
    with torch.inference_mode():
        fast = dict(inputs, need_weights=False)
        assert max_rel_err(outputs(ours, fast), outputs(pm, fast)) <= tol


@pytest.mark.parametrize("case", list(PEFT_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_merge_unmerge_and_unload(case, dtype):
    fields = PEFT_CASES[case]
    tol = {torch.float64: FP64_TOL, torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}[dtype]
    base, ours, pm, inputs = build_pair(fields, "batch_first-mask", dtype)
    layers = dict(lora_layers(ours))
    mha = layers["mha"]
    assert isinstance(mha, LoraMultiheadAttention) and isinstance(layers["mha.out_proj"], LoraLinear)
    originals = {k: v.clone() for k, v in ours.state_dict().items()}
    refs = {name: merged_reference(layer) for name, layer in layers.items()}
    with torch.no_grad():
        unmerged = outputs(ours, inputs)
        minilora.merge(ours, keep_original=True)
        pm.merge_adapter()
        merged = outputs(ours, inputs)
        # The attention adds the deltas exactly as merge does: the same weights, the same bits
        # (lin0, a Linear, adds its branch to x Wᵀ unmerged: rounding apart).
        assert torch.equal(merged, unmerged) if "lin0" not in fields["target_modules"] else \
            max_rel_err(merged, unmerged) <= tol
        assert max_rel_err(merged, outputs(pm, inputs)) <= tol
        for name, layer in layers.items():
            assert_rounded_once(layer.weight, refs[name], layer.adapters["default"])
        minilora.merge(ours, keep_original=True)  # merging twice changes nothing
        assert torch.equal(outputs(ours, inputs), merged)
        minilora.unmerge(ours)
        for key, tensor in ours.state_dict().items():
            assert torch.equal(tensor, originals[key]), key
        assert torch.equal(outputs(ours, inputs), unmerged)

        minilora.merge(ours)  # as peft: W - ΔW on unmerge, within rounding of W
        minilora.unmerge(ours)
        for key in ("mha.in_proj_weight", "mha.out_proj.weight"):
            assert max_rel_err(ours.state_dict()[key], originals[key]) <= tol, key

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft: "already merged"
            plain_ours = minilora.merge_and_unload(ours)
            plain_peft = pm.merge_and_unload()
    assert [type(m) for m in plain_ours.modules()] == [type(m) for m in plain_peft.modules()] \
        == [type(m) for m in base.modules()]
    sd_ours, sd_peft = plain_ours.state_dict(), plain_peft.state_dict()
    assert list(sd_ours) == list(base.state_dict())  # peft re-registers in_proj_weight last
    assert set(sd_peft) == set(sd_ours)
    for name, layer in layers.items():
        key = "mha.in_proj_weight" if name == "mha" else f"{name}.weight"
        assert_rounded_once(sd_ours[key], refs[name], layer.adapters["default"])
        # peft rounds ΔW to the weight dtype before adding: one more rounding, one spacing in bf16
        assert max_rel_err(sd_peft[key], refs[name]) <= (BF16_SPACING if dtype == torch.bfloat16 else tol), key
    with torch.no_grad():
        assert torch.equal(outputs(plain_ours, inputs), merged)
        assert max_rel_err(outputs(plain_ours, inputs), outputs(plain_peft, inputs)) <= tol


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_bf16_outputs_and_gradients_match_peft(case):
    base, ours, pm, inputs = build_pair(PEFT_CASES[case], "batch_first-mask", torch.bfloat16)
    pairs = trainable_pairs(ours, pm)
    for name, mine, theirs in pairs:  # fp32 adapters over the bf16 base, as peft
        assert mine.dtype == theirs.dtype == torch.float32, name
    assert ours.mha.in_proj_weight.dtype == torch.bfloat16
    y_ours, y_peft = outputs(ours, inputs), outputs(pm, inputs)
    assert y_ours.dtype == y_peft.dtype == torch.bfloat16
    assert max_rel_err(y_ours, y_peft) <= BF16_TOL
    loss_of(y_ours).backward()
    loss_of(y_peft).backward()
    assert_grads_close(pairs, BF16_GRAD_TOL)
    # The bound still tells a wrong scaling apart: peft with the deltas' scaling doubled.
    with torch.no_grad():
        for module in pm.modules():
            if isinstance(module, PeftLoraLayer):
                module.scaling["default"] *= 2
        assert max_rel_err(outputs(pm, inputs), y_peft) > 2 * BF16_TOL


def test_safe_merge_refuses_a_broken_out_proj_adapter_and_merges_nothing():
    _, ours, _, _ = build_pair(PEFT_CASES["MHA 1 LoRA"])
    before = copy.deepcopy(ours.state_dict())
    with torch.no_grad():
        ours.mha.out_proj.adapters["default"].lora_B[0, 0] = float("inf")
    before["mha.out_proj.adapters.default.lora_B"] = ours.mha.out_proj.adapters["default"].lora_B.clone()
    with pytest.raises(ValueError, match="'mha.out_proj'.*non-finite"):
        minilora.merge(ours, safe=True)
    assert unchanged(ours, before) and not ours.mha.merged and not ours.mha.out_proj.merged


def test_peft_0_21_doubles_out_proj_delta():
    """What unfixed peft computes: out_proj with W + 2ΔW (minilora: W + ΔW, see the module doc)."""
    base, ours, _, inputs = build_pair(PEFT_CASES["MHA 1 LoRA"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["mha"], lora_alpha=16))
    peft.set_peft_model_state_dict(pm, minilora.adapter_state_dict(ours))
    with torch.no_grad():
        y_peft = outputs(pm, inputs)
        assert max_rel_err(outputs(ours, inputs), y_peft) > 1e-2
        ours.mha.out_proj.adapters["default"].lora_B.mul_(2)
        assert max_rel_err(outputs(ours, inputs), y_peft) <= FP64_TOL


# ---------------------------------------------------------------- files, adapters, switches
def test_save_load_both_ways(tmp_path):
    base, ours, pm, inputs = build_pair(PEFT_CASES["MHA 2 LoRA"], "batch_first-mask")
    with torch.no_grad():
        want = outputs(ours, inputs)
    minilora.save_adapter(ours, tmp_path / "ours")
    theirs = fixed_peft(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours"))
    with torch.no_grad():
        assert max_rel_err(outputs(theirs, inputs), want) <= FP64_TOL
    pm.save_pretrained(tmp_path / "peft")
    loaded = minilora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert max_rel_err(outputs(loaded, inputs), want) <= FP64_TOL
    # peft's file -> ours -> file: the same tensors under the same keys
    minilora.save_adapter(loaded, tmp_path / "again")
    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert list(theirs_file) == list(again) and all(torch.equal(theirs_file[k], again[k]) for k in again)


def test_bias_lora_only_trains_and_saves_out_projs_bias_as_peft(tmp_path):
    base, _ = make_base("batch_first-mask")
    fields = dict(target_modules=["mha"], bias="lora_only")
    ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad and "adapters" not in n) == \
        ["mha.out_proj.bias"]
    assert set(minilora.adapter_state_dict(ours)) == set(peft.get_peft_model_state_dict(pm))


def test_multi_adapter_disable_and_delete():
    base, ours, pm, inputs = build_pair(PEFT_CASES["MHA 2 LoRA"], "batch_first-mask")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minilora.inject(ours, minilora.LoraConfig(target_modules=["mha"], lora_alpha=4), adapter_name="other")
        pm.add_adapter("other", peft.LoraConfig(target_modules=["mha"], lora_alpha=4))
    fixed_peft(pm)
    randomize_adapters(ours, seed=7)
    peft.set_peft_model_state_dict(pm, minilora.adapter_state_dict(ours, "default"))
    peft.set_peft_model_state_dict(pm, minilora.adapter_state_dict(ours, "other"), adapter_name="other")
    with torch.no_grad():
        base_out, one = outputs(base, inputs), outputs(ours, inputs)
        for names in (["other"], ["default", "other"]):
            minilora.set_adapter(ours, names)
            pm.base_model.set_adapter(names)
            got = outputs(ours, inputs)
            assert max_rel_err(got, outputs(pm, inputs)) <= FP64_TOL, names
            assert max_rel_err(got, one) > 1e-2
        # inactive adapters are frozen, on both projections
        assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
            f"{m}.adapters.{a}.lora_{f}" for m in ("mha", "mha.out_proj") for a in ("default", "other")
            for f in "AB"} | {"lin0.adapters.default.lora_A", "lin0.adapters.default.lora_B"}
    # both active: each adapter's factors get their gradient (peft 0.21 gives the first one none)
    minilora.set_adapter(ours, ["default", "other"])
    pm.base_model.set_adapter(["default", "other"])
    for name, p in pm.named_parameters():
        p.requires_grad_(".lora_" in name)
    loss_of(outputs(ours, inputs)).backward()
    loss_of(outputs(pm, inputs)).backward()
    theirs = dict(pm.named_parameters())
    for name, p in ours.named_parameters():
        if ".adapters." in name and name.startswith("mha"):
            assert p.grad is not None and p.grad.abs().max() > 0, name
            their = theirs[peft_name(name)].grad
            if ".other." in name:
                assert (p.grad - their).abs().max() <= FP64_TOL * their.abs().max(), name
    with torch.no_grad():
        with minilora.disable_adapters(ours):
            assert torch.equal(outputs(ours, inputs), base_out)
        minilora.set_adapter(ours, "default")
        assert torch.equal(outputs(ours, inputs), one)
        minilora.merge(ours)
        with pytest.raises(ValueError, match="unmerge"), minilora.disable_adapters(ours):
            pass
        minilora.unmerge(ours)
    minilora.delete_adapter(ours, "other")
    assert "other" not in ours.mha.adapters and "other" not in ours.mha.out_proj.adapters
    minilora.delete_adapter(ours, "default")
    assert [type(m) for m in ours.modules()] == [type(m) for m in base.modules()]
    assert list(ours.state_dict()) == list(base.state_dict())
    with torch.no_grad():
        assert max_rel_err(outputs(ours, inputs), base_out) <= FP64_TOL


def test_add_weighted_adapter_cat_is_the_sum_of_deltas():
    _, ours, _, inputs = build_pair(PEFT_CASES["MHA 1 LoRA"], "batch_first-mask")
    minilora.add_weighted_adapter(ours, ["default"], [0.5], "mix", combination_type="cat")
    assert ours.minilora_state.configs["mix"].target_modules == ["mha"]
    for name, layer in lora_layers(ours):
        src, new = layer.adapters["default"], layer.adapters["mix"]
        want = 0.5 * src.scaling * src.lora_B.double() @ src.lora_A.double()
        assert max_rel_err(new.scaling * new.lora_B.double() @ new.lora_A.double(), want) <= FP64_TOL, name


def test_train_and_eval_reach_the_attention():
    _, ours, _, _ = build_pair(PEFT_CASES["MHA 1 LoRA"])
    ours.eval()
    assert not ours.mha.base_layer.training
    ours.train()
    assert ours.mha.base_layer.training
    assert ours.mha.embed_dim == 10 and ours.mha.num_heads == 2 and not ours.mha.batch_first
    assert (ours.mha.in_features, ours.mha.out_features) == (10, 30)


# ---------------------------------------------------------------- what is refused
def unchanged(model: nn.Module, before: dict) -> bool:
    after = model.state_dict()
    return list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kwargs, fields, match", [
    (dict(kdim=4, vdim=4), dict(target_modules=["mha"]), "kdim=4 / vdim=4 differ from embed_dim=10"),
    ({}, dict(target_modules=["mha"], use_dora=True), "DoRA on nn.MultiheadAttention"),
    ({}, dict(target_modules=["mha"], lora_bias=True), "lora_bias=True on nn.MultiheadAttention"),
    ({}, dict(target_modules=["out_proj"]), "'mha.out_proj' .* is the out_proj of the nn.MultiheadAttention 'mha'"),
    ({}, dict(target_modules=["mha", "mha.out_proj"]), "Target 'mha' instead"),
])
def test_refused_with_the_reason_and_nothing_changed(kwargs, fields, match):
    torch.manual_seed(0)
    model = ModelMha(**kwargs)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        minilora.inject(model, minilora.LoraConfig(**fields))
    assert unchanged(model, before) and not hasattr(model, "minilora_state")


def test_all_linear_leaves_out_proj_out_and_says_so():
    model, _ = make_base()
    with pytest.warns(UserWarning, match=r"'all-linear' leaves out \['mha.out_proj'\].*'mha'"):
        minilora.inject(model, minilora.LoraConfig(target_modules="all-linear"))
    assert minilora.adapted_modules(model) == ["lin0"]
    # a second adapter's all-linear over the adapted attention: its out_proj is still left out
    minilora.inject(model, minilora.LoraConfig(target_modules=["mha"]), adapter_name="b")
    with pytest.warns(UserWarning, match="leaves out"):
        minilora.inject(model, minilora.LoraConfig(target_modules="all-linear"), adapter_name="c")
    assert "c" not in model.mha.out_proj.adapters


def test_inspect_lists_the_attention_not_its_out_proj():
    model, _ = make_base()
    assert adaptable_modules(model) == {"mha": "MultiheadAttention 10, 2 heads", "lin0": "Linear 10->2"}


def test_dropout_does_not_apply_and_says_so():
    model, _ = make_base()
    with pytest.warns(UserWarning, match="lora_dropout=0.1 does not apply to 'mha'"):
        minilora.inject(model, minilora.LoraConfig(target_modules=["mha", "lin0"], lora_dropout=0.1))


def test_per_sample_adapters_refused():
    _, ours, _, inputs = build_pair(PEFT_CASES["MHA 1 LoRA"], "batch_first-mask")
    ours.eval()
    with pytest.raises(ValueError, match="rows cannot have different adapters"), \
            minilora.per_sample_adapters(ours, ["default", "__base__", "default"]):
        ours(**inputs)
    assert ours.mha.row_adapters is None


def test_offline_merge_refuses_mha_naming_it(tmp_path):
    base, ours, _, _ = build_pair(PEFT_CASES["MHA 2 LoRA"])
    os.makedirs(tmp_path / "base")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    minilora.save_adapter(ours, tmp_path / "adapter")
    with pytest.raises(ValueError, match="nn.MultiheadAttention 'mha'.*minilora.merge_and_unload"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
