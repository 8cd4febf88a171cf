"""``from_pretrained``: a base model and its adapter in one call, from the adapter's folder.

The base model comes from the path ``adapter_config.json`` records (``base_model_name_or_path``,
written by ``save_adapter`` and peft), loaded with a transformers auto class chosen from the
config's ``task_type``; then ``load_adapter`` reads and checks the adapter against it. A base
whose vocabulary the adapter outgrew (tokens added before training) is resized first.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from minilora.checkpoint import TOKENIZER_FILES, adapter_folder, load_adapter
from minilora.model_config import CONFIG_FILE
from minilora.peft_format import (BASE_WEIGHT_KEYS, CONFIG_NAME, FACTOR_KEYS, PEFT_PREFIX, WEIGHTS_NAME, TensorEntry,
                                  read_config_file, read_header)
from minilora.tree import vocabulary_ends

__all__ = ["from_pretrained", "AUTO_CLASSES", "TOKENIZER_CONFIG", "MAX_TOKENIZER_BYTES"]

#: A tokenizer saved beside the adapter (transformers' ``save_pretrained`` writes this file).
TOKENIZER_CONFIG = "tokenizer_config.json"
#: The most a tokenizer's files (``TOKENIZER_FILES``) may hold before ``from_pretrained`` reads
#: them (an adapter folder is untrusted input): the largest real ones (tokenizer.json of
#: 250k-token vocabularies) are tens of MiB.
MAX_TOKENIZER_BYTES = 512 << 20

#: peft's task_type -> the transformers auto class that builds a model with that head.
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def _auto_class(task_type: str | None, where: str) -> Any:
    if task_type is None:
        # No head is implied: AutoModel would build the bare backbone, whose module names lack the
        # head model's prefix (``model.``), so the adapter's keys would not fit.
        raise ValueError(f"{where} has no task_type, so the base model's class is unknown; pass auto_class= "
                         "(e.g. transformers.AutoModelForCausalLM)")
    return getattr(importlib.import_module("transformers"), AUTO_CLASSES[task_type])


def _base_location(adapter_dir: str, recorded: str | None, base_model: str | os.PathLike | None) -> str:
    """The base model's folder or hub id, checked where it is evidently a local path."""
    where = os.path.join(adapter_dir, CONFIG_NAME)
    if base_model is None and not recorded:
        raise ValueError(f"{where} records no base_model_name_or_path, so the base model is unknown; pass "
                         "base_model='path/to/base' (the folder or hub id the adapter was trained on)")
    base = os.fspath(base_model) if base_model is not None else recorded
    source = "base_model=" if base_model is not None else f"base_model_name_or_path in {where}"
    hint = "" if base_model is not None else "; if the base model moved, pass base_model='its/new/folder'"
    if os.path.isdir(base):
        if not os.path.isfile(os.path.join(base, CONFIG_FILE)):
            raise ValueError(f"{base!r} ({source}) is a folder without {CONFIG_FILE}: not a transformers model "
                             f"folder (save one with model.save_pretrained(folder)){hint}")
    elif os.path.isabs(base) or base.startswith(("./", "../", "~")) or os.path.exists(base):
        raise FileNotFoundError(f"base model folder {base!r} ({source}) does not exist{hint}")
    return base


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def _trained_vocab(model: nn.Module, entries: Mapping[str, TensorEntry]) -> tuple[int | None, list[str]]:
    """The vocabulary size the adapter's embedding tensors (``entries``: its file's header) were
    trained with, or None when it holds none or they disagree (``load_adapter`` then names the
    misfit); and the vocabulary ends (embedding, head) whose rows the file does not hold."""
    sizes, without_rows = set(), []
    ends = vocabulary_ends(model)
    factors = ((FACTOR_KEYS[True]["lora_A"], 1), (FACTOR_KEYS[False]["lora_B"], 0))  # (r, vocab), (vocab, r)
    for i, (module, (factor, axis)) in enumerate(zip(ends, factors)):
        name = _name_of(model, module)
        if name is None:
            continue
        # the weight (a modules_to_save copy, or save_embedding_layers' base weight under any wrapper)
        rows = [entries.get(f"{PEFT_PREFIX}{name}.{suffix}") for suffix in BASE_WEIGHT_KEYS.values()]
        rows = [e.shape[0] for e in rows if e is not None and len(e.shape) == 2]
        lora = entries.get(f"{PEFT_PREFIX}{name}.{factor}")
        sizes.update(rows + ([lora.shape[axis]] if lora is not None and len(lora.shape) == 2 else []))
        tied = i == 1 and ends[0] is not None and getattr(module, "weight", None) is getattr(ends[0], "weight", 0)
        if not rows and not tied:
            without_rows.append(name)
    return (sizes.pop() if len(sizes) == 1 else None), without_rows


