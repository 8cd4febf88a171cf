"""LoraConfig: validation (each bad value names field, value and what is allowed), frozen, and
the round trip through peft's adapter_config.json fields."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from minilora import LoraConfig

peft = pytest.importorskip("peft")

# (field, bad value, words the message must contain besides the field and the value)
BAD_VALUES = [
    ("r", 0, "integer from 1 to 65536"),
    ("r", -4, "integer from 1 to 65536"),
    ("r", 2.5, "integer from 1 to 65536"),
    ("r", True, "integer from 1 to 65536"),
    ("r", 10**30, "integer from 1 to 65536"),  # was torch's TypeError at inject
    ("lora_alpha", 0, r"number in \(0, 1e\+06\]"),
    ("lora_alpha", float("nan"), r"number in \(0, 1e\+06\]"),
    ("lora_alpha", float("inf"), r"number in \(0, 1e\+06\]"),
    ("lora_alpha", 1e308, r"number in \(0, 1e\+06\]"),  # was accepted: an all-inf merged weight
    ("lora_dropout", 1.0, r"\[0, 1\)"),
    ("lora_dropout", -0.1, r"\[0, 1\)"),
    ("target_modules", [], "at least one module"),
    ("target_modules", ["q_proj", 3], "module-name strings"),
    ("target_modules", "q_proj[", "not a valid regular expression"),
    ("target_modules", 7, "list of module names"),
    ("exclude_modules", "(", "not a valid regular expression"),
    ("modules_to_save", "lm_head", r"list of module names"),
    ("modules_to_save", ["head("], "used as a regular expression"),
    ("bias", "some", r"\('none', 'all', 'lora_only'\)"),
    ("use_rslora", "yes", "True or False"),
    ("init_lora_weights", "loftq", "allowed values"),
    ("init_lora_weights", "kaiming", "allowed values"),
    ("layers_to_transform", -1, "non-negative"),
    ("layers_to_transform", [0, "1"], "non-negative"),
    ("rank_pattern", {"q_proj": 0}, "integer rank from 1 to 65536"),
    ("rank_pattern", {"q_proj": 2.5}, "integer rank from 1 to 65536"),
    ("rank_pattern", {"q_proj": 2**20}, "integer rank from 1 to 65536"),
    ("rank_pattern", ["q_proj"], "dict"),
    ("rank_pattern", {"(": 4}, "not a valid regular expression"),
    ("alpha_pattern", {"q_proj": -1}, r"alpha in \(0, 1e\+06\]"),
    ("alpha_pattern", {"q_proj": 1e300}, r"alpha in \(0, 1e\+06\]"),
    ("fan_in_fan_out", 1, "True or False"),
    ("lora_bias", "no", "True or False"),
    ("inference_mode", None, "True or False"),
    ("task_type", "CLASSIFY", "allowed values"),
    ("use_dora", 1, "True or False"),  # DoRA is implemented, but the flag must be a bool (as peft's JSON)
    ("use_dora", "true", "True or False"),
    ("use_dora", None, "True or False"),
    # peft features minilora does not implement: accepted off, refused on (also by the constructor)
    ("use_qalora", True, "only use_qalora=False"),
    ("target_parameters", "experts.gate_up_proj", "list of parameter names"),
    ("trainable_token_indices", [0, 0], "listed twice"),
    ("trainable_token_indices", {"embed_tokens": [-1]}, "non-negative integers"),
    ("layer_replication", [[0, 2]], "only layer_replication=None"),
    ("loftq_config", {"loftq_bits": 4}, r"only loftq_config=\{\}"),
    ("peft_type", "IA3", "only LoRA adapters"),
    ("qalora_group_size", "16", "expected int"),
]


@pytest.mark.parametrize("field,value,allowed", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_bad_value_names_field_value_and_allowed(field, value, allowed):
    base = {"target_modules": ["q_proj"]} if field != "target_modules" else {}
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}=") as info:
        LoraConfig(**base, **{field: value})
    message = str(info.value)
    import re
    assert re.search(allowed, message), message
    shown = repr(value) if not isinstance(value, dict) else repr(next(iter(value)))
    assert shown in message or str(value) in message, message


def test_layers_to_transform_needs_a_list_target():
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\].*only works with a list target_modules"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ValueError, match=r"layers_pattern='layers'.*only has a meaning together with"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


def test_frozen_and_replace_validates():
    config = LoraConfig(target_modules=["q_proj"], r=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 8
    assert config.r == 4
    assert config.replace(r=16).r == 16 and config.r == 4
    with pytest.raises(ValueError, match=r"LoraConfig\.r=0"):
        config.replace(r=0)


def test_scaling():
    assert LoraConfig(r=16, lora_alpha=32).scaling_for(16, 32) == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling_for(16, 32) == 8.0


def test_set_targets_are_sorted_and_task_type_enum_accepted():
    config = LoraConfig(target_modules={"v_proj", "q_proj"}, task_type=peft.TaskType.SEQ_CLS)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.task_type == "SEQ_CLS"


PEFT_CONFIGS = [
    dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, task_type="CAUSAL_LM"),
    dict(r=4, target_modules=r".*\.(q|v)_proj", init_lora_weights="gaussian", use_rslora=True, bias="all"),
    dict(target_modules="all-linear", modules_to_save=["lm_head", "embed_tokens"], init_lora_weights=False),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2], layers_pattern="layers",
         rank_pattern={"q_proj": 4}, alpha_pattern={r"layers\.0\..*": 3.0}, lora_bias=True, bias="lora_only"),
    dict(target_modules=["c_attn"], fan_in_fan_out=True, exclude_modules=["h.0.attn.c_attn"],
         task_type="SEQ_CLS", init_lora_weights="pissa"),
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True, lora_dropout=0.1,
         modules_to_save=["lm_head"]),
]
MEANING = ["r", "lora_alpha", "lora_dropout", "exclude_modules", "modules_to_save", "bias", "use_rslora",
           "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
           "fan_in_fan_out", "lora_bias", "task_type", "inference_mode", "use_dora"]


@pytest.mark.parametrize("fields", PEFT_CONFIGS)
def test_peft_round_trip_keeps_meaning_and_keys(fields):
    theirs = peft.LoraConfig(**fields)
    # peft's to_dict holds sets; its adapter_config.json holds them as lists. Both must load.
    peft_dict = json.loads(json.dumps(theirs.to_dict(), default=sorted))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every field of a peft config is known: no "unknown field" warning
        ours = LoraConfig.from_dict(peft_dict)
        assert LoraConfig.from_dict(theirs.to_dict()) == ours
    for name in MEANING:
        mine, their = getattr(ours, name), getattr(theirs, name)
        if isinstance(their, (set, frozenset)):
            their = sorted(their)
        assert mine == their, name
    target = theirs.target_modules
    assert ours.target_modules == (sorted(target) if isinstance(target, set) else target)
    out = ours.to_dict()
    json.dumps(out)  # JSON-ready
    assert set(out) >= set(peft_dict)
    assert out["peft_type"] == "LORA"
    # and back into peft: the same config
    again = peft.LoraConfig(**{k: v for k, v in out.items() if k != "peft_type"})
    for name in MEANING:
        assert getattr(again, name) == getattr(theirs, name) or name == "modules_to_save", name
    assert LoraConfig.from_dict(out) == ours


def _peft_default(name):
    f = next(f for f in dataclasses.fields(peft.LoraConfig) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(peft.LoraConfig)])
def test_every_peft_field_is_accepted_by_the_constructor_and_from_dict(name):
    # peft's own default for every field it has: `LoraConfig(..., use_dora=False)` once raised a
    # TypeError while from_dict accepted it. A field minilora does not implement is a no-op there.
    value = _peft_default(name)
    base = {} if name == "target_modules" else {"target_modules": ["q_proj"]}
    built = LoraConfig(**base, **{name: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a peft field is never "unknown"
        assert LoraConfig.from_dict({**base, name: value}) == built
    if name not in MEANING:
        assert built == LoraConfig(**base) and built.to_dict().keys() == LoraConfig(**base).to_dict().keys()


@pytest.mark.parametrize("key,value", [("use_qalora", True), ("layer_replication", [[0, 2]]),
                                       ("eva_config", {"rho": 2.0})])
def test_unimplemented_peft_feature_is_refused_by_both_paths(key, value):
    data = peft.LoraConfig(target_modules=["q_proj"]).to_dict()
    data[key] = value
    message = rf"LoraConfig\.{key}=.* is invalid: {key} switches on a peft feature minilora does not implement; " \
              rf"only {key}=.* \(off\) is accepted"
    with pytest.raises(ValueError, match=message):
        LoraConfig.from_dict(data)
    with pytest.raises(ValueError, match=message):
        LoraConfig(target_modules=["q_proj"], **{key: value})


def test_dora_is_accepted_by_both_paths_and_round_trips():
    config = LoraConfig(target_modules=["q_proj"], use_dora=True)
    assert config.use_dora is True and config != LoraConfig(target_modules=["q_proj"])
    data = peft.LoraConfig(target_modules=["q_proj"], use_dora=True).to_dict()
    data = json.loads(json.dumps(data, default=sorted))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = LoraConfig.from_dict(data)
    assert loaded.use_dora is True
    assert loaded.to_dict()["use_dora"] is True
    assert LoraConfig.from_dict(loaded.to_dict()) == loaded


@pytest.mark.parametrize("path", ["constructor", "from_dict", "replace"])
def test_dora_with_lora_bias_is_refused_naming_both_fields(path):
    # as peft (LoraConfig.__post_init__ refuses the pair): DoRA's column norm has no place for a bias on B
    build = {
        "constructor": lambda: LoraConfig(target_modules=["q_proj"], use_dora=True, lora_bias=True),
        "from_dict": lambda: LoraConfig.from_dict({"target_modules": ["q_proj"], "use_dora": True,
                                                   "lora_bias": True}),
        "replace": lambda: LoraConfig(target_modules=["q_proj"], use_dora=True).replace(lora_bias=True),
    }[path]
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert "lora_bias" in message and "use_dora" in message, message
    # each alone is fine
    LoraConfig(target_modules=["q_proj"], use_dora=True)
    LoraConfig(target_modules=["q_proj"], lora_bias=True)


def test_peft_refuses_dora_with_lora_bias_too():
    with pytest.raises(ValueError):
        peft.LoraConfig(target_modules=["q_proj"], use_dora=True, lora_bias=True)


def test_non_lora_peft_type_is_refused():
    with pytest.raises(ValueError, match="peft_type='IA3'.*only 'LORA'"):
        LoraConfig.from_dict({"peft_type": "IA3", "target_modules": ["q_proj"]})


def test_unknown_fields_warn_and_round_trip():
    data = {"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4, "future_field": {"a": 1}, "zeta": 3}
    with pytest.warns(UserWarning, match=r"does not know: \['future_field', 'zeta'\]"):
        config = LoraConfig.from_dict(data)
    out = config.to_dict()
    assert out["future_field"] == {"a": 1} and out["zeta"] == 3
    with pytest.warns(UserWarning):
        assert LoraConfig.from_dict(out).to_dict() == out


@pytest.mark.parametrize("data", [[], [("r", 4)], "r=4", None])
def test_from_dict_needs_a_dict(data):
    # dict([]) == {}: a JSON list once built a default config without a word
    with pytest.raises(ValueError, match=r"from_dict needs a dict of peft's LoraConfig fields, got a"):
        LoraConfig.from_dict(data)
