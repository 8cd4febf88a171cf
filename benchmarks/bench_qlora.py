"""QLoRA CPU benchmark: minilora vs peft in one run (issue: QLoRA training-step speed and memory goals).

A ~100M-parameter Llama-shaped model (hidden 768, intermediate 2048, 8 layers, 12 heads, vocab
32000, untied lm_head: 105.8M parameters), randomly initialised and saved once to a temporary
folder, is loaded with bitsandbytes 4-bit NF4 + double quantization on the CPU, prepared with each
library's ``prepare_model_for_kbit_training`` (gradient checkpointing on, reentrant, as QLoRA
recipes do) and given LoRA r=16, lora_alpha=32, dropout 0.05 on q,k,v,o,gate,up,down. A training
step is: causal-LM loss on a batch of 8 x 128 random tokens, backward, AdamW step on the adapter
parameters, zero_grad(set_to_none=True): about 2 s on 2 idle cores. Compute dtype bf16 by default (about 15%
faster than fp32 on a CPU with AVX512-BF16/AMX; ``--compute-dtype float32`` for the other, whose
report is written with a ``-fp32`` suffix).

Measured:
  * time per step: both models live in this process; after ``--warmup`` steps each, ``--steps``
    steps each are run interleaved (minilora, peft, peft, minilora, ...: the first in each pair
    alternates) so background load falls on both alike. Reported: each library's median and range,
    the median (and range) of the within-pair ratios minilora / peft, which is the goal ratio, the
    fastest step of each, and the same for the process's CPU time (user+system, all threads);
  * memory: each library's step runs in its own fresh subprocess (``--memory-repeats`` times each,
    interleaved): the process RSS once the model is loaded, prepared and adapted; the peak RSS
    (VmHWM, reset through /proc/self/clear_refs just before the step) over two training steps, the
    first of which creates AdamW's state; and the peak of tensor bytes allocated minus freed in a
    third step, from torch.profiler's allocation events (allocator-independent). Twice: with
    glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=131072: reproducible to ~1 MiB; the goal
    uses this) and with glibc's defaults (what a user gets; tens of MiB apart between processes);
  * both again with gradient checkpointing off (``use_gradient_checkpointing=False``; fresh models
    for the timing too). Reported, no goal.

Before timing, the two models must compute the same thing: the same adapter weights (minilora's
A and a small random B, copied into peft), dropout set to 0 for the check, one training-mode
forward+backward each; the logits, the loss and every adapter gradient are compared. (Not an
eval-mode forward: bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 inference
kernel on the first eval forward without grad, and later training forwards would run on that
inference path: bf16, and no gradient to the layer's input.)

Goals: time per step minilora / peft <= 1.0 and peak RSS minilora <= peft (gradient checkpointing on).

Usage: PYTHONSAFEPATH=1 python benchmarks/bench_qlora.py [--out benchmarks/results] [--quick]
Writes benchmarks/results/qlora-cpu-<date>.md and prints the same report. Needs peft, transformers
and bitsandbytes (>= 0.48 runs 4-bit layers on the CPU). ``--quick``: a tiny model, for smoke runs.
PYTHONSAFEPATH=1: the repo's kernels/ folder must not shadow Hugging Face's ``kernels`` package
(bitsandbytes imports it).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from gc import collect as gc_collect

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LIBS = ("minilora", "peft")
GOAL_TIME = 1.0
FULL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
            num_key_value_heads=12, vocab_size=32000, batch=8, seq=128)
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512, batch=2, seq=32)
R, ALPHA, DROPOUT = 16, 32, 0.05
GC_KWARGS = {"use_reentrant": True}  # what both libraries use by default, passed to silence torch's warning


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# ---------------------------------------------------------------- model
def save_model(shape: dict, folder: str) -> int:
    """A random-init Llama of ``shape`` saved (fp32 safetensors) to ``folder``; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in shape.items() if k not in ("batch", "seq")}
    config = LlamaConfig(**fields, max_position_embeddings=max(512, shape["seq"]), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return count


def load_model(folder: str, compute_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                               bnb_4bit_use_double_quant=True)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu",
                                                dtype=torch.float32)


