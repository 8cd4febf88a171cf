"""The LoRA math, once, and the one place that picks how to run it.

``lora_linear_reference`` is the definition every other path is checked against::

    y = x W0ᵀ + bias + s · (dropout(x) Aᵀ) Bᵀ

    x: (..., K)   W0: (N, K)   bias: (N,) or None   A: (r, K)   B: (N, r)   s = scaling

The adapter factors may be in a wider dtype than the base (fp32 adapters over a bf16 base, as
peft does): the LoRA branch runs in the adapter dtype and the sum is cast back to the base dtype,
in the same order of operations as peft so that both give bit-identical results.

``lora_linear`` dispatches: the fused Triton kernels (``minilora.kernels``) when x is on CUDA,
Triton imports and the dtype is supported; otherwise the reference. The kernels run the LoRA
branch in the base dtype with fp32 accumulation (fp32 adapters are cast to bf16 on load, as
autocast would), so over a bf16 base they match peft within bf16 rounding, not bit for bit;
docs/kernels.md gives the bounds. Inside an autocast region whose dtype is not the base
weight's (an fp32 model under bf16 autocast), the reference runs, so autocast decides the
precision exactly as it does for peft. ``MINILORA_BACKEND=torch``
or ``=triton`` in the environment (read once, at import), ``set_backend(...)`` later, or
``backend=`` per call, forces a path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["lora_linear", "lora_linear_reference", "lora_branch", "backend_for", "set_backend"]

_BACKENDS = ("auto", "torch", "triton")
# Read once: torch.compile bakes an os.environ lookup into the graph without a guard, so a later
# change would reach eager calls but not compiled ones. A module global is guarded: after
# set_backend, a compiled model recompiles on its next call.
_backend = os.environ.get("MINILORA_BACKEND", "auto")


def set_backend(name: str) -> None:
    """Force the path of every later ``lora_linear`` call: "auto", "torch" or "triton"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def lora_branch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False,
                lora_bias: torch.Tensor | None = None) -> torch.Tensor:
    """s · (B(A(dropout(x))) + lora_bias) in the adapter dtype.

    Args:
        x: (..., K) input, any float dtype; cast to A's dtype first (as peft).
        A: (r, K). B: (N, r). lora_bias: (N,) or None (peft's ``lora_bias=True``).
    Returns:
        (..., N) in A's dtype.
    """
    x = x.to(A.dtype)
    if dropout_p > 0.0 and training:
        x = F.dropout(x, p=dropout_p, training=True)
    return F.linear(F.linear(x, A), B, lora_bias) * scaling


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          A: torch.Tensor, B: torch.Tensor, scaling: float,
                          dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """The pure-PyTorch LoRA linear: (..., K) -> (..., N) in the base dtype."""
    result = F.linear(x, weight, bias)
    # Adding the (possibly fp32) branch promotes; the single cast back is peft's rounding point.
    return (result + lora_branch(x, A, B, scaling, dropout_p, training)).to(result.dtype)


#: the largest rank the fused kernels take (the rank is padded to a power of two inside).
MAX_KERNEL_RANK = 256


def _autocast_recasts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True inside an autocast region that would run F.linear in another dtype than the weight's:
    the custom op has no autocast rule, so the kernels would silently compute in the model dtype."""
    device = x.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != weight.dtype


def backend_for(x: torch.Tensor, weight: torch.Tensor, backend: str | None = None,
                rank: int = 1) -> str:
    """Which path ``lora_linear`` takes for these tensors: "torch" or "triton"."""
    choice = backend or _backend
    if choice not in _BACKENDS:
        raise ValueError(f"MINILORA_BACKEND / backend must be one of {_BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    # The kernels compute in the base dtype and treat the base weight as frozen.
    usable = (x.is_cuda and weight.dtype in (torch.float16, torch.bfloat16, torch.float32)
              and x.dtype == weight.dtype and not weight.requires_grad and rank <= MAX_KERNEL_RANK
              and not _autocast_recasts(x, weight))
    if usable:
        try:
            from minilora.kernels import available
            usable = available()
        except ImportError:
            usable = False
    if choice == "triton" and not usable:
        raise RuntimeError(
            "backend 'triton' was forced but cannot run here: it needs x on a CUDA device, "
            "x and a frozen (requires_grad=False) weight of one dtype among fp16/bf16/fp32 "
            "(and, inside autocast, the autocast dtype), "
            f"a rank of at most {MAX_KERNEL_RANK}, "
            "and an importable triton (pip install minilora[triton])")
    return "triton" if usable else "torch"


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor, B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False,
                backend: str | None = None) -> torch.Tensor:
    """LoRA linear through the fastest available path; same contract as the reference."""
    if backend_for(x, weight, backend, rank=A.shape[0]) == "triton":
        from minilora.kernels import fused_lora_linear
        return fused_lora_linear(x, weight, bias, A, B, scaling, dropout_p, training)
    return _lora_linear_torch(x, weight, bias, A, B, scaling, dropout_p, training)


def _lora_linear_torch(x, weight, bias, A, B, scaling, dropout_p, training):
    """The PyTorch path: the reference, except when everything shares one dtype, where the
    branch goes straight into the base output with one in-place ``addmm_`` (scale folded into
    the GEMM's alpha): no (M, N) temporaries for B·S, its scaling and the sum. Differs from the
    reference only by fp rounding (GEMM order), within 1 ulp-ish of fp32."""
    # Under autocast F.linear runs in bf16/fp16 while addmm_ would not: use the reference there.
    if not (x.dtype == weight.dtype == A.dtype == B.dtype) or torch.is_autocast_enabled(x.device.type):
        return lora_linear_reference(x, weight, bias, A, B, scaling, dropout_p, training)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])  # 2-D, so the in-place add is not on a view (no CopySlices)
    out = F.linear(x, weight, bias)  # (M, N)
    if dropout_p > 0.0 and training:
        x = F.dropout(x, p=dropout_p, training=True)
    out.addmm_(F.linear(x, A), B.t(), alpha=scaling)  # += s · (x Aᵀ) Bᵀ
    return out.view(*lead, out.shape[-1])
