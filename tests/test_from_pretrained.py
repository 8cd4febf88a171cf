"""``minilora.from_pretrained``: the base model recorded in adapter_config.json, loaded with the
auto class its task_type names, then the adapter; clear errors for every way that goes wrong.
Everything is local (``save_pretrained`` into tmp_path); HF_HUB_OFFLINE=1 forbids downloads."""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch
import transformers

import minilora
from tiny_models import build, example_inputs, output_of, randomize_adapters

CONFIG = "adapter_config.json"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants as hub  # read at import time: patch the loaded value too
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


def _base(tmp_path, kind="llama", **kwargs):
    """A tiny model saved with save_pretrained; its folder."""
    folder = tmp_path / f"base-{kind}"
    build(kind, **kwargs).save_pretrained(folder)
    return folder


def _adapter(tmp_path, base, auto=transformers.AutoModelForCausalLM, **fields):
    """An adapter trained (random values) on the model loaded from ``base``: its config records
    ``base`` as base_model_name_or_path, as save_adapter writes it."""
    model = minilora.inject(auto.from_pretrained(base), **{"targets": ["q_proj", "v_proj"], "r": 4,
                                                           "lora_alpha": 8, **fields})
    randomize_adapters(model)
    minilora.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", model


def _edit_config(folder, **changes):
    data = json.loads((folder / CONFIG).read_text())
    data.update(changes)
    (folder / CONFIG).write_text(json.dumps(data))


def _out(model, inputs):
    with torch.no_grad():
        return output_of(model(**inputs))


def test_loads_base_and_adapter_like_the_two_steps(tmp_path):
    base = _base(tmp_path)
    folder, trained = _adapter(tmp_path, base, task_type="CAUSAL_LM")
    assert json.loads((folder / CONFIG).read_text())["base_model_name_or_path"] == str(base)
    model = minilora.from_pretrained(folder)
    assert type(model) is transformers.LlamaForCausalLM
    inputs = example_inputs("llama", model)
    want = _out(minilora.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(base), folder), inputs)
    assert torch.equal(_out(model, inputs), want)
    assert torch.equal(want, _out(trained, inputs))
    assert minilora.trainable_parameters(model)[0] == 0  # for inference, as load_adapter
    assert minilora.trainable_parameters(minilora.from_pretrained(folder, is_trainable=True))[0] > 0


def test_from_pretrained_kwargs_pass_through(tmp_path):
    folder, _ = _adapter(tmp_path, _base(tmp_path), task_type="CAUSAL_LM")
    model = minilora.from_pretrained(folder, dtype=torch.float64)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float64
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.dtype == torch.float64


@pytest.mark.parametrize("task_type, cls", [("SEQ_CLS", transformers.LlamaForSequenceClassification),
                                            ("TOKEN_CLS", transformers.LlamaForTokenClassification)])
def test_task_type_picks_the_auto_class(task_type, cls, tmp_path):
    base = _base(tmp_path, num_labels=3, pad_token_id=0)
    auto = {"SEQ_CLS": transformers.AutoModelForSequenceClassification,
            "TOKEN_CLS": transformers.AutoModelForTokenClassification}[task_type]
    # The head is new (random) in the base: the adapter trains it (SEQ_CLS adds it by itself).
    folder, trained = _adapter(tmp_path, base, auto=auto, task_type=task_type, modules_to_save=["score"])
    model = minilora.from_pretrained(folder)
    assert type(model) is cls
    inputs = example_inputs("llama", model)
    assert torch.equal(_out(model, inputs), _out(trained, inputs))


def test_base_model_override_when_the_recorded_folder_moved(tmp_path):
    base = _base(tmp_path)
    folder, trained = _adapter(tmp_path, base, task_type="CAUSAL_LM")
    moved = tmp_path / "moved"
    shutil.move(base, moved)
    with pytest.raises(FileNotFoundError, match=rf"base model folder '{base}'.*does not exist.*base_model="):
        minilora.from_pretrained(folder)
    model = minilora.from_pretrained(folder, base_model=moved)
    inputs = example_inputs("llama", model)
    assert torch.equal(_out(model, inputs), _out(trained, inputs))


def test_explicit_auto_class_without_task_type(tmp_path):
    folder, trained = _adapter(tmp_path, _base(tmp_path))  # task_type None
    with pytest.raises(ValueError, match="has no task_type.*auto_class="):
        minilora.from_pretrained(folder)
    model = minilora.from_pretrained(folder, transformers.AutoModelForCausalLM)
    inputs = example_inputs("llama", model)
    assert torch.equal(_out(model, inputs), _out(trained, inputs))


