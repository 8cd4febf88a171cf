"""Several adapters: set / delete / disable, add_weighted_adapter and per-row batches, against
peft on the same weights and against float64 references computed here."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import minilora
from minilora.inject import lora_layers, lora_state
from tiny_models import (assert_unchanged, build, copy_adapter_to_peft, example_inputs, output_of, randomize_adapters,
                         snapshot, with_adapter)

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore")

A_CFG = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8, init_lora_weights=False)
B_CFG = dict(target_modules=["q_proj", "up_proj"], r=2, lora_alpha=3, init_lora_weights=False)


# Comparisons with peft and with float64 references run on float64 models: two correct
# computations then differ by reordered sums only, at most ~n·u·Σ|terms| with u = 2**-53 and
# n <= 48 here, through 2 layers: < 1e-13 of the output on any CPU (in float32 the same comparison
# moves with the CPU's summation order). A real difference (a missing or extra adapter, a wrong
# weight or scale) is of the order of an adapter's effect, > 1e-3.
FP64_TOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _pair(kind="llama", a_cfg=A_CFG, b_cfg=B_CFG, dtype=torch.float32):
    """minilora and peft models with adapters "default" and "b" holding identical random weights."""
    ours = minilora.inject(build(kind).to(dtype), minilora.LoraConfig(**a_cfg))
    minilora.inject(ours, minilora.LoraConfig(**b_cfg), adapter_name="b")
    randomize_adapters(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(kind).to(dtype), peft.LoraConfig(**a_cfg))
        theirs.add_adapter("b", peft.LoraConfig(**b_cfg))
    copy_adapter_to_peft(ours, theirs, "default")
    copy_adapter_to_peft(ours, theirs, "b")
    return ours, theirs.eval()


def _out(model, inputs):
    dtype = next(model.parameters()).dtype  # float inputs follow a float64 model
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return output_of(model(**inputs))


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- set / disable / delete
def test_set_adapter_single_and_several_match_peft_outputs_and_trainable_counts():
    ours, theirs = _pair(dtype=torch.float64)
    inputs = example_inputs("llama", ours)
    for names in ("b", ["default", "b"], "default"):
        minilora.set_adapter(ours, names)
        theirs.base_model.set_adapter(names)
        theirs.base_model.model.train()  # peft only flips requires_grad; compare counts
        assert _rel(_out(ours, inputs), _out(theirs, inputs)) <= FP64_TOL
        n_ours = minilora.trainable_parameters(ours)[0]
        n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
        assert n_ours == n_theirs > 0, names
        theirs.eval()


def test_two_active_adapters_add_their_deltas_float64_reference():
    ours, _ = _pair(dtype=torch.float64)
    minilora.set_adapter(ours, ["default", "b"])
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, 32, dtype=torch.float64)
    expected = x.double() @ layer.weight.double().T
    for name in ("default", "b"):
        ad = layer.adapters[name]
        expected += ad.scaling * (x.double() @ ad.lora_A.double().T @ ad.lora_B.double().T)
    with torch.no_grad():
        assert _rel(layer(x), expected) <= FP64_TOL
    # only the active adapters train
    assert all(("adapters.default." in n or "adapters.b." in n) for n in _trainable(ours))
    minilora.set_adapter(ours, "b")
    assert _trainable(ours) and all("adapters.b." in n for n in _trainable(ours))


def test_set_adapter_errors_leave_state_unchanged():
    ours, _ = _pair()
    before = lora_state(ours).active
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; this model has \['b', 'default'\]"):
        minilora.set_adapter(ours, ["b", "nope"])
    with pytest.raises(ValueError, match="at least one adapter name"):
        minilora.set_adapter(ours, [])
    minilora.merge(ours, adapter_names=["b"])
    with pytest.raises(ValueError, match=r"merged into .*; call minilora.unmerge\(model\)"):
        minilora.set_adapter(ours, "b")
    assert lora_state(ours).active == before


def test_set_adapter_refuses_two_copies_of_one_modules_to_save():
    ours = minilora.inject(build("mlp"), targets=["lin0"], modules_to_save=["head"])
    minilora.inject(ours, targets=["lin1"], modules_to_save=["head"], adapter_name="b")
    with pytest.raises(ValueError, match=r"\['default', 'b'\] each have their own copy of 'head'"):
        minilora.set_adapter(ours, ["default", "b"])


def test_modules_to_save_copy_follows_active_adapter():
    ours = minilora.inject(build("mlp"), targets=["lin0"], modules_to_save=["head"])
    minilora.inject(ours, targets=["lin1"], modules_to_save=["head"], adapter_name="b")
    randomize_adapters(ours)
    head = ours.head
    x = torch.randn(2, 20)
    for name in ("b", "default"):
        minilora.set_adapter(ours, name)
        assert head.current is head.modules_to_save[name]
        assert torch.equal(head(x), head.modules_to_save[name](x))
        assert {n for n in _trainable(ours) if n.startswith("head.")} == \
            {f"head.modules_to_save.{name}.weight", f"head.modules_to_save.{name}.bias"}


def test_disable_adapters_gives_base_for_all_adapters_like_peft():
    ours, theirs = _pair()
    minilora.set_adapter(ours, ["default", "b"])
    theirs.base_model.set_adapter(["default", "b"])
    inputs = example_inputs("llama", ours)
    base = _out(build("llama"), inputs)
    with minilora.disable_adapters(ours), theirs.disable_adapter():
        assert torch.equal(_out(ours, inputs), base)
        assert torch.equal(_out(theirs, inputs), base)
    assert not torch.equal(_out(ours, inputs), base)


def test_delete_adapter_matches_peft_and_restores_plain_modules():
    ours, theirs = _pair(dtype=torch.float64)
    inputs = example_inputs("llama", ours)
    minilora.delete_adapter(ours, "default")
    theirs.delete_adapter("default")
    # peft's layers switch to "b" (its model-level list says [] then, a peft inconsistency)
    peft_q = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_state(ours).active == ("b",) and peft_q.active_adapters == ["b"]
    theirs.set_adapter("b")  # peft's forward raises KeyError('default') until the model level is set again
    assert _rel(_out(ours, inputs), _out(theirs, inputs)) <= FP64_TOL
    # layers only "default" adapted are plain again; keys of "b" untouched
    assert type(ours.get_submodule("model.layers.0.self_attn.v_proj")) is torch.nn.Linear
    assert minilora.adapted_modules(ours) == [n for n, _ in lora_layers(ours)]
    assert all("adapters.default" not in k for k in ours.state_dict())
    minilora.delete_adapter(ours, "b")
    fresh = build("llama").double()
    assert lora_state(ours) is None and minilora.adapted_modules(ours) == []
    assert ours.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in ours.state_dict().items())


def test_delete_adapter_errors():
    ours, _ = _pair()
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zzz'\]"):
        minilora.delete_adapter(ours, "zzz")
    minilora.merge(ours, adapter_names=["b"])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter 'b' is merged into .*unmerge\(model, 'b'\)"):
        minilora.delete_adapter(ours, "b")
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- add_weighted_adapter
@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
@pytest.mark.parametrize("kind", ["llama", "conv2d", "embed_conv1d"])
def test_add_weighted_adapter_matches_peft(kind, combination):
    targets = {"llama": ["q_proj", "v_proj", "embed_tokens"], "conv2d": ["conv0", "conv1"],
               "embed_conv1d": ["emb", "c_fc", "c_proj"]}[kind]
    a_cfg = dict(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)
    # "linear" needs equal ranks; the others combine different ranks and target sets
    b_cfg = dict(a_cfg, lora_alpha=3) if combination == "linear" else \
        dict(a_cfg, target_modules=targets[:2], r=2, lora_alpha=3)
    ours, theirs = _pair(kind, a_cfg, b_cfg, dtype=torch.float64)
    minilora.add_weighted_adapter(ours, ["default", "b"], [0.7, -0.4], "mix", combination_type=combination)
    theirs.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination)
    minilora.set_adapter(ours, "mix")
    theirs.set_adapter("mix")
    inputs = example_inputs(kind, ours)
    with minilora.disable_adapters(ours):
        base = _out(ours, inputs)
    out = _out(ours, inputs)
    assert (out - base).abs().max() > 1e-3  # the combination does something
    # peft makes the combination weights a float32 tensor (torch.tensor of Python floats), so its
    # float64 result is off by ~2**-24 relative per term (measured <= 8e-8; the SVD of a delta
    # perturbed that little moves as little here). A wrong combination is O(1) of out - base.
    assert _rel(out - base, _out(theirs, inputs) - base) <= 1e-6
    config = lora_state(ours).configs["mix"]
    expected_rank = {"cat": 6, "linear": 4, "svd": 4}[combination]
    assert (config.r, config.lora_alpha) == (expected_rank, expected_rank)
    assert all(layer.adapters["mix"].scaling == 1.0 for _, layer in lora_layers(ours) if "mix" in layer.adapters)


def _weighted_delta64(layer, names, weights):
    total = 0
    for name, w in zip(names, weights):
        if name in layer.adapters:
            ad = layer.adapters[name]
            total = total + w * ad.scaling * (ad.lora_B.double().flatten(1) @ ad.lora_A.double().flatten(1))
    return total


def test_cat_is_exact_and_svd_is_the_best_low_rank_approximation_float64():
    ours, _ = _pair(dtype=torch.float64)  # the combination runs in float64 too: see FP64_TOL
    weights = [0.7, -0.4]
    minilora.add_weighted_adapter(ours, ["default", "b"], weights, "cat", combination_type="cat")
    minilora.add_weighted_adapter(ours, ["default", "b"], weights, "svd3", combination_type="svd", svd_rank=3)
    for name, layer in lora_layers(ours):
        want = _weighted_delta64(layer, ["default", "b"], weights)
        cat = layer.adapters["cat"]
        got = cat.lora_B.double() @ cat.lora_A.double()
        assert _rel(got, want) <= FP64_TOL, name
        svd = layer.adapters["svd3"]
        approx = svd.lora_B.double() @ svd.lora_A.double()
        s = torch.linalg.svdvals(want)
        # Eckart-Young: the Frobenius error of the best rank-3 approximation is the tail of S
        assert abs(torch.linalg.norm(approx - want) - s[3:].norm()) <= FP64_TOL * s[0], name


def test_weighted_lora_bias_combines_exactly():
    ours = minilora.inject(build("mlp").double(), targets=["lin0", "head"], r=2, lora_bias=True)
    minilora.inject(ours, targets=["lin0"], r=3, lora_alpha=5, lora_bias=True, adapter_name="b")
    randomize_adapters(ours)
    minilora.add_weighted_adapter(ours, ["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    x = torch.randn(4, 12, dtype=torch.float64)
    layer = ours.lin0
    want = x.double() @ layer.weight.double().T + layer.bias.double()
    for name, w in (("default", 0.5), ("b", 2.0)):
        ad = layer.adapters[name]
        want += w * ad.scaling * (x.double() @ ad.lora_A.double().T @ ad.lora_B.double().T + ad.lora_bias.double())
    minilora.set_adapter(ours, "mix")
    with torch.no_grad():
        assert _rel(layer(x), want) <= FP64_TOL


def test_weighted_modules_to_save_takes_the_trained_copy():
    ours = minilora.inject(build("mlp"), targets=["lin0"], modules_to_save=["head"])
    minilora.inject(ours, targets=["lin1"], adapter_name="b")
    randomize_adapters(ours)
    minilora.add_weighted_adapter(ours, ["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    trained, new = ours.head.modules_to_save["default"], ours.head.modules_to_save["mix"]
    assert new is not trained and torch.equal(new.weight, trained.weight)
    assert not torch.equal(new.weight, ours.head.original_module.weight)


def test_add_weighted_adapter_errors_leave_model_unchanged():
    ours, _ = _pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    cases = [
        (dict(adapters=["default", "nope"], weights=[1, 1]), r"unknown adapter\(s\) \['nope'\]"),
        (dict(adapters=["default", "b"], weights=[1.0]), r"one finite number per adapter \(2 adapters\)"),
        (dict(adapters=["default", "b"], weights=[1.0, float("nan")]), "one finite number per adapter"),
        (dict(adapters=["default", "b"], weights=[1, 1], combination_type="ties"),
         r"combination_type='ties' is not supported; choose one of \['cat', 'linear', 'svd'\]"),
        (dict(adapters=["default", "b"], weights=[1, 1], combination_type="linear"),
         r"needs adapters of one rank, got \[4, 2\]"),
        (dict(adapters=["default", "b"], weights=[1, 1], adapter_name="b"),
         r"add_weighted_adapter: an adapter named 'b' is already injected .*existing: \['b', 'default'\]"),
        (dict(adapters=["default", "b"], weights=[1, 1], svd_rank=0), "svd_rank=0 is invalid"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("adapter_name", "mix")
        with pytest.raises(ValueError, match=message):
            minilora.add_weighted_adapter(ours, **kwargs)
    assert set(lora_state(ours).configs) == {"default", "b"}
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["__base__", "a.b", "", 3])
def test_add_weighted_adapter_checks_the_new_name_as_inject(name):
    # Regression: add_weighted_adapter skipped inject's name rules. "__base__" became an adapter
    # that per_sample_adapters rows marked "__base__" silently ran; a dot raised a raw KeyError.
    ours, _ = _pair()
    before = snapshot(ours)
    message = rf"adapter_name={re.escape(repr(name))} is invalid: use a non-empty string without dots, other than " \
              r"'__base__' \(reserved for rows without adapter in per_sample_adapters\)"
    with pytest.raises(ValueError, match="add_weighted_adapter: " + message):
        minilora.add_weighted_adapter(ours, ["default", "b"], [1.0, 1.0], name, combination_type="cat")
    assert_unchanged(ours, before)
    with pytest.raises(ValueError, match=message):  # one rule: inject says the same
        minilora.inject(ours, targets=["q_proj"], adapter_name=name)
    assert_unchanged(ours, before)


def test_weighted_refuses_two_copies_of_one_modules_to_save():
    ours = minilora.inject(build("mlp"), targets=["lin0"], modules_to_save=["head"])
    minilora.inject(ours, targets=["lin1"], modules_to_save=["head"], adapter_name="b")
    with pytest.raises(ValueError, match=r"\['default', 'b'\] each have their own copy of 'head'.*cannot be combined"):
        minilora.add_weighted_adapter(ours, ["default", "b"], [1, 1], "mix")


# ---------------------------------------------------------------- per-row adapters
def _row_reference(model, inputs, name):
    """The model output for every row with one adapter (or none), by switching the whole model."""
    return with_adapter(model, name, lambda: _out(model, inputs))


@pytest.mark.parametrize("kind", ["llama", "embed_conv1d"])
def test_per_sample_rows_match_single_adapter_runs(kind):
    if kind == "llama":  # only "default" has a modules_to_save copy of lm_head (peft: KeyError)
        a_cfg, b_cfg = dict(A_CFG, modules_to_save=["lm_head"]), B_CFG
    else:
        a_cfg = dict(target_modules=["emb", "c_fc"], r=4, init_lora_weights=False)
        b_cfg = dict(target_modules=["c_proj", "emb"], r=2, init_lora_weights=False)
    ours = minilora.inject(build(kind).double(), minilora.LoraConfig(**a_cfg))
    minilora.inject(ours, minilora.LoraConfig(**b_cfg), adapter_name="b")
    randomize_adapters(ours)
    names = ["b", "__base__", "default", "b", "default"]
    inputs = example_inputs(kind, ours, batch=len(names))
    with minilora.per_sample_adapters(ours, names):
        mixed = _out(ours, inputs)
        # One set of row indices for the whole model, built on the first call and reused after.
        shared = {id(layer.row_adapters) for _, layer in lora_layers(ours)}
        assert len(shared) == 1
        rows = next(iter(lora_layers(ours)))[1].row_adapters
        cached = {k: id(v) for k, v in rows._index.items()}
        assert 1 <= len(cached) <= 3
        assert torch.equal(_out(ours, inputs), mixed)
        assert {k: id(v) for k, v in rows._index.items()} == cached
    refs = {n: _row_reference(ours, inputs, n) for n in set(names)}
    assert len({tuple(r.flatten()[:4].tolist()) for r in refs.values()}) == 3  # three different models
    for i, name in enumerate(names):
        assert _rel(mixed[i], refs[name][i]) <= FP64_TOL, (i, name)
    # state restored
    assert all(layer.row_adapters is None for _, layer in lora_layers(ours))


def test_per_sample_matches_peft_mixed_batch():
    ours, theirs = _pair(dtype=torch.float64)
    names = ["b", "__base__", "default"]
    inputs = example_inputs("llama", ours, batch=3)
    with minilora.per_sample_adapters(ours, names):
        mixed = _out(ours, inputs)
    with torch.no_grad():
        peft_mixed = output_of(theirs(**inputs, adapter_names=names))
    assert _rel(mixed, peft_mixed) <= FP64_TOL


def test_per_sample_refusals_and_restore_on_exception():
    ours, _ = _pair()
    inputs = example_inputs("llama", ours, batch=3)
    with pytest.raises(ValueError, match=r"got 2 adapter names but the model input is a batch of 3 rows"):
        with minilora.per_sample_adapters(ours, ["b", "default"]):
            ours(**inputs)
    assert all(layer.row_adapters is None for _, layer in lora_layers(ours))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]"):
        with minilora.per_sample_adapters(ours, ["b", "c", "default"]):
            pass
    ours.train()
    with pytest.raises(ValueError, match=r"inference only; call model.eval\(\) first"):
        with minilora.per_sample_adapters(ours, ["b", "b", "b"]):
            pass
    ours.eval()
    with pytest.raises(ValueError, match="put in training mode inside the block"):
        with minilora.per_sample_adapters(ours, ["b", "b", "b"]):
            ours.train()
            ours(**inputs)
    ours.eval()
    minilora.merge(ours, adapter_names=["b"])
    with pytest.raises(ValueError, match=r"merged into .* they would apply to every row"):
        with minilora.per_sample_adapters(ours, ["b", "b", "b"]):
            pass
    minilora.unmerge(ours)
    with pytest.raises(RuntimeError, match="boom"):
        with minilora.per_sample_adapters(ours, ["b", "b", "default"]):
            raise RuntimeError("boom")
    assert all(layer.row_adapters is None for _, layer in lora_layers(ours))
    assert not ours._forward_pre_hooks  # the batch check is gone too


def test_layer_refuses_rows_that_do_not_match_its_batch():
    ours = minilora.inject(build("mlp"), targets=["lin0"])
    from minilora.rows import RowAdapters
    ours.lin0.row_adapters = RowAdapters(["default", "default"])
    with pytest.raises(ValueError, match=r"input of shape \(6, 12\), but 2 row adapters were given"):
        ours.lin0(torch.randn(6, 12))


def test_inject_into_eval_model_keeps_dropout_off():
    # Regression: a new LoRA layer started in training mode, so dropout ran inside an eval model.
    model = minilora.inject(build("mlp"), targets=["lin0", "head"], lora_dropout=0.5, modules_to_save=["lin1"])
    randomize_adapters(model)
    x = torch.randn(4, 12)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
