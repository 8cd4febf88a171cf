"""Mixed batches: one forward where every row runs its own adapter (``per_sample_adapters``).

Two benchmarks in one script:

GPU (default; H100-class, bf16): one LoRA linear K = N = 4096, r = 16, 64 rows, decode (1 token
per row) and prefill (128 tokens per row), with 1, 4, 16 and 64 distinct adapters (rows dealt
round-robin), times the mixed-batch forward of:

    base            F.linear(x, W0) alone                 the floor every extra cost is measured over
    triton          minilora's stacked path, Triton kernels (backend "triton")
    minilora-torch  minilora's stacked path, PyTorch (backend "torch"): gather + two bmm
    minilora-loop   minilora's per-adapter loop (the stack switched off): gather, 2 GEMMs, index_add
    peft            peft's lora.Linear with adapter_names= (its per-adapter loop)

Timings: triton.testing.do_bench (median, L2 flushed) under torch.inference_mode. Every method is
first checked against an fp32 reference from the same bf16 inputs. Goals (docs/kernels.md): the
extra cost of "triton" over "base" with 64 adapters <= 1.5x that with 1 adapter, and at >= 16
adapters "triton" >= 3x faster than "peft".

CPU (--cpu): a tiny Llama (2 layers, hidden 256, 7 targets per layer, r = 16) with 16 adapters
loaded in minilora and, from the same files, in peft; 64 rows of 32 tokens, 4 rows per adapter.
Times the whole model's mixed-batch forward: minilora (stacked, PyTorch path), minilora's loop and
peft's ``adapter_names=``; goal: minilora / peft <= 0.8.

    python benchmarks/bench_multi_adapter.py                      # GPU matrix
    python benchmarks/bench_multi_adapter.py --cpu                # CPU, vs peft
    python benchmarks/bench_multi_adapter.py --dry-run --out /tmp # CPU: tiny shapes, checks the logic

--dry-run runs the GPU benchmark's logic on the CPU (Triton through TRITON_INTERPRET=1, fp32) with
tiny shapes and labels its numbers as meaningless. Writes benchmarks/results/multi-adapter-<what>-<date>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

ADAPTER_COUNTS = [1, 4, 16, 64]
ROWS, RANK, ALPHA = 64, 16, 32
MODES = {"decode": 1, "prefill": 128}
SHAPE = (4096, 4096)
DRY = dict(counts=[1, 3], rows=6, modes={"decode": 1, "prefill": 5}, shape=(40, 72), rank=8)
ERR_LIMIT = 2e-2
CPU_ADAPTERS, CPU_TOKENS = 16, 32
METHODS = ["base", "triton", "minilora-torch", "minilora-loop", "peft"]


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the tiny-Llama CPU benchmark against peft")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no real timings")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--repeats", type=int, default=30, help="CPU: timed runs (median)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="CPU: one torch thread, timed by its CPU time (steadier on a shared machine)")
    return ap.parse_args(argv)


@contextlib.contextmanager
def loop_only():
    """minilora's per-adapter loop, as before the stacked path: no layer offers a stack."""
    from minilora.layers import LoraLinear

    saved = LoraLinear.stacked_adapters
    LoraLinear.stacked_adapters = lambda self: None
    try:
        yield
    finally:
        LoraLinear.stacked_adapters = saved


