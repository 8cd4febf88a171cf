"""Adapters on disk in peft's format: ``save_adapter``, ``load_adapter``, ``adapter_state_dict``.

A folder holds one adapter, ``adapter_config.json`` and ``adapter_model.safetensors``, exactly as
peft writes it (docs/interop.md has the key table). Loading checks shapes against a meta-device
copy of the model with the adapter injected, so the expected shapes come from the same code that
will build the adapter; reading and checking the files is ``minilora.peft_format``'s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from minilora import atomic
from minilora.config import LoraConfig
from minilora.inject import inject, lora_layers, lora_state, require_state
from minilora.layers import LoraEmbedding, LoraLayer
from minilora.model_config import CONFIG_FILE
from minilora.modules_to_save import ModulesToSave
from minilora.params import LoraParams, param_hosts
from minilora.patterns import PatternError, time_budget
from minilora.trainable_tokens import TrainableTokens
from minilora.tree import AdapterHost, vocabulary_ends, walk
from minilora.peft_format import (BASE_WEIGHT_KEYS, CONFIG_NAME, DIGEST_KEY, FACTOR_KEYS, PEFT_PREFIX, PICKLE_NAME,
                                  TOKEN_KEY, WEIGHTS_NAME,
                                  AdapterFileError, check_digest, check_tensor, config_digest, param_module_key,
                                  read_config_file, read_header, read_json, read_tensor, safetensors_bytes)

__all__ = ["AdapterFileError", "save_adapter", "load_adapter", "adapter_state_dict", "gather_tensors",
           "LoadPlan", "plan_load", "meta_clone", "adapter_folder", "HUB_FILES", "TOKENIZER_FILES", "CONFIG_NAME",
           "WEIGHTS_NAME", "PICKLE_NAME", "PEFT_PREFIX"]


# ---------------------------------------------------------------- which tensor goes where
def _peft_names(model: nn.Module) -> dict[str, tuple[str, str | None]]:
    """Model state-dict key -> (its file key with the adapter name removed, owning adapter).
    Keys outside LoRA layers and modules_to_save wrappers are absent (they map to themselves)."""
    names: dict[str, tuple[str, str | None]] = {}
    paths: dict[str, str] = {}  # module name -> its path in peft's model
    for name, module in walk(model):
        path = paths.setdefault(name, name)
        if isinstance(module, AdapterHost):  # peft keeps a module nested in an adapted one under base_layer
            paths.update({f"{name}.{child}": f"{path}.base_layer.{child}" for child in module.inner_hosts()})
        if isinstance(module, LoraLayer):
            suffixes = FACTOR_KEYS[isinstance(module, LoraEmbedding)]
            for key in module.state_dict(keep_vars=True):
                head, _, rest = key.partition(".")
                if head in module.inner_hosts():
                    continue  # named when the walk reaches that host
                if head == "adapters":
                    adapter, _, param = rest.partition(".")
                    suffix = suffixes.get(param)
                    if suffix is None:
                        raise ValueError(f"{name!r}: peft's format has no key for a {param} on an Embedding "
                                         f"layer (adapter {adapter!r}), so it cannot be saved; use lora_bias=False")
                    names[f"{name}.{key}"] = (f"{path}.{suffix}", adapter)
                else:
                    names[f"{name}.{key}"] = (f"{path}.base_layer.{key}", None)
        elif isinstance(module, LoraParams):
            names.update(_param_names(name, module))
        elif isinstance(module, TrainableTokens):
            for key in module.state_dict(keep_vars=True):  # (a tied follower holds no rows of its own)
                head, _, rest = key.partition(".")
                if head == "tokens":
                    names[f"{name}.{key}"] = (f"{name}.{TOKEN_KEY}", rest.partition(".")[0])
                else:
                    names[f"{name}.{key}"] = (f"{name}.token_adapter.base_layer.{key}", None)
        elif isinstance(module, ModulesToSave):
            for key in module.state_dict(keep_vars=True):
                head, _, rest = key.partition(".")
                if head == "modules_to_save":
                    adapter, _, sub = rest.partition(".")
                    peft_key = f"{name}.modules_to_save.{sub}" if "." not in sub else f"{name}.{key}"
                    names[f"{name}.{key}"] = (peft_key, adapter)
    return names


def _param_names(name: str, host: LoraParams) -> dict[str, tuple[str, str | None]]:
    """``_peft_names`` of a host of LoRA on parameters: peft's nesting, by ``param_module_key``."""
    count, names = len(host.targets), {}
    for key in host.state_dict(keep_vars=True):
        head, _, rest = key.partition(".")
        if head == "adapters":  # adapters.<adapter>.<parameter>.<factor>
            adapter, _, rest = rest.partition(".")
            param, _, factor = rest.partition(".")
            module = param_module_key(name, host.targets.index(param), count)
            names[f"{name}.{key}"] = (f"{module}.{FACTOR_KEYS[False][factor]}", adapter)
        else:
            names[f"{name}.{key}"] = (f"{param_module_key(name, count, count)}.{key}", None)
    return names


