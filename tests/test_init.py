"""Adapter initialisation: distributions (Kolmogorov-Smirnov), zero factors, a fresh inject is a
no-op on the output, and pissa / olora move the principal part into the adapter exactly as peft,
also on layers that carry adapters already and when a PiSSA adapter is loaded."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
from scipy import stats

import minilora
from minilora.inject import lora_layers
from tiny_models import (assert_unchanged, build, copy_adapter_to_peft, example_inputs, output_of,
                         randomize_adapters, snapshot)

peft = pytest.importorskip("peft")

P_MIN = 1e-3  # a correct init fails this with probability 1e-3 per test; seeds are fixed anyway


class Wide(nn.Module):
    """Big enough layers for a KS test with thousands of samples."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(300, 200)
        self.emb = nn.Embedding(500, 40)
        self.conv = nn.Conv2d(20, 30, 3)


def _adapter(model, name):
    return dict(lora_layers(model))[name].adapters["default"]


def _ks(sample: torch.Tensor, dist: str, args: tuple) -> float:
    return stats.kstest(sample.detach().double().flatten().numpy(), dist, args=args).pvalue


def _kaiming_bound(fan_in: int) -> float:
    # torch's kaiming_uniform_(a=sqrt(5)): gain = sqrt(2 / (1 + a²)), bound = sqrt(3) · gain / sqrt(fan_in)
    gain = math.sqrt(2.0 / (1 + 5))
    return math.sqrt(3.0) * gain / math.sqrt(fan_in)


@pytest.mark.parametrize("r", [4, 16])
def test_gaussian_init_distribution(r):
    torch.manual_seed(0)
    model = minilora.inject(Wide(), targets=["lin", "emb", "conv"], r=r, init_lora_weights="gaussian")
    for name in ("lin", "conv"):
        ad = _adapter(model, name)
        assert _ks(ad.lora_A, "norm", (0, 1 / r)) > P_MIN
        assert _ks(ad.lora_A, "norm", (0, 1 / math.sqrt(r))) < 1e-6  # the test can tell std 1/r from 1/sqrt(r)
        assert torch.count_nonzero(ad.lora_B) == 0
    emb = _adapter(model, "emb")
    assert torch.count_nonzero(emb.lora_A) == 0
    assert _ks(emb.lora_B, "norm", (0, 1)) > P_MIN


@pytest.mark.parametrize("r", [4, 16])
def test_kaiming_init_distribution(r):
    torch.manual_seed(0)
    model = minilora.inject(Wide(), targets=["lin", "emb", "conv"], r=r, init_lora_weights=True)
    for name, fan_in in (("lin", 300), ("conv", 20 * 3 * 3)):
        ad = _adapter(model, name)
        b = _kaiming_bound(fan_in)
        assert ad.lora_A.abs().max() <= b
        assert _ks(ad.lora_A, "uniform", (-b, 2 * b)) > P_MIN
        assert _ks(ad.lora_A, "uniform", (-2 * b, 4 * b)) < 1e-6
        assert torch.count_nonzero(ad.lora_B) == 0
    emb = _adapter(model, "emb")
    assert torch.count_nonzero(emb.lora_A) == 0
    assert _ks(emb.lora_B, "norm", (0, 1)) > P_MIN


@pytest.mark.parametrize("kind,targets", [
    ("llama", ["q_proj", "v_proj", "embed_tokens", "down_proj"]),
    ("gpt2", ["c_attn", "c_fc", "wte"]),
    ("conv2d", ["conv0", "conv1"]),
    ("embed_conv1d", ["emb", "c_fc", "c_proj"]),
])
@pytest.mark.parametrize("init", ["gaussian", True, False])
def test_fresh_inject_is_a_no_op_unless_init_false(kind, targets, init):
    base = build(kind)
    inputs = example_inputs(kind, base)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = output_of(base(**inputs))
        ours = minilora.inject(copy.deepcopy(base), targets=targets, init_lora_weights=init)
        got = output_of(ours(**inputs))
    if init is False:
        assert not torch.allclose(got, expected, rtol=1e-3, atol=1e-3)
    else:
        assert torch.equal(got, expected)


def _peft_and_ours(kind, targets, init, r=4, alpha=8):
    base = build(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minilora.inject(copy.deepcopy(base), targets=targets, r=r, lora_alpha=alpha, init_lora_weights=init)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=targets, r=r, lora_alpha=alpha,
                                                                       init_lora_weights=init))
    return base, ours, pm


