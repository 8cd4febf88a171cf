"""DoRA CPU benchmark: minilora vs peft in one run (issue: DoRA speed and memory goals).

peft builds the full W + s·B·A (out x in, fp32) on every forward to take its row norms; minilora
takes them with a low-rank identity (minilora/ops.py ``dora_norm``). On one nn.Linear(2048, 2048),
M=512 tokens, r=16, lora_alpha=32, fp32, the four layers (minilora LoRA, minilora DoRA, peft LoRA,
peft DoRA) get the same base weight, factors and magnitudes, and the script measures:

  * forward (no grad) and forward+backward (a fixed random output gradient, x requiring grad,
    grads set to None between steps): in each of ``--rounds`` rounds every measurement runs
    ``--repeats`` times, interleaved (the layers take turns in a random order, so load from other
    processes hits all alike; each timed call follows an untimed call of the same layer), and
    gives its median; every ratio is taken within a round, and the report gives the median over
    rounds and the range (min-max) as the spread;
  * goals: minilora DoRA <= 1.15 x minilora LoRA and <= 0.7 x peft DoRA (forward+backward, dropout 0);
  * memory of one training step (forward+backward): the largest tensor any op allocates (a
    TorchDispatchMode records every op output that does not share storage with an input), how
    many allocations hold >= out x in elements, and the peak of (bytes allocated - bytes freed) in
    the step from torch.profiler's allocation events. Goal: no out x in temporary in minilora.

Two adapter sizes, because they take different paths through the norm:
  * "random factors": both factors random as bench_cpu.py makes them (init_lora_weights=False),
    so ‖s·(BA)_i‖ is about 1.1 ‖W_i‖: an adapter as large as the weight;
  * "trained-size": the same B scaled down so that the median ‖s·(BA)_i‖ / ‖W_i‖ is 0.1.
  Magnitudes are ‖W + sBA‖ (fp64) times 1 + 0.1·N(0, 1), so the DoRA scale is not 1.

And dropout 0.05 (training, random factors): peft recomputes the base on dropout(x) for DoRA, and
so does minilora (DoRA's definition needs x' Wᵀ for the dropped x); reported, no goal.

Usage: python benchmarks/bench_dora.py [--out benchmarks/results] [--quick] [--cpu-time]
Writes benchmarks/results/dora-cpu-<date>.md (with --cpu-time: dora-cpu-<date>-cputime.md) and
prints the same report. peft is a benchmark-only dependency (pip install peft).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import random
import statistics
import time
import warnings

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("minilora LoRA", "minilora DoRA", "peft LoRA", "peft DoRA")
#: the clock: wall time, or with --cpu-time this thread's CPU time (one torch thread; on CPU the
#: backward runs on the calling thread too), which other processes' load barely moves.
_clock = time.perf_counter
GOAL_VS_LORA, GOAL_VS_PEFT = 1.15, 0.7


# ---------------------------------------------------------------- the four layers
def _layers(M: int, K: int, N: int, r: int, dropout: float, delta_ratio: float | None) -> dict:
    """The four layers on one base Linear, with minilora's factors and magnitudes copied into peft.

    delta_ratio: None keeps the random factors; a number scales B so that the median
    ‖s·(BA)_i‖ / ‖W_i‖ is that number.
    """
    import peft
    import minilora
    from minilora.inject import lora_layers

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(K, N))
    layers, config = {}, dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, init_lora_weights=False)
    for dora in (False, True):
        ours = minilora.inject(copy.deepcopy(base), targets=["0"], use_dora=dora, **config)
        (_, layer), = lora_layers(ours)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["0"], use_dora=dora,
                                                                           **config))
        layers["minilora " + ("DoRA" if dora else "LoRA")] = layer
        layers["peft " + ("DoRA" if dora else "LoRA")] = theirs.base_model.model[0]
    lora, dora = layers["minilora LoRA"].adapters["default"], layers["minilora DoRA"].adapters["default"]
    W = layers["minilora DoRA"].weight.detach()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        dora.lora_A.copy_(lora.lora_A)  # one set of factors for all four layers
        dora.lora_B.copy_(lora.lora_B)
        if delta_ratio is not None:
            delta = dora.scaling * (dora.lora_B.double() @ dora.lora_A.double())
            ratio = (delta.norm(dim=1) / W.double().norm(dim=1)).median()
            for adapter in (lora, dora):
                adapter.lora_B.mul_(delta_ratio / ratio.item())
        V = W.double() + dora.scaling * (dora.lora_B.double() @ dora.lora_A.double())
        dora.magnitude.copy_(V.norm(dim=1) * (1 + 0.1 * torch.randn(N, generator=gen, dtype=torch.float64)))
        for kind, adapter in (("LoRA", lora), ("DoRA", dora)):
            theirs = layers["peft " + kind]
            theirs.lora_A["default"].weight.copy_(adapter.lora_A)
            theirs.lora_B["default"].weight.copy_(adapter.lora_B)
            if kind == "DoRA":
                theirs.lora_magnitude_vector["default"].weight.copy_(adapter.magnitude)
    return layers


def _delta_ratio(layer) -> float:
    """Median over rows of ‖s·(BA)_i‖ / ‖W_i‖ for a minilora layer."""
    a = layer.adapters["default"]
    delta = a.scaling * (a.lora_B.detach().double() @ a.lora_A.detach().double())
    return (delta.norm(dim=1) / layer.weight.detach().double().norm(dim=1)).median().item()


def _check_outputs(layers: dict, x: torch.Tensor) -> float:
    """Every layer's fp32 output against an fp64 reference; returns the largest error / bound.

    The bound, per output element: each is a dot product of n = K + r terms (x·W_j plus the rank-r
    branch) summed in fp32 in some order; its error is at most λ·√n·u·T with T the sum of the
    terms' absolute values (probabilistic rounding-error bound, Higham & Mary 2019; fails with
    probability about exp(-λ²/2) per element), u = 2⁻²⁴, λ = 8. DoRA then divides by ‖W_j + s(BA)_j‖,
    a sum of K squares in fp32 (peft) or the low-rank identity (minilora, whose error is at most
    ops.DORA_FALLBACK = 4 times that of the direct sum, larger ratios being recomputed directly),
    which adds at most 2·λ·√K·u relative: 3·λ·√n·u·T covers both. A wrong computation (a lost
    scale, the norm of the wrong axis) is off by a fraction of |y|, about 100x this bound here.
    """
    xd = x.double()
    worst = 0.0
    for kind, layer in layers.items():
        ours = layers["minilora " + kind.split()[1]]
        a = ours.adapters["default"]
        W, b = ours.weight.detach().double(), ours.bias.detach().double()
        A, B = a.lora_A.detach().double(), a.lora_B.detach().double()
        s = a.scaling
        y = xd @ W.T + s * (xd @ A.T) @ B.T
        T = xd.abs() @ W.abs().T + s * (xd.abs() @ A.abs().T) @ B.abs().T
        if a.magnitude is not None:
            g = a.magnitude.detach().double() / (W + s * B @ A).norm(dim=1)
            y, T = g * y, g.abs() * T
        y, T = y + b, T + b.abs()
        n, u, lam = W.shape[1] + A.shape[0], 2.0 ** -24, 8.0
        bound = 3 * lam * math.sqrt(n) * u * T
        with torch.no_grad():
            err = (layer(x).double() - y).abs()
        if not bool((err <= bound).all()):
            raise AssertionError(f"{kind}: output differs from the fp64 reference by {err.max().item():.3g} "
                                 f"(bound {bound.max().item():.3g}); the benchmark would compare different things")
        worst = max(worst, (err / bound).max().item())
    return worst


def _check_grads(layers: dict, x: torch.Tensor, gy: torch.Tensor) -> float:
    """minilora's gradients (x, A, B, magnitude) against peft's on one step; returns the largest
    difference as a fraction of the gradient's largest element (checked <= 1e-3: sums of at most
    max(M, N) fp32 products in different orders, ~√n·u·(Σ|terms| / |sum|) ≈ 1e-5 here; a
    different backward, e.g. a norm that is not detached, is off by O(1))."""
    worst = 0.0
    for kind in ("LoRA", "DoRA"):
        grads = []
        for lib in ("minilora", "peft"):
            layer = layers[f"{lib} {kind}"]
            xg = x.clone().requires_grad_(True)
            layer(xg).backward(gy)
            params = [p for _, p in sorted(_trainable(layer, lib).items())]
            grads.append([xg.grad] + [p.grad.clone() for p in params])
            layer.zero_grad(set_to_none=True)
        for ours, theirs in zip(*grads):
            rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
            if not rel <= 1e-3:
                raise AssertionError(f"{kind}: gradients differ by {rel:.3g} of their largest element")
            worst = max(worst, rel)
    return worst


def _trainable(layer, lib: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable tensors under common names: A, B, (m)."""
    if lib == "minilora":
        a = layer.adapters["default"]
        found = {"A": a.lora_A, "B": a.lora_B, "m": a.magnitude}
    else:
        found = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight,
                 "m": layer.lora_magnitude_vector["default"].weight if "default" in layer.lora_magnitude_vector
                 else None}
    return {k: v for k, v in found.items() if v is not None}


