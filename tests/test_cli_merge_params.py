"""`minilora merge` with LoRA on parameters (``target_parameters``: MoE expert stacks).

transformers v5 models hold each layer's experts as fused 3-D parameters, but checkpoints keep
their own layout: Mixtral and Qwen3-MoE store one tensor per expert (stacked, then concatenated
on load: ``block_sparse_moe.experts.3.w1.weight``), GPT-OSS stores the fused stack (experts, in,
out). An adapter peft trained on the fused parameters is merged into each layout, and the result,
loaded back with transformers, is compared with peft's own ``merge_and_unload`` in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

from minilora.offline_merge import merge_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

R, ALPHA = 2, 5
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
# A float32 delta from float64 factors: every product and the r-term sum round at most r + 3
# times (2 casts, r - 1 adds, the scaling); the merged value rounds once more to the stored dtype.
EPS = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}


def mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2))


def qwen3_moe():
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, head_dim=8))


def gpt_oss():
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, head_dim=8))


def peft_adapter(model, folder, targets=EXPERTS, seed=0):
    """A peft adapter on a float64 copy of ``model`` with random factors; returns peft's merged
    float64 state dict (the reference) after saving the adapter to ``folder``."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"], target_parameters=targets)
    pm = peft.get_peft_model(copy.deepcopy(model).double(), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    pm.save_pretrained(folder)
    # A bound on every |s·B_e @ A_e| from the factors' sizes alone (max|B| max|A| r s): layout-free.
    biggest = {k: max(float(p.abs().max()) for n, p in pm.named_parameters() if k in n) for k in ("lora_A", "lora_B")}
    return pm.merge_and_unload().state_dict(), ALPHA / R * R * biggest["lora_A"] * biggest["lora_B"]


@pytest.mark.parametrize("build", [mixtral, qwen3_moe, gpt_oss])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_adapter_merges_as_peft(tmp_path, build, dtype):
    torch.manual_seed(1)
    model = build().to(dtype)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")  # sharded, in the checkpoint's own layout
    reference, bound = peft_adapter(model, tmp_path / "adapter")
    summary = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert summary.lora_modules == 2 * (1 + len(EXPERTS))  # q_proj and both stacks, in 2 layers
    merged = type(model).from_pretrained(tmp_path / "out", dtype=dtype).state_dict()
    base = model.state_dict()
    eps = EPS[dtype]
    changed = 0
    for key, ref in reference.items():
        got = merged[key].double()
        tol = eps * ref.abs() + (R + 3) * 2.0 ** -24 * bound
        assert (got - ref).abs().le(tol).all(), (key, float((got - ref).abs().max()))
        changed += not torch.equal(merged[key], base[key])
    assert changed == 2 * (1 + len(EXPERTS)), changed  # exactly the adapted tensors moved


def test_one_stack_of_two(tmp_path):
    """Only down_proj targeted: peft keys it without base_layer nesting, gate_up_proj stays as it was."""
    torch.manual_seed(1)
    model = mixtral()
    model.save_pretrained(tmp_path / "base")
    reference, _ = peft_adapter(model, tmp_path / "adapter", targets=["experts.down_proj"])
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    merged = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for key in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        torch.testing.assert_close(merged[key].double(), reference[key], rtol=1e-6, atol=1e-6)
    assert torch.equal(merged["model.layers.0.mlp.experts.gate_up_proj"],
                       model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"])
    assert not torch.equal(merged["model.layers.0.mlp.experts.down_proj"],
                           model.state_dict()["model.layers.0.mlp.experts.down_proj"])


def test_needs_the_model_config(tmp_path):
    torch.manual_seed(1)
    model = mixtral()
    model.save_pretrained(tmp_path / "base")
    peft_adapter(model, tmp_path / "adapter")
    (tmp_path / "base" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"target_parameters=.*needs the model built from .*config\.json"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_model_is_refused(tmp_path):
    """Trained with 4 experts, merged into a checkpoint with 8: refused by name, nothing written."""
    torch.manual_seed(1)
    small, big = mixtral(), mixtral()
    big = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**small.config.to_dict(), "num_local_experts": 8}))
    big.save_pretrained(tmp_path / "base")
    peft_adapter(small, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"parameter 'model\.layers\.0\.mlp\.experts\.(gate_up|down)_proj' has "
                                         r"shape \[8, .*was it trained on another model"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