def _median_time(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved(methods, repeats, clock, warmup=2):
    """Median time of each method, the methods run in turn within each repeat: a load change on a
    shared machine hits all of them alike."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _names(n_adapters, rows):
    return [f"a{i % n_adapters}" for i in range(rows)]


# ------------------------------------------------------------------------------ one layer (GPU)
def _layer_pair(K, N, r, n_adapters, dtype, device):
    """A minilora and a peft LoRA linear with the same n adapters (random A and B, bf16)."""
    import torch
    import torch.nn as nn

    import minilora

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(K, N, bias=False)).to(device, dtype)
    ours = minilora.inject(base, targets=["0"], r=r, lora_alpha=ALPHA, adapter_name="a0")
    for i in range(1, n_adapters):
        minilora.inject(ours, targets=["0"], r=r, lora_alpha=ALPHA, adapter_name=f"a{i}")
    layer = ours[0]
    with torch.no_grad():
        for adapter in layer.adapters.values():  # the adapters in the compute dtype, as peft's
            adapter.to(dtype)
            adapter.lora_A.copy_(torch.randn_like(adapter.lora_A) / K**0.5)
            adapter.lora_B.copy_(torch.randn_like(adapter.lora_B) / r**0.5)
    theirs = _peft_layer(layer, K, N, r, n_adapters, dtype, device)
    return ours.eval(), theirs


def _peft_layer(layer, K, N, r, n_adapters, dtype, device):
    try:
        import peft
    except ImportError:
        return None
    import torch
    import torch.nn as nn

    base = nn.Sequential(nn.Linear(K, N, bias=False)).to(device, dtype)
    with torch.no_grad():
        base[0].weight.copy_(layer.weight)
    config = dict(target_modules=["0"], r=r, lora_alpha=ALPHA)
    model = peft.get_peft_model(base, peft.LoraConfig(**config), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", peft.LoraConfig(**config))
    lin = model.base_model.model[0]
    with torch.no_grad():
        for name, adapter in layer.adapters.items():
            lin.lora_A[name].to(dtype).weight.copy_(adapter.lora_A)
            lin.lora_B[name].to(dtype).weight.copy_(adapter.lora_B)
    return model.eval()


@contextlib.contextmanager
def forced_backend(backend, dry_run):
    """The mixed-batch path forced to ``backend``; in a dry run the kernels run on CPU tensors
    (the interpreter), which ops.backend_for_rows rightly refuses: the dispatch is bypassed."""
    from minilora import ops

    previous, dispatch = ops._backend, ops.backend_for_rows
    ops.set_backend(backend)
    if dry_run:
        ops.backend_for_rows = lambda x, y, stack, backend=None: ops._backend
    try:
        yield
    finally:
        ops.set_backend(previous)
        ops.backend_for_rows = dispatch


def _layer_methods(ours, theirs, x, names, dry_run):
    import torch.nn.functional as F

    import minilora

    layer = ours[0]

    def mixed(backend):
        def fn():
            with minilora.per_sample_adapters(ours, names):
                with (loop_only() if backend is None else forced_backend(backend, dry_run)):
                    return ours(x)
        return fn

    methods = {"base": lambda: F.linear(x, layer.weight), "triton": mixed("triton"),
               "minilora-torch": mixed("torch"), "minilora-loop": mixed(None)}
    if theirs is not None:
        methods["peft"] = lambda: theirs(x, adapter_names=names)
    return methods


def _layer_reference(ours, x, names):
    """fp32 from the same bf16 inputs: row i's base output plus its adapter's branch."""
    import torch

    layer = ours[0]
    W = layer.weight.float()
    out = x.float() @ W.T
    for i, name in enumerate(names):
        a = layer.adapters[name]
        out[i] += a.scaling * (x[i].float() @ a.lora_A.float().T) @ a.lora_B.float().T
    return out


def run_layer(args):
    import torch

    dry = args.dry_run
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    counts, rows, modes, (K, N), r = ((DRY["counts"], DRY["rows"], DRY["modes"], DRY["shape"], DRY["rank"])
                                      if dry else (ADAPTER_COUNTS, ROWS, MODES, SHAPE, RANK))
    timer = _cpu_timer if dry else _gpu_timer()
    results, failures = [], []
    for n in counts:
        ours, theirs = _layer_pair(K, N, r, n, dtype, device)
        names = _names(n, rows)
        for mode, tokens in modes.items():
            x = torch.randn(rows, tokens, K, device=device, dtype=dtype)
            ref = _layer_reference(ours, x, names)
            for method, fn in _layer_methods(ours, theirs, x, names, dry).items():
                with torch.inference_mode():
                    out = fn()
                    if method != "base":
                        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                        if not err <= ERR_LIMIT:
                            failures.append(f"{method} {mode} n={n}: relative error {err:.2e}")
                    ms = timer(fn) * 1e3
                results.append(dict(n=n, mode=mode, method=method, ms=ms))
                print(f"{mode:8s} adapters={n:3d} {method:15s} {ms:9.4f} ms", flush=True)
    return results, failures


def _cpu_timer(fn):
    return _median_time(fn, repeats=3, warmup=1)


def _gpu_timer():
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn) / 1e3


def _layer_goals(results):
    """The two GPU goals from the results: lines of text."""
    t = {(r["mode"], r["n"], r["method"]): r["ms"] for r in results}
    counts = sorted({r["n"] for r in results})
    lines = []
    for mode in sorted({r["mode"] for r in results}):
        lo, hi = counts[0], counts[-1]
        if (mode, lo, "triton") in t and (mode, hi, "triton") in t:
            extra_lo = t[(mode, lo, "triton")] - t[(mode, lo, "base")]
            extra_hi = t[(mode, hi, "triton")] - t[(mode, hi, "base")]
            ratio = extra_hi / extra_lo if extra_lo > 0 else float("inf")
            lines.append(f"- {mode}: extra cost over base, {hi} adapters / {lo}: {ratio:.2f} (goal <= 1.5)")
        for n in counts:
            if n >= 16 and (mode, n, "peft") in t:
                speedup = t[(mode, n, "peft")] / t[(mode, n, "triton")]
                lines.append(f"- {mode}, {n} adapters: peft / triton = {speedup:.2f} (goal >= 3)")
    return lines


def write_layer_report(results, failures, args):
    import torch

    dry = args.dry_run
    device = "CPU-dry-run" if dry else torch.cuda.get_device_name().replace(" ", "-")
    stamp = datetime.date.today().isoformat()
    counts = sorted({r["n"] for r in results})
    lines = [f"# Mixed-batch LoRA forward, {device}, {stamp}", ""]
    if dry:
        lines += ["**DRY RUN**: tiny shapes on the CPU, Triton through the interpreter; the times "
                  "mean nothing.", ""]
    lines += ["Times in ms (median). Rows: method; columns: distinct adapters in the batch.", ""]
    for mode in sorted({r["mode"] for r in results}):
        lines += [f"## {mode}", "", "| method | " + " | ".join(map(str, counts)) + " |",
                  "|---|" + "---|" * len(counts)]
        for method in METHODS:
            cells = [next((f"{r['ms']:.4f}" for r in results if (r["mode"], r["n"], r["method"]) == (mode, n, method)),
                          "-") for n in counts]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Goals", ""] + _layer_goals(results) + [""]
    lines.append(f"All methods within {ERR_LIMIT:g} of the fp32 reference." if not failures
                 else "Errors above the limit:\n" + "\n".join(f"- {f}" for f in failures))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"multi-adapter-{device}-{stamp}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


# ------------------------------------------------------------------------------ tiny Llama (CPU)
def _tiny_llama_pair(tmp):
    """A tiny Llama with CPU_ADAPTERS adapters in minilora and the same files loaded in peft."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import minilora

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=512, max_position_embeddings=128)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = None
    for i in range(CPU_ADAPTERS):
        lora = minilora.LoraConfig(target_modules=targets, r=RANK, lora_alpha=ALPHA + i, init_lora_weights=False)
        ours = minilora.inject(base if ours is None else ours, lora, adapter_name=f"a{i}")
    minilora.save_adapter(ours, tmp)  # adapter "a{i}" into tmp/a{i}
    theirs_base = LlamaForCausalLM(config).eval()
    theirs_base.load_state_dict({k: v for k, v in ours.state_dict().items() if ".adapters." not in k})
    theirs = peft.PeftModel.from_pretrained(theirs_base, os.path.join(tmp, "a0"), adapter_name="a0")
    for i in range(1, CPU_ADAPTERS):
        theirs.load_adapter(os.path.join(tmp, f"a{i}"), adapter_name=f"a{i}")
    return ours.eval(), theirs.eval()