# ---------------------------------------------------------------- memory of one training step
class _Allocations(TorchDispatchMode):
    """Records (elements, bytes, op) for every tensor an op returns that shares no storage with
    its inputs: the op allocated it. Views, in-place results and outputs written into inputs are not
    allocations and are skipped."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self.records.append((nbytes // t.element_size(), nbytes, str(func.overloadpacket)))
        return out


def _peak_bytes(step) -> int:
    """Peak of bytes allocated minus bytes freed during ``step``, from the profiler's CPU
    allocation events (every tensor allocation and free is one event)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure_memory(layer, x: torch.Tensor, gy: torch.Tensor) -> dict:
    xg = x.clone().requires_grad_(True)

    def step():
        layer(xg).backward(gy)
        layer.zero_grad(set_to_none=True)
        xg.grad = None

    step()  # warm: lazily built state is not part of a training step
    with _Allocations() as mode:
        step()
    numel, nbytes, op = max(mode.records)
    out_in = layer.weight.numel()
    return {"largest": numel, "bytes": nbytes, "op": op, "full": sum(n >= out_in for n, *_ in mode.records),
            "peak": _peak_bytes(step)}


# ---------------------------------------------------------------- timing
def _interleaved(fns: dict, repeats: int, warmup: int, seed: int = 0) -> dict:
    """Median time of every function, the functions taking turns: each repeat visits all of them
    in a fresh random order, and each timed call follows an untimed call of the same function.
    Taking turns, load from other processes on the machine slows all of them alike, so a ratio
    taken within the round stays fair; the untimed call before each timed one leaves the caches
    and the allocator as a run of that function leaves them (as timing it back to back does),
    not as whichever function came before (peft's DoRA frees 16 MiB blocks, for one)."""
    cases = list(fns)
    for _ in range(warmup):
        for case in cases:
            fns[case]()
    rng = random.Random(seed)
    times = {case: [] for case in cases}
    for _ in range(repeats):
        rng.shuffle(cases)
        for case in cases:
            fns[case]()
            t0 = _clock()
            fns[case]()
            times[case].append(_clock() - t0)
    return {case: statistics.median(ts) for case, ts in times.items()}


