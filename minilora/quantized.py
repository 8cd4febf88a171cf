"""LoRA over bitsandbytes' quantized linears (QLoRA): ``Linear4bit`` (nf4/fp4) and ``Linear8bitLt``.

Imported only when bitsandbytes already is (``layers.lora_layer_class`` looks in ``sys.modules``).
The frozen base stays quantized and runs its own forward, never ``F.linear`` on the packed weight;
the LoRA branch is cast to the base output's dtype before it is added (outside autocast).

bitsandbytes keeps the quantization state on the weight object, and its forward and state-dict
hooks read it there: the base module keeps the LoRA layer's parameter objects (re-linked before
every use) and the state dict goes through it, so the keys (``weight``, ``weight.absmax``,
``weight.quant_state.bitsandbytes__nf4``, ``SCB``, ...) do not move. Merging dequantizes, adds and
requantizes (lossy: the warning states the error on that layer); the lossless route is ``minilora
merge`` on the unquantized checkpoint (docs/guide.md, "QLoRA").
"""

from __future__ import annotations

import copy
import warnings

import bitsandbytes as bnb
import torch
import torch.nn as nn

from minilora import ops
from minilora.layers import LoraLayer, LoraLinear

__all__ = ["LoraLinear4bit", "LoraLinear8bit", "quantized_layer_class", "dequantized_weight"]


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes linear computes with, in fp32."""
    weight = module.weight
    if isinstance(weight, bnb.nn.Params4bit):
        data, state = weight.data, weight.quant_state
        if _cpu_packed(weight):
            # bitsandbytes repacks a weight for its AVX512-BF16 CPU kernel in its first eval
            # forward without grad: codes reordered, block scales as (in / blocksize, out) bf16.
            # Its inverse restores the codes (on copies here: the layer keeps the packed form)
            # but not that scale layout, so the scales are taken as the kernel uses them.
            data, _ = bnb.functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
            state = bnb.functional.QuantState(absmax=state.absmax.T.reshape(-1).float(), shape=state.shape,
                                              code=state.code, blocksize=state.blocksize,
                                              quant_type=state.quant_type, dtype=torch.float32)
        return bnb.functional.dequantize_4bit(data, state).float()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()


def _cpu_packed(weight: nn.Parameter) -> bool:
    return getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False)


class _QuantizedLinear(LoraLinear):
    """Shared by the 4-bit and 8-bit layers: the base forward and state dict go through the base
    module; merges requantize."""

    supports_dora = False  # DoRA's norm would dequantize the whole weight every step
    round_branch_first = True
    fused = False  # the kernels never see a quantized base

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self._relink()

    def _relink(self) -> None:
        # bitsandbytes' forward and state-dict hooks need the tensors LoraLayer took off the base: the
        # same objects (one copy), re-linked before each use since .to() / load_state_dict may replace ours.
        self.base_layer._parameters["weight"] = self.weight
        if self.bias is not None:
            self.base_layer._parameters["bias"] = self.bias

    def train(self, mode: bool = True):
        # The base module is outside the module tree but runs its own forward, which reads its
        # training flag (bitsandbytes repacks 4-bit weights for the CPU in eval): keep it ours.
        self.base_layer.train(mode)
        return super().train(mode)

    def factor_shapes(self, r):
        base = self.base_layer  # self.weight is packed: its shape is not (out, in)
        return (r, base.in_features), (base.out_features, r)

    def base_forward(self, x, bias=True):
        self._relink()
        return self.base_layer(x)

    # ---------------------------------------------------------------- state dict through the base
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._relink()
        if _cpu_packed(self.weight):
            # bitsandbytes' save unpacks a CPU-repacked weight in place, and not exactly (see
            # dequantized_weight): a state_dict() call, save_adapter's included, would change the
            # model. It gets a copy to unpack; the layer keeps its own.
            packed = self.weight
            self.base_layer._parameters["weight"] = bnb.nn.Params4bit(
                packed.data.clone(), requires_grad=False, quant_state=copy.deepcopy(packed.quant_state),
                blocksize=packed.blocksize, compress_statistics=packed.compress_statistics,
                quant_type=packed.quant_type, quant_storage=packed.quant_storage, bnb_quantized=True)
        try:
            self.base_layer._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._relink()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._relink()
        self.base_layer._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)
        self.weight = self.base_layer.weight  # bitsandbytes may have built a new parameter
        if self.bias is not None:
            self.bias = self.base_layer.bias

    # ---------------------------------------------------------------- merging: dequantize, add, requantize
    def delta_weight(self, adapter):
        return ops.lora_delta(adapter.lora_A, adapter.lora_B, adapter.scaling, torch.float32)

    def _dense_weight(self):
        """The dequantized weight, (out, in) in fp32: merges add to it, then requantize."""
        self._relink()
        return dequantized_weight(self.base_layer)

    def _keep_original(self):
        # The packed parameter is replaced, never changed in place: keeping it is exact and free.
        self.original_weights = (self.weight, None if self.bias is None else self.bias.detach().clone())

    def _restore_original(self):
        weight, bias = self.original_weights
        self.weight = weight
        if bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)
        self._relink()

    def _write(self, wanted: torch.Tensor, bias: torch.Tensor | None, what: str) -> None:
        """Quantize ``wanted`` (fp32, (out, in)) into a new parameter of the base's format, and warn
        with the error that rounding made on this layer."""
        old = self.weight
        self.weight = self._quantize(wanted.to("cpu"), old).to(old.device)
        self._relink()
        got = dequantized_weight(self.base_layer)
        error = (got - wanted.to(got.device)).abs().max().item()
        scale = wanted.abs().max().item()
        warnings.warn(f"{what} into a {self.quant_name} weight ({self.base_layer.out_features}x"
                      f"{self.base_layer.in_features}) requantizes it: max error {error:.3g} on weights up to "
                      f"{scale:.3g}. For exact weights merge into the unquantized checkpoint instead: minilora merge "
                      "BASE_CHECKPOINT ADAPTER OUT", stacklevel=5)
        if bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)


class LoraLinear4bit(_QuantizedLinear):
    """LoRA on ``bitsandbytes.nn.Linear4bit`` (nf4 or fp4, with or without double quantization)."""

    quant_name = "4-bit"

    @staticmethod
    def _quantize(data: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
        state = like.quant_state  # (the CPU repacking sets its dtype to bf16 and keeps the original)
        dtype = state.original_dtype if _cpu_packed(like) else state.dtype
        return bnb.nn.Params4bit(data.to(dtype), requires_grad=False, blocksize=like.blocksize,
                                 compress_statistics=like.compress_statistics, quant_type=like.quant_type,
                                 quant_storage=like.quant_storage, module=like.module)._quantize("cpu")


class LoraLinear8bit(_QuantizedLinear):
    """LoRA on ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8())."""

    quant_name = "8-bit"

    @staticmethod
    def _quantize(data: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
        return bnb.nn.Int8Params(data.half(), requires_grad=False, has_fp16_weights=like.has_fp16_weights).to("cpu")

    def _write(self, wanted, bias, what):
        # bitsandbytes moves CB/SCB from the weight into the module's state in its first forward;
        # a stale state would pair the new codes with the old scales. Cleared, the next forward
        # moves the new ones.
        self._set_quant_state((None, None))
        super()._write(wanted, bias, what)

    def _keep_original(self):
        super()._keep_original()  # with the scales the module's state holds apart from the weight
        self._original_state = self.base_layer.state.CB, self.base_layer.state.SCB

    def _restore_original(self):
        super()._restore_original()
        self._set_quant_state(self._original_state)

    def _set_quant_state(self, state):
        self.base_layer.state.reset_grads()
        self.base_layer.state.CB, self.base_layer.state.SCB = state


def quantized_layer_class(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA class for a bitsandbytes linear, or None for any other module."""
    if isinstance(module, bnb.nn.Linear4bit):
        return LoraLinear4bit
    if isinstance(module, bnb.nn.Linear8bitLt):
        return LoraLinear8bit
    return None