def run_cpu(args):
    import torch

    import minilora

    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = _tiny_llama_pair(tmp)
    names = _names(CPU_ADAPTERS, ROWS)
    ids = torch.randint(0, 512, (ROWS, CPU_TOKENS), generator=torch.Generator().manual_seed(1))

    def minilora_forward():
        with minilora.per_sample_adapters(ours, names):
            return ours(input_ids=ids).logits

    def minilora_loop():
        with loop_only():
            return minilora_forward()

    def peft_forward():
        return theirs(input_ids=ids, adapter_names=names).logits

    with torch.inference_mode():
        a, b, c = minilora_forward(), minilora_loop(), peft_forward()
        # fp32, 2 layers of sums over at most 512 terms: agreement to 1e-4 of the logits' scale
        # shows the same model; a wrong adapter on a row is off by O(1).
        scale = c.abs().max().item()
        for name, got in (("minilora", a), ("minilora-loop", b)):
            err = (got - c).abs().max().item() / scale
            if not err <= 1e-4:
                raise SystemExit(f"{name} differs from peft by {err:.2e} of the logits' scale")
        methods = {"minilora": minilora_forward, "minilora-loop": minilora_loop, "peft": peft_forward}
        times = _interleaved(methods, args.repeats, time.thread_time if args.cpu_time else time.perf_counter)
    return times


def write_cpu_report(times, args):
    import peft
    import torch

    stamp = datetime.date.today().isoformat()
    ratio = times["minilora"] / times["peft"]
    lines = [
        f"# Mixed batch on the CPU: minilora vs peft, {stamp}", "",
        f"{platform.machine()}, {os.cpu_count()} CPU threads visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), peft {peft.__version__}. Tiny Llama (2 layers, hidden 256, "
        f"MLP 512, 7 targets per layer), {CPU_ADAPTERS} adapters of r={RANK}, fp32; {ROWS} rows x "
        f"{CPU_TOKENS} tokens, rows dealt round-robin ({ROWS // CPU_ADAPTERS} per adapter). Whole-model "
        f"forward under inference_mode, median of {args.repeats} interleaved runs, "
        f"{'CPU time of the one thread' if args.cpu_time else 'wall time'}; outputs checked against peft's first.", "",
        "| method | ms | / peft |", "|---|---|---|"]
    for name in ("minilora", "minilora-loop", "peft"):
        lines.append(f"| {name} | {times[name] * 1e3:.2f} | {times[name] / times['peft']:.3f} |")
    lines += ["", f"Goal: minilora / peft <= 0.8: {'met' if ratio <= 0.8 else 'NOT met'} ({ratio:.3f})."]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"multi-adapter-cpu-{stamp}.md")  # the clock is written in it
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    return path


def main(argv=None):
    args = _parse_args(argv)
    if args.cpu:
        import torch

        if args.cpu_time:
            torch.set_num_threads(1)
        write_cpu_report(run_cpu(args), args)
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run (logic check) or --cpu (CPU benchmark)", file=sys.stderr)
            return 2
    results, failures = run_layer(args)
    write_layer_report(results, failures, args)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