def build(lib: str, folder: str, compute_dtype: torch.dtype, gc: bool):
    """(model to call, the transformers model inside it) for ``lib``, QLoRA recipe applied."""
    model = load_model(folder, compute_dtype)
    if lib == "minilora":
        import minilora

        minilora.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                 gradient_checkpointing_kwargs=GC_KWARGS)
        minilora.inject(model, targets=TARGETS, r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT)
        return model, model
    import peft

    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                 gradient_checkpointing_kwargs=GC_KWARGS)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                         target_modules=TARGETS, task_type="CAUSAL_LM"))
    return wrapped, wrapped.base_model.model


def _pairs(ours, theirs):
    """(minilora layer, peft layer) for every adapted module."""
    from minilora.inject import lora_layers

    from minilora.quantized import LoraLinear4bit
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    pairs = [(layer, theirs.get_submodule(name)) for name, layer in lora_layers(ours)]
    assert len(pairs) == len(TARGETS) * ours.config.num_hidden_layers, len(pairs)
    assert all(isinstance(a, LoraLinear4bit) and isinstance(b, PeftLinear4bit) for a, b in pairs), \
        {(type(a).__name__, type(b).__name__) for a, b in pairs}
    return pairs


def _set_dropout(pairs, p: float) -> None:
    for ours, theirs in pairs:
        ours.adapters["default"].dropout = p
        theirs.lora_dropout["default"].p = p


def same_weights_and_check(models: dict, batch) -> dict:
    """Give peft minilora's adapter weights (B made small and random, so the branch counts), then
    check, with dropout 0, that one training-mode forward+backward gives the same logits, loss and
    adapter gradients. Returns the largest differences."""
    pairs = _pairs(models["minilora"][1], models["peft"][1])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a, b in pairs:
            adapter = a.adapters["default"]
            adapter.lora_B.copy_(0.01 * torch.randn(adapter.lora_B.shape, generator=gen))
            b.lora_A["default"].weight.copy_(adapter.lora_A)
            b.lora_B["default"].weight.copy_(adapter.lora_B)
    _set_dropout(pairs, 0.0)
    out = {}
    for lib, (model, _) in models.items():
        model.train()
        result = model(**batch)
        result.loss.backward()
        out[lib] = result.logits.detach(), result.loss.detach()
    _set_dropout(pairs, DROPOUT)
    (logits_a, loss_a), (logits_b, loss_b) = out["minilora"], out["peft"]
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    worst_grad = 0.0
    for a, b in pairs:
        adapter = a.adapters["default"]
        for ga, gb in ((adapter.lora_A.grad, b.lora_A["default"].weight.grad),
                       (adapter.lora_B.grad, b.lora_B["default"].weight.grad)):
            rel = ((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-30)).item()
            if not rel <= 1e-3:
                raise AssertionError(f"adapter gradients differ by {rel:.3g} of their largest element: "
                                     "the benchmark would compare different computations")
            worst_grad = max(worst_grad, rel)
    for model, _ in models.values():
        model.zero_grad(set_to_none=True)
    return {"logits": (logits_a - logits_b).abs().max().item(), "loss": abs(loss_a.item() - loss_b.item()),
            "grad": worst_grad}


def make_batch(shape: dict) -> dict:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=gen)
    return {"input_ids": ids, "labels": ids}


def make_step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ---------------------------------------------------------------- timing (one process, interleaved)
def time_steps(steps: dict, warmup: int, repeats: int) -> dict:
    """Interleaved steps: round i runs both libraries, the first alternating. Wall time, and this
    process's CPU time (all threads: less sensitive to other jobs taking the cores)."""
    times = {lib: [] for lib in LIBS}
    cpu = {lib: [] for lib in LIBS}
    for i in range(warmup + repeats):
        order = LIBS if i % 2 == 0 else LIBS[::-1]
        for lib in order:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[lib]()
            if i >= warmup:
                times[lib].append(time.perf_counter() - t0)
                cpu[lib].append(time.process_time() - c0)
    return {"times": times, "ratios": [a / b for a, b in zip(times["minilora"], times["peft"])],
            "cpu": cpu, "cpu_ratios": [a / b for a, b in zip(cpu["minilora"], cpu["peft"])]}


