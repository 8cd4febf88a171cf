"""minilora against peft on the same weights: the equivalence matrix of the core library.

For each (model, config) case the base model is built once, cast to float64 and deep-copied
into ``minilora.inject`` and ``peft.get_peft_model`` with the same config; our adapter tensors
(made random, so B != 0) are copied into peft's model. Then both must agree on: the adapted module
names, the trainable-parameter count, the outputs, the gradient of every trainable tensor, the
merged outputs and the merge_and_unload models (outputs and state dicts).

Convs that peft gets wrong (dilation, padding_mode) are checked against a float64 reference
computed here instead.

Why float64: two correct implementations differ only in rounding (peft adds s·B(A x) to the base
output, minilora folds s into one addmm_; merging rounds W + s·BA), and in float32 how far that
goes depends on the CPU's kernels (AVX2, AVX-512 and the scalar path sum in different orders):
a fixed float32 bound is either unsafe on some machine or too loose. In float64 it is not.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import minilora
from minilora.inject import lora_layers
from minilora.layers import LoraEmbedding
from tiny_models import (LLAMA_TARGETS, build, copy_to_peft, example_inputs, output_of,
                         randomize_adapters)

peft = pytest.importorskip("peft")

TUTORIAL_BOTH = dict(target_modules=LLAMA_TARGETS, modules_to_save=["lm_head", "embed_tokens"])

# (id, model kind, LoraConfig fields). Every model appears, and every config feature at least once.
CASES = [
    ("mlp-list-save-biasall", "mlp", dict(target_modules=["lin0", "lin1"], modules_to_save=["head"], bias="all")),
    ("mlp-all-linear", "mlp", dict(target_modules="all-linear", r=4, lora_alpha=16)),
    ("mlp-regex-dropout-lorabias", "mlp", dict(target_modules=r"lin0|h.ad", lora_dropout=0.25, lora_bias=True)),
    ("embed_conv1d-loraonly", "embed_conv1d", dict(target_modules=["emb", "c_fc", "c_proj"], bias="lora_only",
                                                  fan_in_fan_out=True)),
    ("conv1d-rslora", "conv1d", dict(target_modules=["conv0", "conv1"], r=4, lora_alpha=8, use_rslora=True)),
    ("conv2d-patterns", "conv2d", dict(target_modules=["conv0", "conv1"], r=4, rank_pattern={"conv1": 2},
                                       alpha_pattern={"conv0": 3.0})),
    ("conv3d", "conv3d", dict(target_modules=["conv0", "conv1"], r=2, lora_alpha=5)),
    ("llama-tutorial-both", "llama", TUTORIAL_BOTH),
    ("llama-tutorial-lm_head", "llama", dict(target_modules=LLAMA_TARGETS, modules_to_save=["lm_head"])),
    ("llama-tutorial-embed", "llama", dict(target_modules=LLAMA_TARGETS, modules_to_save=["embed_tokens"])),
    ("llama-tutorial-neither", "llama", dict(target_modules=LLAMA_TARGETS, r=16, lora_alpha=32)),
    ("llama-all-linear", "llama", dict(target_modules="all-linear")),
    ("llama-layers", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                                   layers_pattern="layers")),
    ("llama-layers-nopattern", "llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=0)),
    ("llama-patterns-rslora", "llama", dict(target_modules=LLAMA_TARGETS, r=8, use_rslora=True,
                                            rank_pattern={"q_proj": 2, r"layers\.1\..*": 4},
                                            alpha_pattern={"v_proj": 32, "mlp.down_proj": 3})),
    ("llama-regex", "llama", dict(target_modules=r".*\.layers\.[01]\.self_attn\.(q|k)_proj",
                                  exclude_modules=["model.layers.1.self_attn.k_proj"])),
    ("qwen2-tutorial-both", "qwen2", TUTORIAL_BOTH),
    ("phi3-tutorial-both", "phi3", TUTORIAL_BOTH),
    # OPT ties lm_head to embed_tokens: modules_to_save on it is tested with the tied Llama below.
    ("opt-fc", "opt", dict(target_modules=LLAMA_TARGETS + ["fc1", "fc2"], bias="lora_only")),
    ("gpt2-dropout", "gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.1,
                                  fan_in_fan_out=True, bias="all")),
    ("t5-regex", "t5", dict(target_modules=r".*(SelfAttention|EncDecAttention)\.(q|v)|.*\.wo", r=4)),
    ("t5-all-linear", "t5", dict(target_modules="all-linear", exclude_modules=r".*decoder.*")),
    ("bert-minilm", "bert", dict(target_modules=["query", "value", "dense"], exclude_modules=["pooler.dense"],
                                 bias="lora_only", lora_bias=False, modules_to_save=["pooler"])),
]

# Phi-3 fuses q/k/v and gate/up: only o_proj and down_proj of the tutorial list exist.
PHI3_UNMATCHED = ["k_proj", "q_proj", "v_proj", "gate_proj", "up_proj"]

# float64 comparisons, as a fraction of the compared tensor's largest value (gradients: of the
# largest gradient in the model, so one that is zero in exact arithmetic, like BERT's key bias,
# is not judged on its own rounding noise). u = 2**-53 ~ 1.1e-16; a sum of n terms, in any
# order, is off by at most ~n·u·Σ|terms| (Higham, Accuracy and Stability of Numerical
# Algorithms, ch. 4); here n <= 1536 (MiniLM's FFN), values O(1) after LayerNorm/RMSNorm, and at
# most 6 layers and their backward compound it: ~6 · 1536 · 1.1e-16 ~ 1e-12 (measured: <= 3e-14).
# A real difference (a missing term, a wrong scale, another dropout mask) is of the order of the
# adapters' effect, which every case checks is > 1e-2 (measured >= 0.26). FP64_TOL sits far from both.
FP64_TOL = 1e-9
# Merged models: the merged delta s·B·A is computed in the weight's dtype when that is float64
# (LoraLayer.delta_weight, merge_dtype), as peft does, so merged outputs carry only float64
# rounding, bounded as above.
MERGE_TOL = FP64_TOL


# ---------------------------------------------------------------- helpers
def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale else diff


def peft_lora_names(pm) -> list[str]:
    from peft.tuners.lora import LoraLayer
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer))


def peft_name(ours_name: str, lora_modules: dict) -> str:
    """Our parameter name -> peft's (``X.adapters.default.lora_A`` <-> ``X.lora_A.default.weight``,
    the base weight of an adapted layer under ``base_layer``)."""
    prefix = "base_model.model."
    if ".adapters." in ours_name:
        module, rest = ours_name.split(".adapters.", 1)
        adapter, leaf = rest.split(".")
        if isinstance(lora_modules[module], LoraEmbedding):
            return f"{prefix}{module}.lora_embedding_{leaf[-1]}.{adapter}"
        if leaf == "lora_bias":
            return f"{prefix}{module}.lora_B.{adapter}.bias"
        return f"{prefix}{module}.{leaf}.{adapter}.weight"
    module, _, leaf = ours_name.rpartition(".")
    if module in lora_modules:
        return f"{prefix}{module}.base_layer.{leaf}"
    return prefix + ours_name


def as64(inputs: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def build_pair(kind: str, fields: dict, base=None, peft_only: dict | None = None):
    """(base, ours, peft model, inputs), all float64, with identical random adapter weights in
    both. ``peft_only``: extra peft.LoraConfig fields (e.g. ensure_weight_tying)."""
    base = (build(kind) if base is None else copy.deepcopy(base)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields, **(peft_only or {})))
    randomize_adapters(ours)
    copy_to_peft(ours, pm)
    return base, ours, pm, as64(example_inputs(kind, base))


def run(model, inputs, train: bool, seed: int = 0) -> torch.Tensor:
    """The main output (with BERT's pooler output appended, so the pooler gets gradients)."""
    model.train(train)
    torch.manual_seed(seed)  # the same dropout masks in both models: they draw in the same order
    result = model(**inputs)
    pooled = getattr(result, "pooler_output", None)
    out = output_of(result)
    return out if pooled is None else torch.cat([out.flatten(1), pooled], dim=1)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(out.shape, generator=g).to(out.dtype)  # same draws for a float64 run
    return (out * weights).sum()


def trainable_grads(ours, pm) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    lora_modules = dict(lora_layers(ours))
    theirs = dict(pm.named_parameters(remove_duplicate=False))
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    mapped = {peft_name(n, lora_modules): p for n, p in mine.items()}
    peft_trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert set(mapped) == peft_trainable, (sorted(set(mapped) ^ peft_trainable))
    return [(n, p.grad, theirs[n].grad) for n, p in mapped.items()]


def check_pair(kind: str, fields: dict, base=None, peft_only: dict | None = None) -> tuple:
    """Every comparison of the matrix; returns both merge_and_unload models for extra checks."""
    base, ours, pm, inputs = build_pair(kind, fields, base, peft_only)
    # same adapted module set, same trainable-parameter count
    assert sorted(minilora.adapted_modules(ours)) == peft_lora_names(pm)
    assert minilora.find_targets(base, minilora.LoraConfig(**fields)) == minilora.adapted_modules(ours)
    assert minilora.trainable_parameters(ours) == pm.get_nb_trainable_parameters()

    # outputs and gradients (train mode with seeded dropout when the config has dropout)
    train = fields.get("lora_dropout", 0.0) > 0
    base_out = run(base, inputs, False)
    y_ours, y_peft = run(ours, inputs, train), run(pm, inputs, train)
    assert max_rel_err(y_ours, y_peft) <= FP64_TOL
    assert max_rel_err(y_ours, base_out) > 1e-2, "adapters had no effect: the comparison proves nothing"
    loss_of(y_ours).backward()
    loss_of(y_peft).backward()
    grads = trainable_grads(ours, pm)
    assert grads
    assert all(g_ours is not None and g_peft is not None for _, g_ours, g_peft in grads)
    scale = max(g_peft.abs().max().item() for _, _, g_peft in grads)
    for name, g_ours, g_peft in grads:
        assert (g_ours - g_peft).abs().max().item() <= FP64_TOL * scale, name
    if train:  # the dropout really acts: another seed, another output
        assert max_rel_err(run(ours, inputs, True, seed=1), y_ours) > 1e-4
        assert max_rel_err(run(ours, inputs, True, seed=0), y_ours) == 0

    # merged outputs
    with torch.no_grad():
        unmerged = run(ours, inputs, False)
        minilora.merge(ours)
        pm.merge_adapter()
        merged_ours, merged_peft = run(ours, inputs, False), run(pm, inputs, False)
        assert max_rel_err(merged_ours, merged_peft) <= MERGE_TOL
        assert max_rel_err(merged_ours, unmerged) <= MERGE_TOL

        # merge_and_unload: same module types, same state dict, same outputs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns "already merged"
            plain_ours = minilora.merge_and_unload(ours)
            plain_peft = pm.merge_and_unload()
        assert [type(m) for m in plain_ours.modules()] == [type(m) for m in plain_peft.modules()]
        sd_ours, sd_peft = plain_ours.state_dict(), plain_peft.state_dict()
        assert list(sd_ours) == list(sd_peft) == list(base.state_dict())
        for key in sd_ours:
            assert max_rel_err(sd_ours[key], sd_peft[key]) <= MERGE_TOL, key
        assert max_rel_err(run(plain_ours, inputs, False), run(plain_peft, inputs, False)) <= MERGE_TOL
    return plain_ours, plain_peft


# ---------------------------------------------------------------- the matrix
@pytest.mark.parametrize("kind,fields", [pytest.param(k, f, id=i) for i, k, f in CASES])
def test_matches_peft(kind, fields):
    check_pair(kind, fields)


def test_phi3_tutorial_config_warns_with_closest_names():
    base = build("phi3")
    with pytest.warns(UserWarning, match="matched no module") as record:
        ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**TUTORIAL_BOTH))
    text = " ".join(str(w.message) for w in record)
    for target in PHI3_UNMATCHED:
        assert repr(target) in text
    assert "model.layers.0.self_attn.qkv_proj" in text and "model.layers.0.mlp.gate_up_proj" in text
    assert {n.rsplit(".", 1)[-1] for n in minilora.adapted_modules(ours)} == {"o_proj", "down_proj"}


