"""A LoRA layer exposes its base layer's hyper-parameters under the base's names, read-only
(peft's layers expose ``in_features`` / ``out_features``; transformers reads e.g.
``encode_proj.out_features``), while ``weight`` / ``bias`` stay the layer's own parameters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import minilora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402  (after the importorskip)

# Non-default hyper-parameters everywhere, so a property that returned a default (or another
# attribute) would be caught.
BASES = {
    "linear": lambda: nn.Linear(12, 20),
    "linear_no_bias": lambda: nn.Linear(12, 20, bias=False),
    "gpt2_conv1d": lambda: Conv1D(20, 12),
    "embedding": lambda: nn.Embedding(50, 16, padding_idx=3, max_norm=2.0, norm_type=1.5, scale_grad_by_freq=True,
                                      sparse=True),
    "conv1d": lambda: nn.Conv1d(4, 8, 3, stride=2, padding=1, dilation=2, groups=2, padding_mode="reflect"),
    "conv2d": lambda: nn.Conv2d(4, 6, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1), padding_mode="circular"),
    "conv3d": lambda: nn.Conv3d(2, 6, 3, padding="same", padding_mode="replicate", bias=False),
}


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def _public_hyper_parameters(base: nn.Module) -> dict[str, object]:
    # Everything the plain module holds as a public plain attribute (train/eval mode is the
    # layer's own): in_features, padding_idx, kernel_size, nf, ...
    return {k: v for k, v in vars(base).items() if not k.startswith("_") and k != "training"}


def _ours(kind: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = BASES[kind]()
    model = minilora.inject(Holder(copy.deepcopy(base)), targets=["layer"], r=2,
                            fan_in_fan_out=isinstance(base, Conv1D))
    return base, model.layer


def _peft_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Holder(BASES[kind]()), peft.LoraConfig(target_modules=["layer"], r=2))
    return model.base_model.model.layer


@pytest.mark.parametrize("kind", list(BASES))
def test_every_public_hyper_parameter_of_the_base_reads_through(kind):
    base, layer = _ours(kind)
    params = _public_hyper_parameters(base)
    assert params, "the base kind has hyper-parameters"
    for name, value in params.items():
        assert getattr(layer, name) == value, name
        assert name not in vars(layer), f"{name} is read from base_layer, not copied"


@pytest.mark.parametrize("kind", list(BASES))
def test_same_values_as_peft_for_what_peft_exposes(kind):
    base, ours = _ours(kind)
    theirs = _peft_layer(kind)
    names = set(_public_hyper_parameters(base)) | {"in_features", "out_features"}
    exposed = {n for n in names if hasattr(theirs, n)}
    assert {"in_features", "out_features"} <= exposed  # peft has both on every kind
    for name in sorted(exposed):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("kind", list(BASES))
def test_weight_and_bias_are_the_layers_own_parameters(kind):
    base, layer = _ours(kind)
    own = dict(layer.named_parameters(recurse=False))
    assert layer.weight is own["weight"]
    torch.testing.assert_close(layer.weight, base.weight, rtol=0, atol=0)
    if getattr(base, "bias", None) is None:  # nn.Embedding has none at all
        assert layer.bias is None and "bias" not in own
    else:
        assert layer.bias is own["bias"]
    # Reading hyper-parameters must not bring the base's (emptied) tensor slots back into play.
    assert layer.base_layer._parameters["weight"] is None


@pytest.mark.parametrize("kind", list(BASES))
def test_setting_a_hyper_parameter_raises_and_changes_nothing(kind):
    base, layer = _ours(kind)
    for name, value in _public_hyper_parameters(base).items():
        with pytest.raises(AttributeError, match=rf"reads '{name}' from its base {type(base).__name__} \(read-only"):
            setattr(layer, name, 7)
        assert getattr(layer, name) == value and name not in vars(layer)
        assert getattr(layer.base_layer, name) == value


def test_dpr_embeddings_size_with_lora_on_encode_proj():
    # transformers' DPREncoder.embeddings_size reads encode_proj.out_features.
    config = transformers.DPRConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=48, projection_dim=8, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.DPRContextEncoder(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["encode_proj"]))
    minilora.inject(model, targets=["encode_proj"])
    assert minilora.adapted_modules(model) == ["ctx_encoder.encode_proj"]
    assert model.ctx_encoder.embeddings_size == 8 == theirs.base_model.model.ctx_encoder.embeddings_size
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # B = 0 at init: both give the base model's output (bit for bit in practice)
        torch.testing.assert_close(model(ids).pooler_output, theirs(ids).pooler_output)


class ReadsOutFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        # A model that sizes something from its layer's hyper-parameter inside forward.
        return self.proj(x).reshape(-1, self.proj.out_features) * self.proj.in_features


def test_compiled_forward_reads_hyper_parameters_without_graph_break():
    model = minilora.inject(ReadsOutFeatures(), targets=["proj"], init_lora_weights=False)
    x = torch.randn(3, 6)
    expected = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(x), expected)  # backend="eager": the same kernels, bit for bit
