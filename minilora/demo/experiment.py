"""The demo's experiment: the five scenarios, training one, the held-out evaluation, the check
that the best adapter merges into the base weights without changing the logits, and the outputs
(the markdown table and report, the loss-curve plot, results.json)."""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import minilora
from minilora.demo.tasks import Settings, Task

__all__ = ["MERGE_TOLERANCE", "Scenario", "scenarios", "evaluate", "train_scenario", "deterministic",
           "merge_check", "table", "plot", "describe_machine", "markdown", "results"]

MERGE_TOLERANCE = 1e-4  # max |merged - unmerged| logit, relative to the largest logit (fp32)


@dataclass
class Scenario:
    """One row of the experiment: what it trains, and (filled in by training) what it measured."""

    name: str
    lora_on: str
    full: list[str]
    config: minilora.LoraConfig | None  # None: no LoRA, only the head trains
    losses: list[float] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    accuracy: float = 0.0
    seconds: float = 0.0


def scenarios(task: Task, settings: Settings) -> list[Scenario]:
    """Head only, then LoRA on attention / attention + MLP, each without and with embeddings."""
    def config(targets: list[str], save: list[str]) -> minilora.LoraConfig:
        return minilora.LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, target_modules=targets,
                                   modules_to_save=save or None, task_type=task.task_type)

    # A sequence classifier's head is added to modules_to_save by task_type="SEQ_CLS".
    always = task.head if task.task_type == "SEQ_CLS" else []
    embeddings = list(dict.fromkeys(task.embeddings))
    out = [Scenario("head only", "-", task.head, None)]
    for label, targets in (("attention", task.attention), ("attention+MLP", task.attention + task.mlp)):
        shown = ", ".join(_short_names(targets, task.attention + task.mlp))
        out.append(Scenario(f"LoRA {label}", shown, always, config(targets, [])))
        out.append(Scenario(f"LoRA {label} + embeddings", shown, list(dict.fromkeys(always + embeddings)),
                            config(targets, embeddings)))
    return out


def _short_names(names: list[str], among: list[str]) -> list[str]:
    """The shortest dotted suffix of each name that no other name in ``among`` ends with, for
    display ("attention.self.query" -> "query"; "attention.output.dense" stays whole)."""
    out = []
    for name in names:
        parts = name.split(".")
        others = [o for o in among if o != name]
        out.append(next((".".join(parts[-d:]) for d in range(1, len(parts))
                         if not any(o == ".".join(parts[-d:]) or o.endswith("." + ".".join(parts[-d:]))
                                    for o in others)), name))
    return out


def evaluate(task: Task, model: nn.Module) -> float:
    model.eval()
    right = seen = 0
    with torch.no_grad():
        for batch in task.test:
            r, n = task.correct(model, batch)
            right, seen = right + r, seen + n
    return right / seen