def _bias_all(model, names, adapter_name):
    # peft: every "*.bias" of the model's state dict that does not belong to another adapter.
    for key in model.state_dict(keep_vars=True):
        peft_key, owner = names.get(key, (key, None))
        if peft_key.rpartition(".")[2] == "bias" and owner in (None, adapter_name):
            yield peft_key, key


def _bias_lora_only(model, names, adapter_name):
    # peft: the base bias of every LoRA layer in the model (whichever adapter made it).
    for name, layer in lora_layers(model):
        if layer.bias is not None:
            yield names[f"{name}.bias"][0], f"{name}.bias"


_BIAS_SLOTS = {"none": lambda model, names, adapter_name: (), "all": _bias_all, "lora_only": _bias_lora_only}


def _slots(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """File key -> model state-dict key, for everything a saved ``adapter_name`` holds."""
    state = lora_state(model)
    if state is None or adapter_name not in state.configs:
        known = sorted(state.configs) if state else []
        raise ValueError(f"adapter {adapter_name!r} is not in this model (adapters: {known})")
    names = _peft_names(model)
    slots: dict[str, str] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.adapters:
            for param, tensor in layer.adapters[adapter_name]._parameters.items():
                if tensor is not None:
                    key = f"{name}.adapters.{adapter_name}.{param}"
                    slots[names[key][0]] = key
    for name, host in param_hosts(model):
        for param, adapter in host.adapters[adapter_name].items() if adapter_name in host.adapters else ():
            for factor in ("lora_A", "lora_B"):
                key = f"{name}.adapters.{adapter_name}.{param}.{factor}"
                slots[names[key][0]] = key
    # Tied copies (embeddings sharing one trained weight) are written under each module's key, so a
    # reader that does not tie gets the weight in both places; loading accepts any one of them.
    for name, wrapper in walk(model):
        if isinstance(wrapper, ModulesToSave) and adapter_name in wrapper.modules_to_save:
            for key in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True):
                slots[f"{name}.{key}"] = f"{name}.modules_to_save.{adapter_name}.{key}"
    for name, host in walk(model):  # token rows: the owner's only (a tied head follows them)
        if isinstance(host, TrainableTokens) and host.follows is None and adapter_name in host.tokens:
            slots[f"{name}.{TOKEN_KEY}"] = f"{name}.tokens.{adapter_name}.delta"
    for peft_key, key in _BIAS_SLOTS[state.configs[adapter_name].bias](model, names, adapter_name):
        slots.setdefault(peft_key, key)
    return {PEFT_PREFIX + k: v for k, v in sorted(slots.items())}


def _vocabulary_hosts(model: nn.Module) -> list[tuple[str, str, str]]:
    """(name, what wraps it, model key of its base weight) of the token embedding and the output
    head: LoRA, trainable tokens, modules_to_save (whose original module holds it), or nothing."""
    ends = [end for end in vocabulary_ends(model) if end is not None]
    hosts = []
    for name, module in model.named_modules():
        if not any(module is end for end in ends):
            continue
        wrapper = ("lora" if isinstance(module, LoraLayer) else "tokens" if isinstance(module, TrainableTokens)
                   else "modules_to_save" if isinstance(module, ModulesToSave)
                   else "plain" if not isinstance(module, AdapterHost) else None)
        if wrapper is not None:
            inner = "original_module." if wrapper == "modules_to_save" else ""
            hosts.append((name, wrapper, f"{name}.{inner}weight"))
    return hosts


def _vocabulary_weights(model: nn.Module) -> dict[str, str]:
    """The base weights ``save_embedding_layers`` writes, those of the token embedding and the
    output head: file key (peft's, for what wraps the module now) -> model state-dict key."""
    return {f"{PEFT_PREFIX}{name}.{BASE_WEIGHT_KEYS[wrapper]}": key for name, wrapper, key in _vocabulary_hosts(model)}


