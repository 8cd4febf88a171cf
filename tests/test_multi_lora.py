"""Mixed batches through the stacked factors (``ops.StackedLora``, ``ops.multi_lora_add``).

The PyTorch path is checked against a float64 reference built from each adapter alone, and against
the per-adapter loop it replaces; the stack's cache against every way the adapters can change.

Tolerances: a float64 model's rows sum the same K and r terms in another order, so they agree to
a few float64 roundings per sum (FP64_TOL, relative to the output, far below any wrong scaling or
dropped term, which moves outputs by O(1)). Lower precisions: see ``_bound``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import minilora
from minilora import ops
from minilora.inject import lora_layers
from minilora.layers import LoraLinear
from tiny_models import build, example_inputs, output_of, randomize_adapters, with_adapter

FP64_TOL = 1e-10
U32 = 2.0**-24  # float32 unit roundoff


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _out(model, inputs):
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return output_of(model(**inputs))


def _row_reference(model, inputs, name):
    """The output with one adapter (or none) for the whole model, by switching it."""
    return with_adapter(model, name, lambda: _out(model, inputs))


def _mixed(model, inputs, names):
    with minilora.per_sample_adapters(model, names):
        return _out(model, inputs)


def _assert_rows_match(model, inputs, names, tol=FP64_TOL):
    mixed = _mixed(model, inputs, names)
    refs = {n: _row_reference(model, inputs, n) for n in set(names)}
    for i, name in enumerate(names):
        assert _rel(mixed[i], refs[name][i]) <= tol, (i, name)
    return mixed


@pytest.fixture
def count_stacks(monkeypatch):
    """Counts ops.stack_lora calls (the layers look it up through the module)."""
    calls = []
    real = ops.stack_lora

    def counting(names, factors):
        calls.append(tuple(names))
        return real(names, factors)

    monkeypatch.setattr(ops, "stack_lora", counting)
    return calls


# e's lora_bias on a layer without bias cannot be merged: inject warns, this file does not merge.
pytestmark = pytest.mark.filterwarnings("ignore:lora_bias=True on")


def _llama_with_adapters():
    """float64 tiny Llama, four adapters: ranks 1..7, different alphas and targets (c does not
    touch q_proj, d is a DoRA adapter, e has a lora_bias: both take the loop beside the stack)."""
    model = build("llama").double()
    cfgs = {
        "a": dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8),
        "b": dict(target_modules=["q_proj", "up_proj", "down_proj"], r=1, lora_alpha=3),
        "c": dict(target_modules=["v_proj", "up_proj"], r=7, lora_alpha=2),
        "d": dict(target_modules=["q_proj"], r=2, lora_alpha=4, use_dora=True),
        "e": dict(target_modules=["up_proj"], r=3, lora_alpha=5, lora_bias=True),
    }
    for name, cfg in cfgs.items():
        minilora.inject(model, minilora.LoraConfig(**cfg, init_lora_weights=False), adapter_name=name)
    randomize_adapters(model)
    return model.eval()


NAMES = ["b", "__base__", "a", "c", "b", "d", "e", "a", "c", "c"]


def test_rows_match_each_adapter_alone_and_the_loop():
    model = _llama_with_adapters()
    inputs = example_inputs("llama", model, batch=len(NAMES))
    mixed = _assert_rows_match(model, inputs, NAMES)
    # the same as the per-adapter loop the stack replaces
    saved = LoraLinear.stacked_adapters
    LoraLinear.stacked_adapters = lambda self: None
    try:
        looped = _mixed(model, inputs, NAMES)
    finally:
        LoraLinear.stacked_adapters = saved
    assert _rel(mixed, looped) <= FP64_TOL
    # every row of one adapter, and one row only
    for names in (["c"] * 4, ["a"], ["__base__", "b"]):
        _assert_rows_match(model, example_inputs("llama", model, batch=len(names)), names)


def test_mixed_batches_under_torch_compile_give_the_eager_rows():
    """Compiled, each row still gets its adapter alone (the stack's cache check and the row
    grouping run in Python: graph breaks and a recompile per batch composition, docs/guide.md)."""
    import torch._dynamo
    model = _llama_with_adapters()
    compiled = torch.compile(model, backend="aot_eager")
    try:
        for names in (NAMES, ["c", "c", "a", "__base__"]):
            inputs = example_inputs("llama", model, batch=len(names))
            with minilora.per_sample_adapters(model, names):
                got = _out(compiled, inputs)
            refs = {n: _row_reference(model, inputs, n) for n in set(names)}
            for i, name in enumerate(names):
                assert _rel(got[i], refs[name][i]) <= FP64_TOL, (names, i, name)
    finally:
        torch._dynamo.reset()


def test_stack_holds_plain_adapters_with_padding_and_scalings(count_stacks):
    model = _llama_with_adapters()
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():  # (with gradients on, trainable factors take the loop: no stack)
        stack = layer.stacked_adapters()
    assert stack.names == ("a", "b", "c")  # d (DoRA) and e (lora_bias) are not stacked
    assert stack.A.shape == (3, 7, layer.in_features) and stack.B.shape == (3, layer.out_features, 7)
    for i, name in enumerate(stack.names):
        adapter = layer.adapters[name]
        assert torch.equal(stack.A[i, : adapter.r], adapter.lora_A) and not stack.A[i, adapter.r:].any()
        assert torch.equal(stack.B[i, :, : adapter.r], adapter.lora_B) and not stack.B[i, :, adapter.r:].any()
        assert stack.scaling[i].item() == adapter.scaling
    assert len(count_stacks) == 1


def test_stack_is_rebuilt_only_when_adapters_change(count_stacks, tmp_path):
    model = _llama_with_adapters()
    inputs = example_inputs("llama", model, batch=len(NAMES))
    with torch.no_grad():
        stacked_layers = sum(1 for _, layer in lora_layers(model) if layer.stacked_adapters() is not None)
    assert len(count_stacks) == stacked_layers  # built once each
    count_stacks.clear()
    _assert_rows_match(model, inputs, NAMES)
    _assert_rows_match(model, inputs, list(reversed(NAMES)))  # another batch: same stacks
    assert count_stacks == []

    def rebuilt_after(change, names=NAMES):
        count_stacks.clear()
        change()
        _assert_rows_match(model, example_inputs("llama", model, batch=len(names)), names)
        return len(count_stacks)

    q0 = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # an in-place write to one factor of one layer: that layer only
        assert rebuilt_after(lambda: q0.adapters["a"].lora_B.mul_(-2)) == 1
    minilora.save_adapter(model, tmp_path, adapter_name="c")
    assert rebuilt_after(lambda: minilora.load_adapter(model, tmp_path / "c", adapter_name="c2"),
                         NAMES + ["c2"]) == sum(1 for _, layer in lora_layers(model) if "c2" in layer.adapters)
    names = ["a", "c2", "__base__", "d", "c", "e", "a"]
    had_b = sum(1 for _, layer in lora_layers(model) if "b" in layer.adapters and {"a", "c", "c2"} & set(layer.adapters))
    assert rebuilt_after(lambda: minilora.delete_adapter(model, "b"), names) == had_b
    # a new scaling (set by a hot swap or by hand) is part of the key
    assert rebuilt_after(lambda: setattr(q0.adapters["a"], "scaling", 0.25), names) == 1
    # reassigning a parameter (load_state_dict(assign=True), to_empty) is seen too
    assert rebuilt_after(lambda: setattr(q0.adapters["a"], "lora_A",
                                         nn.Parameter(torch.randn_like(q0.adapters["a"].lora_A))), names) == 1
    assert rebuilt_after(lambda: None, names) == 0


def test_gradients_to_adapters_take_the_loop():
    """The stack is detached: with gradients on and trainable factors, the loop runs, and the
    factors get their gradients (per_sample_adapters refuses training mode, not autograd)."""
    model = nn.Sequential(nn.Linear(12, 10)).double()
    minilora.inject(model, targets=["0"], r=3, init_lora_weights=False, adapter_name="a")
    minilora.inject(model, targets=["0"], r=5, init_lora_weights=False, adapter_name="b")
    randomize_adapters(model)
    model.eval()
    for p in model[0].adapters.parameters():
        p.requires_grad_(True)
    x = torch.randn(4, 12, dtype=torch.float64)
    names = ["a", "b", "b", "__base__"]
    with minilora.per_sample_adapters(model, names):
        assert model[0].stacked_adapters() is None
        out = model(x)
        out.sum().backward()
        with torch.no_grad():
            assert model[0].stacked_adapters() is not None
            assert _rel(model(x), out.detach()) <= FP64_TOL
    assert model[0].adapters["a"].lora_A.grad is not None and model[0].adapters["b"].lora_B.grad is not None


def _bound(dtype, chain):
    """Elementwise bound in units of mag = |x Wᵀ| + s·|x||Aᵀ||Bᵀ| (same formula on absolute values):
    the base output rounded to the compute dtype c once, the sum rounded once more, and ``chain``
    float32 roundings along the sums over K and r (any order: Higham ch. 3)."""
    return 2 * torch.finfo(dtype).eps / 2 + chain * U32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tokens", [1, 9], ids=["decode", "prefill"])
def test_lower_precision_against_float64(dtype, tokens):
    K, N = 48, 40
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N, bias=False)).to(dtype)  # fp32 adapters over it, as inject makes them
    ranks, alphas = [1, 16, 5, 64, 3, 8, 2, 33, 7], [1, 32, 7, 16, 9, 8, 1, 40, 3]
    for i, (r, alpha) in enumerate(zip(ranks, alphas)):
        minilora.inject(model, targets=["0"], r=r, lora_alpha=alpha, init_lora_weights=False, adapter_name=f"a{i}")
    layer = model[0]
    assert {a.lora_A.dtype for a in layer.adapters.values()} == {torch.float32}
    model.eval()
    names = [f"a{i % 9}" for i in range(20)] + ["__base__"] * 3
    x = torch.randn(len(names), tokens, K).to(dtype)
    with torch.no_grad(), minilora.per_sample_adapters(model, names):
        out = model(x)
    assert out.dtype == dtype
    W = layer.weight.double()
    ref, mag = x.double() @ W.T, x.double().abs() @ W.abs().T
    for i, name in enumerate(names):
        if name != "__base__":
            a = layer.adapters[name]
            A, B = a.lora_A.double(), a.lora_B.double()
            ref[i] += a.scaling * (x[i].double() @ A.T) @ B.T
            mag[i] += a.scaling * (x[i].double().abs() @ A.abs().T) @ B.abs().T
    used = ((out.double() - ref).abs() / (_bound(dtype, K + 64 + 3) * mag)).max().item()
    assert used <= 1, used
    base_rows = slice(20, None)
    with torch.no_grad():  # untouched, bit for bit (the base output of the whole batch: a GEMM on
        base = layer.base_forward(x)  # fewer rows may take another kernel, another summation order)
    assert torch.equal(out[base_rows], base[base_rows])


def test_forced_triton_backend_refuses_on_cpu():
    model = nn.Sequential(nn.Linear(8, 6))
    minilora.inject(model, targets=["0"], r=2, init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        stack = model[0].stacked_adapters()
    x, y = torch.randn(2, 8), torch.randn(2, 6)
    with torch.no_grad():
        assert ops.backend_for_rows(x, y, stack) == "torch"
        with pytest.raises(RuntimeError, match="backend 'triton' was forced for a mixed batch.*CUDA device"):
            ops.backend_for_rows(x, y, stack, "triton")
    with pytest.raises(ValueError, match="must be one of"):
        ops.backend_for_rows(x, y, stack, "cuda")


# --------------------------------------------------------------------------------------------
# The Triton path (minilora.kernels.multi_lora): under the interpreter on the CPU (fp32, fp16),
# on a GPU when there is one (bf16 too). Cases are plain functions, run in a spawned child whose
# triton interprets (see tests/test_kernels_interpret.py for why), or in-process on a GPU.
# --------------------------------------------------------------------------------------------

KERNEL_RANKS = [1, 64, 7, 16, 33, 2, 5, 12, 3]  # mixed, padded to 64 in the stack


def _kernel_bound(dtype, chain):
    """The kernels' bound in units of mag (module docstring of kernels/multi_lora.py): four
    roundings to the compute dtype (A, B cast on load, S stored, y stored) and ``chain`` fp32 ones."""
    return 4 * torch.finfo(dtype).eps / 2 + chain * U32


def _rows_reference(y0, x, names, factors):
    """float64 y0[i] + s·(x_i Aᵀ) Bᵀ with row i's factors (names[i] = "a<slot>"), and its mag (the
    same on absolute values)."""
    ref, mag = y0.double().clone(), y0.double().abs()
    for i, name in enumerate(names):
        if name != "__base__":
            A, B, s = factors[int(name[1:])]
            A, B = A.double(), B.double()
            ref[i] += s * (x[i].double() @ A.T) @ B.T
            mag[i] += s * (x[i].double().abs() @ A.abs().T) @ B.abs().T
    return ref, mag


def _used(got, ref, mag, bound):
    assert torch.isfinite(got).all(), "non-finite values: an element was not written"
    return ((got.double() - ref).abs() / (bound * mag)).max().item()


def _poison():
    from minilora.kernels import multi_lora

    multi_lora._new_output = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    return multi_lora


def check_kernels(dtype, n_adapters, R, T, K, N, base_rows, device="cpu", seed=0):
    """The kernels' y against float64 (and the PyTorch path against float64, with its own bound);
    rows without adapter bit-identical; S allocated NaN-filled (an unwritten element that is read
    shows up as NaN)."""
    from minilora.rows import RowAdapters

    multi_lora = _poison()
    g = torch.Generator().manual_seed(seed)
    ranks = KERNEL_RANKS[:n_adapters]
    factors = [((torch.randn(r, K, generator=g) / K**0.5).to(device), (torch.randn(N, r, generator=g) / r**0.5).to(device),
                0.5 + i / 3) for i, r in enumerate(ranks)]
    stack = ops.stack_lora([f"a{i}" for i in range(n_adapters)], factors)
    names = [f"a{int(i)}" for i in torch.randint(0, n_adapters, (R,), generator=g)]
    for i in base_rows:
        names[i] = "__base__"
    where = RowAdapters(names).slots(stack.names, device)
    x = torch.randn(R, T, K, generator=g).to(device, dtype)
    y0 = torch.randn(R, T, N, generator=g).to(device, dtype)
    y = multi_lora.multi_lora_add_(y0.clone(), x, stack.A, stack.B, stack.scaling, where)
    torch_path = ops.multi_lora_add(y0.clone(), x, stack, where, backend="torch")  # y is consumed
    ref, mag = _rows_reference(y0, x, names, factors)
    chain = K + max(ranks) + 2
    for got, bound in ((y, _kernel_bound(dtype, chain)), (torch_path, _bound(dtype, chain))):
        assert got.dtype == dtype
        assert _used(got, ref, mag, bound) <= 1
    # so the two paths agree within the sum of their bounds
    assert _used(y, torch_path.double(), mag, _kernel_bound(dtype, chain) + _bound(dtype, chain)) <= 1
    for i in base_rows:
        assert torch.equal(y[i], y0[i])


def check_layer_through_kernels(dtype, device="cpu"):
    """A mixed batch through a model, ops.multi_lora_add's dispatch sending it to the kernels:
    within the kernels' bound of float64 from the layer's own base output."""
    _poison()
    K, N = 40, 72
    model = nn.Sequential(nn.Linear(K, N)).to(device, dtype)
    for i, (r, alpha) in enumerate([(3, 6), (16, 4), (9, 27)]):
        minilora.inject(model, targets=["0"], r=r, lora_alpha=alpha, init_lora_weights=False, adapter_name=f"a{i}")
    randomize_adapters(model)
    model.eval()
    layer = model[0]
    names = ["a2", "__base__", "a0", "a2", "a1", "a2", "a0"]
    x = torch.randn(len(names), 5, K).to(device, dtype)
    asked, real = [], ops.backend_for_rows

    def kernels_here(x, y, stack, backend=None):  # the interpreter runs them on the CPU
        asked.append(backend)
        return "triton"

    with torch.no_grad(), minilora.per_sample_adapters(model, names):
        ops.backend_for_rows = kernels_here
        try:
            got = model(x)
        finally:
            ops.backend_for_rows = real
        y0 = layer.base_forward(x)
    assert asked == [None]
    factors = [(a.lora_A, a.lora_B, a.scaling) for a in layer.adapters.values()]
    ref, mag = _rows_reference(y0, x, names, factors)
    assert _used(got, ref, mag, _kernel_bound(dtype, K + 16 + 2)) <= 1
    assert torch.equal(got[1], y0[1])


def check_kernel_errors():
    from minilora.kernels import multi_lora
    from minilora.rows import RowAdapters

    stack = ops.stack_lora(["a"], [(torch.randn(2, 8), torch.randn(6, 2), 1.0)])
    where = RowAdapters(["a", "a"]).slots(stack.names, "cpu")
    x, y = torch.randn(2, 1, 8), torch.randn(2, 1, 6)
    cases = [((y.double(), x, stack.A, stack.B, stack.scaling), "x and y must share one dtype"),
             ((y, x[..., :-1], stack.A, stack.B, stack.scaling), r"x must have shape \(R, T, K\)"),
             ((y, x, stack.A, stack.B[:, :-1], stack.scaling), r"B must have shape \(n, N, r\)"),
             ((y, x, stack.A.to("meta"), stack.B, stack.scaling), "A is on meta but y is on cpu"),
             ((y[0], x, stack.A, stack.B, stack.scaling), r"expected y \(R, T, N\)")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            multi_lora.multi_lora_add_(*args, where)


def _interpreter_init():
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)


def _run_in_child(fn, *args):
    import traceback

    try:
        fn(*args)
    except BaseException:  # pytest's exceptions cannot be pickled
        raise AssertionError(traceback.format_exc()) from None


@pytest.fixture(scope="module")
def interpret():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pytest.importorskip("triton")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_interpreter_init) as pool:
        yield lambda *args: pool.submit(_run_in_child, *args).result(timeout=300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n_adapters,T,base_rows", [(1, 1, ()), (4, 5, (0, 6)), (9, 2, (3,)), (9, 1, ())],
                         ids=["1-decode", "4-prefill-base", "9-base", "9-decode"])
def test_kernels_interpreted(interpret, dtype, n_adapters, T, base_rows):
    interpret(check_kernels, dtype, n_adapters, 11, T, 40, 72, base_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layer_through_kernels_interpreted(interpret, dtype):
    interpret(check_layer_through_kernels, dtype)


def test_kernel_errors_interpreted(interpret):
    interpret(check_kernel_errors)


on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n_adapters,T,base_rows", [(1, 1, ()), (4, 128, (0, 6)), (9, 3, (3,)), (9, 1, ())])
def test_kernels_gpu(dtype, n_adapters, T, base_rows):
    check_kernels(dtype, n_adapters, 64, T, 520, 328, base_rows, "cuda")


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_layer_gpu_takes_the_kernels_by_default(dtype):
    model = nn.Sequential(nn.Linear(64, 48)).to("cuda", dtype)
    minilora.inject(model, targets=["0"], r=4, init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        stack = model[0].stacked_adapters()
        x = torch.randn(2, 64, device="cuda", dtype=dtype)
        assert ops.backend_for_rows(x, x[:, :48], stack) == "triton"
        assert ops.backend_for_rows(x, x[:, :48], stack, "torch") == "torch"
    assert ops.backend_for_rows(x, x[:, :48], stack) == "torch"  # gradients on: no kernels
    check_layer_through_kernels(dtype, "cuda")


def test_generate_with_a_mixed_batch_gives_each_rows_own_generation():
    """Greedy and beam-search generation (the KV cache's one-token steps) in one mixed batch give
    each row the tokens that adapter alone generates. generate repeats each row per beam in place,
    so each name is given once per beam; one name per prompt is refused with that hint."""
    # float64: a row's logits in the batch and alone differ by rounding only (~1e-15 relative), far
    # below any gap between the two largest logits that greedy or beam choices compare
    model = _llama_with_adapters()
    ids = torch.tensor([[5, 9, 13, 2], [7, 7, 1, 30], [3, 4, 5, 6], [9, 8, 7, 6]])
    names = ["a", "c", "__base__", "e"]  # e (lora_bias) takes the loop beside the stack
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)  # no early EOS
    for beams in (1, 2):
        with torch.no_grad(), minilora.per_sample_adapters(model, [n for n in names for _ in range(beams)]):
            mixed = model.generate(ids, num_beams=beams, **settings)
        for i, name in enumerate(names):
            alone = with_adapter(model, name, lambda: model.generate(ids[i:i + 1], num_beams=beams, **settings))
            assert torch.equal(mixed[i], alone[0]), (beams, name)
        others = {n: with_adapter(model, n, lambda: model.generate(ids[:1], num_beams=beams, **settings))[0]
                  for n in names}  # control: the adapters steer the first prompt to different tokens
        assert len({tuple(t.tolist()) for t in others.values()}) == len(names)
    with torch.no_grad(), minilora.per_sample_adapters(model, names):
        with pytest.raises(ValueError, match=r"batch of 8 rows.*num_beams or num_return_sequences = 2.*give each "
                                             r"name 2 times"):
            model.generate(ids, num_beams=2, **settings)
