"""H100 benchmark of minilora's fused Triton LoRA linear against cuBLAS, peft and friends.

For each shape K->N, rank r and token count M (bf16, random inputs, adapters in bf16 for every
method so that all do the same work), times forward, backward and forward+backward of:

    cublas          F.linear(x, W0)                      the denominator of every ratio
    merged          F.linear(x, W0 + s·B A)              forward only (cannot train)
    peft-p0         peft's lora.Linear on an nn.Linear, dropout 0
    peft-p0.05      the same with dropout 0.05 (train mode)
    minilora-torch  minilora.ops.lora_linear_reference
    unsloth-addmm   y = x W0ᵀ; y.addmm_(x Aᵀ, Bᵀ, alpha=s)
    triton-p0       minilora.kernels.fused_lora_linear, dropout 0
    triton-p0.05    the same with dropout 0.05

"backward" is y.backward(dY) for a retained graph: dX (x requires grad, as in any layer but the
first) plus dA, dB; for cublas it is dX = dY W0 alone. Timings: triton.testing.do_bench (L2
flushed between runs, median); forward at M <= 128 through CUDA graphs (do_bench_cudagraph) to
remove launch gaps, as a decoding server would run. Each method is first checked against an fp32
reference computed from the same bf16 inputs (max relative error, flagged above 2e-2).

Writes benchmarks/results/kernels-<device>-<date>.md and .png and prints the table.

    python benchmarks/bench_kernels.py                      # the full matrix (minutes)
    python benchmarks/bench_kernels.py --quick              # 4096->4096, r=16
    python benchmarks/bench_kernels.py --dry-run --out /tmp # CPU: tiny shapes, checks the logic

--dry-run runs on the CPU (the Triton path through TRITON_INTERPRET=1, fp32 since the interpreter
cannot do bf16): it exercises every method, the correctness check, the report and the plot, and
labels its numbers as meaningless CPU wall-clock times.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import time

SHAPES = [(4096, 4096), (4096, 1024), (4096, 6144), (4096, 14336), (14336, 4096)]
RANKS = [8, 16, 64]
TOKENS = [1, 16, 128, 1024, 4096, 16384]
CUDA_GRAPH_MAX_M = 128
ALPHA_OVER_R = 2.0  # scaling s = alpha / r
ERR_LIMIT = 2e-2

DRY_SHAPES, DRY_RANKS, DRY_TOKENS = [(40, 72)], [8], [3, 80]  # both forward paths


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no real timings")
    ap.add_argument("--quick", action="store_true", help="only 4096->4096 and r=16")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--tokens", type=int, nargs="*", help="override the M values")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Methods: each builds (forward_fn, params_for_grad) from the same tensors
# ----------------------------------------------------------------------------------------------


def _peft_layer(w0, A, B, scaling, p):
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    N, K = w0.shape
    r = A.shape[0]
    base = torch.nn.Linear(K, N, bias=False, device=w0.device, dtype=w0.dtype)
    base.weight.data.copy_(w0)
    base.weight.requires_grad_(False)
    alpha = scaling * r
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=p)
    layer.lora_A["default"].weight.data = A.detach().clone()
    layer.lora_B["default"].weight.data = B.detach().clone()
    layer.train()
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def build_methods(w0, A, B, scaling, peft_ok):
    """name -> factory() returning (fn(x) -> y, trainable tensors); "cublas" first."""
    import torch
    import torch.nn.functional as F

    from minilora.ops import lora_linear_reference

    def leaves():
        return A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()

    def cublas():
        return (lambda x: F.linear(x, w0)), []

    def merged():
        wm = (w0.float() + scaling * B.float() @ A.float()).to(w0.dtype)
        return (lambda x: F.linear(x, wm)), []

    def minilora_torch():
        a, b = leaves()
        return (lambda x: lora_linear_reference(x, w0, None, a, b, scaling)), [a, b]

    def unsloth():
        a, b = leaves()

        def fn(x):
            y = F.linear(x, w0)
            x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            return y2.addmm(x2 @ a.t(), b.t(), alpha=scaling).view(y.shape)
        return fn, [a, b]

    def triton(p):
        def factory():
            from minilora.kernels import fused_lora_linear
            a, b = leaves()
            return (lambda x: fused_lora_linear(x, w0, None, a, b, scaling, p, True)), [a, b]
        return factory

    def peft(p):
        def factory():
            layer, params = _peft_layer(w0, A, B, scaling, p)
            return layer, params
        return factory

    methods = {"cublas": cublas, "merged": merged}
    if peft_ok:
        methods.update({"peft-p0": peft(0.0), "peft-p0.05": peft(0.05)})
    methods.update({"minilora-torch": minilora_torch, "unsloth-addmm": unsloth,
                    "triton-p0": triton(0.0), "triton-p0.05": triton(0.05)})
    return methods


# ----------------------------------------------------------------------------------------------
# Timing, FLOPs and bytes
# ----------------------------------------------------------------------------------------------


def make_timer(dry_run):
    """timer(fn, graph: bool, grad_to_none) -> milliseconds."""
    if dry_run:
        def cpu_timer(fn, graph=False, grad_to_none=None):
            fn()
            times = []
            for _ in range(1):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        return cpu_timer

    from triton.testing import do_bench, do_bench_cudagraph

    def gpu_timer(fn, graph=False, grad_to_none=None):
        if graph:
            return do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none,
                                      return_mode="median")
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    return gpu_timer


def work(M, K, N, r, mode, lora):
    """(FLOPs, minimal bytes) of one call; lora=False for the cuBLAS / merged baselines."""
    e = 2  # bf16
    if mode == "forward":
        flops = 2 * M * N * K + (2 * M * r * (K + N) if lora else 0)
        nbytes = e * (M * K + N * K + M * N + (r * (K + N) if lora else 0))
    elif mode == "backward":  # dX (+ dU, dB, dA, dU A)
        flops = 2 * M * N * K + (4 * M * r * (K + N) if lora else 0)
        nbytes = e * (M * N + N * K + M * K + ((M * K + 2 * r * (K + N)) if lora else 0))
    else:
        f1, b1 = work(M, K, N, r, "forward", lora)
        f2, b2 = work(M, K, N, r, "backward", lora)
        flops, nbytes = f1 + f2, b1 + b2
    return flops, nbytes


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run(args):
    import torch

    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    shapes, ranks, tokens = ((DRY_SHAPES, DRY_RANKS, DRY_TOKENS) if dry else
                             ([(4096, 4096)], [16], TOKENS) if args.quick else
                             (SHAPES, RANKS, TOKENS))
    tokens = args.tokens or tokens
    try:
        import peft  # noqa: F401
        peft_ok = True
    except ImportError:
        peft_ok = False
    timer = make_timer(dry)
    gen = torch.Generator(device=device).manual_seed(0)
    rows, failures = [], []
    for K, N in shapes:
        for r in ranks:
            scaling = ALPHA_OVER_R
            w0 = (torch.randn(N, K, device=device, generator=gen) / K**0.5).to(dtype)
            A = (torch.randn(r, K, device=device, generator=gen) / K**0.5).to(dtype)
            B = (torch.randn(N, r, device=device, generator=gen) / r**0.5).to(dtype)
            methods = build_methods(w0, A, B, scaling, peft_ok)
            for M in tokens:
                x = torch.randn(M, K, device=device, generator=gen).to(dtype)
                dy = torch.randn(M, N, device=device, generator=gen).to(dtype)
                base_ref = x.float() @ w0.float().T
                ref = base_ref + scaling * (x.float() @ A.float().T) @ B.float().T
                base_ms = {}
                for name, factory in methods.items():
                    fn, params = factory()
                    lora = name not in ("cublas", "merged")
                    with torch.no_grad():
                        y = fn(x)
                    want = base_ref if name == "cublas" else ref
                    err = ((y.float() - want).abs().max() / want.abs().max()).item()
                    if "p0.05" in name:
                        err = float("nan")  # dropout draws differ from the reference
                    elif not err <= ERR_LIMIT:
                        failures.append(f"{name} K={K} N={N} r={r} M={M}: rel err {err:.2e}")
                    xg = x.detach().clone().requires_grad_()
                    for mode in ("forward", "backward", "both"):
                        if name == "merged" and mode != "forward":
                            continue
                        if mode == "forward":
                            def bench(fn=fn):
                                with torch.no_grad():
                                    return fn(x)
                            ms = timer(bench, graph=M <= CUDA_GRAPH_MAX_M)
                        elif mode == "backward":
                            y_g = fn(xg)
                            ms = timer(lambda y_g=y_g: y_g.backward(dy, retain_graph=True),
                                       grad_to_none=[xg, *params])
                        else:
                            ms = timer(lambda fn=fn: fn(xg).backward(dy),
                                       grad_to_none=[xg, *params])
                        if name == "cublas":
                            base_ms[mode] = ms
                        flops, nbytes = work(M, K, N, r, mode, lora)
                        rows.append(dict(K=K, N=N, r=r, M=M, method=name, mode=mode, ms=ms,
                                         ratio=ms / base_ms[mode], tflops=flops / ms / 1e9,
                                         gbps=nbytes / ms / 1e6, err=err))
                    print(f"K={K:5d} N={N:5d} r={r:3d} M={M:5d} {name:15s} "
                          + " ".join(f"{row['mode']}={row['ms']:.4f}ms({row['ratio']:.2f}x)"
                                     for row in rows[-3:] if row["method"] == name),
                          flush=True)
    return rows, failures


def _goals(rows):
    """The goals table of docs/kernels.md, from the rows (triton-p0 unless said)."""
    def ratios(mode, pred, method="triton-p0"):
        return [r["ratio"] for r in rows if r["method"] == method and r["mode"] == mode
                and pred(r["M"])]

    def fmt(values):
        return f"{max(values):.3f}x (worst of {len(values)})" if values else "no such rows"

    speedups = []
    for r in rows:
        if r["method"] == "triton-p0" and r["mode"] == "both" and r["M"] >= 2048:
            peft = [q for q in rows if q["method"] == "peft-p0" and q["mode"] == "both"
                    and (q["K"], q["N"], q["r"], q["M"]) == (r["K"], r["N"], r["r"], r["M"])]
            if peft:
                speedups.append(peft[0]["ms"] / r["ms"])
    return [("forward, M >= 2048", "<= 1.05x cuBLAS", fmt(ratios("forward", lambda m: m >= 2048))),
            ("forward, M <= 16, CUDA graphs", "<= 1.10x cuBLAS",
             fmt(ratios("forward", lambda m: m <= 16))),
            ("fwd+bwd, M >= 2048", "<= 1.10x base fwd + dX",
             fmt(ratios("both", lambda m: m >= 2048))),
            ("fwd+bwd vs peft (dropout 0), M >= 2048", ">= 1.3x faster",
             f"{min(speedups):.2f}x (worst of {len(speedups)})" if speedups else "no such rows")]


def write_report(rows, failures, args):
    import torch

    dry = args.dry_run
    device_name = "CPU-dry-run" if dry else torch.cuda.get_device_name()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"kernels-{slug}-{stamp}")
    versions = f"torch {torch.__version__}"
    try:
        import triton
        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    lines = [f"# Fused LoRA linear benchmark: {device_name}, {stamp}", "",
             f"{versions}. Command: `python {' '.join(sys.argv)}`", ""]
    if dry:
        lines += ["**DRY RUN on the CPU: tiny fp32 shapes, Triton through the interpreter. The "
                  "times below are CPU wall-clock of a logic check, not a benchmark.**", ""]
    lines += ["Ratios are to cuBLAS `F.linear(x, W0)` (forward) / its dX (backward) / both, same "
              f"M. Forward at M <= {CUDA_GRAPH_MAX_M} uses CUDA graphs. err: max relative error "
              "of the forward vs an fp32 reference (n/a with dropout).", "",
              "## Goals (triton-p0)", "", "| goal | target | measured |", "| --- | --- | --- |"]
    lines += [f"| {g} | {t} | {m} |" for g, t, m in _goals(rows)]
    lines += ["", "## Correctness", ""]
    lines += ([f"- FAILED: {f}" for f in failures] if failures
              else [f"All methods within {ERR_LIMIT} of the fp32 reference."])
    lines += ["", "## All timings", "",
              "| K->N | r | M | method | mode | ms | x cuBLAS | TFLOP/s | GB/s | err |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        err = "n/a" if r["err"] != r["err"] else f"{r['err']:.1e}"
        lines.append(f"| {r['K']}->{r['N']} | {r['r']} | {r['M']} | {r['method']} | {r['mode']} "
                     f"| {r['ms']:.4f} | {r['ratio']:.3f} | {r['tflops']:.1f} | "
                     f"{r['gbps']:.0f} | {err} |")
    md = base + ".md"
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    png = _plot(rows, base + ".png", f"{device_name} {stamp}" + (" (DRY RUN)" if dry else ""))
    return md, png


def _plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the first (shape, rank): ratio to cuBLAS vs M, per method, forward and fwd+bwd
    K, N, r = rows[0]["K"], rows[0]["N"], rows[0]["r"]
    methods = list(dict.fromkeys(q["method"] for q in rows))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, mode in zip(axes, ("forward", "both")):
        sel = [q for q in rows if (q["K"], q["N"], q["r"], q["mode"]) == (K, N, r, mode)]
        for method in dict.fromkeys(q["method"] for q in sel):
            pts = [(q["M"], q["ratio"]) for q in sel if q["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method, color=colors[method])
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("M (tokens)")
        ax.set_title(f"{mode}: K={K} N={N} r={r}")
    axes[0].set_ylabel("time / cuBLAS")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    args = _parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (or --dry-run)")
    rows, failures = run(args)
    md, png = write_report(rows, failures, args)
    print(f"wrote {md} and {png}")
    if failures:
        print("correctness FAILURES:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
