"""``minilora.from_pretrained``: the base model recorded in adapter_config.json, loaded with the
auto class its task_type names, then the adapter; clear errors for every way that goes wrong.
Everything is local (``save_pretrained`` into tmp_path); HF_HUB_OFFLINE=1 forbids downloads."""

from __future__ import annotations

import json
import shutil

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