@pytest.fixture
def seeded_svd_lowrank(monkeypatch):
    """torch.svd_lowrank draws its random basis from the global generator, which peft and minilora
    advance differently while building layers; reseeded at each call, both get the same draws."""
    import peft.tuners.lora.layer as peft_layer
    real = torch.svd_lowrank

    def seeded(A, q=6, niter=2, M=None):
        torch.manual_seed(1234)
        return real(A, q=q, niter=niter, M=M)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj", "gate_proj", "down_proj"]),
                                          ("gpt2", ["c_attn", "c_fc"]), ("mlp", ["lin0", "lin1", "head"])])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_pissa_olora_residual_plus_adapter_is_the_original(kind, targets, init, seeded_svd_lowrank):
    if (kind, init) == ("gpt2", "olora"):
        return _check_olora_conv1d()
    base, ours, pm = _peft_and_ours(kind, targets, init)
    inputs = example_inputs(kind, base)
    with torch.no_grad():
        expected = output_of(base(**inputs))
        got = output_of(ours(**inputs))
        # fp32 SVD/QR is backward stable: residual + s·BA = W + E, |E| <~ n·2**-24·|W| (n <= 128,
        # <= 8e-6 of |W|; measured 1e-7 at the outputs), so 1e-5 holds; a wrong scale is O(|W|).
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
        modules = dict(pm.base_model.model.named_modules())
        original = dict(base.named_modules())
        for name, layer in lora_layers(ours):
            ad, theirs = layer.adapters["default"], modules[name]
            assert ad.lora_B.abs().max() > 0.05  # not a zero-B init
            torch.testing.assert_close(ad.lora_A, theirs.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ad.lora_B, theirs.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-6)
            # float64 check of "residual + s·BA = original" per layer
            full = layer.weight.double() + layer.delta_weight(ad).double()
            torch.testing.assert_close(full, original[name].weight.double(), rtol=0, atol=1e-5)
        assert torch.allclose(got, output_of(pm(**inputs)), rtol=1e-5, atol=1e-5)


def _check_olora_conv1d():
    """peft's olora factors a Conv1D's stored (in, out) weight: its forward then crashes on these
    shapes. minilora factors the (out, in) matrix, so residual + adapter is the original."""
    base = build("gpt2")
    inputs = example_inputs("gpt2", base)
    ours = minilora.inject(copy.deepcopy(base), targets=["c_attn", "c_fc"], r=4, lora_alpha=8, init_lora_weights="olora")
    with torch.no_grad():
        assert torch.allclose(output_of(ours(**inputs)), output_of(base(**inputs)), rtol=1e-5, atol=1e-5)
        for _, layer in lora_layers(ours):
            B = layer.adapters["default"].lora_B
            torch.testing.assert_close(B.T @ B, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal: QR, ~n·u = 3e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["c_attn"], r=4,
                                                                       init_lora_weights="olora"))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        pm(**inputs)


@pytest.mark.parametrize("adapted", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rank_above_the_matrix_rank_is_refused_before_any_change(init, adapted):
    model = build("mlp")  # head is 20 -> 6: at most 6 directions
    if adapted:  # the LoRA layer holds the weight now, not its base_layer
        minilora.inject(model, targets=["head"], r=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' takes r=8 principal directions of 'head', "
                                         r"whose weight \(6, 20\) has only 6"):
        minilora.inject(model, targets=["lin0", "head"], r=8, init_lora_weights=init, adapter_name="p")
    assert_unchanged(model, before)


# ---------------------------------------------------------------- pissa / olora beside other adapters
FIRST = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)


def _adapted_pair():
    """minilora and peft llama models with adapter "default" on q_proj / v_proj, same random factors."""
    ours = minilora.inject(build("llama"), minilora.LoraConfig(**FIRST))
    randomize_adapters(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(**FIRST))
    copy_adapter_to_peft(ours, theirs)
    return ours, theirs.eval()


def _weights64(model) -> dict[str, torch.Tensor]:
    """Every linear weight of the model as it is now, float64 (a LoRA layer holds its own)."""
    return {n: m.weight.detach().double().clone() for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and "adapters" not in n}