def test_opt_tutorial_config_warns_for_llama_only_names():
    with pytest.warns(UserWarning, match="'o_proj'.*'gate_proj'.*'down_proj'.*'up_proj'"):
        ours = minilora.inject(build("opt"), target_modules=LLAMA_TARGETS + ["fc1", "fc2"])
    assert {n.rsplit(".", 1)[-1] for n in minilora.adapted_modules(ours)} == {"q_proj", "k_proj", "v_proj",
                                                                              "fc1", "fc2"}


def _seq_cls_llama():
    import transformers as tf
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return tf.LlamaForSequenceClassification(config).eval()


def test_seq_cls_all_linear_excludes_and_trains_the_classifier():
    base = _seq_cls_llama()
    fields = dict(target_modules="all-linear", task_type="SEQ_CLS")
    plain_ours, _ = check_pair("llama", fields, base=base)
    ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
    assert "score" not in minilora.adapted_modules(ours)
    assert isinstance(ours.score, minilora.ModulesToSave)
    assert ours.score.modules_to_save["default"].weight.requires_grad
    assert not ours.score.original_module.weight.requires_grad


def test_seq_cls_bert_minilm():
    from transformers import AutoModelForSequenceClassification
    from tiny_models import minilm_dir
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
    check_pair("bert", dict(target_modules="all-linear", task_type="SEQ_CLS", r=4), base=base)


