"""Triton kernels for minilora, installed as ``minilora.kernels``.

Importing this package never imports triton: ``available()`` only looks for it, and
``fused_lora_linear`` / ``multi_lora_add_`` load ``minilora.kernels.lora_linear`` /
``minilora.kernels.multi_lora`` (which import triton and register the torch.library ops) on
first call. Kernels know tensors, never modules.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["MAX_RANK", "COMPUTE_DTYPES", "available", "fused_lora_linear", "multi_lora_add_"]

#: the largest rank the kernels take (padded to a power of two inside). Here, not in
#: lora_matmul.py, so that ``minilora.ops`` can read it without importing triton.
MAX_RANK = 256
#: the dtypes the kernels compute in (inputs and weights), fp32 accumulation in all of them.
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache  # asked on every CUDA forward; the answer cannot change within a process
def available() -> bool:
    """True when triton is installed and either a CUDA device is present or ``TRITON_INTERPRET=1``
    (the CPU interpreter, for tests that call the kernels on CPU tensors)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    return torch.cuda.is_available()


def fused_lora_linear(x, weight, bias, A, B, scaling, dropout_p=0.0, training=False, **kwargs):
    """See ``minilora.kernels.lora_linear.fused_lora_linear`` (loaded on first call)."""
    from minilora.kernels.lora_linear import fused_lora_linear as impl

    return impl(x, weight, bias, A, B, scaling, dropout_p, training, **kwargs)


def multi_lora_add_(y, x, A, B, scaling, where):
    """See ``minilora.kernels.multi_lora.multi_lora_add_`` (loaded on first call)."""
    from minilora.kernels.multi_lora import multi_lora_add_ as impl

    return impl(y, x, A, B, scaling, where)
