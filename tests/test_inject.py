"""inject: which modules a config selects (peft's rules, minilora's fixes), what becomes
trainable, and every error path, each leaving the model exactly as it was."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import minilora
from minilora.inject import lora_layers
from tiny_models import LLAMA_TARGETS, assert_unchanged, build, snapshot

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_base():
    return build("llama")


@pytest.fixture
def llama(llama_base):
    return copy.deepcopy(llama_base)


def leaf_names(model) -> list[str]:
    return minilora.adapted_modules(model)


def peft_targets(model, **fields) -> list[str]:
    from peft.tuners.lora import LoraLayer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**fields))
    return [n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)]


# ---------------------------------------------------------------- matching rules
@pytest.mark.parametrize("fields,expected", [
    (dict(target_modules=["self_attn.q_proj"]), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    (dict(target_modules=["model.layers.1.mlp.up_proj"]), ["model.layers.1.mlp.up_proj"]),
    (dict(target_modules=r".*\.1\.self_attn\.(q|v)_proj"), ["model.layers.1.self_attn.q_proj",
                                                            "model.layers.1.self_attn.v_proj"]),
    (dict(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.v_proj", "q_proj"]),
     ["model.layers.1.self_attn.v_proj"]),
    (dict(target_modules=["q_proj", "k_proj"], exclude_modules=r".*\.0\..*"),
     ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]),
    (dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1, layers_pattern="layers"),
     ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
    (dict(target_modules=["q_proj"], layers_to_transform=[0]), ["model.layers.0.self_attn.q_proj"]),
    (dict(target_modules=["o_proj", "lm_head"], modules_to_save=["lm_head"]),
     ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
])
def test_selection_matches_peft(llama, fields, expected):
    assert minilora.find_targets(llama, **fields) == expected
    ours = minilora.inject(llama, **fields)
    assert leaf_names(ours) == expected
    assert sorted(peft_targets(build("llama"), **fields)) == sorted(expected)


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None])
def test_all_linear_on_a_classifier_matches_peft(task_type):
    """all-linear on a sequence classifier (no output embedding): with SEQ_CLS the head is trained
    in full and so never a LoRA target; without it, it is a Linear like any other (as peft)."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.LlamaForSequenceClassification(tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0))
    fields = dict(target_modules="all-linear", task_type=task_type)
    ours = minilora.find_targets(model, **fields)
    assert ("score" in ours) == (task_type is None)
    assert sorted(peft_targets(model, **fields)) == sorted(ours)


def test_list_entry_matches_only_on_dot_boundaries(llama):
    before = snapshot(llama)
    with pytest.raises(ValueError, match=r"no module matches target_modules: 'proj' \(closest: "):
        minilora.inject(llama, targets=["proj"])
    assert_unchanged(llama, before)


def test_regex_is_a_fullmatch(llama):
    with pytest.raises(ValueError, match=r"target_modules='q_proj' selects no module"):
        minilora.inject(llama, targets="q_proj")
    assert len(leaf_names(minilora.inject(llama, targets=r".*q_proj"))) == 2


def test_modules_to_save_is_never_a_lora_target(llama):
    ours = minilora.inject(llama, targets=r".*(o_proj|lm_head)", modules_to_save=["lm_head"])
    assert isinstance(ours.lm_head, minilora.ModulesToSave)
    assert "lm_head" not in leaf_names(ours)


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.myhead = nn.Linear(4, 2)

    def forward(self, x):
        h = self.body(x)
        return self.head(h) + self.myhead(h)


def test_modules_to_save_matches_on_dot_boundaries():
    torch.manual_seed(0)
    ours = minilora.inject(Heads(), targets=["body"], modules_to_save=["head"])
    assert isinstance(ours.head, minilora.ModulesToSave)
    assert isinstance(ours.myhead, nn.Linear)
    # peft's loose endswith match wraps "myhead" too (a known peft bug minilora does not copy)
    pm = peft.get_peft_model(Heads(), peft.LoraConfig(target_modules=["body"], modules_to_save=["head"]))
    assert type(pm.base_model.model.myhead).__name__ == "ModulesToSaveWrapper"