def test_no_recorded_base(tmp_path):
    folder, _ = _adapter(tmp_path, _base(tmp_path), task_type="CAUSAL_LM")
    _edit_config(folder, base_model_name_or_path=None)
    with pytest.raises(ValueError, match="records no base_model_name_or_path.*base_model="):
        minilora.from_pretrained(folder)


def test_base_folder_that_is_not_a_model(tmp_path):
    folder, _ = _adapter(tmp_path, _base(tmp_path), task_type="CAUSAL_LM")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder without config.json: not a transformers model"):
        minilora.from_pretrained(folder, base_model=tmp_path / "empty")


def test_hub_id_is_not_downloaded(tmp_path):
    folder, _ = _adapter(tmp_path, _base(tmp_path), task_type="CAUSAL_LM")
    _edit_config(folder, base_model_name_or_path="some-org/some-model-that-is-not-here")
    with pytest.raises(OSError, match="base model 'some-org/some-model-that-is-not-here' of adapter"):
        minilora.from_pretrained(folder)


def test_adapter_that_does_not_fit_the_base(tmp_path):
    folder, _ = _adapter(tmp_path, _base(tmp_path), task_type="CAUSAL_LM")
    gpt2 = _base(tmp_path, "gpt2")
    with pytest.raises(ValueError, match=r"does not fit base model .*GPT2LMHeadModel.*q_proj"):
        minilora.from_pretrained(folder, base_model=gpt2)
    wide_folder = tmp_path / "wide"  # the same module names, other shapes
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(wide_folder)
    with pytest.raises(minilora.AdapterFileError, match="does not fit base model.*has shape"):
        minilora.from_pretrained(folder, base_model=wide_folder)


def test_bad_adapter_config_is_load_adapters_error(tmp_path):
    folder, _ = _adapter(tmp_path, _base(tmp_path), task_type="CAUSAL_LM")
    _edit_config(folder, r=-1)
    with pytest.raises(minilora.AdapterFileError, match="adapter_config.json"):
        minilora.from_pretrained(folder)


def test_a_broken_weights_file_fails_before_the_base_loads(tmp_path, monkeypatch):
    folder, _ = _adapter(tmp_path, _base(tmp_path), task_type="CAUSAL_LM")
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 7)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the base was loaded")))
    with pytest.raises(minilora.AdapterFileError, match="adapter_model.safetensors"):
        minilora.from_pretrained(folder)


# ---------------------------------------------------------------- a vocabulary grown before training
def _tokenizer(folder, size):
    """A word-level tokenizer of ``size`` tokens saved into ``folder`` (transformers' files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0")
    assert len(fast) == size
    fast.save_pretrained(folder)


def _grown(tmp_path, new_rows=8, **fields):
    """Base saved at 64 tokens; the adapter trained after growing it by ``new_rows``."""
    base = _base(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(64 + new_rows)
    minilora.inject(model, **{"targets": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM",
                              **fields})
    randomize_adapters(model)
    minilora.save_adapter(model, tmp_path / "adapter")
    new_ids = torch.arange(64, 64 + new_rows).reshape(2, -1)
    return tmp_path / "adapter", model, {"input_ids": torch.cat([new_ids, new_ids.flip(1) - 40], 1)}


def test_grown_vocabulary_is_read_from_the_adapters_embeddings(tmp_path):
    folder, trained, inputs = _grown(tmp_path, modules_to_save=["embed_tokens", "lm_head"])
    with pytest.raises(minilora.AdapterFileError, match=r"has shape \[72, 32\], but this model needs \[64, 32\]: the "
                                                        r"adapter was trained on a vocabulary of 72 tokens .*"
                                                        r"model.resize_token_embeddings\(72\)"):  # two steps
        minilora.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-llama"), folder)
    model = minilora.from_pretrained(folder)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == 72
    assert torch.equal(_out(model, inputs), _out(trained, inputs))  # the new tokens' rows included


def test_grown_vocabulary_same_as_peft_with_a_tokenizer(tmp_path):
    import peft
    folder, trained, inputs = _grown(tmp_path, modules_to_save=["embed_tokens", "lm_head"])
    _tokenizer(folder, 72)  # peft learns the size from a tokenizer only
    ours = _out(minilora.from_pretrained(folder), inputs)
    theirs = _out(peft.AutoPeftModelForCausalLM.from_pretrained(folder).eval(), inputs)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, _out(trained, inputs))


def test_grown_vocabulary_from_peft_saved_embedding_layers(tmp_path):
    """LoRA on the grown embedding: peft writes the base embedding too (save_embedding_layers), and
    the LoRA factor's width and that weight both give the size."""
    import peft
    base = _base(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(70)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False,
                             task_type="CAUSAL_LM")
    trained = peft.get_peft_model(model, config).eval()
    trained.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"vocabulary of 70 tokens, 6 more .*no values for the new rows of "
                                         r"\['lm_head'\]: they are random here"):
        model = minilora.from_pretrained(tmp_path / "adapter")
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))  # the caller's random stream is untouched
    assert model.get_input_embeddings().weight.shape[0] == 70
    inputs = {"input_ids": torch.tensor([[69, 3, 65, 64, 12]])}
    # The untargeted head's 6 new rows are in no file (peft's own reload differs there too)
    assert torch.equal(_out(model, inputs)[..., :64], _out(trained, inputs)[..., :64])