def _steps(layer, x: torch.Tensor, gy: torch.Tensor):
    xg = x.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            layer(x)

    def train_step():
        layer(xg).backward(gy)
        layer.zero_grad(set_to_none=True)
        xg.grad = None
    return forward, train_step


def bench(M: int, K: int, N: int, r: int, repeats: int, rounds: int) -> dict:
    torch.manual_seed(2)
    x, gy = torch.randn(M, K), torch.randn(M, N)
    settings = {"random": _layers(M, K, N, r, 0.0, None), "trained": _layers(M, K, N, r, 0.0, 0.1),
                "dropout": _layers(M, K, N, r, 0.05, None)}
    checks = {"output err / bound": max(_check_outputs(settings[s], x) for s in ("random", "trained")),
              "grad diff / max": max(_check_grads(settings[s], x, gy) for s in ("random", "trained")),
              "delta ratio random": _delta_ratio(settings["random"]["minilora DoRA"]),
              "delta ratio trained": _delta_ratio(settings["trained"]["minilora DoRA"])}
    for layers in settings.values():
        for layer in layers.values():
            layer.train()
    # (setting, kind, "forward" | "train"): the trained-size LoRA layers equal the random ones in
    # cost (same shapes, no value-dependent path), so only their DoRA layers are timed.
    cases = [("random", k, mode) for k in KINDS for mode in ("forward", "train")]
    cases += [("trained", k, mode) for k in KINDS if "DoRA" in k for mode in ("forward", "train")]
    cases += [("dropout", k, "train") for k in KINDS]
    fns = {}
    for setting, kind, mode in cases:
        forward, train_step = _steps(settings[setting][kind], x, gy)
        fns[setting, kind, mode] = forward if mode == "forward" else train_step
    per_round = []
    for i in range(rounds):
        per_round.append(_interleaved(fns, repeats, warmup=3 if i == 0 else 1, seed=i))
    memory = {(s, k): measure_memory(settings[s][k], x, gy) for s in ("random", "trained", "dropout") for k in KINDS}
    return {"rounds": per_round, "memory": memory, "checks": checks, "out_in": K * N, "M": M}