def _optional_slots(model: nn.Module) -> dict[str, str]:
    """Base weights a file may hold beside the adapter, accepted on load and copied in as peft
    does (``save_embedding_layers``, e.g. after resizing the vocabulary): the token embedding's
    and output head's under any wrapper's key (a file written while another adapter wrapped the
    module names it so), and that of any LoRA-adapted embedding. File key -> model key."""
    slots = {f"{PEFT_PREFIX}{name}.{suffix}": key
             for name, _, key in _vocabulary_hosts(model) for suffix in BASE_WEIGHT_KEYS.values()}
    slots.update({f"{PEFT_PREFIX}{name}.{BASE_WEIGHT_KEYS['lora']}": f"{name}.weight"
                  for name, layer in lora_layers(model) if isinstance(layer, LoraEmbedding)})
    return slots


def _base_vocab(base: str | None) -> int | None:
    """``vocab_size`` from the config.json of the base an adapter records, read only where it is
    local (a model folder, or the Hugging Face cache for a hub id); None where unknown."""
    if not base:
        return None
    path = os.path.join(base, CONFIG_FILE)
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache  # no network: the cache or nothing
            path = try_to_load_from_cache(base, CONFIG_FILE)
        except (ImportError, ValueError):  # not a hub id either
            return None
        if not isinstance(path, str):
            return None
    try:
        data = read_json(path, "a transformers model config")
    except AdapterFileError:
        return None
    if not isinstance(data, dict):
        return None
    if "vocab_size" not in data and isinstance(data.get("text_config"), dict):  # a multimodal model's text half
        data = data["text_config"]
    size = data.get("vocab_size")
    return size if isinstance(size, int) else None


def _embedding_slots(model: nn.Module, save_embedding_layers: bool | str, base: str | None) -> dict[str, str]:
    """File key -> model key of the base weights written with an adapter (peft's
    ``save_embedding_layers``): the token embedding's and output head's, always, never, or
    ("auto") when their row count is not the recorded base's vocabulary (it was resized)."""
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers={save_embedding_layers!r}: expected True, False or 'auto'")
    slots = _vocabulary_weights(model)
    if save_embedding_layers != "auto" or not slots:
        return slots if save_embedding_layers else {}
    vocab = _base_vocab(base)
    rows = {model.state_dict(keep_vars=True)[v].shape[0] for v in slots.values()}
    return slots if vocab is not None and rows != {vocab} else {}


