"""Adapters on disk, both ways with real peft: minilora save -> peft.PeftModel.from_pretrained,
peft save_pretrained -> minilora.load_adapter, same outputs; same key sets, shapes and config."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import minilora
from minilora.peft_format import DIGEST_KEY
from minilora.inject import lora_state
from tiny_models import build, copy_adapter_to_peft, example_inputs, output_of, randomize_adapters

peft = pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

# (kind, config fields): one per layer kind and feature the format has to carry.
CASES = {
    "llama": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8)),
    "llama_mts_emb": ("llama", dict(target_modules=["q_proj", "embed_tokens"], r=4, lora_alpha=16,
                                    modules_to_save=["lm_head"], use_rslora=True)),
    "gpt2_lora_only": ("gpt2", dict(target_modules=["c_attn", "c_fc"], r=4, bias="lora_only")),
    "embed_conv1d": ("embed_conv1d", dict(target_modules=["emb", "c_fc"], r=4, lora_alpha=6)),
    "conv2d": ("conv2d", dict(target_modules=["conv0", "conv1"], r=4, rank_pattern={"conv1": 2})),
    "bert": ("bert", dict(target_modules=["query", "value"], r=4, modules_to_save=["pooler.dense"])),
    "mlp_all_lora_bias": ("mlp", dict(target_modules=["lin0", "lin1"], r=2, bias="all", lora_bias=True,
                                      init_lora_weights=True, modules_to_save=["head"])),
}


def _keys(folder: str) -> dict[str, tuple[int, ...]]:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        # peft writes {"format": "pt"}; minilora adds the digest of the config saved with it
        assert f.metadata()["format"] == "pt" and set(f.metadata()) <= {"format", DIGEST_KEY}
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _peft_model(kind, cfg, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build(kind), peft.LoraConfig(**cfg, **extra)).eval()


def _trained(kind, cfg):
    """A minilora model whose adapter (and trained copies, biases) hold random values."""
    ours = minilora.inject(build(kind), minilora.LoraConfig(**cfg))
    randomize_adapters(ours)
    if cfg.get("bias", "none") != "none":  # trained biases must travel too
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if p.requires_grad and name.endswith("bias"):
                    p.add_(0.5)
    return ours


def _out(model, inputs):
    with torch.no_grad():
        return output_of(model(**inputs))


def _peft_only_extra(kind, cfg) -> set[str]:
    # peft's save_embedding_layers="auto" also writes the *base* weight of a LoRA-adapted
    # embed_tokens/lm_head; minilora writes adapter tensors only (and accepts that key on load).
    return {f"base_model.model.{m}.base_layer.weight" for m in ("model.embed_tokens",)
            if "embed_tokens" in cfg["target_modules"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_keys_shapes_and_config_as_peft(case, tmp_path):
    kind, cfg = CASES[case]
    ours = minilora.inject(build(kind), minilora.LoraConfig(**cfg))
    minilora.save_adapter(ours, tmp_path / "ours")
    theirs = _peft_model(kind, cfg)
    theirs.save_pretrained(tmp_path / "peft")
    ours_keys, peft_keys = _keys(tmp_path / "ours"), _keys(tmp_path / "peft")
    for key in _peft_only_extra(kind, cfg):
        assert peft_keys.pop(key)
    assert ours_keys == peft_keys
    assert len(ours_keys) >= 2
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in ("peft_type", "r", "lora_alpha", "bias", "use_rslora", "modules_to_save", "rank_pattern",
                  "alpha_pattern", "lora_bias", "inference_mode", "lora_dropout", "use_dora"):
        assert ours_cfg[field] == peft_cfg[field], field
    # fan_in_fan_out is not compared: peft flips it to True in its config when it meets a Conv1D
    # (and writes that); both libraries pick the layout per layer from the layer type anyway.
    assert sorted(ours_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])
    # every field peft writes is in ours (peft's own bookkeeping aside)
    assert set(peft_cfg) - set(ours_cfg) <= {"auto_mapping", "peft_version", "revision", "megatron_core",
                                             "qalora_group_size", "ensure_weight_tying", "runtime_config"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_minilora_save_loads_in_peft_with_equal_outputs(case, tmp_path):
    kind, cfg = CASES[case]
    ours = _trained(kind, cfg)
    inputs = example_inputs(kind, ours)
    minilora.save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(kind), tmp_path).eval()
    base = _out(build(kind), inputs)
    got, want = _out(theirs, inputs), _out(ours, inputs)
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_save_loads_in_minilora_with_equal_outputs(case, tmp_path):
    kind, cfg = CASES[case]
    source = _trained(kind, cfg)  # random values, copied into peft
    theirs = _peft_model(kind, cfg)
    copy_adapter_to_peft(source, theirs, "default")
    if cfg.get("bias", "none") != "none":
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if p.requires_grad and name.endswith("bias") and ".lora_" not in name:
                    p.add_(0.5)
    theirs.save_pretrained(tmp_path)
    ours = minilora.load_adapter(build(kind), tmp_path)
    inputs = example_inputs(kind, ours)
    assert (_out(theirs, inputs) - _out(build(kind), inputs)).abs().max() > 1e-3
    assert torch.equal(_out(ours, inputs), _out(theirs, inputs))
    # loaded for inference: frozen, like peft's default is_trainable=False
    assert minilora.trainable_parameters(ours)[0] == 0
    assert lora_state(ours).configs["default"].inference_mode is True


def test_is_trainable_matches_peft_trainable_count(tmp_path):
    kind, cfg = CASES["llama_mts_emb"]
    minilora.save_adapter(_trained(kind, cfg), tmp_path)
    ours = minilora.load_adapter(build(kind), tmp_path, is_trainable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(kind), tmp_path, is_trainable=True)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert minilora.trainable_parameters(ours)[0] == n_theirs > 0


def test_several_adapters_in_sub_folders_both_ways(tmp_path):
    kind, cfg = "llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    cfg_b = dict(target_modules=["up_proj"], r=2, lora_alpha=4, modules_to_save=["lm_head"])
    ours = minilora.inject(build(kind), minilora.LoraConfig(**cfg))
    minilora.inject(ours, minilora.LoraConfig(**cfg_b), adapter_name="b")
    randomize_adapters(ours)
    minilora.save_adapter(ours, tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors", "b"]
    assert sorted(os.listdir(tmp_path / "ours" / "b")) == ["adapter_config.json", "adapter_model.safetensors"]

    # peft reads both folders
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
        theirs.load_adapter(tmp_path / "ours" / "b", adapter_name="b")
    inputs = example_inputs(kind, ours)
    for name in ("default", "b"):
        minilora.set_adapter(ours, name)
        theirs.set_adapter(name)
        assert torch.equal(_out(ours, inputs), _out(theirs, inputs)), name

    # peft writes the same layout; minilora loads it back
    theirs.save_pretrained(tmp_path / "peft")
    assert _keys(tmp_path / "peft") == _keys(tmp_path / "ours")
    assert _keys(tmp_path / "peft" / "b") == _keys(tmp_path / "ours" / "b")
    back = minilora.load_adapter(build(kind), tmp_path / "peft")
    minilora.load_adapter(back, tmp_path / "peft" / "b", adapter_name="b")
    assert lora_state(back).active == ("default",)  # an extra adapter is added inactive, as peft
    for name in ("default", "b"):
        minilora.set_adapter(back, name)
        minilora.set_adapter(ours, name)
        assert torch.equal(_out(back, inputs), _out(ours, inputs)), name


def test_single_named_adapter_goes_to_its_sub_folder_like_peft(tmp_path):
    ours = minilora.inject(build("mlp"), targets=["lin0"])
    minilora.inject(ours, targets=["lin1"], adapter_name="b")
    minilora.save_adapter(ours, tmp_path, adapter_name="b")
    assert os.listdir(tmp_path) == ["b"]


def test_tied_embeddings_modules_to_save_like_peft_ensure_weight_tying(tmp_path):
    # GPT-2 ties lm_head to wte; minilora keeps one trained copy for both (peft's
    # ensure_weight_tying=True) and writes both keys, as peft does then.
    cfg = dict(target_modules=["c_attn"], r=4, modules_to_save=["lm_head"])
    ours = _trained("gpt2", cfg)
    minilora.save_adapter(ours, tmp_path / "ours")
    theirs = _peft_model("gpt2", cfg, ensure_weight_tying=True)
    theirs.save_pretrained(tmp_path / "peft")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft")
    inputs = example_inputs("gpt2", ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build("gpt2"), tmp_path / "ours").eval()
    assert torch.equal(_out(loaded, inputs), _out(ours, inputs))
    # a file with only lm_head.weight (peft without tying) fills the shared copy
    back = minilora.load_adapter(build("gpt2"), tmp_path / "ours")
    assert torch.equal(_out(back, inputs), _out(ours, inputs))


def test_tied_modules_to_save_of_a_second_adapter_reaches_both_ends(tmp_path):
    """A second adapter training the tied lm_head in full gets its copy on wte too (an earlier
    adapter had wrapped both, hiding the shared weight): each file then rebuilds its adapter's
    model, in either loading order."""
    model = build("gpt2")
    for name, target in (("a", "c_attn"), ("b", "c_fc")):
        minilora.inject(model, targets=[target], r=4, modules_to_save=["lm_head"], adapter_name=name)
    randomize_adapters(model)
    assert set(model.transformer.wte.modules_to_save) == {"a", "b"}
    minilora.save_adapter(model, tmp_path)
    inputs = example_inputs("gpt2", model)
    for order in (("a", "b"), ("b", "a")):
        loaded = build("gpt2")
        for name in order:
            minilora.load_adapter(loaded, tmp_path / name, name)
        for name in order:
            minilora.set_adapter(model, name)
            minilora.set_adapter(loaded, name)
            assert torch.equal(_out(loaded, inputs), _out(model, inputs)), (order, name)


def test_adapter_state_dict_is_what_save_writes(tmp_path):
    kind, cfg = CASES["embed_conv1d"]
    ours = _trained(kind, cfg)
    state = minilora.adapter_state_dict(ours)
    minilora.save_adapter(ours, tmp_path)
    from safetensors.torch import load_file
    on_disk = load_file(tmp_path / "adapter_model.safetensors")
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k], on_disk[k]) for k in state)
    # and the values are the model's (not copies of zeros): lora_embedding_A is the emb adapter's A
    assert torch.equal(state["base_model.model.emb.lora_embedding_A"], ours.emb.adapters["default"].lora_A)
    # CPU copies: changing them does not touch the model
    state["base_model.model.emb.lora_embedding_A"].zero_()
    assert ours.emb.adapters["default"].lora_A.abs().sum() > 0


def test_base_model_name_or_path_is_written(tmp_path):
    ours = minilora.inject(build("bert"), targets=["query"])
    minilora.save_adapter(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == ours.config._name_or_path != ""
    assert written["peft_type"] == "LORA" and written["inference_mode"] is True