def test_tokenizer_grows_but_never_shrinks_the_base(tmp_path):
    """No embedding tensors in the adapter: a larger tokenizer beside it grows the base, as peft's
    auto classes do; a smaller one leaves it (the adapter then loads into the unchanged base)."""
    import peft
    folder, _ = _adapter(tmp_path, _base(tmp_path), task_type="CAUSAL_LM")
    _tokenizer(folder, 80)
    model = minilora.from_pretrained(folder)
    assert model.get_input_embeddings().weight.shape[0] == 80 == model.get_output_embeddings().weight.shape[0]
    assert peft.AutoPeftModelForCausalLM.from_pretrained(folder).get_input_embeddings().weight.shape[0] == 80
    _tokenizer(folder, 40)
    assert minilora.from_pretrained(folder).get_input_embeddings().weight.shape[0] == 64


def _grown_lora(tmp_path, rows=70, save=True, **save_kwargs):
    """LoRA on the token embedding and head of a base grown from 64 to ``rows`` tokens (new rows
    random, in no file unless written as base weights); saved with save_adapter's options."""
    base = _base(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(rows)
    minilora.inject(model, targets=["embed_tokens", "lm_head", "q_proj"], r=4, lora_alpha=8, task_type="CAUSAL_LM")
    randomize_adapters(model)
    if save:
        minilora.save_adapter(model, tmp_path / "adapter", **save_kwargs)
    return tmp_path / "adapter", model


BASE_KEYS = {"base_model.model.model.embed_tokens.base_layer.weight", "base_model.model.lm_head.base_layer.weight"}


def _keys(folder):
    from safetensors import safe_open
    with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
        return set(handle.keys())


def test_lora_on_a_grown_vocabulary_round_trips_with_its_base_rows(tmp_path):
    """save_embedding_layers="auto" writes the grown base embedding and head (the base's config.json
    says 64 tokens): from_pretrained rebuilds the trained model exactly, and peft (given the
    tokenizer it needs to resize) loads the same model."""
    import peft
    folder, trained = _grown_lora(tmp_path)
    assert BASE_KEYS <= _keys(folder)
    inputs = {"input_ids": torch.tensor([[69, 3, 65, 64, 12, 66]])}
    model = minilora.from_pretrained(folder)
    assert torch.equal(_out(model, inputs), _out(trained, inputs))  # all 70 logits
    _tokenizer(folder, 70)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(_out(theirs, inputs), _out(trained, inputs), rtol=0, atol=0)


def test_auto_writes_base_rows_only_for_a_resized_vocabulary(tmp_path):
    folder, _ = _grown_lora(tmp_path / "same", rows=64)
    assert not _keys(folder) & BASE_KEYS  # the base's own 64 rows: the base folder has them
    folder, _ = _grown_lora(tmp_path / "forced", rows=64, save_embedding_layers=True)
    assert BASE_KEYS <= _keys(folder)
    folder, _ = _grown_lora(tmp_path / "never", rows=70, save_embedding_layers=False)
    assert not _keys(folder) & BASE_KEYS
    model = build("llama")  # built from a config: the base's vocabulary is unknown, "auto" writes none
    model.resize_token_embeddings(70)
    minilora.inject(model, targets=["embed_tokens"], r=2)
    minilora.save_adapter(model, tmp_path / "unknown")
    assert not _keys(tmp_path / "unknown") & BASE_KEYS


def test_auto_reads_a_hub_bases_vocabulary_from_the_cache(tmp_path, monkeypatch):
    """A hub id is looked up in the Hugging Face cache, never downloaded."""
    import huggingface_hub.constants as hub
    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / ("0" * 40)
    build("llama").config.save_pretrained(snapshot)
    (tmp_path / "cache" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "cache" / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _, model = _grown_lora(tmp_path, save=False)
    model.config._name_or_path = "org/tiny"
    minilora.save_adapter(model, tmp_path / "grown")
    assert BASE_KEYS <= _keys(tmp_path / "grown")
    model.config._name_or_path = "org/not-cached"
    minilora.save_adapter(model, tmp_path / "unknown")
    assert not _keys(tmp_path / "unknown") & BASE_KEYS


def test_a_merged_layer_writes_its_base_weight_without_the_delta(tmp_path):
    _, model = _grown_lora(tmp_path, save=False)
    want = minilora.adapter_state_dict(model, save_embedding_layers=True)
    for keep_original in (True, False):
        minilora.merge(model, keep_original=keep_original)
        got = minilora.adapter_state_dict(model, save_embedding_layers=True)
        # Without a kept original: (W + delta) - delta in fp32, two roundings of values below 4: < 1e-6
        for key in BASE_KEYS:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0 if keep_original else 1e-6)
        minilora.unmerge(model)


def test_save_embedding_layers_is_checked_before_writing(tmp_path):
    _, model = _grown_lora(tmp_path, save=False)
    with pytest.raises(ValueError, match=r"save_embedding_layers='yes': expected True, False or 'auto'"):
        minilora.save_adapter(model, tmp_path / "adapter", save_embedding_layers="yes")
    assert not (tmp_path / "adapter").exists()


def test_a_grown_vocabulary_under_lora_elsewhere_keeps_its_new_rows(tmp_path):
    """Only q_proj/v_proj adapted, vocabulary grown: "auto" writes the whole embedding and head
    (their new rows exist nowhere else), as peft does; both libraries load either file."""
    import peft
    plain = {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    folder, trained, inputs = _grown(tmp_path)
    assert plain <= _keys(folder)
    assert torch.equal(_out(minilora.from_pretrained(folder), inputs), _out(trained, inputs))
    _tokenizer(folder, 72)
    assert torch.equal(_out(peft.AutoPeftModelForCausalLM.from_pretrained(folder).eval(), inputs),
                       _out(trained, inputs))
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-llama"),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    theirs.resize_token_embeddings(72)
    theirs.eval().save_pretrained(tmp_path / "peft")
    assert plain <= _keys(tmp_path / "peft")
    ours = minilora.from_pretrained(tmp_path / "peft", transformers.AutoModelForCausalLM)
    assert torch.equal(_out(ours, inputs), _out(theirs, inputs))


def test_a_grown_vocabulary_under_trainable_tokens_round_trips(tmp_path):
    """The new tokens' trained rows are the token adapter's; the untrained ones and the head's new
    rows are base weights, written under peft's keys ("auto"), so both libraries rebuild the model."""
    import peft
    folder, trained, inputs = _grown(tmp_path, trainable_token_indices=[64, 65, 66])
    rows = trained.model.embed_tokens.tokens["default"].delta
    with torch.no_grad():
        rows.add_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(5)))  # trained
    minilora.save_adapter(trained, folder)
    assert {"base_model.model.model.embed_tokens.token_adapter.base_layer.weight",
            "base_model.model.lm_head.weight"} <= _keys(folder)
    assert torch.equal(_out(minilora.from_pretrained(folder), inputs), _out(trained, inputs))
    _tokenizer(folder, 72)
    assert torch.equal(_out(peft.AutoPeftModelForCausalLM.from_pretrained(folder).eval(), inputs),
                       _out(trained, inputs))


