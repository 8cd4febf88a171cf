"""LoRA on parameters (``target_parameters``) against peft on the same weights: MoE expert stacks
of tiny Mixtral, Qwen3-MoE and GPT-OSS (whose stacks are stored (experts, in, out)), a plain 2-D
nn.Parameter in a custom module and an nn.Linear's weight (peft's two "MLP using nn.Parameter"
cases), and target_parameters combined with target_modules.

Both models get identical adapter tensors through peft's own loader (``set_peft_model_state_dict``
on our ``adapter_state_dict``), so a wrong file key fails as a missing key or a wrong output.
Tolerances: float64 comparisons use ``FP64_TOL`` and bf16 ones ``BF16_TOL`` / ``BF16_GRAD_TOL``
with the arguments given in tests/test_equivalence_peft.py and tests/test_dora_peft.py (a few
layers of sums of at most a few hundred terms: ~1e-13 relative in float64; a handful of bf16
spacings, 2^-7 each, in bf16); a wrong scaling or a dropped expert moves outputs by >= 1e-2
(asserted on mutated models below).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import minilora
from minilora.checkpoint import PEFT_PREFIX, adapter_state_dict
from minilora.layers import LoraLayer
from minilora.params import LoraParams, param_hosts
from minilora.peft_format import param_module_key
from minilora.tree import walk
from tiny_models import assert_unchanged, build, snapshot

peft = pytest.importorskip("peft")
from peft.utils import set_peft_model_state_dict  # noqa: E402

FP64_TOL = 1e-9
BF16_TOL = 4 * 2.0 ** -7
BF16_GRAD_TOL = 2 * BF16_TOL
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


# ---------------------------------------------------------------- models
class ParamLinear(nn.Module):
    """A linear layer written with bare nn.Parameters and F.linear (not an nn.Linear)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MlpUsingParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = ParamLinear(12, 20)
        self.lin1 = nn.Linear(20, 6)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def build_model(kind: str, layers: int = 2, experts: str = "eager") -> nn.Module:
    """Tiny models from transformers configs (4 experts, top-2; ``experts``: transformers'
    experts implementation), or the custom MLPs."""
    torch.manual_seed(0)
    if kind == "mlp_params":
        return MlpUsingParameters().eval()
    if kind == "mlp":
        return build("mlp")
    import transformers as tf
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    configs = {
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**common, intermediate_size=24, num_local_experts=4,
                                                                  num_experts_per_tok=2)),
        "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**common, intermediate_size=48,
                                                                      moe_intermediate_size=24, num_experts=4,
                                                                      num_experts_per_tok=2)),
        "gpt_oss": lambda: tf.GptOssForCausalLM(tf.GptOssConfig(**common, intermediate_size=24, num_local_experts=4,
                                                                num_experts_per_tok=2, sliding_window=8)),
    }
    model = configs[kind]().eval()
    if experts != "default":  # grouped_mm (transformers' default) has no float64 kernel
        model.set_experts_implementation(experts)
    return model


def inputs_for(kind: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind in ("mlp", "mlp_params"):
        return {"x": torch.randn(3, 12, generator=g, dtype=torch.float64)}
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=g)}