def test_dropout_masks_match_peft_only_with_the_same_seed():
    """Guards the dropout comparison: different seeds must give different outputs in both."""
    _, ours, pm, inputs = build_pair("mlp", dict(target_modules=["lin0", "lin1", "head"], lora_dropout=0.5))
    assert torch.equal(run(ours, inputs, True, 7), run(pm, inputs, True, 7))
    assert not torch.equal(run(ours, inputs, True, 7), run(pm, inputs, True, 8))


# ---------------------------------------------------------------- convs peft gets wrong or refuses
def _conv_reference(model, x: torch.Tensor, merged: bool, factors: dict | None = None) -> torch.Tensor:
    """ConvNet forward in float64. merged=True: one conv with W0 + s·B·A (independent of our
    two-conv branch); else the two-conv branch (grouped convs cannot merge). ``factors`` maps a
    layer name to float64 (A, B) to use instead of the layer's own (for gradients)."""
    def layer(name, h):
        lora = getattr(model, name)
        base = lora.base_layer
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[lora.weight.dim()]
        ad = lora.adapters["default"]
        W0, b = lora.weight.double(), lora.bias.double()
        A, B = (factors or {}).get(name, (ad.lora_A.double(), ad.lora_B.double()))
        padding = base.padding
        if base.padding_mode != "zeros":
            h = F.pad(h, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        geometry = (base.stride, padding, base.dilation)
        if merged:
            W = W0 + ad.scaling * torch.einsum("or,ri...->oi...", B.flatten(1), A)
            return conv(h, W, b, *geometry, 1)
        hidden = conv(h, A, None, *geometry, 1)
        return conv(h, W0, b, *geometry, base.groups) + ad.scaling * conv(hidden, B, None, 1, 0, 1, base.groups)

    h = torch.relu(layer("conv0", x.double()))
    return layer("conv1", h).flatten(1)


@pytest.mark.parametrize("kind,overrides", [
    ("conv2d", dict(dilation=2)), ("conv1d", dict(dilation=3)), ("conv1d", dict(padding_mode="reflect")),
    ("conv2d", dict(padding_mode="circular")), ("conv3d", dict(dilation=2)),
    ("conv2d", dict(groups=2)), ("conv1d", dict(groups=4, dilation=2)),
])
def test_conv_geometry_against_float64(kind, overrides):
    base = build(kind, **overrides).double()  # float64 on both sides: see FP64_TOL
    ours = minilora.inject(copy.deepcopy(base), target_modules=["conv0", "conv1"], r=4, lora_alpha=6)
    randomize_adapters(ours)
    x = example_inputs(kind, base)["x"].double()
    grouped = overrides.get("groups", 1) > 1
    y = output_of(ours(x))
    ref = _conv_reference(ours, x, merged=not grouped)
    assert max_rel_err(y, ref) <= FP64_TOL

    # gradients of A and B against float64 autograd
    factors = {name: tuple(p.detach().double().requires_grad_(True)
                           for p in (getattr(ours, name).adapters["default"].lora_A,
                                     getattr(ours, name).adapters["default"].lora_B))
               for name in ("conv0", "conv1")}
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (y * weights).sum().backward()
    (_conv_reference(ours, x, not grouped, factors) * weights).sum().backward()
    for name, (A64, B64) in factors.items():
        ad = getattr(ours, name).adapters["default"]
        assert max_rel_err(ad.lora_A.grad, A64.grad) <= FP64_TOL
        assert max_rel_err(ad.lora_B.grad, B64.grad) <= FP64_TOL

    if grouped:
        with pytest.raises(ValueError, match=r"grouped conv \(groups=\d\) cannot be merged"):
            minilora.merge(ours)
    else:
        with torch.no_grad():
            minilora.merge(ours)
            assert max_rel_err(output_of(ours(x)), ref) <= MERGE_TOL

    # peft's conv LoRA drops dilation / padding_mode: it crashes or gives another output.
    if overrides.get("dilation", 1) > 1 or overrides.get("padding_mode", "zeros") != "zeros":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["conv0", "conv1"], r=4,
                                                                           lora_alpha=6))
        fresh = minilora.inject(copy.deepcopy(base), target_modules=["conv0", "conv1"], r=4, lora_alpha=6)
        randomize_adapters(fresh)
        copy_to_peft(fresh, pm)
        try:
            theirs = output_of(pm(x))
        except RuntimeError:
            return
        assert theirs.shape != ref.shape or max_rel_err(theirs, ref) > 1e-3


