"""Adapter initialisation: distributions (Kolmogorov-Smirnov), zero factors, a fresh inject is a
no-op on the output, and pissa / olora move the principal part into the adapter exactly as peft."""

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
from tiny_models import build, example_inputs, output_of

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


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj", "gate_proj", "down_proj"]),
                                          ("gpt2", ["c_attn", "c_fc"]), ("mlp", ["lin0", "lin1", "head"])])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_residual_plus_adapter_is_the_original(kind, targets, init):
    if (kind, init) == ("gpt2", "olora"):
        return _check_olora_conv1d()
    base, ours, pm = _peft_and_ours(kind, targets, init)
    inputs = example_inputs(kind, base)
    with torch.no_grad():
        expected = output_of(base(**inputs))
        got = output_of(ours(**inputs))
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
            torch.testing.assert_close(B.T @ B, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal columns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["c_attn"], r=4,
                                                                       init_lora_weights="olora"))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        pm(**inputs)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rank_above_the_matrix_rank_is_refused_before_any_change(init):
    from tiny_models import assert_unchanged, snapshot
    model = build("mlp")  # head is 20 -> 6: at most 6 directions
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' takes r=8 principal directions of 'head', "
                                         r"whose weight \(6, 20\) has only 6"):
        minilora.inject(model, targets=["lin0", "head"], r=8, init_lora_weights=init)
    assert_unchanged(model, before)