def output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def loss_of(y: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return (y * torch.randn(y.shape, generator=g).to(y.dtype)).sum()


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def randomize(model: nn.Module, seed: int = 3, scale: float = 0.3) -> None:
    """Random values for every adapter factor (B starts at zero otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, host in walk(model):
            if isinstance(host, (LoraLayer, LoraParams)):
                for p in host.adapters.parameters():
                    p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype))


def file_key_params(model: nn.Module, adapter: str = "default") -> dict[str, nn.Parameter]:
    """peft's key of each of our trainable factors -> the factor (written from peft's nesting rule
    independently of minilora.checkpoint)."""
    out = {}
    for name, host in walk(model):
        if isinstance(host, LoraParams) and adapter in host.adapters:
            for pname, ad in host.adapters[adapter].items():
                module = param_module_key(name, host.targets.index(pname), len(host.targets))
                out[f"{PEFT_PREFIX}{module}.lora_A.{adapter}.weight"] = ad.lora_A
                out[f"{PEFT_PREFIX}{module}.lora_B.{adapter}.weight"] = ad.lora_B
        elif isinstance(host, LoraLayer) and adapter in host.adapters:
            ad = host.adapters[adapter]
            out[f"{PEFT_PREFIX}{name}.lora_A.{adapter}.weight"] = ad.lora_A
            out[f"{PEFT_PREFIX}{name}.lora_B.{adapter}.weight"] = ad.lora_B
    return out


def to_peft(ours: nn.Module, pm, adapter: str = "default") -> None:
    result = set_peft_model_state_dict(pm, adapter_state_dict(ours, adapter), adapter_name=adapter)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if ".lora_" in k and f".{adapter}." in k]


def make_pair(kind: str, fields: dict, dtype=torch.float64, layers: int = 2, scale: float = 0.3):
    # float64: the eager experts loop; bf16: transformers' default (grouped_mm), the path of real runs
    base = build_model(kind, layers, "eager" if dtype == torch.float64 else "default").to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    randomize(ours, scale=scale)
    to_peft(ours, pm)
    return base, ours, pm


def peft_adapted(pm) -> list[str]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    names = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, PeftLoraLayer)}
    return sorted({n.split(".base_layer")[0] for n in names})


# ---------------------------------------------------------------- the matrix (float64)
CASES = [
    ("mixtral-experts", "mixtral", dict(target_modules=[], target_parameters=EXPERTS, r=2, lora_alpha=5)),
    ("qwen3_moe-experts-rslora", "qwen3_moe", dict(target_modules=[], target_parameters=EXPERTS, r=3,
                                                   lora_alpha=4, use_rslora=True)),
    ("gpt_oss-experts-transposed", "gpt_oss", dict(target_modules=[], target_parameters=EXPERTS, r=2, lora_alpha=3)),
    ("mixtral-combined", "mixtral", dict(target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.down_proj"],
                                         r=3, lora_alpha=4, rank_pattern={"down_proj": 2})),
    ("mlp-param-1", "mlp_params", dict(target_parameters=["lin0.weight"], r=2, lora_alpha=3)),
    ("mlp-param-2", "mlp", dict(target_modules=["lin0"], target_parameters=["lin1.weight"], r=2, lora_alpha=3)),
]


@pytest.mark.parametrize("kind,fields", [pytest.param(k, f, id=i) for i, k, f in CASES])
def test_matches_peft(kind, fields, tmp_path):
    base, ours, pm = make_pair(kind, fields)
    inputs = inputs_for(kind)
    # same adapted modules and parameters, same trainable count, base keys unmoved
    assert sorted(minilora.adapted_modules(ours)) == peft_adapted(pm)
    assert minilora.trainable_parameters(ours) == pm.get_nb_trainable_parameters()
    assert set(base.state_dict()) <= set(ours.state_dict())
    layers = [n for n, m in walk(ours) if isinstance(m, LoraLayer)]
    params = [f"{n}.{p}" for n, host in param_hosts(ours) for p in host.targets]
    assert minilora.find_targets(base, minilora.LoraConfig(**fields)) == layers + params

    check_training(base, ours, pm, inputs)
    check_files(base, ours, pm, inputs, tmp_path)
    check_merges(base, ours, pm, inputs)


def check_training(base, ours, pm, inputs) -> None:
    """Outputs and gradients equal to peft's, through three lockstep Adam steps."""
    params = file_key_params(ours)
    theirs = dict(pm.named_parameters())
    assert set(params) == {n for n, p in pm.named_parameters() if p.requires_grad}
    opt_ours = torch.optim.Adam(params.values(), lr=1e-2)
    opt_peft = torch.optim.Adam([theirs[k] for k in params], lr=1e-2)
    y_base = output(base, inputs)
    for step in range(4):
        y_ours, y_peft = output(ours, inputs), output(pm, inputs)
        assert max_rel_err(y_ours, y_peft) <= FP64_TOL, step
        assert max_rel_err(y_ours, y_base) > 1e-2, "adapters had no effect: the comparison proves nothing"
        if step == 3:
            break
        opt_ours.zero_grad(), opt_peft.zero_grad()
        loss_of(y_ours).backward(), loss_of(y_peft).backward()
        scale = max(theirs[k].grad.abs().max().item() for k in params)
        for key, p in params.items():
            assert (p.grad - theirs[key].grad).abs().max().item() <= FP64_TOL * scale, key
        opt_ours.step(), opt_peft.step()


