"""CPU benchmark: minilora vs peft in one run (issue: core library speed goals).

Measures, on this machine's CPU threads:
  * a LoRA Linear's forward and forward+backward at M=512, K=N=2048, r=16, fp32
    (goal: minilora / peft <= 1.0), with dropout 0;
  * inject time on a Llama-7B-shaped model built on the meta device with the 7 usual targets and
    modules_to_save=['lm_head', 'embed_tokens'] (goal <= 0.1 s; peft takes about 0.6 s).

Usage: python benchmarks/bench_cpu.py [--out benchmarks/results] [--quick]
Writes benchmarks/results/cpu-<date>.md and prints the same table. peft is a benchmark-only
dependency (pip install peft).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn as nn

TARGETS = ["k_proj", "q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def _median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layers(M: int, K: int, N: int, r: int):
    import peft
    import minilora

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(K, N))
    ours = minilora.inject(copy.deepcopy(base), targets=["0"], r=r, lora_alpha=2 * r, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * r,
                                                                       init_lora_weights=False))
    from minilora.inject import lora_layers
    (_, layer), = lora_layers(ours)
    peft_layer = theirs.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.adapters["default"].lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.adapters["default"].lora_B)
    x = torch.randn(M, K)
    # Same numbers first: a benchmark of two different computations would mean nothing.
    torch.testing.assert_close(layer(x), peft_layer(x), rtol=1e-5, atol=1e-5)
    return layer, peft_layer, x


def bench_layer(M: int, K: int, N: int, r: int, repeats: int) -> dict[str, float]:
    layer, peft_layer, x = _layers(M, K, N, r)
    xg = x.clone().requires_grad_(True)
    out = {}
    for label, module in (("minilora", layer), ("peft", peft_layer)):
        module.train()
        with torch.no_grad():
            out[f"{label} forward"] = _median_time(lambda: module(x), repeats)

        def step():
            module(xg).sum().backward()
        out[f"{label} forward+backward"] = _median_time(step, repeats)
    return out


def bench_inject(repeats: int) -> dict[str, float]:
    import peft
    import minilora
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig()  # the 7B shape: 32 layers, hidden 4096, MLP 11008, vocab 32000

    def fresh():
        with torch.device("meta"):
            return LlamaForCausalLM(config)

    def ours():
        minilora.inject(fresh(), targets=TARGETS, r=16, lora_alpha=32, modules_to_save=["lm_head", "embed_tokens"])

    def theirs():
        peft.get_peft_model(fresh(), peft.LoraConfig(target_modules=TARGETS, r=16, lora_alpha=32,
                                                     modules_to_save=["lm_head", "embed_tokens"]))

    build = _median_time(fresh, repeats, warmup=1)
    return {"minilora inject": _median_time(ours, repeats, warmup=1) - build,
            "peft inject": _median_time(theirs, repeats, warmup=1) - build}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (checks the script)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    M, K, N, r = (64, 128, 128, 16) if args.quick else (512, 2048, 2048, 16)
    repeats = 3 if args.quick else 30
    t = bench_layer(M, K, N, r, repeats)
    t.update(bench_inject(1 if args.quick else 5))
    rows = [
        ("LoRA Linear forward", t["minilora forward"], t["peft forward"], "<= 1.0"),
        ("LoRA Linear forward+backward", t["minilora forward+backward"], t["peft forward+backward"], "<= 1.0"),
        ("inject, Llama-7B shape on meta", t["minilora inject"], t["peft inject"], "minilora <= 0.1 s"),
    ]
    date = datetime.date.today().isoformat()
    header = (f"CPU benchmark, {date}: {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"layer M={M}, K={K}, N={N}, r={r}, fp32, dropout 0; median of {repeats} runs")
    lines = [f"# {header}", "", "| what | minilora | peft | minilora / peft | goal |", "|---|---|---|---|---|"]
    for what, ours, theirs, goal in rows:
        lines.append(f"| {what} | {ours * 1e3:.2f} ms | {theirs * 1e3:.2f} ms | {ours / theirs:.3f} | {goal} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"cpu-{date}.md")
        with open(path, "w") as f:
            f.write(report)
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