def test_rank_and_alpha_pattern_first_hit_wins(llama):
    fields = dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=8,
                  rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 4, "v_proj": 6},
                  alpha_pattern={r".*\.1\..*": 3, "v_proj": 5})
    ours = minilora.inject(llama, **fields)
    got = {n: (layer.adapters["default"].r, layer.adapters["default"].alpha) for n, layer in lora_layers(ours)}
    assert got == {"model.layers.0.self_attn.q_proj": (2, 8), "model.layers.0.self_attn.v_proj": (6, 5),
                   "model.layers.1.self_attn.q_proj": (2, 3), "model.layers.1.self_attn.v_proj": (6, 3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build("llama"), peft.LoraConfig(**fields))
    for name, (r, alpha) in got.items():
        module = pm.base_model.model.get_submodule(name)
        assert module.r["default"] == r and module.lora_alpha["default"] == alpha
        assert module.scaling["default"] == alpha / r


def test_find_targets_equals_adapted_modules(llama):
    fields = dict(target_modules="all-linear", exclude_modules=["mlp.up_proj"])
    planned = minilora.find_targets(llama, **fields)
    assert not hasattr(llama, "minilora_state")  # a dry run
    assert planned == leaf_names(minilora.inject(llama, **fields))
    assert "lm_head" not in planned and len(planned) == 12


# ---------------------------------------------------------------- trainable parameters, base keys
def test_only_adapters_copies_and_bias_mode_train():
    base = build("qwen2")  # q/k/v have biases
    fields = dict(target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"], bias="lora_only")
    ours = minilora.inject(copy.deepcopy(base), **fields)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    expected = {f"model.layers.{i}.self_attn.q_proj.{leaf}" for i in (0, 1)
                for leaf in ("adapters.default.lora_A", "adapters.default.lora_B", "bias")}
    expected |= {f"model.layers.{i}.self_attn.o_proj.adapters.default.lora_{x}" for i in (0, 1) for x in "AB"}
    expected |= {"lm_head.modules_to_save.default.weight"}
    assert trainable == expected
    all_bias = minilora.inject(copy.deepcopy(base), **{**fields, "bias": "all"})
    biases = {n for n, p in all_bias.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {n for n in base.state_dict() if n.endswith("bias")}


def test_base_state_dict_keys_and_values_survive(llama_base):
    ours = minilora.inject(copy.deepcopy(llama_base), targets=LLAMA_TARGETS, modules_to_save=["embed_tokens"])
    sd = ours.state_dict()
    original = llama_base.state_dict()
    moved = {"model.embed_tokens.weight"}  # a modules_to_save wrapper moves it, as in peft
    assert set(sd) >= set(original) - moved
    for key in set(original) - moved:
        assert torch.equal(sd[key], original[key]), key
    assert torch.equal(sd["model.embed_tokens.original_module.weight"], original["model.embed_tokens.weight"])
    assert torch.equal(sd["model.embed_tokens.modules_to_save.default.weight"], original["model.embed_tokens.weight"])


@pytest.mark.parametrize("kind,target,flag", [("gpt2", "c_attn", False), ("llama", "q_proj", True)])
def test_wrong_fan_in_fan_out_warns_and_is_corrected(kind, target, flag):
    base = build(kind)
    with pytest.warns(UserWarning, match=rf"fan_in_fan_out={flag} does not fit .*{target}.*using fan_in_fan_out={not flag}"):
        ours = minilora.inject(copy.deepcopy(base), targets=[target], fan_in_fan_out=flag, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=[target], fan_in_fan_out=flag))
    from tiny_models import copy_to_peft, example_inputs, output_of
    copy_to_peft(ours, pm)
    inputs = example_inputs(kind, base)
    with torch.no_grad():  # B = 0 at init: both give the base output, bit for bit in practice
        assert torch.allclose(output_of(ours(**inputs)), output_of(pm(**inputs)), rtol=1e-6, atol=1e-6)
        for _, layer in lora_layers(ours):
            assert layer.delta_weight(layer.adapters["default"]).shape == layer.weight.shape


# ---------------------------------------------------------------- error paths: message + untouched
class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.proj(x))


ERRORS = [
    ("llama", dict(targets=["q_prj"]), ValueError,
     r"no module matches target_modules: 'q_prj' \(closest: model\.layers\.0\.self_attn\.q_proj"),
    ("llama", dict(targets=["q_prj", "v_prj"]), ValueError, r"'q_prj' \(closest: .*'v_prj' \(closest: .*v_proj"),
    ("llama", dict(targets=["self_attn"]), ValueError,
     r"module 'model\.layers\.0\.self_attn' matches target_modules but is a LlamaAttention; LoRA supports "
     r"nn\.Linear, transformers Conv1D"),
    ("llama", dict(targets=["input_layernorm"]), ValueError, r"is a LlamaRMSNorm; LoRA supports"),
    ("with_norm", dict(targets=["norm"]), ValueError, r"module 'norm' matches target_modules but is a LayerNorm"),
    ("llama", dict(targets=["q_proj"], lora_rank=4), TypeError, r"unknown LoraConfig fields \['lora_rank'\]"),
    ("llama", dict(targets=["q_proj"], r=0), ValueError, r"LoraConfig\.r=0 is invalid"),
    ("llama", dict(targets=["q_proj"], bias="everything"), ValueError, r"LoraConfig\.bias='everything'"),
    ("llama", dict(targets=".*q_proj", layers_to_transform=[0]), ValueError,
     r"layers_to_transform=\[0\] is invalid: it only works with a list target_modules"),
    ("llama", dict(targets=["q_proj"], layers_pattern="layers"), ValueError,
     r"layers_pattern='layers' is invalid: it only has a meaning together with layers_to_transform"),
    ("llama", dict(targets=["q_proj"], layers_to_transform=[7]), ValueError,
     r"selects no module .*layers_to_transform"),
    ("llama", dict(targets=["q_proj"], exclude_modules=["q_proj"]), ValueError, r"selects no module"),
    ("llama", dict(targets=["embed_tokens"], init_lora_weights="pissa"), ValueError,
     r"init_lora_weights='pissa' needs linear layers, but target 'model\.embed_tokens' is a Embedding"),
    ("conv2d_g2", dict(targets=["conv0"], r=3), ValueError,
     r"target .conv0.: r=3 is not a multiple of the conv.s groups=2"),
    ("llama", dict(targets=["q_proj"], adapter_name="a.b"), ValueError, r"adapter_name='a\.b' is invalid"),
    ("llama", dict(targets=["q_proj"], adapter_name="__base__"), ValueError, r"adapter_name='__base__' is invalid"),
    ("llama", dict(targets=["q_proj"], adapter_name="half"), ValueError,
     r"adapter_name='half' is invalid: it is an attribute of torch's nn\.ModuleDict"),
    ("llama", dict(targets=None), ValueError, r"target_modules is None"),
    ("llama", dict(config="q_proj"), TypeError, r"config must be a minilora\.LoraConfig, got str"),
]


def _model(kind):
    torch.manual_seed(0)
    if kind == "with_norm":
        return WithNorm()
    if kind == "conv2d_g2":
        return build("conv2d", groups=2)
    return build(kind)


@pytest.mark.parametrize("kind,kwargs,error,match", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_error_leaves_model_untouched(kind, kwargs, error, match):
    model = _model(kind)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        minilora.inject(model, **kwargs)
    assert_unchanged(model, before)
    assert not hasattr(model, "minilora_state")
    if "adapter_name" not in kwargs:
        with pytest.raises(error, match=match):  # the dry run says the same
            minilora.find_targets(model, **kwargs)


def test_same_adapter_name_twice(llama):
    minilora.inject(llama, targets=["q_proj"])
    before = snapshot(llama)
    with pytest.raises(ValueError, match=r"an adapter named 'default' is already injected.*existing: \['default'\]"):
        minilora.inject(llama, targets=["v_proj"])
    assert_unchanged(llama, before)


def test_find_targets_creates_no_adapter_name(llama):
    # Regression: the dry run checked a made-up adapter name, so a model that had an adapter of
    # that name could not be asked what a config selects.
    minilora.inject(llama, targets=["q_proj"], adapter_name="__dry_run__")
    assert minilora.find_targets(llama, targets=["v_proj"]) == ["model.layers.0.self_attn.v_proj",
                                                                  "model.layers.1.self_attn.v_proj"]


def test_second_bias_mode_adapter_refused(llama):
    minilora.inject(llama, targets=["q_proj"], bias="all")
    before = snapshot(llama)
    with pytest.raises(ValueError, match=r"bias='lora_only' for adapter 'other'.*only one adapter may use"):
        minilora.inject(llama, targets=["v_proj"], bias="lora_only", adapter_name="other")
    assert_unchanged(llama, before)


def test_partial_match_warns_and_names_closest(llama):
    with pytest.warns(UserWarning, match=r"matched no module and were skipped: 'gate_prj' \(closest: "
                                         r"model\.layers\.0\.mlp\.gate_proj"):
        ours = minilora.inject(llama, targets=["q_proj", "gate_prj"])
    assert len(leaf_names(ours)) == 2


def test_lora_and_modules_to_save_on_tied_pair_refused():
    import transformers as tf
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=2, tie_word_embeddings=True))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'model\.embed_tokens' shares its weight with 'lm_head' \(tied"):
        minilora.inject(model, targets=["embed_tokens"], modules_to_save=["lm_head"])
    assert_unchanged(model, before)


def test_modules_to_save_tied_to_an_earlier_adapters_lora_refused():
    """A second adapter may not fully train a module whose weight is tied to a module that an
    earlier adapter put LoRA on: wrapping it would hide that LoRA layer inside the copy."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=2, tie_word_embeddings=True))
    minilora.inject(model, targets=["q_proj", "lm_head"], adapter_name="a")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with 'model\.embed_tokens' \(tied.*earlier one"):
        minilora.inject(model, targets=["v_proj"], modules_to_save=["embed_tokens"], adapter_name="b")
    assert_unchanged(model, before)
    assert minilora.adapted_modules(model) == ["model.layers.0.self_attn.q_proj", "lm_head"]


class _SharedLinear(nn.Module):
    """One nn.Linear registered at two paths ("enc.0" and "dec.0") and applied twice."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(8, 8)
        self.enc = nn.Sequential(shared, nn.Tanh())
        self.dec = nn.Sequential(shared)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.dec(self.enc(x)))


