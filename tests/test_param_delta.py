"""``ops.param_delta``: the delta of a LoRA on a parameter, against a float64 reference written
from its definition (expert e's A_e = rows e·r.., its B_e = columns e, E+e, ... of B), and whole
against blocks (the offline merge computes it one block of experts or rows at a time)."""

from __future__ import annotations

import pytest
import torch

from minilora import ops

U32 = 2.0**-24  # float32 unit roundoff


def reference(A: torch.Tensor, B: torch.Tensor, s: float, shape: tuple[int, ...], transposed: bool) -> torch.Tensor:
    """Element by element from the definition, float64."""
    A, B = A.double(), B.double()
    if len(shape) == 2:
        return s * torch.einsum("ok,ki->oi", B, A)
    E = shape[0]
    r = A.shape[0] // E
    out = torch.empty(E, B.shape[0], A.shape[1], dtype=torch.float64)
    for e in range(E):
        A_e = A[e * r:(e + 1) * r]             # (r, in)
        B_e = B[:, [k * E + e for k in range(r)]]  # (out, r)
        out[e] = s * (B_e @ A_e)
    return out.transpose(1, 2) if transposed else out


CASES = [((6, 10), False, 3), ((4, 6, 10), False, 2), ((4, 10, 6), True, 2), ((1, 6, 10), False, 3),
         ((3, 8, 8), True, 4)]


@pytest.mark.parametrize("shape,transposed,r", CASES)
def test_param_delta_matches_float64_reference(shape, transposed, r):
    g = torch.Generator().manual_seed(0)
    E = shape[0] if len(shape) == 3 else 1
    n_in, n_out = (shape[-2], shape[-1]) if transposed else (shape[-1], shape[-2])
    A = torch.randn(E * r, n_in, generator=g)
    B = torch.randn(n_out, E * r, generator=g)
    s = 0.75
    got = ops.param_delta(A, B, s, torch.float32, shape, transposed=transposed)
    assert got.shape == shape and got.dtype == torch.float32
    ref = reference(A, B, s, shape, transposed)
    mag = reference(A.abs(), B.abs(), abs(s), shape, transposed)
    # A sum of r fp32 products and the scaling: at most r + 1 fp32 roundings, each <= u·mag
    # (any summation order). A wrong pairing of A's rows with B's columns is off by O(mag).
    assert ((got.double() - ref).abs() <= (r + 1) * U32 * mag + 1e-300).all()
    # float64 in, float64 out: the same numbers to float64's precision
    got64 = ops.param_delta(A.double(), B.double(), s, torch.float64, shape, transposed=transposed)
    assert torch.allclose(got64, ref, rtol=0, atol=1e-12 * mag.max().item())


@pytest.mark.parametrize("shape,transposed,r", CASES)
def test_param_delta_blocks_equal_whole(shape, transposed, r):
    g = torch.Generator().manual_seed(1)
    E = shape[0] if len(shape) == 3 else 1
    n_in, n_out = (shape[-2], shape[-1]) if transposed else (shape[-1], shape[-2])
    A, B = torch.randn(E * r, n_in, generator=g), torch.randn(n_out, E * r, generator=g)
    whole = ops.param_delta(A, B, 0.5, torch.float32, shape, transposed=transposed)
    blocks = [ops.param_delta(A, B, 0.5, torch.float32, shape, transposed=transposed, rows=slice(i, i + 1))
              for i in range(shape[0])]
    assert torch.equal(torch.cat(blocks), whole)


def test_param_delta_refuses_other_ranks():
    with pytest.raises(ValueError, match="2-D or 3-D"):
        ops.param_delta(torch.ones(2, 3), torch.ones(4, 2), 1.0, torch.float32, (2, 2, 2, 3))
