"""Hot-swapping under torch.compile on the CPU: the time of a swap, and of the first forward after
it, with and without ``prepare_for_hotswap``; and what the padding costs an eager forward.

A 4-layer Llama (hidden 256, random weights), LoRA on q/k/v/o, one CPU thread, batch 4 x 64.
Four adapters: ranks 16, 4, 8, 16 and scalings 2, 2, 0.5, 1/16; the first is loaded, the other
three swapped in. Writes benchmarks/results/hotswap-cpu-<date>.md.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/bench_hotswap.py [--backends inductor aot_eager]
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
import warnings

import torch
import torch._dynamo
import transformers as tf

import minilora

SETUP = ("A 4-layer Llama (hidden 256, random weights), LoRA on q/k/v/o, one CPU thread, batch 4 x 64. Adapters of "
         "ranks 16, 4, 8, 16 and scalings 2, 2, 0.5, 1/16: the first loaded, the other three swapped in.")
ADAPTERS = [(16, 32), (4, 8), (8, 4), (16, 1)]  # (r, lora_alpha)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONFIG = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2)


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).eval()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def swaps(folder: str, backend: str, prepared: bool, x: torch.Tensor) -> tuple[list[float], list[float]]:
    """(seconds per swap, seconds of the first forward after each swap)."""
    torch._dynamo.reset()
    model = minilora.load_adapter(_base(), os.path.join(folder, "a0"))
    if prepared:
        minilora.prepare_for_hotswap(model, target_rank=max(r for r, _ in ADAPTERS))
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(input_ids=x)
        swap_s, call_s = [], []
        for i in range(1, len(ADAPTERS)):
            swap_s.append(_timed(lambda: minilora.hotswap_adapter(compiled, os.path.join(folder, f"a{i}"))))
            call_s.append(_timed(lambda: compiled(input_ids=x)))
    return swap_s, call_s


def padding_cost(x: torch.Tensor, repeats: int = 7) -> dict[str, float]:
    """Median eager forward seconds: r=16 as loaded, held scaling only, padded to 64."""
    models = {}
    for label, room in (("r=16", None), ("prepared, target_rank=16", 16), ("prepared, target_rank=64", 64)):
        model = minilora.inject(_base(), targets=TARGETS, r=16, lora_alpha=32, init_lora_weights=False)
        if room:
            minilora.prepare_for_hotswap(model, target_rank=room)
        models[label] = model
    times: dict[str, list[float]] = {label: [] for label in models}
    with torch.no_grad():
        for _ in range(repeats):
            for label, model in models.items():  # interleaved: drift hits every variant alike
                times[label].append(_timed(lambda: model(input_ids=x)))
    return {label: sorted(t)[len(t) // 2] for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["inductor", "aot_eager"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    x = torch.randint(0, CONFIG["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(1))
    lines = ["# Hot-swapping under torch.compile (CPU)", "", SETUP, "",
             "| backend | prepared | a swap | first forward after swaps 1, 2, 3 |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        for i, (r, alpha) in enumerate(ADAPTERS):
            model = minilora.inject(_base(), targets=TARGETS, r=r, lora_alpha=alpha, init_lora_weights=False)
            minilora.save_adapter(model, os.path.join(folder, f"a{i}"))
        for backend in args.backends:
            for prepared in (True, False):
                swap_s, call_s = swaps(folder, backend, prepared, x)
                lines.append(f"| {backend} | {'yes' if prepared else 'no'} | {min(swap_s) * 1e3:.0f}-"
                             f"{max(swap_s) * 1e3:.0f} ms | {', '.join(f'{s:.2f}' for s in call_s)} s |")
                print(lines[-1], flush=True)
    lines += ["", "Eager forward (median of 7):", ""]
    lines += [f"- {label}: {seconds * 1e3:.1f} ms" for label, seconds in padding_cost(x).items()]
    print("\n".join(lines[-3:]))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       f"hotswap-cpu-{datetime.date.today().isoformat()}.md")
    with open(out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