def test_module_registered_at_two_paths_is_adapted_once_and_stays_shared(tmp_path):
    """peft replaces such a module at its first path only (the second keeps the bare layer); minilora
    puts the same LoRA layer at both, names it once (its first path, as named_modules does), and
    merges, saves and unloads it once."""
    torch.manual_seed(0)
    base = _SharedLinear()
    model = minilora.inject(copy.deepcopy(base), targets=["enc.0"], r=2, lora_alpha=6)
    assert minilora.find_targets(base, target_modules=["enc.0"]) == ["enc.0"]
    assert model.enc[0] is model.dec[0] and isinstance(model.enc[0], minilora.LoraLayer)
    assert minilora.adapted_modules(model) == ["enc.0"]
    assert minilora.trainable_parameters(model)[0] == 2 * (8 + 8)
    from tiny_models import randomize_adapters
    randomize_adapters(model)
    adapter = model.enc[0].adapters["default"]
    x = torch.randn(5, 8)

    def reference(w_extra, absolute=False):  # float64: the shared layer applied twice, both times with LoRA
        f = torch.abs if absolute else (lambda t: t)
        w = f(base.enc[0].weight.double()) + w_extra
        b, head_w, head_b = (f(t.double()) for t in (base.enc[0].bias, base.head.weight, base.head.bias))
        h = f(x.double()) @ w.T + b
        h = (h if absolute else torch.tanh(h)) @ w.T + b  # |tanh(a) - tanh(b)| <= |a - b|, |tanh(a)| <= |a|
        return h @ head_w.T + head_b

    delta = 3.0 * adapter.lora_B.double() @ adapter.lora_A.double()
    out = model(x)
    # Elementwise, in units of mag (the same formula on absolute values): two LoRA linears (K = 8
    # products, bias, rank 2, scale, sum: <= 14 roundings each), tanh (1), the head (9): <= 40
    # float32 roundings, each <= u·mag in any summation order, so <= 40·2**-24·mag on every CPU.
    abs_delta = 3.0 * adapter.lora_B.double().abs() @ adapter.lora_A.double().abs()
    mag = reference(abs_delta, absolute=True)
    assert ((out.double() - reference(delta)).abs() <= 40 * 2**-24 * mag).all()
    minilora.merge(model)  # once, not once per path
    # W + s·B·A in float32: rank 2, scale, sum: <= 4 roundings of |W| + s·|B||A| per element.
    bound = 4 * 2**-24 * (base.enc[0].weight.double().abs() + abs_delta)
    assert ((model.enc[0].weight.double() - base.enc[0].weight.double() - delta).abs() <= bound).all()
    minilora.unmerge(model)
    minilora.save_adapter(model, tmp_path / "a")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["base_model.model.enc.0.lora_A.weight", "base_model.model.enc.0.lora_B.weight"]
    loaded = minilora.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert loaded.enc[0] is loaded.dec[0]
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    minilora.unload(loaded)
    assert type(loaded.enc[0]) is nn.Linear and loaded.enc[0] is loaded.dec[0]
    torch.testing.assert_close(loaded(x), base(x), rtol=0, atol=0)