# ---------------------------------------------------------------- tied embeddings
def _tied_llama():
    import transformers as tf
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_tied_embeddings_share_one_trainable_copy(saved):
    base = _tied_llama()
    fields = dict(target_modules=["q_proj", "v_proj"], modules_to_save=[saved])
    ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
    head, emb = ours.lm_head, ours.model.embed_tokens
    assert isinstance(head, minilora.ModulesToSave) and isinstance(emb, minilora.ModulesToSave)
    shared = head.modules_to_save["default"].weight
    assert shared is emb.modules_to_save["default"].weight and shared.requires_grad
    before = shared.detach().clone()
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    inputs = example_inputs("llama", base)
    loss_of(output_of(ours(**inputs))).backward()
    optimizer.step()
    assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight
    assert not torch.equal(shared, before)  # one step moved both the input and the output embedding
    assert torch.equal(base.lm_head.weight, before) and torch.equal(head.original_module.weight, before)

    # peft keeps them tied only with ensure_weight_tying=True (by default it wraps lm_head alone
    # and silently unties, peft issue #2777); with it, both libraries agree on everything.
    plain_ours, plain_peft = check_pair("llama", fields, base=base, peft_only=dict(ensure_weight_tying=True))
    for plain in (plain_ours, plain_peft):
        assert plain.lm_head.weight is plain.model.embed_tokens.weight
        assert plain.config.tie_word_embeddings is True


def test_peft_without_ensure_weight_tying_unties():
    """Documents the peft behaviour minilora deliberately does not copy."""
    base = _tied_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"],
                                                                       modules_to_save=["lm_head"]))
    model = pm.base_model.model
    assert not hasattr(model.model.embed_tokens, "modules_to_save")
    assert model.lm_head.modules_to_save["default"].weight is not model.model.embed_tokens.weight


def test_lora_on_a_tied_embedding_unties_on_merge_and_says_so_in_the_config():
    base = _tied_llama().double()  # float64: see FP64_TOL
    ours = minilora.inject(copy.deepcopy(base), target_modules=["embed_tokens", "q_proj"])
    randomize_adapters(ours)
    inputs = example_inputs("llama", base)
    with torch.no_grad():
        before = output_of(ours(**inputs))
        with pytest.warns(UserWarning, match="tied embeddings"):
            plain = minilora.merge_and_unload(ours)
        assert plain.lm_head.weight is not plain.model.embed_tokens.weight
        assert plain.config.tie_word_embeddings is False
        assert torch.equal(plain.lm_head.weight, base.lm_head.weight)  # the output side keeps its weight
        assert max_rel_err(output_of(plain(**inputs)), before) <= MERGE_TOL