def check_files(base, ours, pm, inputs, tmp_path) -> None:
    """Saved by minilora, loaded by peft; saved by peft, loaded by minilora: the same outputs."""
    minilora.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        loaded_ours = minilora.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        y_ours = output(ours, inputs)
        assert max_rel_err(output(loaded_peft, inputs), y_ours) <= FP64_TOL
        assert max_rel_err(output(loaded_ours, inputs), y_ours) <= FP64_TOL


def check_merges(base, ours, pm, inputs) -> None:
    """merge (against peft and a float64 reference of each merged stack), merge_and_unload."""
    with torch.no_grad():
        y_ours = output(ours, inputs)
        originals = {f"{n}.{p}": host._parameters[p].clone() for n, host in param_hosts(ours) for p in host.targets}
        minilora.merge(ours)
        pm.merge_adapter()
        assert max_rel_err(output(ours, inputs), y_ours) <= FP64_TOL
        assert max_rel_err(output(pm, inputs), y_ours) <= FP64_TOL
        for name, host in param_hosts(ours):
            for pname in host.targets:
                ad = host.adapters["default"][pname]
                ref = originals[f"{name}.{pname}"] + reference_delta(ad, host._parameters[pname].shape,
                                                                     host.transposed(pname))
                assert max_rel_err(host._parameters[pname], ref) <= FP64_TOL
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain_ours, plain_peft = minilora.merge_and_unload(ours), pm.merge_and_unload()
        assert [type(m) for m in plain_ours.modules()] == [type(m) for m in plain_peft.modules()] \
            == [type(m) for m in base.modules()]
        sd_ours, sd_peft = plain_ours.state_dict(), plain_peft.state_dict()
        # (peft's parametrizations re-register a merged parameter last: same keys, other order)
        assert list(sd_ours) == list(base.state_dict()) and set(sd_peft) == set(sd_ours)
        for key in sd_ours:
            assert max_rel_err(sd_ours[key], sd_peft[key]) <= FP64_TOL, key


def reference_delta(adapter, shape, transposed: bool) -> torch.Tensor:
    """s·B_e A_e per expert, float64, one expert at a time from peft's description of the layout
    (A's rows expert-major, B's columns rank-major)."""
    A, B = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()
    if len(shape) == 2:
        return adapter.scaling * B @ A
    E, r = shape[0], adapter.r
    out = torch.stack([B[:, e::E] @ A[e * r:(e + 1) * r] for e in range(E)]) * adapter.scaling
    return out.transpose(1, 2) if transposed else out


# ---------------------------------------------------------------- bf16
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_bf16_matches_peft(kind):
    """One decoder layer, so the router's input carries no adapter and both models pick the same
    experts (a top-k choice would amplify one bf16 rounding into a different expert). Factors of
    0.1 make s·B_e A_e about twice the stack's values, as trained deltas are, not 20x: there peft's
    fold in bf16 (factors cast to bf16, summed in bf16) would dominate the comparison. Both models
    are also checked against the same model in float64 (the bf16 values upcast, eager experts)."""
    fields = dict(target_modules=[], target_parameters=EXPERTS, r=2, lora_alpha=4)
    base, ours, pm, = make_pair(kind, fields, dtype=torch.bfloat16, layers=1, scale=0.1)
    inputs = inputs_for(kind)
    reference = copy.deepcopy(ours).double()
    reference.set_experts_implementation("eager")
    with torch.no_grad():
        y_ref = output(reference, inputs)
    params, theirs = file_key_params(ours), dict(pm.named_parameters())
    for key, p in params.items():  # fp32 factors over the bf16 stacks, as peft
        assert p.dtype == theirs[key].dtype == torch.float32, key
    y_ours, y_peft = output(ours, inputs), output(pm, inputs)
    assert y_ours.dtype == torch.bfloat16
    assert max_rel_err(y_ours, y_peft) <= BF16_TOL
    assert max_rel_err(y_ours, y_ref) <= BF16_TOL
    loss_of(y_ours).backward(), loss_of(y_peft).backward()
    scale = max(theirs[k].grad.abs().max().item() for k in params)
    for key, p in params.items():
        assert (p.grad - theirs[key].grad).abs().max().item() <= BF16_GRAD_TOL * scale, key
    # the bound still sees a wrong scaling: peft with every scaling doubled
    with torch.no_grad():
        for module in pm.modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                module.scaling["default"] *= 2
        assert max_rel_err(output(pm, inputs), y_peft) > 2 * BF16_TOL

    # merge: one rounding of W + delta (fp32 delta) against float64; unmerge with keep_original exact
    with torch.no_grad():
        before = {n: t.clone() for n, t in ours.state_dict().items()}
        minilora.merge(ours, keep_original=True)
        for _, host in param_hosts(ours):
            for pname in host.targets:
                ad = host.adapters["default"][pname]
                W0 = host.original_weights[host.targets.index(pname)].double()
                delta = reference_delta(ad, W0.shape, host.transposed(pname))
                mag = W0.abs() + reference_delta(_abs(ad), W0.shape, host.transposed(pname)).abs()
                # one bf16 rounding (u = 2^-8) of W0 + delta, plus the fp32 delta's (r + 2) roundings
                bound = 2.0 ** -8 * (W0 + delta).abs() + (ad.r + 2) * 2.0 ** -24 * mag
                assert ((host._parameters[pname].double() - (W0 + delta)).abs() <= bound).all()
        minilora.unmerge(ours)
        for key, value in ours.state_dict().items():
            assert torch.equal(value, before[key]), key


