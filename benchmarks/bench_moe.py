"""MoE CPU benchmark: LoRA on the experts of one MoE layer (``target_parameters``), minilora vs peft
in one run.

One Mixtral sparse-MoE block from a transformers config (router + 8 experts, top-2; hidden 512,
intermediate 1024, fp32), LoRA r=16, lora_alpha=32 on ``experts.gate_up_proj`` (8, 2048, 512) and
``experts.down_proj`` (8, 512, 1024), M=256 tokens. Both libraries fold every expert's update into
the stack before the block's own forward (peft: one ``baddbmm`` inside a parametrization;
minilora: one ``baddbmm`` in ``ops.param_weight``, the stack lent to the module), so the cost is
the fold, the experts' matmuls and the backward through both.

Measured: forward (no grad) and forward+backward (a fixed output gradient, the input requiring
grad, grads set to None between steps), for transformers' two CPU experts implementations:
``grouped_mm`` (its default) and ``eager`` (a Python loop over the hit experts, in the model
code). The plain block (no LoRA) is timed alongside. In each of ``--rounds`` rounds every
measurement runs ``--repeats`` times, interleaved in a random order (load from other processes
hits all alike); a round gives each median, ratios are taken within a round, the report gives
the median over rounds and the min-max. Goal: minilora <= 1.0 x peft (forward+backward).

Usage: python benchmarks/bench_moe.py [--out benchmarks/results] [--quick] [--cpu-time]
Writes benchmarks/results/moe-cpu-<date>.md (with --cpu-time: moe-cpu-<date>-cputime.md) and
prints it. peft is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import random
import statistics
import time
import warnings

import torch

GOAL = 1.0
#: the clock: wall time, or with --cpu-time this thread's CPU time (one torch thread; on CPU the
#: backward runs on the calling thread too), which other processes' load barely moves.
_clock = time.perf_counter
KINDS = ("base", "minilora", "peft")
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _blocks(hidden: int, intermediate: int, experts: int, r: int, implementation: str) -> dict:
    """The plain block and both adapted copies, minilora's random factors copied into peft."""
    import peft
    import transformers as tf
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    import minilora
    from minilora.checkpoint import adapter_state_dict

    torch.manual_seed(0)
    config = tf.MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=experts,
                              num_experts_per_tok=2)
    config._experts_implementation = implementation
    base = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.02)
    fields = dict(target_modules=[], target_parameters=TARGETS, r=r, lora_alpha=2 * r, init_lora_weights=False)
    ours = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(**fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    peft.set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    return {"base": base, "minilora": ours, "peft": theirs}


def _check(blocks: dict, x: torch.Tensor, gy: torch.Tensor) -> tuple[float, float]:
    """(output difference, gradient difference) of minilora vs peft, relative to the largest value."""
    outs, grads = {}, {}
    for kind in ("minilora", "peft"):
        xi = x.clone().requires_grad_(True)
        y = blocks[kind](xi)
        y.backward(gy)
        outs[kind], grads[kind] = y.detach(), xi.grad
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return rel(outs["minilora"], outs["peft"]), rel(grads["minilora"], grads["peft"])


def _steps(block, x: torch.Tensor, gy: torch.Tensor) -> dict:
    def forward():
        with torch.no_grad():
            block(x)

    def train_step():
        xi = x.detach().requires_grad_(True)
        block(xi).backward(gy)
        for p in block.parameters():
            p.grad = None

    return {"forward": forward, "forward+backward": train_step}


def _interleaved(fns: dict, repeats: int, rng: random.Random) -> dict:
    """Median seconds of each fn over ``repeats`` timed calls, in a shuffled order each time, each
    after an untimed call of the same fn."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        order = list(fns)
        rng.shuffle(order)
        for key in order:
            fns[key]()
            start = _clock()
            fns[key]()
            times[key].append(_clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(M: int, hidden: int, intermediate: int, experts: int, r: int, repeats: int, rounds: int) -> dict:
    results = {}
    for implementation in ("grouped_mm", "eager"):
        blocks = _blocks(hidden, intermediate, experts, r, implementation)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, M, hidden, generator=g)
        gy = torch.randn(1, M, hidden, generator=g)
        check = _check(blocks, x, gy)
        fns = {(kind, what): fn for kind in KINDS for what, fn in _steps(blocks[kind], x, gy).items()}
        rng = random.Random(0)
        per_round = [_interleaved(fns, repeats, rng) for _ in range(rounds)]
        results[implementation] = (per_round, check)
    return results


def _stat(values: list[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    values = [v * scale for v in values]
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(results: dict, args, shapes: str) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    import peft
    lines = [f"# MoE CPU benchmark, {datetime.date.today()}{' (QUICK: tiny shapes)' if args.quick else ''}: "
             f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, peft {peft.__version__}; {shapes}; {args.rounds} rounds of {args.repeats} "
             f"interleaved runs, {'CPU time of one thread' if args.cpu_time else 'wall time'}; load average at the end {load}", "",
             "Times in ms: median over rounds (min-max of the round medians). Ratios are taken within each round.", "",
             "| experts implementation | what | base (no LoRA) | minilora | peft | minilora / peft |",
             "|---|---|---|---|---|---|"]
    goals = []
    for implementation, (per_round, _) in results.items():
        for what in ("forward", "forward+backward"):
            cols = [_stat([r[(k, what)] for r in per_round], 1e3) for k in KINDS]
            ratios = [r[("minilora", what)] / r[("peft", what)] for r in per_round]
            lines.append(f"| {implementation} | {what} | {' | '.join(cols)} | {_stat(ratios, fmt='{:.3f}')} |")
            if what == "forward+backward":
                goals.append((implementation, statistics.median(ratios)))
    lines += ["", "| goal (median) | measured | target | met |", "|---|---|---|---|"]
    for implementation, ratio in goals:
        lines.append(f"| {implementation}: minilora / peft, forward+backward | {ratio:.3f} | <= {GOAL} | "
                     f"{'yes' if ratio <= GOAL else 'NO'} |")
    checks = "; ".join(f"{impl}: output {c[0]:.1e}, input gradient {c[1]:.1e}" for impl, (_, c) in results.items())
    lines += ["", f"Checked before timing, minilora against peft on the same factors (largest difference relative "
                  f"to the largest value, fp32): {checks}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (checks the script)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 10)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all measurements (default 5)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one torch thread, timed by this thread's CPU time (steadier on a loaded machine)")
    args = parser.parse_args(argv)
    if args.cpu_time:
        global _clock
        _clock = time.thread_time
        torch.set_num_threads(1)
    M, hidden, intermediate, experts, r = (16, 32, 48, 4, 2) if args.quick else (256, 512, 1024, 8, 16)
    args.repeats = args.repeats or (2 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 5)
    shapes = (f"Mixtral sparse-MoE block, hidden {hidden}, intermediate {intermediate}, {experts} experts, top-2, "
              f"M={M} tokens, r={r}, lora_alpha={2 * r}, fp32")
    text = report(bench(M, hidden, intermediate, experts, r, args.repeats, args.rounds), args, shapes)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    name = f"moe-cpu-{datetime.date.today()}{'-cputime' if args.cpu_time else ''}{'-quick' if args.quick else ''}.md"
    with open(os.path.join(args.out, name), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