@pytest.mark.parametrize("fields", [
    dict(modules_to_save=["embed_tokens", "lm_head"]),  # the trained copies carry the new rows
    dict(),  # LoRA elsewhere: the grown base rows are saved beside it
    dict(targets=["embed_tokens", "lm_head", "q_proj"]),  # LoRA on the grown embedding and head
    dict(trainable_token_indices=[64, 65, 3]),  # token rows over the grown base rows
], ids=["modules_to_save", "lora-elsewhere", "lora-on-the-vocabulary", "token-rows"])
def test_offline_merge_of_a_grown_vocabulary_equals_the_in_memory_merge(tmp_path, fields):
    """``minilora merge`` gives the embedding and head the adapter's rows and config.json the new
    vocab_size; the merged checkpoint loads as a plain model equal to from_pretrained, then
    merge_and_unload."""
    from minilora.offline_merge import merge_checkpoint
    folder, trained, inputs = _grown(tmp_path, **fields)
    summary = merge_checkpoint(tmp_path / "base-llama", folder, tmp_path / "merged")
    assert summary.vocab_size == 72
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 72
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    in_memory = minilora.merge_and_unload(minilora.from_pretrained(folder))
    assert merged.get_input_embeddings().weight.shape[0] == 72 == merged.get_output_embeddings().weight.shape[0]
    # fp32 weights W + s·BA, merged block by block or whole: a few fp32 ulps (1.2e-7) per length-32
    # sum, over two layers
    torch.testing.assert_close(_out(merged, inputs), _out(in_memory, inputs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_out(merged, inputs), _out(trained, inputs), rtol=1e-5, atol=1e-6)


def test_offline_merge_refuses_a_grown_vocabulary_missing_rows(tmp_path):
    """Rows for the embedding but none for the untied head: the head's new rows are unknown."""
    from minilora.offline_merge import merge_checkpoint
    base = _base(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(72)
    minilora.inject(model, targets=["q_proj"], r=4, modules_to_save=["embed_tokens"], task_type="CAUSAL_LM")
    minilora.save_adapter(model, tmp_path / "adapter", save_embedding_layers=False)
    with pytest.raises(ValueError, match=r"gives \['model.embed_tokens.weight'\] 72 rows .* holds no rows for "
                                         r"'lm_head.weight' \(64 in .*its new rows are unknown"):
        merge_checkpoint(base, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_offline_merge_takes_base_rows_saved_under_trainable_tokens(tmp_path):
    """save_embedding_layers=True beside token rows on an unchanged vocabulary: peft's
    token_adapter.base_layer key names the embedding's weight."""
    from minilora.offline_merge import merge_checkpoint
    base = _base(tmp_path)
    model = minilora.inject(transformers.AutoModelForCausalLM.from_pretrained(base), targets=["q_proj"], r=4,
                            trainable_token_indices=[3, 5], task_type="CAUSAL_LM")
    randomize_adapters(model)
    rows = model.model.embed_tokens.tokens["default"].delta
    with torch.no_grad():
        rows.add_(1)
    minilora.save_adapter(model, tmp_path / "adapter", save_embedding_layers=True)
    assert "base_model.model.model.embed_tokens.token_adapter.base_layer.weight" in _keys(tmp_path / "adapter")
    merge_checkpoint(base, tmp_path / "adapter", tmp_path / "merged")
    inputs = example_inputs("llama", model)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_out(merged, inputs), _out(model, inputs), rtol=1e-5, atol=1e-6)

def test_an_unreadable_tokenizer_is_named(tmp_path):
    folder, _ = _adapter(tmp_path, _base(tmp_path), task_type="CAUSAL_LM")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"the tokenizer saved with adapter .* could not be loaded"):
        minilora.from_pretrained(folder)


def test_an_oversized_tokenizer_folder_is_not_read(tmp_path, monkeypatch):
    import minilora.auto
    folder, _ = _adapter(tmp_path, _base(tmp_path), task_type="CAUSAL_LM")
    _tokenizer(folder, 80)
    (folder / "optimizer.pt").write_bytes(b"\0" * 5000)  # a Trainer checkpoint's: not the tokenizer's
    monkeypatch.setattr(minilora.auto, "MAX_TOKENIZER_BYTES", 4000)  # the real bound is 512 MiB of files
    assert minilora.from_pretrained(folder).get_input_embeddings().weight.shape[0] == 80
    (folder / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes() + b" " * 5000)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the tokenizer was read")))
    with pytest.raises(ValueError, match=r"tokenizer files .* hold [0-9.]+ MiB, more than any tokenizer .*not read"):
        minilora.from_pretrained(folder)


def test_hotswap_between_adapters_of_one_grown_vocabulary(tmp_path):
    """Adapters trained on the same grown vocabulary carry the same base rows: a swap accepts them
    (they change nothing); base rows that differ from the model's are refused, the model unchanged."""
    from tiny_models import assert_unchanged, snapshot
    base = _base(tmp_path)
    grown = transformers.AutoModelForCausalLM.from_pretrained(base)
    grown.resize_token_embeddings(72)
    trained = []
    for name, seed in (("first", 3), ("second", 4)):
        model = minilora.inject(copy.deepcopy(grown), targets=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                task_type="CAUSAL_LM")
        randomize_adapters(model, seed=seed)
        minilora.save_adapter(model, tmp_path / name)
        trained.append(model)
    inputs = {"input_ids": torch.tensor([[70, 3, 65, 64, 12, 66]])}
    model = minilora.prepare_for_hotswap(minilora.from_pretrained(tmp_path / "first"), target_rank=4)
    minilora.hotswap_adapter(model, tmp_path / "second")
    torch.testing.assert_close(_out(model, inputs), _out(trained[1], inputs), rtol=0, atol=0)
    other = copy.deepcopy(trained[1])
    with torch.no_grad():
        other.get_input_embeddings().weight[70] += 1  # another model's new rows
    minilora.save_adapter(other, tmp_path / "other")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"base weights \('model.embed_tokens.weight'.* differ from the model's"):
        minilora.hotswap_adapter(model, tmp_path / "other")
    assert_unchanged(model, before)