def _fit_vocabulary(model: nn.Module, folder: str, entries: Mapping[str, TensorEntry], trust_remote_code: bool) -> None:
    """Resize the base's token embeddings to the adapter's vocabulary (tokens added before training).

    The adapter's own embedding tensors give the size exactly, larger or smaller. Without them, a
    tokenizer saved beside the adapter that is larger than the embedding grows it, as peft's
    ``AutoPeftModel`` does (new rows initialised by transformers' mean resizing). New rows the
    file does not hold are random (a warning names them); the caller's random streams are kept."""
    embedding = vocabulary_ends(model)[0]
    if not callable(getattr(model, "resize_token_embeddings", None)) or embedding is None:
        return
    rows = embedding.weight.shape[0]
    size, without_rows = _trained_vocab(model, entries)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    if size is not None:
        if size == rows:
            return
        if size > rows and without_rows:
            warnings.warn(f"adapter {folder!r} was trained on a vocabulary of {size} tokens, {size - rows} more than "
                          f"the base's, but holds no values for the new rows of {without_rows}: they are random "
                          "here, so outputs on the new tokens differ from the trained model's (save the adapter with "
                          "save_embedding_layers=True, or train those rows: modules_to_save, trainable_token_indices)",
                          stacklevel=3)
        with torch.random.fork_rng(devices=devices):  # rows the file holds are overwritten: no mean needed
            model.resize_token_embeddings(size, mean_resizing=False)
    elif os.path.isfile(os.path.join(folder, TOKENIZER_CONFIG)):
        from transformers import AutoTokenizer
        nbytes = sum(entry.stat().st_size for entry in os.scandir(folder)
                     if entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in TOKENIZER_FILES))
        if nbytes > MAX_TOKENIZER_BYTES:
            raise ValueError(f"the tokenizer files beside the adapter in {folder!r} hold {nbytes / 2**20:.1f} MiB, "
                             f"more than any tokenizer ({MAX_TOKENIZER_BYTES / 2**20:.0f} MiB at most); they are not "
                             "read. Remove them, or what else their names match")
        try:
            length = len(AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code))
        except (OSError, ValueError) as err:  # what transformers raises for missing or unreadable files
            raise ValueError(f"the tokenizer saved with adapter {folder!r} ({TOKENIZER_CONFIG}) could not be "
                             f"loaded: {err}. It gives the vocabulary the adapter was trained with; fix or "
                             f"remove it (then the base keeps its vocabulary)") from err
        if length > rows:
            with torch.random.fork_rng(devices=devices):
                model.resize_token_embeddings(length)


def from_pretrained(adapter_dir: str | os.PathLike, auto_class: Any = None, *,
                    base_model: str | os.PathLike | None = None, adapter_name: str = "default",
                    is_trainable: bool = False, allow_pickle: bool = False, adapter_revision: str | None = None,
                    **from_pretrained_kwargs: Any) -> nn.Module:
    """Load the base model an adapter was trained on, then the adapter: peft's
    ``AutoPeftModelFor*.from_pretrained``, returning the transformers model with the adapter injected.

    ``adapter_dir`` is a folder, or a Hugging Face Hub repository id fetched at
    ``adapter_revision`` (``checkpoint.adapter_folder``; ``revision`` in
    ``from_pretrained_kwargs`` is the base model's). The base is ``base_model`` if given (a
    folder or hub id: the recorded path moved), else the ``base_model_name_or_path`` of
    ``adapter_dir/adapter_config.json`` (read and validated as ``load_adapter`` reads it). It is
    loaded with ``auto_class.from_pretrained(base, **from_pretrained_kwargs)``: ``dtype``,
    ``device_map``, ``quantization_config`` (QLoRA), ... pass through. ``auto_class`` defaults to
    the class for the config's ``task_type`` (``AUTO_CLASSES``: CAUSAL_LM ->
    AutoModelForCausalLM, ...). A recorded ``revision`` is passed on when the recorded base is
    used. A hub id downloads as transformers does; ``HF_HUB_OFFLINE=1`` forbids it.

    A vocabulary resized before training is resized again first: to the adapter's embedding
    tensors' rows (from its safetensors header), else, as peft, up to a larger tokenizer saved in
    ``adapter_dir`` (with ``trust_remote_code`` from ``from_pretrained_kwargs``).

    Raises:
        AdapterFileError: the adapter folder's config or weights (as ``load_adapter``); an adapter
            id neither on disk nor on the Hub.
        ValueError: no base path recorded nor given; no task_type and no ``auto_class``; a base
            folder that is not a transformers model; the adapter does not fit the base (its target
            modules, shapes: ``load_adapter``'s errors, naming the base); a tokenizer saved in
            ``adapter_dir`` that transformers cannot load, or whose files hold more than
            ``MAX_TOKENIZER_BYTES`` (when it is asked for the vocabulary size).
        FileNotFoundError: a base folder that does not exist.
        OSError: transformers could not load the base (its message, naming the base).

    Returns:
        The base model with the adapter loaded (active; frozen unless ``is_trainable``).
    """
    folder = adapter_folder(adapter_dir, adapter_revision, allow_pickle)
    config, _ = read_config_file(folder)
    base = _base_location(folder, config.base_model_name_or_path, base_model)
    weights = os.path.join(folder, WEIGHTS_NAME)
    # The header now, so a broken file fails before the base loads. A pickle is not opened here:
    # load_adapter decides whether it is read at all.
    entries = read_header(weights)[0] if os.path.isfile(weights) else {}
    if auto_class is None:
        auto_class = _auto_class(config.task_type, os.path.join(folder, CONFIG_NAME))
    if base_model is None and config.revision and "revision" not in from_pretrained_kwargs:
        from_pretrained_kwargs["revision"] = config.revision
    try:
        model = auto_class.from_pretrained(base, **from_pretrained_kwargs)
    except OSError as err:
        raise OSError(f"base model {base!r} of adapter {folder!r} could not be loaded with "
                      f"{getattr(auto_class, '__name__', auto_class)}: {err}") from err
    _fit_vocabulary(model, folder, entries, bool(from_pretrained_kwargs.get("trust_remote_code", False)))
    try:
        return load_adapter(model, folder, adapter_name, is_trainable, allow_pickle=allow_pickle)
    except ValueError as err:  # AdapterFileError included: the same type, with the base named
        raise type(err)(f"adapter {folder!r} does not fit base model {base!r} ({type(model).__name__}): "
                        f"{err}") from None