def profile_step(step, top: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ---------------------------------------------------------------- memory (one fresh process per measurement)
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _tensor_peak(step) -> int:
    """Peak of tensor bytes allocated minus freed during ``step`` (torch.profiler allocation events)."""
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


def memory_child(lib: str, folder: str, shape: dict, compute_dtype: torch.dtype, gc: bool) -> dict:
    """Runs in a fresh process: RSS after setup, peak RSS over two steps, tensor peak of a third."""
    _quiet()
    import peft  # noqa: F401  both libraries' imports in both processes: the same baseline
    import minilora  # noqa: F401

    base = _status_kib("VmRSS")
    model, _ = build(lib, folder, compute_dtype, gc)
    batch = make_batch(shape)
    step = make_step(model, batch)
    model.train()
    setup_peak = _status_kib("VmHWM")
    # Loading leaves a library-independent 0-100 MiB of freed heap in the RSS, different from one
    # process to the next (glibc keeps it); hand it back so that the step is measured from the
    # tensors the setup really holds, the same for both libraries.
    gc_collect()
    _malloc_trim()
    after_setup = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS, Linux >= 4.0
    step()
    step()
    step_peak = _status_kib("VmHWM")
    return {"imports": base, "setup_peak": setup_peak, "after_setup": after_setup, "step_peak": step_peak,
            "tensor_peak": _tensor_peak(step) // 1024}


# glibc's default: malloc gives freed heap back to the system only now and then and moves its mmap
# threshold up after large frees, so a step's peak RSS varies by ~40 MiB from process to process
# whatever the library. With the threshold pinned, every tensor over 128 KiB is its own mapping,
# unmapped when freed: the peak is reproducible to ~1 MiB. Both are measured; the goal uses "pinned".
ALLOCATORS = {"pinned": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "glibc default": {}}


def run_memory(folder: str, quick: bool, dtype_name: str, gc: bool, allocator: str, repeats: int) -> dict:
    """``repeats`` fresh processes per library, interleaved; their ``memory_child`` results."""
    results = {lib: [] for lib in LIBS}
    for i in range(repeats):
        for lib in (LIBS if i % 2 == 0 else LIBS[::-1]):
            cmd = [sys.executable, os.path.abspath(__file__), "--_memory", lib, "--_folder", folder,
                   "--compute-dtype", dtype_name, "--_gc", str(int(gc))] + (["--quick"] if quick else [])
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            env.update(ALLOCATORS[allocator], PYTHONSAFEPATH="1")
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("MEMORY ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"memory subprocess for {lib} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            results[lib].append(json.loads(lines[-1][len("MEMORY "):]))
    return results


# ---------------------------------------------------------------- report
def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cells(samples: dict, num, unit: str, spread_min: float) -> tuple[str, str, float]:
    """'median unit (min-max)' per library and the ratio of the medians; the range only if it is
    at least ``spread_min`` wide. ``num`` formats one value without its unit."""
    cells, med = [], {}
    for lib in LIBS:
        xs = samples[lib]
        med[lib] = statistics.median(xs)
        cell = f"{num(med[lib])} {unit}"
        if len(xs) > 1 and max(xs) - min(xs) >= spread_min:
            cell += f" ({num(min(xs))}-{num(max(xs))})"
        cells.append(cell)
    return cells[0], cells[1], med["minilora"] / med["peft"]


MEMORY_ROWS = (  # (what, key or None for the growth, shown without checkpointing too)
    ("peak RSS in the step", "step_peak", True),
    ("RSS growth in the step (peak - RSS after setup)", None, True),
    ("peak tensor bytes in a step (torch.profiler)", "tensor_peak", True),
    ("RSS after load + prepare + adapters", "after_setup", False),
    ("peak RSS during load + prepare + adapters", "setup_peak", False),
)


def report(meta: dict, timing: dict, memory: dict) -> tuple[str, dict]:
    import bitsandbytes
    import peft
    import transformers

    s = meta["shape"]
    lines = [
        f"# QLoRA CPU benchmark, {meta['date']}: minilora vs peft, one training step",
        "",
        f"Machine: {platform.machine()}, {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads; load average {meta['load_start']} at the start, {os.getloadavg()[0]:.1f} at the end (other jobs "
        "shared the CPU: hence the interleaving and medians).",
        f"Versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, Python {platform.python_version()}.",
        "",
        f"Model: Llama, hidden {s['hidden_size']}, intermediate {s['intermediate_size']}, {s['num_hidden_layers']} "
        f"layers, {s['num_attention_heads']} heads, vocab {s['vocab_size']}, untied lm_head: "
        f"{meta['params'] / 1e6:.1f}M parameters, random init; loaded in 4-bit NF4 with double quantization, "
        f"compute dtype {meta['dtype']}, device_map=cpu ({meta['quantized']} Linear4bit layers). LoRA r={R}, "
        f"lora_alpha={ALPHA}, dropout {DROPOUT} on {','.join(t.split('_')[0] for t in TARGETS)} "
        f"({meta['trainable'] / 1e6:.2f}M trainable). Step: batch {s['batch']} x {s['seq']} tokens, causal-LM loss, "
        "backward, AdamW, zero_grad. Each library's own prepare_model_for_kbit_training (reentrant gradient "
        "checkpointing unless said otherwise).",
        f"Same computation checked first (dropout 0, training mode, same adapter weights): logits differ by at most "
        f"{meta['check']['logits']:.2g}, loss by {meta['check']['loss']:.2g}, adapter gradients by "
        f"{meta['check']['grad']:.2g} of their largest element.",
        "",
        "Time: both models in one process, steps interleaved; median (range) of each library's steps, and the "
        "median (range) of the within-pair ratios (the goal's ratio); CPU time is this process's user+system time "
        "in the step, less sensitive to other jobs than wall time. Memory: one fresh process per measurement, median (range where "
        "it is >= 1 MiB) of the repeats; \"pinned\": MALLOC_MMAP_THRESHOLD_=131072 (reproducible to ~1 MiB), "
        "\"glibc default\": no setting (what a user gets; varies by tens of MiB between processes).",
        "",
        "| what | minilora | peft | minilora / peft | goal |",
        "|---|---|---|---|---|",
    ]
    verdict = {}
    for gc in meta["gc_modes"]:
        label = "checkpointing " + ("on" if gc else "off")
        t = timing[gc]
        a, b, _ = _cells(t["times"], "{:.2f}".format, "s", 0.0)
        ratio = statistics.median(t["ratios"])
        lines.append(f"| time per step, {label} ({len(t['ratios'])} steps each) | {a} | {b} | {ratio:.3f} "
                     f"({min(t['ratios']):.2f}-{max(t['ratios']):.2f}) | {f'<= {GOAL_TIME}' if gc else '-'} |")
        if gc:
            verdict["time per step"] = ratio <= GOAL_TIME
        fast = {lib: min(t["times"][lib]) for lib in LIBS}
        lines.append(f"| fastest step (least disturbed by other jobs), {label} | {fast['minilora']:.2f} s | "
                     f"{fast['peft']:.2f} s | {fast['minilora'] / fast['peft']:.3f} | - |")
        a, b, _ = _cells(t["cpu"], "{:.2f}".format, "s", 0.0)
        cpu_ratio = statistics.median(t["cpu_ratios"])
        lines.append(f"| CPU time per step (all threads), {label} | {a} | {b} | {cpu_ratio:.3f} "
                     f"({min(t['cpu_ratios']):.2f}-{max(t['cpu_ratios']):.2f}) | - |")
    for (gc, allocator), mem in memory.items():
        label = "checkpointing " + ("on" if gc else "off") + f", {allocator}"
        for what, key, always in MEMORY_ROWS:
            if not (gc and allocator == "pinned") and not always:
                continue
            if key == "tensor_peak" and allocator != "pinned":
                continue  # the same tensors whatever malloc does
            samples = {lib: [m[key] if key else m["step_peak"] - m["after_setup"] for m in mem[lib]] for lib in LIBS}
            a, b, r = _cells(samples, lambda kib: f"{kib / 1024:.0f}", "MiB", 1024)
            goal = "<= peft" if key == "step_peak" and gc and allocator == "pinned" else "-"
            lines.append(f"| {what}, {label} ({len(mem['minilora'])} run{'s' if len(mem['minilora']) > 1 else ''} each) | {a} | {b} | {r:.3f} | {goal} |")
            if goal != "-":
                verdict["peak memory"] = r <= 1.0
    lines.append("")
    if meta.get("quick"):
        lines.append("Smoke run (--quick: a tiny model, two steps): no goal verdict.")
    else:
        lines.append("Goals (gradient checkpointing on): "
                     + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in verdict.items()) + ".")
    return "\n".join(lines) + "\n", verdict


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run")
    parser.add_argument("--steps", type=int, help="timed steps per library (default 15, quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps per library first (default 2, quick 1)")
    parser.add_argument("--memory-repeats", type=int, help="memory subprocesses per library (default 2, quick 1)")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="bnb_4bit_compute_dtype, the same for both libraries (default bfloat16)")
    parser.add_argument("--no-gc-off", action="store_true", help="skip the runs without gradient checkpointing")
    parser.add_argument("--profile", action="store_true", help="print each library's top ops for one step")
    parser.add_argument("--_memory", choices=LIBS, help=argparse.SUPPRESS)
    parser.add_argument("--_folder", help=argparse.SUPPRESS)
    parser.add_argument("--_gc", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    dtype = getattr(torch, args.compute_dtype)
    _quiet()

    if args._memory:  # child process of run_memory
        result = memory_child(args._memory, args._folder, shape, dtype, bool(args._gc))
        print("MEMORY " + json.dumps(result), flush=True)
        return

    import bitsandbytes as bnb

    steps = args.steps or (2 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    memory_repeats = args.memory_repeats or (1 if args.quick else 2)
    gc_modes = (True,) if args.no_gc_off or args.quick else (True, False)
    meta = {"date": datetime.date.today().isoformat(), "shape": shape, "dtype": args.compute_dtype,
            "load_start": f"{os.getloadavg()[0]:.1f}", "gc_modes": gc_modes, "quick": args.quick}
    batch = make_batch(shape)
    folder = tempfile.mkdtemp(prefix="bench_qlora_")
    try:
        t0 = time.perf_counter()
        meta["params"] = save_model(shape, folder)
        print(f"model: {meta['params']:,} parameters ({meta['params'] / 1e6:.1f}M), saved in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        timing, meta["check"] = {}, {}
        for gc in gc_modes:  # each library's own recipe for each mode: fresh models
            label = f"gradient checkpointing {'on' if gc else 'off'}"
            models = {lib: build(lib, folder, dtype, gc=gc) for lib in LIBS}
            meta["quantized"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in models["peft"][1].modules())
            meta["trainable"] = sum(p.numel() for p in models["minilora"][1].parameters() if p.requires_grad)
            theirs_trainable = sum(p.numel() for p in models["peft"][0].parameters() if p.requires_grad)
            assert meta["trainable"] == theirs_trainable, (meta["trainable"], theirs_trainable)
            check = same_weights_and_check(models, batch)
            for key, value in check.items():
                meta["check"][key] = max(meta["check"].get(key, 0.0), value)
            print(f"{label}: same computation, largest differences {check}", flush=True)
            step_fns = {lib: make_step(model, batch) for lib, (model, _) in models.items()}
            t0 = time.perf_counter()
            timing[gc] = t = time_steps(step_fns, warmup, steps)
            print(f"timing, {label}: "
                  + ", ".join(f"{lib} {statistics.median(t['times'][lib]):.3f} s" for lib in LIBS)
                  + f", ratio {statistics.median(t['ratios']):.3f}, CPU-time ratio "
                  f"{statistics.median(t['cpu_ratios']):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if args.profile:
                for lib in LIBS:
                    print(f"--- {lib}, {label}: top ops by self CPU time")
                    print(profile_step(step_fns[lib]), flush=True)
            del models, step_fns

        memory = {}
        runs = [(gc, "pinned") for gc in gc_modes] + ([] if args.quick else [(True, "glibc default")])
        for gc, allocator in runs:
            t0 = time.perf_counter()
            memory[gc, allocator] = mem = run_memory(folder, args.quick, args.compute_dtype, gc, allocator,
                                                     memory_repeats)
            print(f"memory, gradient checkpointing {'on' if gc else 'off'}, {allocator}: "
                  + ", ".join(f"{lib} step peak {_mib(statistics.median(m['step_peak'] for m in mem[lib]))}"
                              for lib in LIBS) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    text, _ = report(meta, timing, memory)
    print()
    print(text)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        suffix = "" if args.compute_dtype == parser.get_default("compute_dtype") else "-fp32"
        path = os.path.join(args.out, f"qlora-cpu-{meta['date']}{suffix}.md")
        with open(path, "w") as f:
            f.write(text)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