# ---------------------------------------------------------------- report
def _stat(values: list[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    values = [v * scale for v in values]
    mid = fmt.format(statistics.median(values))
    return mid if len(values) == 1 else f"{mid} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(res: dict, M: int, K: int, N: int, r: int, repeats: int, rounds: int,
           cpu_time: bool = False) -> tuple[str, bool]:
    import peft

    R = res["rounds"]
    t = lambda *case: [rd[case] for rd in R]  # noqa: E731
    ratio = lambda a, b: [rd[a] / rd[b] for rd in R]  # noqa: E731
    date = datetime.date.today().isoformat()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    header = (f"DoRA CPU benchmark, {date}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}, torch {torch.__version__}, peft {peft.__version__}; "
              f"nn.Linear({K}, {N}), M={M}, r={r}, lora_alpha={2 * r}, fp32; {rounds} rounds of {repeats} "
              f"interleaved runs, {'CPU time of the one thread' if cpu_time else 'wall time'}; "
              f"load average at the end {load}")
    lines = [f"# {header}", "",
             "Times in ms: median over rounds (min-max of the round medians). Ratios are taken within each round.", "",
             "| setting | what | minilora LoRA | minilora DoRA | peft LoRA | peft DoRA | "
             "minilora DoRA / minilora LoRA | minilora DoRA / peft DoRA | peft DoRA / peft LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = {"random": "random factors, dropout 0", "trained": "trained-size, dropout 0",
             "dropout": "random factors, dropout 0.05"}
    for setting in ("random", "trained", "dropout"):
        for mode in ("forward", "train"):
            if (setting, "minilora DoRA", mode) not in R[0]:
                continue
            lora_setting = "random" if setting == "trained" else setting  # same cost, see bench()
            cells = []
            for kind in KINDS:
                s = lora_setting if "LoRA" in kind else setting
                cells.append(_stat(t(s, kind, mode), 1e3))
            ours = (setting, "minilora DoRA", mode)
            cells.append(_stat(ratio(ours, (lora_setting, "minilora LoRA", mode)), fmt="{:.3f}"))
            cells.append(_stat(ratio(ours, (setting, "peft DoRA", mode)), fmt="{:.3f}"))
            cells.append(_stat(ratio((setting, "peft DoRA", mode), (lora_setting, "peft LoRA", mode)), fmt="{:.3f}"))
            what = "forward" if mode == "forward" else "forward+backward"
            lines.append(f"| {names[setting]} | {what} | " + " | ".join(cells) + " |")

    out_in, mem = res["out_in"], res["memory"]
    lines += ["", f"Memory of one training step (forward+backward; out x in = {out_in:,} elements, "
                  f"M x out = {res['M'] * N:,}): the largest tensor an op allocates, how many allocations hold "
                  ">= out x in elements, and the peak of allocated minus freed bytes in the step "
                  "(torch.profiler allocation events; the output, x.grad and the factors' grads are in it).", "",
              "| setting | layer | largest allocation | made by | allocations >= out x in | peak in step |",
              "|---|---|---|---|---|---|"]
    for (setting, kind), m in mem.items():
        lines.append(f"| {names[setting]} | {kind} | {m['largest']:,} elements, {m['bytes'] / 2**20:.1f} MiB | "
                     f"{m['op']} | {m['full']} | "
                     f"{m['peak'] / 2**20:.1f} MiB |")

    goals = []
    for setting in ("random", "trained"):
        ours = (setting, "minilora DoRA", "train")
        vs_lora = statistics.median(ratio(ours, ("random", "minilora LoRA", "train")))
        vs_peft = statistics.median(ratio(ours, (setting, "peft DoRA", "train")))
        full = mem[setting, "minilora DoRA"]["full"]
        goals += [(f"{names[setting]}: minilora DoRA / minilora LoRA, forward+backward", f"{vs_lora:.3f}",
                   f"<= {GOAL_VS_LORA}", vs_lora <= GOAL_VS_LORA),
                  (f"{names[setting]}: minilora DoRA / peft DoRA, forward+backward", f"{vs_peft:.3f}",
                   f"<= {GOAL_VS_PEFT}", vs_peft <= GOAL_VS_PEFT),
                  (f"{names[setting]}: minilora DoRA allocations >= out x in in a training step", str(full),
                   "0", full == 0)]
    lines += ["", "| goal (medians) | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {what} | {value} | {target} | {'yes' if ok else 'NO'} |" for what, value, target, ok in goals]
    c = res["checks"]
    lines += ["", f"Median ‖s·(BA)_i‖ / ‖W_i‖: random factors {c['delta ratio random']:.2f}, trained-size "
                  f"{c['delta ratio trained']:.2f}. Checked before timing: all four outputs against an fp64 "
                  f"reference (largest error / rounding bound {c['output err / bound']:.3f}), minilora's gradients "
                  f"against peft's (largest difference {c['grad diff / max']:.1e} of the largest gradient)."]
    return "\n".join(lines) + "\n", all(ok for *_, ok in goals)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (checks the script)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 15)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all layers (default 5)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one torch thread, timed by its CPU time: steadier on a shared, loaded machine")
    args = parser.parse_args(argv)
    global _clock
    if args.cpu_time:
        torch.set_num_threads(1)
        _clock = time.thread_time
    warnings.filterwarnings("ignore")
    M, K, N, r = (16, 256, 256, 4) if args.quick else (512, 2048, 2048, 16)
    repeats = args.repeats or (3 if args.quick else 15)
    rounds = args.rounds or (1 if args.quick else 5)
    res = bench(M, K, N, r, repeats, rounds)
    text, met = report(res, M, K, N, r, repeats, rounds, cpu_time=args.cpu_time)
    print(text)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        suffix = "-cputime" if args.cpu_time else ""
        path = os.path.join(args.out, f"dora-cpu-{datetime.date.today().isoformat()}{suffix}.md")
        with open(path, "w") as f:
            f.write(text)
        print(f"written: {path}")
    print("all goals met" if met else "goals NOT all met (see the table)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