def train_scenario(task: Task, scenario: Scenario, settings: Settings, seed: int,
                   on_step: Callable[[float], None] | None = None) -> nn.Module:
    """Train one scenario in place of its record (losses, counts, accuracy, seconds); returns the
    model. ``on_step(loss)`` is called after each step (the CLI's progress bar)."""
    torch.manual_seed(seed)  # same LoRA init and dropout masks in every scenario
    start = time.perf_counter()
    model = copy.deepcopy(task.model)
    if scenario.config is None:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in task.head:
            model.get_submodule(name).requires_grad_(True)
    else:
        minilora.inject(model, scenario.config)
    scenario.trainable, scenario.total = minilora.trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    model.train()
    for step in range(settings.steps):
        loss = task.loss(model, task.train[step % len(task.train)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scenario.losses.append(float(loss))
        if on_step is not None:
            on_step(scenario.losses[-1])
    scenario.accuracy = evaluate(task, model)
    scenario.seconds = time.perf_counter() - start
    return model


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """torch's deterministic algorithms inside, the caller's setting restored afterwards."""
    # Cheap on CPU (the deterministic kernels are the default ones there).
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _latency_ms(model: nn.Module, inputs: dict, repeats: int) -> float:
    with torch.no_grad():
        model(**inputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def merge_check(task: Task, model: nn.Module, settings: Settings) -> dict[str, float]:
    """Logits of the LoRA model vs the merged plain model, on every held-out batch, and the
    median latency of one held-out batch through each."""
    model.eval()
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in task.test]
    with torch.no_grad():
        before = [model(**x).logits for x in inputs]
    unmerged_ms = _latency_ms(model, inputs[0], settings.latency_repeats)
    plain = minilora.merge_and_unload(model)
    with torch.no_grad():
        after = [plain(**x).logits for x in inputs]
    merged_ms = _latency_ms(plain, inputs[0], settings.latency_repeats)
    gap = max(float((a - b).abs().max()) for a, b in zip(after, before))
    scale = max(float(b.abs().max()) for b in before)
    return {"max_abs_diff": gap, "max_abs_logit": scale, "relative": gap / max(scale, 1e-12),
            "unmerged_ms": unmerged_ms, "merged_ms": merged_ms}


def table(task: Task, rows: list[Scenario]) -> str:
    """The results as a markdown table, one row per scenario."""
    head = ("| scenario | LoRA on | trained in full | trainable params | trainable % | final loss | "
            f"{task.accuracy_name} | wall s |")
    lines = [head, "|" + "---|" * 8]
    for s in rows:
        tail = statistics.fmean(s.losses[-max(1, len(s.losses) // 10):])
        lines.append(f"| {s.name} | {s.lora_on} | {', '.join(s.full) or '-'} | {s.trainable:,d} | "
                     f"{100 * s.trainable / s.total:.2f} | {tail:.3f} | {100 * s.accuracy:.1f}% | {s.seconds:.1f} |")
    return "\n".join(lines)


def plot(rows: list[Scenario], path: Path, title: str, accuracy_name: str) -> None:
    """loss_curves.png: smoothed training losses (left) and held-out accuracy (right)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.get_cmap("tab10").colors
    for color, s in zip(colors, rows):
        steps = range(1, len(s.losses) + 1)
        ax_loss.plot(steps, s.losses, color=color, alpha=0.25, linewidth=1)
        smooth = s.losses[:1]
        for value in s.losses[1:]:  # exponential moving average, for a readable trend
            smooth.append(0.8 * smooth[-1] + 0.2 * value)
        ax_loss.plot(steps, smooth, color=color, linewidth=2, label=s.name)
    ax_loss.set(xlabel="training step", ylabel="training loss", title="training loss (smoothed; raw faint)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    names = [s.name.replace(" + ", "\n+ ") for s in rows]
    bars = ax_acc.barh(names, [100 * s.accuracy for s in rows], color=colors[: len(rows)])
    for bar_, s in zip(bars, rows):
        ax_acc.text(bar_.get_width() + 1, bar_.get_y() + bar_.get_height() / 2,
                    f"{100 * s.accuracy:.1f}%  ({100 * s.trainable / s.total:.2f}% trainable)", va="center", fontsize=8)
    ax_acc.set(xlim=(0, 130), xlabel=f"{accuracy_name} (%)", title=accuracy_name)
    ax_acc.invert_yaxis()
    ax_acc.tick_params(axis="y", labelsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_machine() -> str:
    """'AMD EPYC (x86_64), 2 CPU threads visible, torch 2.13.0 using 1 thread(s), Linux'."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
    return (f"{cpu or 'CPU'} ({platform.machine()}), {os.cpu_count()} CPU threads visible, torch {torch.__version__} "
            f"using {torch.get_num_threads()} thread(s), {platform.system()}")


def markdown(task: Task, rows: list[Scenario], best: Scenario, check: dict, settings: Settings, seed: int,
             total_s: float, command: str, machine: str) -> str:
    """results.md: the setup, the table, the plot, the best adapter and the merge check."""
    return f"""# minilora demo: which modules should LoRA train?

{task.title}. Run on {datetime.date.today().isoformat()}, {machine}, in {total_s:.0f} s (`{command}`).

Data: {task.description}.

Training: {settings.steps} AdamW steps of batch {settings.batch_size} (lr {settings.lr}, max {settings.max_length} tokens),
LoRA r={settings.r}, lora_alpha={settings.lora_alpha}; the same seed ({seed}) for every scenario.
"final loss" is the mean training loss over the last tenth of the steps.

{table(task, rows)}

![loss curves and accuracy](loss_curves.png)

Best LoRA scenario: **{best.name}** ({100 * best.accuracy:.1f}%), saved in peft's format to `best-adapter/`
(load it with `minilora.load_adapter(model, "best-adapter")` or peft's `PeftModel.from_pretrained`).

Merged into the base weights (`minilora.merge_and_unload`): largest logit difference to the unmerged
model {check['max_abs_diff']:.2e} (logits up to {check['max_abs_logit']:.2f}; relative {check['relative']:.1e},
tolerance {MERGE_TOLERANCE:g}). Latency of one held-out batch: {check['unmerged_ms']:.1f} ms unmerged,
{check['merged_ms']:.1f} ms merged (median of {settings.latency_repeats}).
"""


def results(task: Task, rows: list[Scenario], best: Scenario, check: dict, settings: Settings, seed: int,
            total_s: float) -> dict:
    """results.json: everything the report says, as data."""
    fields = ("name", "lora_on", "full", "losses", "trainable", "total", "accuracy", "seconds")
    return {"task": task.title, "seed": seed, "settings": settings.__dict__, "best": best.name,
            "merge_check": check, "seconds": total_s,
            "scenarios": [{k: getattr(s, k) for k in fields} for s in rows]}