def _assert_same_as_peft(ours, theirs, adapters):
    """Same base weights, same factors of every adapter, same outputs with each adapter active."""
    modules = dict(theirs.base_model.model.named_modules())
    assert minilora.adapted_modules(ours) == [n for n, m in modules.items() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for name, layer in lora_layers(ours):
        theirs_layer = modules[name]
        torch.testing.assert_close(layer.weight, theirs_layer.base_layer.weight, rtol=1e-6, atol=1e-6)
        for adapter_name, adapter in layer.adapters.items():
            torch.testing.assert_close(adapter.lora_A, theirs_layer.lora_A[adapter_name].weight, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(adapter.lora_B, theirs_layer.lora_B[adapter_name].weight, rtol=1e-6, atol=1e-6)
    inputs = example_inputs("llama", ours)
    for active in adapters:
        minilora.set_adapter(ours, active)
        theirs.base_model.set_adapter(active)  # PeftModel.set_adapter takes one name only
        with torch.no_grad():
            torch.testing.assert_close(output_of(ours(**inputs)), output_of(theirs(**inputs)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_second_pissa_olora_adapter_decomposes_the_current_weight_as_peft(init):
    # peft (LoraLayer.update_layer -> pissa_init / olora_init) decomposes whatever weight the layer
    # has now and leaves the residual under every adapter of the layer.
    ours, theirs = _adapted_pair()
    before = _weights64(ours)
    second = dict(target_modules=["q_proj", "up_proj"], r=2, lora_alpha=4, init_lora_weights=init)
    with pytest.warns(UserWarning, match=rf"init_lora_weights='{init}' replaces the weight of "
                                         r"'model\.layers\.0\.self_attn\.q_proj' \(and 1 other layers\) by its "
                                         r"residual, and adapters \['default'\] already there"):
        minilora.inject(ours, minilora.LoraConfig(**second), adapter_name="p")
    theirs.add_adapter("p", peft.LoraConfig(**second))
    for name, layer in lora_layers(ours):
        if "p" in layer.adapters:  # float64: residual + s·B A is the weight the layer had
            full = layer.weight.double() + layer.delta_weight(layer.adapters["p"]).double()
            torch.testing.assert_close(full, before[name], rtol=0, atol=1e-5)
            assert (layer.weight.double() - before[name]).abs().max() > 1e-2  # the residual is not the weight
    _assert_same_as_peft(ours, theirs, ["default", "p", ["default", "p"]])


def test_load_pissa_adapter_reruns_the_decomposition_as_peft(tmp_path):
    # peft's from_pretrained / load_adapter add the adapter as its config says (init_lora_weights=
    # "pissa": SVD of the current weight, the residual left in the base), then fill the factors
    # from the file; also into a layer that carries another adapter.
    trained = minilora.inject(build("llama"), targets=["q_proj", "up_proj"], r=2, lora_alpha=4,
                              init_lora_weights="pissa")
    randomize_adapters(trained)  # as after training
    minilora.save_adapter(trained, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh_theirs = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    fresh = minilora.load_adapter(build("llama"), tmp_path)
    torch.testing.assert_close(fresh.model.layers[0].self_attn.q_proj.weight,
                               trained.model.layers[0].self_attn.q_proj.weight)  # the residual, not the original
    _assert_same_as_peft(fresh, fresh_theirs, ["default"])

    ours, theirs = _adapted_pair()
    with pytest.warns(UserWarning, match=r"init_lora_weights='pissa' replaces the weight of .*adapters \['default'\]"):
        minilora.load_adapter(ours, tmp_path, adapter_name="p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "PiSSA changes the base weights of the model ..."
        theirs.load_adapter(str(tmp_path), adapter_name="p")
    _assert_same_as_peft(ours, theirs, ["default", "p"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_on_a_layer_with_merged_adapters_refused(init):
    # peft decomposes the merged weight; after merge(keep_original=True) an unmerge would then put
    # the kept original back and drop the residual. Refused, model untouched.
    ours, _ = _adapted_pair()
    minilora.merge(ours)
    before = snapshot(ours)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' on 'model\.layers\.0\.self_attn\.q_proj', "
                                         r"whose weight has adapters \['default'\] merged into it.*"
                                         r"minilora\.unmerge\(model\) first"):
        minilora.inject(ours, targets=["q_proj"], r=2, init_lora_weights=init, adapter_name="p")
    assert_unchanged(ours, before)


# ---------------------------------------------------------------- orthogonal
def test_orthogonal_init_draws_peft_s_factors():
    """The same generator state gives peft's factors exactly (its draws, in its order)."""
    from minilora.layers import init_adapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build("mlp"), peft.LoraConfig(target_modules=["lin0"], r=6,
                                                               init_lora_weights="orthogonal"))
    theirs = pm.base_model.model.lin0
    ours = _adapter(minilora.inject(build("mlp"), targets=["lin0"], r=6, init_lora_weights="orthogonal"), "lin0")
    torch.manual_seed(7)
    theirs.orthogonal_init("default")
    torch.manual_seed(7)
    init_adapter(ours, "orthogonal")
    assert torch.equal(ours.lora_A, theirs.lora_A["default"].weight)
    assert torch.equal(ours.lora_B, theirs.lora_B["default"].weight)


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_orthogonal_init_is_a_no_op_with_both_factors_random(kind, targets):
    base = build(kind)
    inputs = example_inputs(kind, base)
    torch.manual_seed(0)
    model = minilora.inject(copy.deepcopy(base), targets=targets, r=8, init_lora_weights="orthogonal")
    for name, layer in lora_layers(model):
        ad = layer.adapters["default"]
        assert ad.lora_A.abs().max() > 0.01 and ad.lora_B.abs().max() > 0.01, name
        # B A = R2ᵀ (Q_odd Q_evenᵀ) R1ᵀ / 100 with Q's rows orthonormal to fp32 rounding: each entry
        # is below ‖B row‖·‖A column‖·‖Q_odd Q_evenᵀ‖, and that norm below r·2⁻²³ for a QR of r x r.
        # A and B from the same half would give ‖B row‖·‖A column‖ itself.
        bound = 8 * 2.0**-23 * ad.lora_B.norm(dim=1).max() * ad.lora_A.norm(dim=0).max()
        assert (ad.lora_B @ ad.lora_A).abs().max() <= bound, name
    with torch.no_grad():  # the outputs move by those products only: far below fp32 rounding of O(1) logits
        torch.testing.assert_close(output_of(model(**inputs)), output_of(base(**inputs)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("targets, r, rank_pattern, message", [
    (["lin0"], 3, {}, r"target 'lin0' has r=3, which is odd"),
    (["lin0", "lin1"], 4, {"lin1": 5}, r"target 'lin1' has r=5, which is odd"),
])
def test_orthogonal_init_needs_even_ranks(targets, r, rank_pattern, message):
    model = build("mlp")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"init_lora_weights='orthogonal' .* needs an even r .*" + message):
        minilora.inject(model, targets=targets, r=r, rank_pattern=rank_pattern, init_lora_weights="orthogonal")
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind, target, found", [("conv2d", "conv0", "Conv2d"), ("mha", "mha", "MultiheadAttention")])
def test_orthogonal_init_needs_matrix_layers(kind, target, found):
    model = build(kind)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"needs an even r and a Linear, Conv1D or Embedding layer; target "
                                         rf"'{target}' is of type {found}"):
        minilora.inject(model, targets=[target], r=4, init_lora_weights="orthogonal")
    assert_unchanged(model, before)


def test_orthogonal_init_on_an_embedding_and_a_peft_file_with_it(tmp_path):
    """peft gives an Embedding its default init under "orthogonal" (its file keeps the name);
    minilora gives it the orthogonal halves too (B A = 0, neither zero), and loads peft's file."""
    model = minilora.inject(build("llama"), targets=["embed_tokens", "q_proj"], r=4, init_lora_weights="orthogonal")
    ad = _adapter(model, "model.embed_tokens")
    assert ad.lora_A.abs().max() > 0.01 and ad.lora_B.abs().max() > 0.01
    bound = 4 * 2.0**-23 * ad.lora_B.norm(dim=1).max() * ad.lora_A.norm(dim=0).max()
    assert (ad.lora_B @ ad.lora_A).abs().max() <= bound
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4,
                                                                    init_lora_weights="orthogonal"))
    assert torch.count_nonzero(theirs.base_model.model.model.embed_tokens.lora_embedding_A["default"]) == 0
    with torch.no_grad():  # peft's adapter trained (random values), saved and loaded
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = minilora.load_adapter(build("llama"), tmp_path / "peft")
    inputs = example_inputs("llama", loaded)
    with torch.no_grad():  # fp32, the same weights: sums of at most 48 terms round apart
        torch.testing.assert_close(output_of(loaded(**inputs)), output_of(theirs(**inputs)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa_niter_4", "orthogonal"])
def test_new_inits_are_refused_on_parameters(init):
    with pytest.raises(ValueError, match="init_lora_weights.*does not work with target_parameters"):
        minilora.LoraConfig(target_parameters=["experts.down_proj"], init_lora_weights=init)


@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_-1", "pissa_niter_12345", "PISSA", "orthogonal "])
def test_bad_init_names_are_refused_with_the_choices(init):
    with pytest.raises(ValueError, match=r"allowed values are .*'orthogonal'.*'pissa_niter_<n>'"):
        minilora.LoraConfig(init_lora_weights=init)
