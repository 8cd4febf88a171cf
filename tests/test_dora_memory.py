"""DoRA's training step never builds an (out x in) temporary (minilora/ops.py ``dora_norm``).

peft forms W + s·B·A in full on every forward to take its row norms; minilora takes them with a
low-rank identity. Each test runs one training step (forward + backward) under a dispatch mode
that records every tensor an op allocates (an output sharing no storage with the op's inputs: views
and in-place results are not allocations) and checks none holds out·in elements or more. The
shapes make out·in much larger than anything else in the step (M·out, M·in, r·out, the factors),
so such a tensor can only be a weight-sized temporary. The same step through peft must allocate
one, which shows the check can fail.

Factors are "trained-size": B random and scaled so that the median ‖s·(BA)_i‖ / ‖W_i‖ is 0.1 (a
fine-tune's delta is a fraction of the weight), magnitudes ‖W + sBA‖ times 1 + 0.1·N(0, 1), so the
DoRA scale is not 1. No timings here: benchmarks/bench_dora.py measures speed.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import minilora
from minilora.inject import lora_layers

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dora.py"


class Allocations(TorchDispatchMode):
    """Records (elements, op) for every tensor an op returns that shares no storage with its inputs."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.records.append((t.untyped_storage().nbytes() // t.element_size(), str(func)))
        return out


def step_allocations(layer: nn.Module, x: torch.Tensor) -> list[tuple[int, str]]:
    """Allocations of one training step: forward, backward of a fixed random gradient."""
    if x.is_floating_point():
        x = x.clone().requires_grad_(True)  # as inside a model: the layer's input needs a gradient
    with torch.no_grad():
        shape, dtype = (y := layer(x)).shape, y.dtype
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    layer.zero_grad(set_to_none=True)
    with Allocations() as mode:
        layer(x).backward(gy)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable), "the step trained nothing"
    return mode.records


def weight_sized(records: list[tuple[int, str]], out_in: int) -> list[tuple[int, str]]:
    return sorted((r for r in records if r[0] >= out_in), reverse=True)


def out_in_rows(layer) -> torch.Tensor:
    """The base weight as (out, in) in fp64 (Conv1D and Embedding store it transposed)."""
    w = layer.weight.detach().double()
    return w.T if layer.transposed else w


@torch.no_grad()
def trained_size(layer, ratio: float = 0.1) -> None:
    """Scale B so the median ‖s·(BA)_i‖ / ‖W_i‖ is ``ratio``; magnitudes ‖W + sBA‖·(1 + 0.1·N(0, 1))."""
    a = layer.adapters["default"]
    gen = torch.Generator().manual_seed(4)
    a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen))
    if not a.lora_A.abs().sum():  # Embedding: A starts at zero
        a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=gen))
    W = out_in_rows(layer)
    delta = a.scaling * (a.lora_B.double() @ a.lora_A.double())
    a.lora_B.mul_(ratio / (delta.norm(dim=1) / W.norm(dim=1)).median().item())
    V = W + a.scaling * (a.lora_B.double() @ a.lora_A.double())
    a.magnitude.copy_(V.norm(dim=1) * (1 + 0.1 * torch.randn(V.shape[0], generator=gen, dtype=torch.float64)))