def _abs(adapter):
    """An adapter-like view with |A|, |B| (the magnitude of the delta for the error bound)."""
    clone = copy.deepcopy(adapter)
    with torch.no_grad():
        clone.lora_A.abs_(), clone.lora_B.abs_()
    return clone


# ---------------------------------------------------------------- several adapters
def test_two_adapters_active_disable_delete_match_peft():
    fields = dict(target_modules=[], target_parameters=EXPERTS, r=2, lora_alpha=4)
    base, ours, pm = make_pair("mixtral", fields)
    minilora.inject(ours, minilora.LoraConfig(**{**fields, "r": 3}), adapter_name="b")
    pm.add_adapter("b", peft.LoraConfig(**{**fields, "r": 3}))
    randomize(ours, seed=9)
    to_peft(ours, pm), to_peft(ours, pm, "b")
    inputs = inputs_for("mixtral")
    with torch.no_grad():
        for names in (["b"], ["default", "b"]):
            minilora.set_adapter(ours, names)
            pm.base_model.set_adapter(names)
            assert max_rel_err(output(ours, inputs), output(pm, inputs)) <= FP64_TOL, names
        with minilora.disable_adapters(ours):
            assert torch.equal(output(ours, inputs), output(base, inputs))
        minilora.merge(ours, keep_original=True)  # two merged adapters, then one taken out exactly
        merged = output(ours, inputs)
        assert max_rel_err(merged, output(pm, inputs)) <= FP64_TOL
        minilora.unmerge(ours, "b")
        minilora.unmerge(ours)
        minilora.set_adapter(ours, "default")
        pm.base_model.set_adapter("default")
        assert max_rel_err(output(ours, inputs), output(pm, inputs)) <= FP64_TOL
    minilora.delete_adapter(ours, "b")
    assert all("b" not in host.adapters for _, host in param_hosts(ours))
    minilora.delete_adapter(ours, "default")
    assert [type(m) for m in ours.modules()] == [type(m) for m in base.modules()]
    assert list(ours.state_dict()) == list(base.state_dict())


def test_refusals_where_peft_refuses_leave_the_model_unchanged():
    fields = dict(target_modules=[], target_parameters=EXPERTS, r=2)
    _, ours, _ = make_pair("mixtral", fields)
    inputs = inputs_for("mixtral")
    with pytest.raises(ValueError, match="per_sample_adapters.*target_parameters"):
        with minilora.per_sample_adapters(ours, ["default", "default"]):
            output(ours, inputs)
    before = snapshot(ours)
    with pytest.raises(ValueError, match="same set"):
        minilora.inject(ours, minilora.LoraConfig(target_modules=[], target_parameters=EXPERTS[:1]), adapter_name="c")
    assert_unchanged(ours, before)
    minilora.inject(ours, minilora.LoraConfig(target_modules=["q_proj"]), adapter_name="q")
    with pytest.raises(ValueError, match="target_parameters.*cannot be combined"):
        minilora.add_weighted_adapter(ours, ["default", "q"], [1.0, 1.0], "mix", combination_type="cat")


