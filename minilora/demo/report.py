"""The demo's outputs: the markdown table and report, the loss-curve plot, results.json."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
from pathlib import Path

import torch

from minilora.demo.experiment import MERGE_TOLERANCE, Scenario
from minilora.demo.tasks import Settings, Task


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
        smooth, acc = [], None
        for value in s.losses:  # exponential moving average, for a readable trend
            acc = value if acc is None else 0.8 * acc + 0.2 * value
            smooth.append(acc)
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
