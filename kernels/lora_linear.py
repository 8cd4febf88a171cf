"""The fused LoRA linear as torch.library custom ops with autograd, and its public entry point.

Two ops, opaque to torch.compile (it traces them without a graph break, using the fake impls):

* ``minilora::fused_lora_linear``          (x2d, W0, bias, A, B, ...) -> (y, S)
* ``minilora::fused_lora_linear_backward`` (dy, x2d, W0, A, B, S, ...) -> (dx, dA, dB)

Gradients (written for 2-D x; W0 frozen; keep the dropout mask, s' = s / (1 - p) or s):

    S  = s' · (keep ⊙ x) Aᵀ                       (M, r), saved for backward
    y  = x W0ᵀ + bias + S Bᵀ
    dU = s' · dY B                                (M, r)   gradient w.r.t. (keep ⊙ x) Aᵀ
    dB = dYᵀ S                                    (N, r)
    dA = dUᵀ (keep ⊙ x)                           (r, K)
    dX = dY W0 + keep ⊙ (dU A)                    (M, K)
    dbias = Σ_m dY                                (N,)

Saved for backward: x (K elements per token, a reference to the layer's input), S (r per token),
the seed (8 bytes per call); W0, A, B are parameters (no copies). The mask is regenerated.
"""

from __future__ import annotations

from typing import Optional

import torch

from minilora.kernels import lora_matmul as _k


@torch.library.custom_op("minilora::fused_lora_linear", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                A: torch.Tensor, B: torch.Tensor, scale: float, p: float,
                seed: Optional[torch.Tensor], path: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.forward(x, weight, bias, A, B, scale, p, seed, path)


@_forward_op.register_fake
def _(x, weight, bias, A, B, scale, p, seed, path):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0])


@torch.library.custom_op("minilora::fused_lora_linear_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                 B: torch.Tensor, s: torch.Tensor, scale: float, p: float,
                 seed: Optional[torch.Tensor], need_dx: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, da, db = _k.backward(dy, x, weight, A, B, s, scale, p, seed, need_dx)
    return (dx if dx is not None else x.new_empty(0)), da, db


@_backward_op.register_fake
def _(dy, x, weight, A, B, s, scale, p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(A), torch.empty_like(B)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, scale, p, seed, _path = inputs
    _y, s = output
    ctx.save_for_backward(x, weight, A, B, s, seed)
    ctx.scale, ctx.p = scale, p
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _ds):
    x, weight, A, B, s, seed = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = _backward_op(dy, x, weight, A, B, s, ctx.scale, ctx.p, seed, need_dx)
    dbias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        dbias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return (dx if need_dx else None), None, dbias, da, db, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      A: torch.Tensor, B: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                      training: bool = False, *, seed: int | None = None,
                      path: str = "auto") -> torch.Tensor:
    """y = x W0ᵀ + bias + s · (dropout(x) Aᵀ) Bᵀ with the Triton kernels.

    Same contract as ``minilora.ops.lora_linear_reference``, except that the LoRA branch runs in
    x's dtype with fp32 accumulation (A and B are cast on load) and dropout draws its mask from
    Philox, not from torch's generator (same distribution, different draws).

    Args:
        x: (..., K), any strides (a copy is made only if the leading dims cannot be flattened).
        weight: (N, K) frozen base weight, same dtype as x (fp16, bf16 or fp32).
        bias: (N,) or None. A: (r, K), B: (N, r), 1 <= r <= 256, any float dtype.
        scaling: s. dropout_p, training: dropout on x for the LoRA branch when training.
        seed: fixes the dropout mask (default: drawn from torch's generator on x's device).
        path: "auto", "fused" (single kernel) or "split" (shrink + seeded GEMM).
    Returns:
        (..., N) in x's dtype.
    Raises:
        ValueError: weight requires grad (W0 must be frozen), or a bad device, dtype or shape.
    """
    if weight.requires_grad:
        raise ValueError("the fused LoRA kernels treat weight as frozen but it requires grad; "
                         "call weight.requires_grad_(False) or use backend='torch'")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if x.shape[-1:] != weight.shape[-1:]:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else None} features but weight has "
                         f"shape {tuple(weight.shape)}")
    # Before dispatch: a meta or mixed-device input would be routed to the fake impl silently.
    _k.check_device(x=x, weight=weight, bias=bias, A=A, B=B)
    p = dropout_p if training else 0.0
    scale = scaling / (1.0 - p)
    seed_t = None
    if p > 0.0 and seed is None:
        seed_t = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    elif p > 0.0:
        seed_t = torch.tensor([seed], dtype=torch.int64, device=x.device)
    lead = x.shape[:-1]
    y, _s = _forward_op(x.reshape(-1, x.shape[-1]), weight, bias, A, B, scale, p, seed_t, path)
    return y.reshape(*lead, weight.shape[0])