# ---------------------------------------------------------------- config and inject errors
@pytest.mark.parametrize("field,value,message", [
    ("lora_dropout", 0.1, "lora_dropout.*target_parameters.*dropout"),
    ("fan_in_fan_out", True, "fan_in_fan_out.*target_parameters"),
    ("lora_bias", True, "lora_bias.*target_parameters"),
    ("use_dora", True, "use_dora.*target_parameters"),
    ("init_lora_weights", "pissa", "init_lora_weights.*target_parameters"),
])
def test_config_refuses_what_cannot_work_on_parameters(field, value, message):
    with pytest.raises(ValueError, match=message):
        minilora.LoraConfig(target_parameters=EXPERTS, **{field: value})
    with pytest.raises(ValueError, match=message):
        minilora.LoraConfig.from_dict({**peft.LoraConfig(target_parameters=EXPERTS).to_dict(), field: value})


def test_config_accepts_peft_forms():
    assert minilora.LoraConfig(target_parameters=("a.w", "b.w")).target_parameters == ["a.w", "b.w"]
    data = peft.LoraConfig(target_modules=[], target_parameters=EXPERTS).to_dict()
    config = minilora.LoraConfig.from_dict(data)
    assert config.target_parameters == EXPERTS and config.target_modules == []
    with pytest.raises(ValueError, match="target_parameters.*list of parameter names"):
        minilora.LoraConfig(target_parameters="experts.gate_up_proj")
    with pytest.raises(ValueError, match="target_modules=\\[\\]"):
        minilora.LoraConfig(target_modules=[])


@pytest.mark.parametrize("kind,fields,message", [
    ("mixtral", dict(target_modules=[], target_parameters=["experts.gate_up_prj"]),
     "no parameter matches target_parameters.*gate_up_proj"),
    ("mlp", dict(target_modules=["lin1"], target_parameters=["lin1.weight"]), "adapted through target_modules"),
    ("mlp", dict(target_parameters=["lin0.bias"]), "2-D .* or 3-D"),
    ("mlp", dict(target_parameters=["head.weight"], modules_to_save=["head"]), "modules_to_save"),
])
def test_inject_refuses_bad_parameter_targets_untouched(kind, fields, message):
    model = build_model(kind)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        minilora.inject(model, minilora.LoraConfig(**fields))
    assert_unchanged(model, before)


def test_parameter_of_the_model_itself_is_refused():
    model = ParamLinear(4, 3)
    with pytest.raises(ValueError, match="parameter of the model itself"):
        minilora.inject(model, target_parameters=["weight"])


def test_unmatched_entry_warns_with_closest_name():
    with pytest.warns(UserWarning, match="experts.down_prj.*experts.down_proj"):
        minilora.inject(build_model("mixtral"), target_modules=[], target_parameters=["experts.down_prj",
                                                                                       "experts.gate_up_proj"])


def test_tied_parameter_is_refused():
    import transformers as tf
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=True))
    before = snapshot(model)
    with pytest.raises(ValueError, match="lm_head.weight.*shared with.*embed_tokens.weight"):
        minilora.inject(model, target_parameters=["lm_head.weight"])
    assert_unchanged(model, before)


def test_second_adapter_loads_next_to_the_first(tmp_path):
    fields = dict(target_modules=[], target_parameters=EXPERTS, r=2, lora_alpha=4)
    base, ours, pm = make_pair("mixtral", fields)
    minilora.save_adapter(ours, tmp_path)
    minilora.load_adapter(ours, tmp_path, adapter_name="again")
    minilora.set_adapter(ours, "again")
    inputs = inputs_for("mixtral")
    with torch.no_grad():
        assert max_rel_err(output(ours, inputs), output(pm, inputs)) <= FP64_TOL


def test_gradient_checkpointing_gives_the_same_gradients():
    """The host lends the folded stack again when a checkpointed block reruns its forward."""
    fields = dict(target_modules=["q_proj"], target_parameters=EXPERTS, r=2, lora_alpha=4)
    _, ours, _ = make_pair("mixtral", fields)
    checkpointed = copy.deepcopy(ours)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    inputs = inputs_for("mixtral")
    grads = []
    for model in (ours, checkpointed):
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # use_cache is switched off
            loss_of(output(model, inputs)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():  # the same float64 operations again: the same bits
        assert grads[1][name] is not None and torch.equal(grad, grads[1][name]), name


def test_modules_to_save_of_a_later_adapter_cannot_wrap_parameter_lora():
    model = minilora.inject(build_model("mlp_params"), target_parameters=["lin0.weight"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="'lin0' is both a LoRA target and in modules_to_save"):
        minilora.inject(model, target_modules=["lin1"], modules_to_save=["lin0"], adapter_name="b")
    assert_unchanged(model, before)