def test_module_registered_at_two_paths_in_modules_to_save_stays_shared():
    torch.manual_seed(0)
    model = minilora.inject(_SharedLinear(), targets=["head"], modules_to_save=["enc.0"])
    assert model.enc[0] is model.dec[0] and isinstance(model.enc[0], minilora.ModulesToSave)
    minilora.delete_adapter(model, "default")
    assert type(model.enc[0]) is nn.Linear and model.enc[0] is model.dec[0]


def test_lora_bias_on_an_embedding_refused_and_on_biasless_layer_warns():
    model = build("embed_conv1d")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lora_bias=True is not supported for embeddings.*'emb'"):
        minilora.inject(model, targets=["emb", "c_fc"], lora_bias=True, fan_in_fan_out=True)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="lora_bias=True is not supported"):  # peft refuses it too
        peft.get_peft_model(build("embed_conv1d"), peft.LoraConfig(target_modules=["emb"], lora_bias=True))
    with pytest.warns(UserWarning, match=r"lora_bias=True on 'lin1', which has no bias: this adapter cannot be merged"):
        minilora.inject(build("mlp"), targets=["lin0", "lin1"], lora_bias=True)


def test_lora_bias_on_an_already_adapted_layer_sees_its_bias():
    # Regression: the check read the base_layer's bias slot, which inject empties (the LoRA layer
    # holds the bias), so a second adapter warned "has no bias" on a layer that has one.
    model = minilora.inject(build("mlp"), targets=["lin0", "lin1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        minilora.inject(model, targets=["lin0", "lin1"], lora_bias=True, adapter_name="b")
    assert [str(w.message) for w in caught] == [
        "lora_bias=True on 'lin1', which has no bias: this adapter cannot be merged"]
    assert model.lin0.merge_problem(["b"]) is None  # lin0's lora_bias can merge into its bias


def test_lora_only_bias_follows_each_layers_own_active_adapters():
    model = minilora.inject(build("mlp"), targets=["lin0"], r=4, bias="lora_only")
    minilora.inject(model, targets=["head"], r=4, adapter_name="b")
    minilora.set_adapter(model, ["default", "b"])
    assert model.lin0.bias.requires_grad
    assert not model.head.bias.requires_grad  # adapter "b" has bias="none"
