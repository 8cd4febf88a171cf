"""The offline merge and the layers' merge give bit-identical weights, for every layer kind.

Both compute s·B@A with ``ops.lora_delta`` in ``ops.merge_dtype`` and round W + delta once; DoRA's
norms are summed by ``ops.dora_merge_norm`` over the same row blocks. These tests hold the two
paths to ``torch.equal``, so a change to one that the other does not follow fails here.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

import minilora
from minilora import ops
from minilora.offline_merge import merge_checkpoint
from minilora.peft_format import safetensors_bytes
from minilora.trainable_tokens import token_hosts
from tiny_models import EmbedConv1D, build, randomize_adapters

pytest.importorskip("transformers")  # transformers' Conv1D (GPT-2)

# kind -> (model builder, config fields that pick the layers)
KINDS = {
    "linear": (lambda: build("mlp"), dict(target_modules=["lin0", "lin1", "head"])),
    "conv1d_gpt2": (lambda: build("embed_conv1d"), dict(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)),
    # square Conv1D weights: only fan_in_fan_out in the adapter's config tells the layout
    "conv1d_gpt2_square": (lambda: (torch.manual_seed(0), EmbedConv1D(hidden=16))[1],
                           dict(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)),
    "embedding": (lambda: build("embed_conv1d"), dict(target_modules=["emb"])),
    "conv1d": (lambda: build("conv1d"), dict(target_modules=["conv0", "conv1"])),
    "conv2d": (lambda: build("conv2d"), dict(target_modules=["conv0", "conv1"])),
    "conv3d": (lambda: build("conv3d"), dict(target_modules=["conv0", "conv1"])),
}


def _variant(name: str, targets: list[str]) -> dict:
    return {"lora": {}, "rslora": dict(use_rslora=True),
            "patterns": dict(rank_pattern={targets[0]: 2}, alpha_pattern={targets[-1]: 7}),
            "dora": dict(use_dora=True)}[name]


def _checkpoint_and_adapter(tmp_path, model, config: dict):
    """Write the base model as ``base/model.safetensors``, inject and randomize, save the adapter."""
    (tmp_path / "base").mkdir()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    (tmp_path / "base" / "model.safetensors").write_bytes(safetensors_bytes(state, {"format": "pt"}))
    model = minilora.inject(model, r=4, lora_alpha=8, init_lora_weights=False, **config)
    randomize_adapters(model)
    minilora.save_adapter(model, tmp_path / "adapter")
    return model, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "patterns", "dora"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_offline_merge_is_bit_identical_to_merge_and_unload(tmp_path, kind, variant, dtype):
    make, config = KINDS[kind]
    config = {**config, **_variant(variant, config["target_modules"])}
    model, base = _checkpoint_and_adapter(tmp_path, make().to(dtype), config)
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = minilora.merge_and_unload(model).state_dict()
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    for name in config["target_modules"]:  # the adapters did change the weights
        assert not torch.equal(got[name + ".weight"], base[name + ".weight"]), name


def test_grouped_conv_is_refused_by_both_merges_in_the_same_words(tmp_path):
    model, _ = _checkpoint_and_adapter(tmp_path, build("conv2d", groups=2), dict(target_modules=["conv0"]))
    problem = re.escape(ops.grouped_merge_problem(2))
    with pytest.raises(ValueError, match=problem):
        minilora.merge_and_unload(model)
    with pytest.raises(ValueError, match=rf"'conv0': {problem}"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- trainable token rows
# (model overrides, trainable_token_indices, whether the checkpoint stores the tied lm_head.weight
# too: transformers' save_pretrained drops it, a plain state-dict dump keeps both names)
TOKEN_CASES = {
    "untied-list": ({}, [3, 5, 40], True),
    "untied-dict-head": ({}, {"embed_tokens": [3, 5], "lm_head": [1, 40]}, True),
    "tied-one-stored": ({"tie_word_embeddings": True}, [3, 5, 40], False),
    "tied-both-stored": ({"tie_word_embeddings": True}, {"embed_tokens": [3, 5, 40]}, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_offline_merge_writes_token_rows_bit_identically(tmp_path, case, dtype):
    overrides, indices, both = TOKEN_CASES[case]
    model = build("llama", **overrides).to(dtype)
    (tmp_path / "base").mkdir()
    model.config.architectures = ["LlamaForCausalLM"]  # as save_pretrained writes it
    model.config.save_pretrained(tmp_path / "base")  # config.json: the offline merge learns the ties from it
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if both or k != "lm_head.weight"}
    (tmp_path / "base" / "model.safetensors").write_bytes(safetensors_bytes(state, {"format": "pt"}))
    model = minilora.inject(model, target_modules=["q_proj"], r=4, init_lora_weights=False,
                            trainable_token_indices=indices)
    randomize_adapters(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, host in token_hosts(model):
            for rows in host.tokens.values():
                rows.delta.add_(torch.randn(rows.delta.shape, generator=g).to(rows.delta.dtype))
    minilora.save_adapter(model, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = minilora.merge_and_unload(model).state_dict()
    assert sorted(got) == sorted(k for k in want if both or k != "lm_head.weight")
    for key in got:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert not torch.equal(got["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    if "lm_head.weight" in got and (overrides or isinstance(indices, dict)):  # tied, or rows of its own
        assert not torch.equal(got["lm_head.weight"], state["lm_head.weight"])


def test_offline_merge_refuses_token_rows_that_do_not_fit(tmp_path):
    model = build("llama")
    (tmp_path / "base").mkdir()
    small = {k: v for k, v in model.state_dict().items()}
    small["model.embed_tokens.weight"] = small["model.embed_tokens.weight"][:10].clone()
    (tmp_path / "base" / "model.safetensors").write_bytes(safetensors_bytes(small, {"format": "pt"}))
    model = minilora.inject(model, target_modules=["q_proj"], trainable_token_indices=[3, 40])
    minilora.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"token rows .* for token ids up to 40 .* is \[10, 32\]"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_offline_merge_of_a_peft_adapter_writes_peft_rows(tmp_path):
    peft = pytest.importorskip("peft")
    model = build("llama", tie_word_embeddings=True)
    (tmp_path / "base").mkdir()
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp_path / "base")
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "base" / "model.safetensors").write_bytes(safetensors_bytes(state, {"format": "pt"}))
    pm = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 9]))
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(1.0)
    pm.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = pm.merge_and_unload().state_dict()
    assert sorted(got) == sorted(k for k in want if k != "lm_head.weight")
    assert torch.equal(got["model.embed_tokens.weight"], want["model.embed_tokens.weight"])


@pytest.mark.parametrize("change, words", [
    (dict(trainable_token_indices=None), "gives 'model.embed_tokens' no token ids"),
    (dict(trainable_token_indices={"lm_head": [3, 40]}), "gives 'model.embed_tokens' no token ids"),
    (dict(trainable_token_indices=[3, 40, 41]), r"must be \[3, dim\]"),
])
def test_offline_merge_refuses_token_rows_against_their_config(tmp_path, change, words):
    import json
    model = build("llama")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(safetensors_bytes(
        {k: v.detach().clone() for k, v in model.state_dict().items()}, {"format": "pt"}))
    minilora.save_adapter(minilora.inject(model, target_modules=["q_proj"], trainable_token_indices=[3, 40]),
                          tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"  # without minilora's config digest, as peft's
    weights.write_bytes(safetensors_bytes(load_file(weights), {"format": "pt"}))
    with pytest.raises(ValueError, match=words):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- LoRA on parameters (target_parameters)
def _moe(family: str):
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 num_experts_per_tok=2)
    if family == "mixtral":  # checkpoint: one tensor per expert (w1, w3 concatenated on load; w2)
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=24, num_local_experts=4,
                                                                          **small))
    if family == "qwen3_moe":  # one tensor per expert (gate_proj, up_proj; down_proj)
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            intermediate_size=24, moe_intermediate_size=12, num_experts=4, head_dim=8, **small))
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(  # the fused stacks, (experts, in, out)
        intermediate_size=24, num_local_experts=4, head_dim=8, **small))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_offline_merge_of_expert_stacks_is_bit_identical(tmp_path, family, dtype):
    """However the checkpoint stores the stacks, the merged checkpoint loads into the stacks
    merge_and_unload gives: each expert's rows come from the same per-expert product."""
    torch.manual_seed(0)
    model = _moe(family).to(dtype)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    stacks = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    minilora.inject(model, target_modules=["q_proj"], target_parameters=stacks, r=2, lora_alpha=5,
                    rank_pattern={"layers.1.mlp.experts.down_proj": 3})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    minilora.save_adapter(model, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    got = type(model).from_pretrained(tmp_path / "out", dtype=dtype).state_dict()
    want = minilora.merge_and_unload(model).state_dict()
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    for layer in range(2):
        for stack in stacks:
            key = f"model.layers.{layer}.{stack}"
            assert not torch.equal(got[key], base[key]), key
