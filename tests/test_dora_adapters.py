"""DoRA with several adapters: per-row batches, merging adapters in turn, add_weighted_adapter.

Equivalence with peft lives in test_dora_peft.py; these cases check minilora's own contracts
against float64 references. FP64_TOL: two correct float64 computations of a tiny model differ by
reordered sums only (n·u·Σ|terms|, n < 100, u = 2**-53: < 1e-13 of the output); a wrong
magnitude, norm or order of adapters changes outputs by the adapter's effect, > 1e-3.
"""

from __future__ import annotations

import pytest
import torch

import minilora
from minilora.inject import lora_layers
from tiny_models import assert_unchanged, build, example_inputs, output_of, randomize_adapters, snapshot, with_adapter

FP64_TOL = 1e-10
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out=False does not fit")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _out(model, inputs):
    with torch.no_grad():
        return output_of(model(**inputs))


def _model(kind: str, dora_b: bool = True):
    """float64 model with DoRA adapter "default" and adapter "b" (DoRA or plain LoRA), random
    factors and magnitudes away from their initial norms."""
    if kind == "llama":
        a = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8)
        b = dict(target_modules=["q_proj", "up_proj"], r=2, lora_alpha=3)
    else:
        a = dict(target_modules=["emb", "c_fc"], r=4, lora_alpha=8)
        b = dict(target_modules=["c_proj", "emb"], r=2, lora_alpha=3)
    model = minilora.inject(build(kind).double(), init_lora_weights=False, use_dora=True, **a)
    minilora.inject(model, adapter_name="b", init_lora_weights=False, use_dora=dora_b, **b)
    randomize_adapters(model)
    with torch.no_grad():  # magnitudes near their usual size (randomize gives ~N(0, 0.3))
        for _, layer in lora_layers(model):
            for adapter in layer.adapters.values():
                if adapter.magnitude is not None:
                    norm = layer.dora_direct_norm(adapter, layer.weight)
                    adapter.magnitude.copy_(norm * (1 + adapter.magnitude))
    return model.eval()


def _reference(model, inputs, name):
    return with_adapter(model, name, lambda: _out(model, inputs))


@pytest.mark.parametrize("dora_b", [True, False], ids=["dora+dora", "dora+lora"])
@pytest.mark.parametrize("kind", ["llama", "embed_conv1d"])
def test_per_sample_rows_with_dora_match_single_adapter_runs(kind, dora_b):
    # peft refuses adapter_names with DoRA; each row here must get exactly what its adapter alone gives.
    model = _model(kind, dora_b)
    names = ["b", "__base__", "default", "b", "default"]
    inputs = example_inputs(kind, model, batch=len(names))
    with minilora.per_sample_adapters(model, names):
        mixed = _out(model, inputs)
    refs = {n: _reference(model, inputs, n) for n in set(names)}
    assert len({tuple(r.flatten()[:4].tolist()) for r in refs.values()}) == 3
    for i, name in enumerate(names):
        assert _rel(mixed[i], refs[name][i]) <= FP64_TOL, (i, name)


@pytest.mark.parametrize("kind", ["llama", "embed_conv1d"])
def test_merging_dora_adapters_in_turn_equals_both_active(kind):
    """Both adapters active: each DoRA adapter rescales the running output, as peft. Merging them
    (one call, or one after the other) gives that model, and its norm comes from the unmerged
    weight (as forward sees it), not from the weight holding the first merged adapter."""
    model = _model(kind)
    inputs = example_inputs(kind, model)
    minilora.set_adapter(model, ["default", "b"])
    both = _out(model, inputs)
    original = {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}
    for order in (["default", "b"], [["default"], ["b"]]):
        if isinstance(order[0], list):
            for names in order:
                minilora.merge(model, adapter_names=names)
        else:
            minilora.merge(model, adapter_names=order)
        assert _rel(_out(model, inputs), both) <= FP64_TOL
        minilora.unmerge(model)  # without keep_original: W / g - ΔW, as peft
        for n, layer in lora_layers(model):
            assert _rel(layer.weight, original[n]) <= FP64_TOL, n
        assert _rel(_out(model, inputs), both) <= FP64_TOL


def test_keep_original_unmerge_is_bit_exact_with_dora():
    model = _model("llama")
    before = {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}
    minilora.set_adapter(model, ["default", "b"])
    minilora.merge(model, keep_original=True)
    assert any(not torch.equal(layer.weight, before[n]) for n, layer in lora_layers(model))
    minilora.unmerge(model)
    assert all(torch.equal(layer.weight, before[n]) for n, layer in lora_layers(model))


def test_add_weighted_adapter_refuses_dora_and_leaves_model_unchanged():
    model = _model("llama", dora_b=False)
    snap = snapshot(model)
    for sources in (["default", "b"], ["default"]):
        with pytest.raises(ValueError, match=r"\['default'\] use DoRA; their magnitude vectors"):
            minilora.add_weighted_adapter(model, sources, [0.5] * len(sources), "mix", combination_type="cat")
        assert_unchanged(model, snap)
    minilora.add_weighted_adapter(model, ["b"], [0.5], "half_b")  # plain LoRA still combines


def test_dora_trainable_parameters_are_factors_and_magnitude():
    model = minilora.inject(build("llama"), target_modules=["q_proj"], r=4, use_dora=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = [n for n, _ in lora_layers(model)]
    assert trainable == {f"{n}.adapters.default.{p}" for n in layers for p in ("lora_A", "lora_B", "magnitude")}
    with pytest.raises(ValueError, match=r"lora_bias=True does not work with use_dora=True"):
        minilora.inject(build("llama"), target_modules=["q_proj"], use_dora=True, lora_bias=True)