def gather_tensors(model: nn.Module, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the model tensors named by state-dict ``keys`` (copies: safetensors
    refuses aliased tensors). The one place that reads tensor values for saving."""
    tensors = model.state_dict(keep_vars=True)
    return {key: _unsharded(tensors[key].detach()).to("cpu", copy=True).contiguous() for key in keys}


def _unsharded(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP2-sharded parameter (a DTensor), else the tensor itself.
    All-gathering is collective: every rank must ask for the same keys in the same order."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(tensor, dtensor.DTensor):
        return tensor.full_tensor()
    return tensor


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", *,
                       save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """The tensors peft would save for ``adapter_name``, under peft's file keys (CPU copies).

    ``save_embedding_layers`` (peft's option): also the base weights of the token embedding and
    output head (``...embed_tokens.base_layer.weight`` under LoRA, ``...embed_tokens.weight``
    unwrapped; a modules_to_save copy is written anyway), so an adapter trained on a resized
    vocabulary reloads exactly. True: always; False: never; "auto": when their row count is not
    the ``vocab_size`` of the base recorded in the config (``base_model_name_or_path``), read
    locally from its folder or the Hugging Face cache; an unknown base writes none (pass True
    after resizing such a model).

    Raises:
        ValueError: the adapter does not exist, or holds a tensor peft's format cannot name;
            ``save_embedding_layers`` other than True, False or "auto".
    """
    slots = _slots(model, adapter_name)
    embeddings = _embedding_slots(model, save_embedding_layers,
                                  _base_name(model, lora_state(model).configs[adapter_name]))
    slots.update(embeddings)
    values = gather_tensors(model, dict.fromkeys(slots.values()))
    modules = dict(model.named_modules())
    for key in embeddings.values():  # a weight with merged adapters or rows in it: the weight without them
        host = modules[key.rpartition(".")[0]]
        if getattr(host, "merged", None):
            values[key] = host.unmerged_weight().detach().to("cpu", copy=True).contiguous()
    for name, layer in lora_layers(model):  # factors padded for hot-swapping: the adapter's own rank
        if adapter_name in layer.adapters and layer.rank_room(adapter_name) != layer.adapters[adapter_name].r:
            for param in ("lora_A", "lora_B"):
                key = f"{name}.adapters.{adapter_name}.{param}"
                values[key] = layer.unpadded(adapter_name, param, values[key]).contiguous()
    out: dict[str, torch.Tensor] = {}
    for file_key, key in slots.items():
        # Two file keys for one tensor (bias="all"): separate copies, as safetensors refuses aliases.
        out[file_key] = values.pop(key) if key in values else out[next(k for k in out if slots[k] == key)].clone()
    return out


# ---------------------------------------------------------------- writing (atomic)
def _base_name(model: nn.Module, config: LoraConfig) -> str | None:
    """The base model an adapter records: the config's, else the name transformers loaded it by."""
    if config.base_model_name_or_path:
        return config.base_model_name_or_path
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


def _config_json(model: nn.Module, config: LoraConfig) -> bytes:
    data = config.to_dict()
    data["inference_mode"] = True  # as peft: a saved adapter loads for inference unless asked otherwise
    if data["lora_bias"] and data["init_lora_weights"] not in (True, False):
        # peft refuses lora_bias with any other init, which no longer matters once trained.
        data["init_lora_weights"] = True
    data["base_model_name_or_path"] = _base_name(model, config)
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _check_folder_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"adapter name {name!r} cannot be a sub-folder name; rename the adapter")


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                 is_main_process: bool = True, save_embedding_layers: bool | str = "auto") -> None:
    """Write adapters in peft's format: ``"default"`` into ``path``, any other into ``path/<name>``;
    ``adapter_name=None`` saves every adapter of the model.

    ``save_embedding_layers``: also write the base weights of the token embedding and output
    head, as ``adapter_state_dict`` says ("auto": when the vocabulary was resized).

    A folder never loads as a mix of two saves: the files are written by ``atomic.write_files``
    (weights renamed before config), and the weights carry a digest of their config, which
    ``load_adapter`` checks.

    A model sharded with FSDP2: call this on every rank with ``is_main_process=(rank == 0)``
    (as ``minilora.training.save_adapter_sharded`` does); only the main process writes.

    Raises:
        ValueError: no such adapter, or the model has none; ``save_embedding_layers`` other than
            True, False or "auto".
    """
    state = require_state(model, "save_adapter")
    names = list(state.configs) if adapter_name is None else [adapter_name]
    for name in names:
        if name not in state.configs:
            raise ValueError(f"save_adapter: no adapter named {name!r}; this model has {sorted(state.configs)}")
        _check_folder_name(name)
    files = []  # (path, bytes), weights before config in each folder: all serialised before any write
    for name in names:
        folder = os.fspath(path) if name == "default" else os.path.join(os.fspath(path), name)
        config_bytes = _config_json(model, state.configs[name])
        metadata = {"format": "pt", DIGEST_KEY: config_digest(json.loads(config_bytes))}  # ties weights to config
        weights = adapter_state_dict(model, name, save_embedding_layers=save_embedding_layers)
        files += [(os.path.join(folder, WEIGHTS_NAME), safetensors_bytes(weights, metadata)),
                  (os.path.join(folder, CONFIG_NAME), config_bytes)]
    if is_main_process:  # a sharded model's other ranks took part in the gathers above
        atomic.write_files(files, root=os.fspath(path))