def peft_copy(model: nn.Module, layer, target: str, **config):
    """peft's DoRA on a copy of ``model`` with ``layer``'s factors and magnitude; its LoRA layer."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(model, peft.LoraConfig(target_modules=[target], use_dora=True, **config))
    peft_layer = theirs.base_model.model.get_submodule(target)
    a = layer.adapters["default"]
    with torch.no_grad():
        if "default" in getattr(peft_layer, "lora_embedding_A", {}):  # peft keeps raw tensors there
            peft_layer.lora_embedding_A["default"].copy_(a.lora_A)
            peft_layer.lora_embedding_B["default"].copy_(a.lora_B)
        else:
            peft_layer.lora_A["default"].weight.copy_(a.lora_A)
            peft_layer.lora_B["default"].weight.copy_(a.lora_B)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
    return peft_layer


# (id, base module, input, LoraConfig fields). out·in is at least 32x every activation and factor.
def _conv1d():
    from transformers.pytorch_utils import Conv1D
    return Conv1D(512, 512)  # nf=out, nx=in: weight (in, out)


CASES = [
    # fp32 Linear: one GEMM-sized A Wᵀ, no weight-sized temporaries.
    ("linear-fp32", lambda: nn.Linear(512, 512), lambda: torch.randn(8, 512), dict(r=4, lora_alpha=8)),
    ("conv1d-fp32", _conv1d, lambda: torch.randn(2, 4, 512), dict(r=4, lora_alpha=8, fan_in_fan_out=True)),
    # bf16 base, fp32 adapters: the norm casts W in blocks of ~1M elements; out·in = 2M.
    ("linear-bf16", lambda: nn.Linear(1024, 2048).to(torch.bfloat16), lambda: torch.randn(4, 1024).to(torch.bfloat16),
     dict(r=4, lora_alpha=8)),
    # Embedding: DoRA's outputs are the 512 dims, the norm runs over the (dim, num) matrix.
    ("embedding", lambda: nn.Embedding(4096, 512), lambda: torch.randint(0, 4096, (2, 8)), dict(r=4, lora_alpha=8)),
]


def _setup(build, make_x, config):
    torch.manual_seed(0)
    base = nn.Sequential(build())
    model = minilora.inject(copy.deepcopy(base), targets=["0"], use_dora=True, init_lora_weights=False, **config)
    (_, layer), = lora_layers(model)
    trained_size(layer)
    layer.train()
    return base, layer, make_x()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_minilora_dora_step_has_no_weight_sized_temporary(case):
    _, build, make_x, config = case
    _, layer, x = _setup(build, make_x, config)
    out_in = layer.weight.numel()
    records = step_allocations(layer, x)
    assert records, "the dispatch mode recorded nothing"
    big = weight_sized(records, out_in)
    assert not big, f"a DoRA training step allocated weight-sized tensors (out·in = {out_in}): {big[:5]}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_peft_dora_step_has_one(case):
    """The same check on peft's DoRA fails: it builds W + s·B·A (out x in) in the step."""
    _, build, make_x, config = case
    base, layer, x = _setup(build, make_x, config)
    peft_layer = peft_copy(base, layer, "0", init_lora_weights=False, **config)
    peft_layer.train()
    # Same layer, same numbers, so the two steps do the same computation: fp32 results differ only
    # by the order of sums (~√in·u ≈ 1e-6 relative); bf16 ones by a few roundings of the output
    # (2⁻⁸ relative each).
    tol = dict(rtol=1e-4, atol=1e-5) if layer.weight.dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -6)
    with torch.no_grad():
        torch.testing.assert_close(peft_layer(x).float(), layer(x).float(), **tol)
    big = weight_sized(step_allocations(peft_layer, x), layer.weight.numel())
    assert big, "peft's DoRA step allocated no weight-sized tensor: the check above proves nothing"


def test_bench_dora_quick(tmp_path):
    """benchmarks/bench_dora.py --quick runs end to end (tiny shapes) and prints its tables."""
    pytest.importorskip("peft")
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in ("| random factors, dropout 0 | forward+backward |", "| trained-size, dropout 0 | minilora DoRA |",
                 "| goal (medians) |", "fp64 reference"):
        assert text in proc.stdout, text
    assert not list(tmp_path.iterdir()), "--quick must not write a report"


@pytest.mark.parametrize("weights", ["large-adapter", "cancelling"])
def test_minilora_direct_norm_pass_has_no_weight_sized_temporary(weights):
    """Rows the low-rank identity cannot take accurately go through ops.dora_norm's direct pass,
    which must work in blocks well below out x in. "large-adapter": both factors random,
    ‖s·(BA)_i‖ ≈ ‖W_i‖ at r=16, where the identity's worst-case rounding bound flags rows without
    any cancellation; "cancelling": W_i = -s·(BA)_i + a 1e-3 remainder on every row, which any
    sound test must send to the direct pass."""
    torch.manual_seed(0)
    model = minilora.inject(nn.Sequential(nn.Linear(512, 512)), targets=["0"], use_dora=True,
                            init_lora_weights=False, r=16, lora_alpha=32)
    (_, layer), = lora_layers(model)
    a = layer.adapters["default"]
    if weights == "cancelling":
        with torch.no_grad():
            delta = a.scaling * (a.lora_B @ a.lora_A)
            layer.weight.copy_(-delta + 1e-3 * delta.norm(dim=1, keepdim=True) * torch.randn(512, 512) / 512 ** 0.5)
            a.magnitude.copy_(out_in_rows(layer).add(a.scaling * (a.lora_B.double() @ a.lora_A.double())).norm(dim=1))
    layer.train()
    big = weight_sized(step_allocations(layer, torch.randn(8, 512)), layer.weight.numel())
    assert not big, f"a DoRA training step allocated weight-sized tensors: {big[:5]}"
