"""``minilora demo``: which modules should LoRA train? Measured on a real pretrained model
(docs/guide.md, "Evidence: the demo", says what it runs and writes).

This file is the command: arguments, progress and messages. The experiment is ``minilora.demo``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn

from minilora.checkpoint import save_adapter
from minilora.demo import experiment
from minilora.demo.experiment import MERGE_TOLERANCE, Scenario
from minilora.demo.tasks import FULL, QUICK, Settings, Task, causal_lm_task, classification_task

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="minilora-demo", help="output folder (default ./minilora-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data order, init and dropout (default 0)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (well under a minute), for tests")
    parser.add_argument("--steps", type=int, help="training steps per scenario (default 60, quick 6)")
    parser.add_argument("--model", type=Path, help="your causal LM folder (with --data)")
    parser.add_argument("--data", type=Path, help="a UTF-8 text file to train the causal LM on (with --model)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); on a "
                        "machine shared with other jobs, 1 is often faster than oversubscribed cores")


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _settings(args: argparse.Namespace) -> Settings:
    """The run's settings from the command line, after checking it."""
    if (args.model is None) != (args.data is None):
        raise ValueError("--model and --data go together: a causal LM folder and a text file to train it on")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: give a positive number of training steps")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: give a positive number of threads")
    base = QUICK if args.quick else FULL
    return base if args.steps is None else Settings(**{**base.__dict__, "steps": args.steps})


def _train_all(task: Task, rows: list[Scenario], settings: Settings, seed: int) -> tuple[Scenario, nn.Module]:
    """Train every scenario under a progress bar; the best LoRA one (accuracy, then fewer
    trainable parameters) and its model."""
    from tqdm import tqdm

    best, best_model = None, None
    for scenario in rows:
        with tqdm(total=settings.steps, desc=f"{scenario.name:<32}", unit="step", leave=True) as bar:
            def step_done(loss: float, bar=bar) -> None:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update()

            model = experiment.train_scenario(task, scenario, settings, seed, on_step=step_done)
        better = best is None or (scenario.accuracy, -scenario.trainable) > (best.accuracy, -best.trainable)
        if scenario.config is not None and better:
            best, best_model = scenario, model
        del model
    return best, best_model


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, for the report."""
    return ("minilora demo" + (" --quick" if args.quick else "") + (f" --seed {args.seed}" if args.seed else "")
            + (f" --threads {args.threads}" if args.threads else "")
            + (f" --model {args.model} --data {args.data}" if args.model else ""))


def run(args: argparse.Namespace) -> int:
    settings, out = _settings(args), Path(args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo reads is on disk
    start = time.perf_counter()
    with experiment.deterministic(), _threads(args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on a fresh head; the report says it all
        task = (causal_lm_task(args.model, args.data, settings, args.seed) if args.model
                else classification_task(settings, args.seed, args.quick))
        print(f"{task.title}\n{task.description}\n")
        rows = experiment.scenarios(task, settings)
        best, best_model = _train_all(task, rows, settings, args.seed)
        out.mkdir(parents=True, exist_ok=True)
        save_adapter(best_model, out / "best-adapter")
        check = experiment.merge_check(task, best_model, settings)
        machine = experiment.describe_machine()  # inside: the thread count in use
    total_s = time.perf_counter() - start
    print("\n" + experiment.table(task, rows) + "\n")
    experiment.plot(rows, out / "loss_curves.png", task.title, task.accuracy_name)
    (out / "results.md").write_text(experiment.markdown(task, rows, best, check, settings, args.seed, total_s,
                                                        _command(args), machine))
    results = experiment.results(task, rows, best, check, settings, args.seed, total_s)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    ok = check["relative"] <= MERGE_TOLERANCE
    print(f"best: {best.name}, adapter saved to {out / 'best-adapter'}; merged vs unmerged logits: max diff "
          f"{check['max_abs_diff']:.2e} ({'OK' if ok else 'TOO LARGE'}); latency {check['unmerged_ms']:.1f} ms "
          f"unmerged -> {check['merged_ms']:.1f} ms merged")
    print(f"report: {out / 'results.md'}, plot: {out / 'loss_curves.png'} ({total_s:.0f} s)")
    if not ok:
        raise ValueError(f"merged logits differ from unmerged ones by {check['relative']:.1e} (relative), "
                         f"more than {MERGE_TOLERANCE:g}: merging is broken")
    return 0