# ---------------------------------------------------------------- reading and validating
class _FileTensor:
    """A tensor of the weights file: dtype and shape known up front, values read on demand."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], load: Any) -> None:
        self.dtype, self.shape, self.load = dtype, tuple(shape), load


def _weights(folder: str, config_data: Mapping[str, Any], allow_pickle: bool) -> tuple[str, dict[str, _FileTensor]]:
    """The weights file's path and its tensors (nothing but the header read yet, for safetensors)."""
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    pickle_path = os.path.join(folder, PICKLE_NAME)
    if os.path.isfile(weights_path):
        entries, metadata = read_header(weights_path)
        check_digest(weights_path, metadata, config_data)
        return weights_path, {k: _FileTensor(e.torch_dtype, e.shape, lambda e=e: read_tensor(e))
                              for k, e in entries.items()}
    if os.path.isfile(pickle_path):
        if not allow_pickle:
            raise AdapterFileError(
                f"{folder} holds only {PICKLE_NAME}, a pickle: unpickling can run arbitrary code, so minilora does "
                f"not read it by default. Convert it once, if you trust its source: "
                f"sd = torch.load('{PICKLE_NAME}', weights_only=True); "
                f"safetensors.torch.save_file(sd, '{WEIGHTS_NAME}', metadata={{'format': 'pt'}}); "
                "or pass allow_pickle=True (reads it with torch.load(weights_only=True))")
        try:
            loaded = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a bad or unsafe pickle
            raise AdapterFileError(f"{pickle_path} could not be read with torch.load(weights_only=True) "
                                   f"({err})") from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in loaded.items()):
            raise AdapterFileError(f"{pickle_path} does not hold a dict of tensors")
        return pickle_path, {k: _FileTensor(v.dtype, v.shape, lambda v=v: v) for k, v in loaded.items()}
    raise AdapterFileError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter weights are missing (an "
                           f"adapter saved only as {PICKLE_NAME}, a pickle, is read, and fetched from the Hub, only "
                           "with allow_pickle=True)")