def _two_adapters_on_a_grown_vocabulary(tmp_path):
    """A base saved at 64 tokens, grown to 70: adapter "a" with LoRA on embed_tokens and lm_head,
    adapter "b" on q_proj only (its file gets the grown base rows under a's wrapping keys)."""
    base = _base(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(70)
    minilora.inject(model, targets=["embed_tokens", "lm_head"], r=4, adapter_name="a", task_type="CAUSAL_LM")
    minilora.inject(model, targets=["q_proj"], r=4, adapter_name="b", task_type="CAUSAL_LM")
    randomize_adapters(model)
    return model


def test_base_rows_are_written_and_read_whatever_wraps_the_embedding(tmp_path):
    """peft writes the grown rows under the wrapping module's keys (base_layer) when another adapter
    wraps the embedding; either key form loads into either wrapping, in either order."""
    model = _two_adapters_on_a_grown_vocabulary(tmp_path)
    minilora.save_adapter(model, tmp_path / "saved", adapter_name="b")
    folder = tmp_path / "saved" / "b"
    assert BASE_KEYS <= _keys(folder)
    inputs = {"input_ids": torch.tensor([[69, 3, 65, 64, 12, 66]])}
    minilora.set_adapter(model, "b")
    want = _out(model, inputs)
    assert torch.equal(_out(minilora.from_pretrained(folder), inputs), want)  # into the plain embedding
    other = _two_adapters_on_a_grown_vocabulary(tmp_path / "again")  # into a LoRA-wrapped one, a's values kept
    minilora.delete_adapter(other, "b")
    minilora.load_adapter(other, folder, adapter_name="b")
    minilora.set_adapter(other, "b")
    assert torch.equal(_out(other, inputs), want)
    plain, trained, _ = _grown(tmp_path / "plain", new_rows=6)  # written with nothing wrapping the embedding
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= _keys(plain)
    minilora.load_adapter(other, plain, adapter_name="c")
    minilora.set_adapter(other, "c")
    assert torch.equal(_out(other, inputs), _out(trained, inputs))


def test_base_rows_are_refused_where_adapters_are_merged_into_them(tmp_path):
    from tiny_models import assert_unchanged, snapshot
    model = _two_adapters_on_a_grown_vocabulary(tmp_path)
    minilora.save_adapter(model, tmp_path / "saved", adapter_name="b")
    minilora.delete_adapter(model, "b")
    minilora.merge(model, adapter_names=["a"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"holds the base weight '(lm_head|model.embed_tokens).weight' .*adapters \['a'\] are "
                                         r"merged into that weight; call minilora.unmerge\(model\) first"):
        minilora.load_adapter(model, tmp_path / "saved" / "b", adapter_name="b")
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind, fields", [
    ("llama-tied", dict(modules_to_save=["embed_tokens"])),
    ("llama-tied", dict()),
    ("llama-tied", dict(trainable_token_indices=[64, 3])),
    ("t5", dict(modules_to_save=["shared"])),
    ("t5", dict()),
    ("t5", dict(trainable_token_indices=[64, 3])),
])
def test_offline_merge_of_a_grown_tied_vocabulary(tmp_path, kind, fields):
    """Tied embeddings (Llama's embed_tokens and lm_head; T5's shared, its two stacks' embed_tokens
    and lm_head) grow as one weight: names without rows of their own in the adapter take the group's,
    and the result equals from_pretrained + merge_and_unload (the base file is never read past a
    tensor's end)."""
    from minilora.offline_merge import merge_checkpoint
    base_model = build("llama", tie_word_embeddings=True) if kind == "llama-tied" else build("t5")
    base_model.save_pretrained(tmp_path / "base", max_shard_size="20KB")  # sharded: tensors follow each other
    auto = transformers.AutoModelForCausalLM if kind == "llama-tied" else transformers.AutoModelForSeq2SeqLM
    model = auto.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(72)
    targets = ["q_proj", "v_proj"] if kind == "llama-tied" else ["q", "v"]
    task = "CAUSAL_LM" if kind == "llama-tied" else "SEQ_2_SEQ_LM"
    minilora.inject(model, targets=targets, r=4, lora_alpha=8, task_type=task, **fields)
    randomize_adapters(model)
    minilora.save_adapter(model, tmp_path / "adapter")
    summary = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert summary.vocab_size == 72
    ids = torch.tensor([[69, 3, 65, 64, 12, 66, 70]])
    inputs = {"input_ids": ids} if kind == "llama-tied" else {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    merged = auto.from_pretrained(tmp_path / "merged")
    in_memory = minilora.merge_and_unload(minilora.from_pretrained(tmp_path / "adapter"))
    want = in_memory.state_dict()
    for key, value in merged.state_dict().items():  # every tensor, the grown rows included
        torch.testing.assert_close(value, want[key], rtol=1e-6, atol=1e-7, msg=key)
    # Merged weights against the unmerged forward: fp32 W + s·BA rounds once more per weight, and the
    # roundings pass through up to ~20 chained products of 32-term sums (T5: two stacks, cross
    # attention): at most ~20 · 32 · 2⁻²⁴ ≈ 4e-5 of the output's scale. A wrong row is O(scale).
    got, want = _out(merged, inputs), _out(model, inputs)
    assert (got - want).abs().max() <= 5e-5 * want.abs().max()


def test_offline_merge_refuses_lora_on_a_grown_t5_shared_embedding(tmp_path):
    """After resize_token_embeddings T5's shared and its stacks' embed_tokens are one module, so
    LoRA on shared reached them all; the checkpoint cannot tell that from tied weights of separate
    modules. Refused, with the way that works."""
    from minilora.offline_merge import merge_checkpoint
    build("t5").save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(72)
    minilora.inject(model, targets=["shared", "q"], r=4, task_type="SEQ_2_SEQ_LM")
    minilora.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"LoRA on 'shared.weight' of a grown vocabulary, and "
                                         r"\['(en|de)coder.embed_tokens.weight', .* Merge in memory: "
                                         r"minilora.from_pretrained, then merge_and_unload"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_offline_merge_of_a_grown_tied_vocabulary_from_peft(tmp_path):
    """peft's file holds the embedding's trained copy only (its lm_head is tied): the head takes
    those rows, read from the adapter, never from past the end of the base's tensor."""
    import peft
    from minilora.offline_merge import merge_checkpoint
    build("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(72)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on tied layers without ensure_weight_tying
        theirs = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    assert not any("lm_head" in k for k in _keys(tmp_path / "adapter"))
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    want = minilora.merge_and_unload(minilora.from_pretrained(tmp_path / "adapter")).state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, want[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("tied, fields", [
    (False, dict(modules_to_save=["embed_tokens", "lm_head"])),  # + <name>.modules_to_save / original_module keys
    (True, dict(trainable_token_indices=[64, 65, 3])),  # + the tied head's copy of the token rows
])
def test_peft_files_of_a_grown_vocabulary_load_and_merge(tmp_path, tied, fields):
    """peft's save_embedding_layers writes more than minilora does beside a modules_to_save copy or
    tied token rows; both paths read them and give peft's model."""
    import peft
    from minilora.offline_merge import merge_checkpoint
    build("llama", tie_word_embeddings=tied).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(72)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False,
                                                            task_type="CAUSAL_LM", **fields)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.5)  # the trained copies / token rows
    theirs.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    inputs = {"input_ids": torch.tensor([[69, 3, 65, 64, 12, 66, 70]])}
    ours = minilora.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(_out(ours, inputs), _out(theirs, inputs), rtol=1e-5, atol=1e-6)
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_out(merged, inputs), _out(theirs, inputs), rtol=1e-5, atol=1e-6)


