"""Property: any valid config survives save -> load -> save byte for byte (same keys, same
tensors, same JSON), and the loaded model computes what the saved one did."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilora
from tiny_models import build, example_inputs, output_of, randomize_adapters

LAYERS = ["lin0", "lin1", "head"]


@st.composite
def configs(draw):
    targets = draw(st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True))
    free = [n for n in LAYERS if n not in targets]
    mts = draw(st.one_of(st.none(), st.lists(st.sampled_from(free), min_size=1, unique=True))) if free else None
    rank_pattern = draw(st.dictionaries(st.sampled_from(targets), st.integers(1, 5), max_size=2))
    alpha_pattern = draw(st.dictionaries(st.sampled_from(targets), st.sampled_from([1.0, 3.5, 16]), max_size=1))
    return minilora.LoraConfig(
        target_modules=targets, r=draw(st.integers(1, 6)), lora_alpha=draw(st.sampled_from([1, 2.5, 8, 32])),
        use_rslora=draw(st.booleans()), bias=draw(st.sampled_from(["none", "all", "lora_only"])),
        lora_bias=draw(st.booleans()), modules_to_save=mts, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        lora_dropout=draw(st.sampled_from([0.0, 0.1])),
        init_lora_weights=draw(st.sampled_from(["gaussian", True, False])))


def _read(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs(), seed=st.integers(0, 1000))
def test_save_load_save_is_byte_identical(tmp_path_factory, config, seed):
    root = tmp_path_factory.mktemp("rt")
    model = minilora.inject(build("mlp"), config)
    randomize_adapters(model, seed=seed)
    if config.bias != "none":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and name.endswith("bias"):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    minilora.save_adapter(model, root / "first")

    loaded = minilora.load_adapter(build("mlp"), root / "first")
    minilora.save_adapter(loaded, root / "second")
    first, second = _read(root / "first"), _read(root / "second")
    assert first.keys() == {"adapter_config.json", "adapter_model.safetensors"}
    assert first == second

    inputs = example_inputs("mlp", model)
    with torch.no_grad():
        assert torch.equal(output_of(loaded(**inputs)), output_of(model(**inputs)))
    assert minilora.adapted_modules(loaded) == minilora.adapted_modules(model)
    # every adapter tensor made it into the file: a state-dict comparison of the adapter parts
    ours = minilora.adapter_state_dict(model)
    theirs = minilora.adapter_state_dict(loaded)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