def _list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _checked_values(file_path: str, tensors: Mapping[str, _FileTensor], slots: Mapping[str, str],
                    optional: Mapping[str, str], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File key -> its values in the dtype of the model tensor they fill, all checked."""
    # A key may be absent when another present key names the same tensor (tied copies).
    present = {id(expected[slots[k]]) for k in tensors if k in slots}
    missing = [k for k in slots if k not in tensors and id(expected[slots[k]]) not in present]
    if missing:
        raise AdapterFileError(f"{file_path} lacks {len(missing)} key(s) the config implies: {_list(missing)}; "
                               "the file does not belong to this config or model")
    unexpected = sorted(k for k in tensors if k not in slots and k not in optional)
    if unexpected:
        raise AdapterFileError(f"{file_path} has {len(unexpected)} unexpected key(s): {_list(unexpected)}; "
                               f"the config and this model expect only keys like {_list(list(slots), 2)}")
    targets = {k: expected[slots.get(k) or optional[k]] for k in sorted(tensors)}  # sorted: stable first error
    for key, target in targets.items():  # shapes and dtypes first: no tensor data is read for a bad file
        check_tensor(file_path, key, tensors[key].dtype, tensors[key].shape, target.dtype, tuple(target.shape))
    return {key: check_tensor(file_path, key, tensors[key].dtype, tensors[key].shape, target.dtype,
                              tuple(target.shape), load=tensors[key].load)
            for key, target in targets.items()}


def meta_clone(model: nn.Module) -> nn.Module:
    """A structural copy of the model with every tensor on the meta device, for a dry-run inject."""
    memo: dict[int, Any] = {}

    def to_meta(t: Any) -> None:
        if isinstance(t, torch.Tensor) and id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta

    for module in model.modules():
        for t in (*module._parameters.values(), *module._buffers.values()):
            to_meta(t)
        # Tensors held as plain attributes too: merge(keep_original=True)'s CPU copies, the
        # shared weight of an untied embedding. Deep-copying those would copy real memory.
        for value in vars(module).values():
            for t in value if isinstance(value, (tuple, list)) else (value,):
                to_meta(t)
    return copy.deepcopy(model, memo)


@dataclasses.dataclass
class LoadPlan:
    """An adapter folder read and checked against a model, nothing applied yet (``plan_load``)."""

    config: LoraConfig
    values: dict[str, torch.Tensor]  # state-dict key of ``dry`` -> checked values, in that tensor's dtype
    dry: nn.Module  # the meta model given to plan_load, with the adapter injected as the config says
    base_keys: list[str]  # keys of ``values`` that are base weights (peft's save_embedding_layers)


#: The files of a tokenizer saved with an adapter (glob patterns, as transformers names them).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model")
#: What an adapter repository on the Hub is fetched for: its config and weights, and a tokenizer
#: saved with it (``from_pretrained`` reads its size). The pickle only with ``allow_pickle``.
HUB_FILES = (CONFIG_NAME, WEIGHTS_NAME, *TOKENIZER_FILES)


def _looks_local(path: str) -> bool:
    # A repo id is "name" or "owner/name": anything else, or anything on disk, is a path.
    return os.path.exists(path) or os.path.isabs(path) or path.startswith(("./", "../", "~")) \
        or path.count("/") > 1 or (os.sep != "/" and os.sep in path)


def adapter_folder(path: str | os.PathLike, revision: str | None = None, allow_pickle: bool = False) -> str:
    """The local folder of an adapter: ``path`` itself when it is on disk or looks like a path;
    else ``path`` is a Hugging Face Hub repository id ("owner/name"), whose adapter files
    (``HUB_FILES``) are fetched at ``revision`` by ``huggingface_hub``, the cache first
    (``HF_HUB_OFFLINE=1``: only the cache). Nothing is read here: the folder is checked as any.

    Raises:
        AdapterFileError: not on disk, and not a repository the Hub (or the cache) has.
        ValueError: a ``revision`` with a local path.
    """
    folder = os.fspath(path)
    if _looks_local(folder):
        if revision is not None:
            raise ValueError(f"revision={revision!r} picks a version of a Hugging Face Hub repository, but "
                             f"{folder!r} is a local path; drop revision=")
        return folder  # a missing folder is named by the reader
    try:
        from huggingface_hub import snapshot_download
        patterns = [*HUB_FILES, PICKLE_NAME] if allow_pickle else list(HUB_FILES)
        return snapshot_download(folder, revision=revision, allow_patterns=patterns)
    except Exception as err:  # huggingface_hub's errors: not found, offline, invalid id, HTTP
        at = f" at revision {revision!r}" if revision else ""
        raise AdapterFileError(f"adapter {folder!r} is not a local folder, and the Hugging Face Hub repository of "
                               f"that id{at} could not be read ({type(err).__name__}: {err})") from None


def plan_load(dry: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *,
              is_trainable: bool = False, allow_pickle: bool = False, revision: str | None = None) -> LoadPlan:
    """Read and check an adapter folder (``adapter_folder``: a path or Hub id) by injecting it
    into ``dry``, a ``meta_clone`` of the model it is meant for (so the expected shapes come from
    the code that will build it). The validation behind ``load_adapter`` and
    ``hotswap_adapter``; raises as ``load_adapter`` does."""
    folder = adapter_folder(path, revision, allow_pickle)
    config, config_data = read_config_file(folder)
    config = config.replace(inference_mode=not is_trainable)
    file_path, tensors = _weights(folder, config_data, allow_pickle)
    try:
        with time_budget():  # patterns from the file: the dry run bounds their matching time
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # they come once, from the real inject
                inject(dry, config, adapter_name=adapter_name)
    except PatternError as err:
        raise AdapterFileError(f"{os.path.join(folder, CONFIG_NAME)}: {err}") from None
    slots, optional = _slots(dry, adapter_name), _optional_slots(dry)
    modules = dict(dry.named_modules())
    copies = _repeated_keys(modules, slots, tensors)
    optional.update(copies)
    expected = dry.state_dict(keep_vars=True)
    _check_vocabulary(file_path, tensors, {**optional, **slots}, expected, dry, modules)
    checked = _checked_values(file_path, tensors, slots, optional, expected)
    _check_repeats(file_path, {k: slots.get(k) or optional[k] for k in checked}, checked, expected)
    values = {slots.get(k) or optional[k]: v for k, v in checked.items()}
    base_keys = [optional[k] for k in checked if k in optional and k not in slots and k not in copies]
    for key in base_keys:  # copying a base weight in would drop what is merged into it (unmerge would corrupt it)
        merged = getattr(modules[key.rpartition(".")[0]], "merged", None)
        if merged:
            raise ValueError(f"{file_path} holds the base weight {key!r} (save_embedding_layers), but adapters "
                             f"{merged} are merged into that weight; call minilora.unmerge(model) first")
    return LoadPlan(config, values, dry, base_keys)


def _repeated_keys(modules: Mapping[str, nn.Module], slots: Mapping[str, str], tensors: Iterable[str]
                   ) -> dict[str, str]:
    """File keys peft's save_embedding_layers adds for tensors the adapter holds already -> the
    model key they fill: a modules_to_save copy again as ``<name>.modules_to_save.weight``, and a
    tied head's token rows beside its embedding's (the head follows them)."""
    suffix = ".modules_to_save.weight"
    repeated = {k: slots[f"{k[: -len(suffix)]}.weight"] for k in tensors
                if k.endswith(suffix) and f"{k[: -len(suffix)]}.weight" in slots}
    names = {id(m): n for n, m in modules.items()}
    for name, module in modules.items():
        if isinstance(module, TrainableTokens) and module.follows is not None:
            owner = f"{PEFT_PREFIX}{names[id(module.follows)]}.{TOKEN_KEY}"
            if owner in slots:
                repeated[f"{PEFT_PREFIX}{name}.{TOKEN_KEY}"] = slots[owner]
    return repeated


def _check_repeats(file_path: str, targets: Mapping[str, str], values: Mapping[str, torch.Tensor],
                   expected: Mapping[str, torch.Tensor]) -> None:
    """File keys that fill one tensor (tied weights written under each name, peft's repeated
    modules_to_save copy or tied token rows) must agree: which one would win is no answer."""
    first: dict[int, str] = {}
    for key in sorted(values):
        other = first.setdefault(id(expected[targets[key]]), key)
        if other != key and not torch.equal(values[other], values[key]):
            raise AdapterFileError(f"{file_path}: {other!r} and {key!r} fill the same tensor of this model (tied, or "
                                   "written twice) but hold different values; the file is inconsistent")


def _check_vocabulary(file_path: str, tensors: Mapping[str, _FileTensor], targets: Mapping[str, str],
                      expected: Mapping[str, torch.Tensor], model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """A tensor of the token embedding or output head that is off along the vocabulary only: the
    adapter was trained after tokens were added (say so, with the fix, rather than a bare shape).
    ``modules``: the model's, by name."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    found = [end for end in vocabulary_ends(model) if end is not None]
    ends = {n for n, m in modules.items() if any(m is end for end in found)}
    for key in sorted(k for k in tensors if k in targets):
        target = targets[key]
        if not isinstance(vocab, int) or not any(target.startswith(end + ".") for end in ends):
            continue
        got, want = tensors[key].shape, tuple(expected[target].shape)
        off = [d for d in range(len(want)) if len(got) == len(want) and got[d] != want[d]]
        if len(off) == 1 and want[off[0]] == vocab:
            size = got[off[0]]
            raise AdapterFileError(f"{file_path}: {key!r} has shape {list(got)}, but this model needs {list(want)}: "
                                   f"the adapter was trained on a vocabulary of {size} tokens and this model has "
                                   f"{vocab}. Resize the model first, model.resize_token_embeddings({size}) "
                                   "(minilora.from_pretrained does it)")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False, *, allow_pickle: bool = False, revision: str | None = None) -> nn.Module:
    """Load a peft-format adapter folder into ``model`` (a base model, or one with adapters).

    ``path`` is a folder, or a Hugging Face Hub repository id fetched at ``revision`` as
    ``adapter_folder`` says (as peft's ``PeftModel.from_pretrained`` accepts one).

    The adapter is injected as ``adapter_config.json`` says and filled from the weights file. Into
    a base model it becomes the active adapter; into an injected model it is added inactive (see
    ``set_adapter``). ``is_trainable=False`` loads it for inference (frozen, as peft). Base
    weights of the token embedding and output head in the file (peft's and ``save_adapter``'s
    ``save_embedding_layers``, for a resized vocabulary) are copied into the base, as peft does.

    Everything is checked before the model is touched; on any error the model is exactly as it was.
    The files are untrusted input (see ``minilora.peft_format``); pickle is read only with
    ``allow_pickle``, through ``torch.load(weights_only=True)``.

    Raises:
        AdapterFileError: missing or unparsable config, peft_type other than LORA, a field value
            LoraConfig refuses, a pattern that takes too long to match, missing or corrupt weights,
            a weights file saved with another config (digest mismatch: an interrupted save), a
            pickle without ``allow_pickle``, missing or unexpected keys, a shape that does not fit
            (key, expected, found), a non-float dtype, values that are NaN or inf once cast to the
            dtype of the model tensor they fill.
        ValueError: the adapter name exists already, or the config does not fit the model
            (e.g. its target modules are not in it), as ``inject`` raises.

    Returns:
        The same model object.
    """
    plan = plan_load(meta_clone(model), path, adapter_name, is_trainable=is_trainable, allow_pickle=allow_pickle,
                     revision=revision)
    # inject draws the new factors at random before they are overwritten: keep the caller's streams
    with torch.random.fork_rng(devices=sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})):
        inject(model, plan.config, adapter_name=adapter_name)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in plan.values.items():
            targets[key].copy_(tensor.to(device=targets[key].device))
    return model