def test_base_rows_beside_another_adapters_modules_to_save(tmp_path):
    """Adapter a trains lm_head in full; b (LoRA elsewhere) saved beside it writes the head's grown
    base rows (its original module's, peft's key) and loads in either order."""
    base = _base(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(70)
    minilora.inject(model, targets=["q_proj"], modules_to_save=["lm_head"], adapter_name="a", task_type="CAUSAL_LM")
    minilora.inject(model, targets=["v_proj"], adapter_name="b", task_type="CAUSAL_LM")
    randomize_adapters(model)
    minilora.save_adapter(model, tmp_path / "saved")
    assert "base_model.model.lm_head.original_module.weight" in _keys(tmp_path / "saved" / "b")
    inputs = {"input_ids": torch.tensor([[69, 3, 65, 64, 12, 66]])}
    minilora.set_adapter(model, "b")
    assert torch.equal(_out(minilora.from_pretrained(tmp_path / "saved" / "b"), inputs), _out(model, inputs))
    for order in (("a", "b"), ("b", "a")):
        other = transformers.AutoModelForCausalLM.from_pretrained(base)
        other.resize_token_embeddings(70)
        for name in order:
            minilora.load_adapter(other, tmp_path / "saved" / name, name)
        minilora.set_adapter(other, "b")
        assert torch.equal(_out(other, inputs), _out(model, inputs)), order


@pytest.mark.parametrize("tied, fields, repeated", [
    (False, dict(modules_to_save=["embed_tokens", "lm_head"]), "base_model.model.lm_head.modules_to_save.weight"),
    (True, dict(trainable_token_indices=[64, 65, 3]), "base_model.model.lm_head.token_adapter.trainable_tokens_delta"),
    (True, dict(trainable_token_indices=[64, 65, 3]), "base_model.model.lm_head.token_adapter.base_layer.weight"),
], ids=["modules_to_save-copy", "tied-token-rows", "tied-base-rows"])
def test_a_file_repeating_one_weight_with_other_values_is_refused(tmp_path, tied, fields, repeated):
    """peft's save_embedding_layers writes some tensors twice (a modules_to_save copy; a tied head's
    token rows and base rows); when the two disagree, no path picks one: both refuse, nothing written."""
    import peft
    from safetensors.torch import load_file, save_file
    from minilora.offline_merge import merge_checkpoint
    build("llama", tie_word_embeddings=tied).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(72)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM", **fields))
    theirs.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[repeated] = tensors[repeated] + 1
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(minilora.AdapterFileError, match=rf"'{repeated}'.* fill the same tensor of this model \(tied, "
                                                        r"or written twice\) but hold different values"):
        minilora.from_pretrained(tmp_path / "adapter")
    with pytest.raises(minilora.AdapterFileError, match=r"inconsistent"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_hotswap_of_grown_vocabulary_adapters_with_and_without_a_trained_head(tmp_path):
    """The head held under modules_to_save in the model, plain in the file (or the other way):
    equal base rows are found either way; nothing half-written (it raised a KeyError mid-swap)."""
    from tiny_models import assert_unchanged, snapshot
    base = _base(tmp_path)
    for name, fields in (("with-head", dict(modules_to_save=["lm_head"])), ("without", {})):
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        torch.manual_seed(0)  # the same grown rows in both
        model.resize_token_embeddings(70)
        minilora.inject(model, targets=["q_proj"], task_type="CAUSAL_LM", **fields)
        randomize_adapters(model)
        minilora.save_adapter(model, tmp_path / name, save_embedding_layers=True)
    inputs = {"input_ids": torch.tensor([[69, 3, 65, 64, 12, 66]])}
    model = minilora.from_pretrained(tmp_path / "with-head")
    minilora.hotswap_adapter(model, tmp_path / "without")  # fewer modules_to_save: the head goes back
    assert torch.equal(_out(model, inputs), _out(minilora.from_pretrained(tmp_path / "without"), inputs))
    model = minilora.from_pretrained(tmp_path / "without")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"the new adapter touches \['lm_head'\]"):
        minilora.hotswap_adapter(model, tmp_path / "with-head")
    assert_unchanged(model, before)
