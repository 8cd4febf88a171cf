"""The demo's experiment: the five scenarios, training one, the held-out evaluation, and the
check that the best adapter merges into the base weights without changing the logits."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import minilora
from minilora.demo.tasks import Settings, Task

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


def _prepare(task: Task, scenario: Scenario) -> nn.Module:
    model = copy.deepcopy(task.model)
    if scenario.config is None:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in task.head:
            model.get_submodule(name).requires_grad_(True)
    else:
        minilora.inject(model, scenario.config)
    return model


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
    model = _prepare(task, scenario)
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

def _latency_ms(model: nn.Module, batch: dict, repeats: int) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
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
    batch = task.test[0]
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in task.test]
    with torch.no_grad():
        before = [model(**x).logits for x in inputs]
    unmerged_ms = _latency_ms(model, batch, settings.latency_repeats)
    plain = minilora.merge_and_unload(model)
    with torch.no_grad():
        after = [plain(**x).logits for x in inputs]
    merged_ms = _latency_ms(plain, batch, settings.latency_repeats)
    gap = max(float((a - b).abs().max()) for a, b in zip(after, before))
    scale = max(float(b.abs().max()) for b in before)
    return {"max_abs_diff": gap, "max_abs_logit": scale, "relative": gap / max(scale, 1e-12),
            "unmerged_ms": unmerged_ms, "merged_ms": merged_ms}
