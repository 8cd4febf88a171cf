"""Adapters on disk in peft's format: ``save_adapter``, ``load_adapter``, ``adapter_state_dict``.

A folder holds one adapter, exactly as peft writes it (so peft, vLLM and every tool that reads
peft's format load it)::

    adapter_config.json          LoraConfig.to_dict(): peft's field names, "peft_type": "LORA"
    adapter_model.safetensors    adapter tensors only, metadata {"format": "pt"}

File keys are peft's model keys with the adapter name dropped and ``base_model.model.`` in front:

    our state-dict key                               file key (after base_model.model.)
    <m>.adapters.<a>.lora_A     (Linear/Conv1D/Conv)  <m>.lora_A.weight
    <m>.adapters.<a>.lora_B                           <m>.lora_B.weight
    <m>.adapters.<a>.lora_bias                        <m>.lora_B.bias
    <m>.adapters.<a>.lora_A     (Embedding)           <m>.lora_embedding_A
    <m>.adapters.<a>.lora_B     (Embedding)           <m>.lora_embedding_B
    <w>.modules_to_save.<a>.<k>                       <w>.<k>
    <m>.bias                    (bias="lora_only")    <m>.base_layer.bias
    every ``*.bias``            (bias="all")          its peft name (``base_layer.bias`` in LoRA layers)

Loading validates everything before the model is touched: the config, the file's integrity, the
key set, every shape (against a structural copy of the model on the meta device with the adapter
injected, so the expected shapes come from the same code that will build the adapter), dtypes and
finiteness. Only then is the adapter injected and filled. Pickle is never read unless asked for,
and then only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from minilora.config import LoraConfig
from minilora.inject import _walk, inject, lora_layers, lora_state
from minilora.layers import LoraEmbedding, LoraLayer
from minilora.modules_to_save import ModulesToSave

__all__ = ["AdapterFileError", "save_adapter", "load_adapter", "adapter_state_dict", "gather_tensors",
           "CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_NAME", "PEFT_PREFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> your model, in every peft file key

# LoraAdapter parameter -> peft's key suffix, by whether the layer is an Embedding. peft keeps
# embedding factors as bare Parameters (no ".weight") and has no lora_bias for embeddings.
_FACTOR_KEYS: dict[bool, dict[str, str]] = {
    False: {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_bias": "lora_B.bias"},
    True: {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"},
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AdapterFileError(ValueError):
    """An adapter folder or file that cannot be loaded as it is (the message says what and why)."""


# ---------------------------------------------------------------- which tensor goes where
def _peft_names(model: nn.Module) -> dict[str, tuple[str, str | None]]:
    """Model state-dict key -> (peft's key for it with the adapter name removed, owning adapter).

    Keys outside LoRA layers and modules_to_save wrappers map to themselves with no owner.
    The wrapper copies follow peft's name removal (``<w>.modules_to_save.<a>.bias`` ->
    ``<w>.modules_to_save.bias``, while a deeper ``...<a>.dense.bias`` keeps the name): this only
    shows in bias="all" files, where peft writes these keys.
    """
    names: dict[str, tuple[str, str | None]] = {}
    for name, module in _walk(model):
        if isinstance(module, LoraLayer):
            suffixes = _FACTOR_KEYS[isinstance(module, LoraEmbedding)]
            for key in module.state_dict(keep_vars=True):
                head, _, rest = key.partition(".")
                if head == "adapters":
                    adapter, _, param = rest.partition(".")
                    suffix = suffixes.get(param)
                    if suffix is None:
                        raise ValueError(f"{name!r}: peft's format has no key for a {param} on an Embedding "
                                         f"layer (adapter {adapter!r}), so it cannot be saved; use lora_bias=False")
                    names[f"{name}.{key}"] = (f"{name}.{suffix}", adapter)
                else:
                    names[f"{name}.{key}"] = (f"{name}.base_layer.{key}", None)
        elif isinstance(module, ModulesToSave):
            for key in module.state_dict(keep_vars=True):
                head, _, rest = key.partition(".")
                if head == "modules_to_save":
                    adapter, _, sub = rest.partition(".")
                    peft_key = f"{name}.modules_to_save.{sub}" if "." not in sub else f"{name}.{key}"
                    names[f"{name}.{key}"] = (peft_key, adapter)
    return names


def _is_bias(key: str) -> bool:
    return key == "bias" or key.endswith(".bias")


def _bias_all(model, names, adapter_name):
    # peft: every "*.bias" of the model's state dict that does not belong to another adapter.
    for key in model.state_dict(keep_vars=True):
        peft_key, owner = names.get(key, (key, None))
        if _is_bias(peft_key) and owner in (None, adapter_name):
            yield peft_key, key


def _bias_lora_only(model, names, adapter_name):
    # peft: the base bias of every LoRA layer in the model (whichever adapter made it).
    for name, layer in lora_layers(model):
        if layer.bias is not None:
            yield f"{name}.base_layer.bias", f"{name}.bias"


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
    # Tied copies (input and output embeddings sharing one trained weight) are written under each
    # module's key, as peft does with ensure_weight_tying; a reader that does not tie still gets
    # the same weight in both places. Loading accepts any one of them (see _check_tensors).
    for name, wrapper in _walk(model):
        if isinstance(wrapper, ModulesToSave) and adapter_name in wrapper.modules_to_save:
            for key in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True):
                slots[f"{name}.{key}"] = f"{name}.modules_to_save.{adapter_name}.{key}"
    for peft_key, key in _BIAS_SLOTS[state.configs[adapter_name].bias](model, names, adapter_name):
        slots.setdefault(peft_key, key)
    return {PEFT_PREFIX + k: v for k, v in sorted(slots.items())}


def _optional_slots(model: nn.Module) -> dict[str, str]:
    """Keys peft may add that we accept on load: the base weight of a LoRA-adapted embedding
    (peft's ``save_embedding_layers``, e.g. after resizing the vocabulary). Loaded like peft does."""
    outputs = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return {f"{PEFT_PREFIX}{name}.base_layer.weight": f"{name}.weight" for name, layer in lora_layers(model)
            if isinstance(layer, LoraEmbedding) or (outputs is not None and layer is outputs)}


def gather_tensors(model: nn.Module, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the model tensors named by state-dict ``keys``.

    The one place that reads tensor values for saving: a sharded model (FSDP, DeepSpeed) replaces
    this with a gather. Copies, so two keys sharing a tensor (tied copies) are written separately,
    as peft does (safetensors refuses aliased tensors).
    """
    tensors = model.state_dict(keep_vars=True)
    return {key: _unsharded(tensors[key].detach()).to("cpu", copy=True).contiguous() for key in keys}


def _unsharded(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP2-sharded parameter (a DTensor), else the tensor itself.

    All-gathering is collective: every rank must ask for the same keys in the same order (the
    callers pass sorted slots, so they do). No DTensor exists unless its module was imported.
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(tensor, dtensor.DTensor):
        return tensor.full_tensor()
    return tensor


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors peft would save for ``adapter_name``, under peft's file keys (CPU copies).

    Raises:
        ValueError: the adapter does not exist, or holds a tensor peft's format cannot name.
    """
    slots = _slots(model, adapter_name)
    values = gather_tensors(model, dict.fromkeys(slots.values()))
    out: dict[str, torch.Tensor] = {}
    for file_key, key in slots.items():
        # Two file keys for one tensor (peft's bias="all" duplicate): separate copies, since
        # safetensors refuses aliased tensors.
        out[file_key] = values.pop(key) if key in values else out[next(k for k in out if slots[k] == key)].clone()
    return out


# ---------------------------------------------------------------- writing (atomic)
def _config_json(model: nn.Module, config: LoraConfig) -> bytes:
    data = config.to_dict()
    data["inference_mode"] = True  # as peft: a saved adapter loads for inference unless asked otherwise
    if data["lora_bias"] and data["init_lora_weights"] not in (True, False):
        # peft refuses lora_bias with any other init; the init no longer matters once trained
        # values are in the file, and True is peft's default.
        data["init_lora_weights"] = True
    if not data.get("base_model_name_or_path"):
        model_config = getattr(model, "config", None)
        name = getattr(model_config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        data["base_model_name_or_path"] = name or None
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _weights_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save
    return save(dict(tensors), metadata={"format": "pt"})


def _write_bytes(handle, data: bytes) -> None:
    handle.write(data)


def _stage(folder: str, final_name: str, data: bytes) -> str:
    """Write ``data`` to a fsynced temporary file next to ``final_name``; returns its path."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{final_name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            _write_bytes(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every OS/file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_folder_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"adapter name {name!r} cannot be a sub-folder name; rename the adapter")


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                 is_main_process: bool = True) -> None:
    """Write adapters in peft's format: ``"default"`` into ``path``, any other into ``path/<name>``.

    ``adapter_name=None`` saves every adapter of the model (as peft's ``save_pretrained``).
    Atomic: every file of every adapter is first written to a fsynced temporary file in its final
    folder; only when all are written are they renamed over the old ones (``os.replace``), config
    last. An exception before that leaves the previous files as they were and no temporary file
    behind. (A power cut exactly between two renames can pair a new weights file with an old
    config; the loader then reports the mismatch if the shapes differ.)

    A model sharded with FSDP2 (``fully_shard``): call this on every rank with
    ``is_main_process=(rank == 0)``; only the adapter tensors are all-gathered, and only the main
    process writes (``minilora.training.save_adapter_sharded`` does exactly that).

    Raises:
        ValueError: no such adapter, or the model has none.
    """
    state = lora_state(model)
    if state is None or not state.configs:
        raise ValueError("save_adapter: this model has no minilora adapters; call minilora.inject(model, ...) first")
    names = list(state.configs) if adapter_name is None else [adapter_name]
    for name in names:
        if name not in state.configs:
            raise ValueError(f"save_adapter: no adapter named {name!r}; this model has {sorted(state.configs)}")
        _check_folder_name(name)
    payloads = []  # (folder, {file name: bytes}); everything is serialised before any disk write
    for name in names:
        folder = os.fspath(path) if name == "default" else os.path.join(os.fspath(path), name)
        payloads.append((folder, {WEIGHTS_NAME: _weights_bytes(adapter_state_dict(model, name)),
                                  CONFIG_NAME: _config_json(model, state.configs[name])}))
    if not is_main_process:  # a sharded model's other ranks: they took part in the gathers above
        return
    created: list[str] = []
    staged: list[tuple[str, str]] = []  # (temporary path, final path)
    try:
        for folder, files in payloads:
            if not os.path.isdir(folder):
                missing = folder
                while missing and not os.path.isdir(missing):  # remember what to remove on failure
                    created.append(missing)
                    missing = os.path.dirname(missing)
                os.makedirs(folder, exist_ok=True)
            for file_name, data in files.items():  # weights first, config last
                staged.append((_stage(folder, file_name, data), os.path.join(folder, file_name)))
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    for folder in dict.fromkeys(folder for folder, _ in payloads):
        _fsync_dir(folder)


# ---------------------------------------------------------------- reading and validating
def _read_config(folder: str) -> LoraConfig:
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        hint = "" if os.path.isdir(folder) else " (the folder itself does not exist)"
        raise AdapterFileError(f"{config_path} is missing{hint}; an adapter folder holds {CONFIG_NAME} "
                               f"and {WEIGHTS_NAME}, as written by save_adapter or peft's save_pretrained")
    try:
        with open(config_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{config_path} is not valid JSON ({err}); expected peft's adapter config") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{config_path} holds a JSON {type(data).__name__}, expected an object with "
                               "peft's LoraConfig fields")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFileError(f"{config_path} has peft_type={peft_type!r}; minilora loads only LoRA adapters "
                               "(peft_type 'LORA')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown fields are kept for the round trip
            return LoraConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{config_path}: {err}") from None


def _read_weights(folder: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    pickle_path = os.path.join(folder, PICKLE_NAME)
    if os.path.isfile(weights_path):
        from safetensors import SafetensorError
        from safetensors.torch import load
        with open(weights_path, "rb") as handle:
            data = handle.read()
        try:
            return load(data)
        except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
            raise AdapterFileError(f"{weights_path} is not a readable safetensors file ({err}); it is probably "
                                   "truncated or corrupt: save the adapter again") from None
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
            raise AdapterFileError(f"{pickle_path} could not be read with torch.load(weights_only=True) ({err})") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise AdapterFileError(f"{pickle_path} does not hold a dict of tensors")
        return loaded
    raise AdapterFileError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter weights are missing")


def _list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_tensors(file_path: str, tensors: Mapping[str, torch.Tensor], slots: Mapping[str, str],
                   optional: Mapping[str, str], expected: Mapping[str, torch.Tensor]) -> None:
    # A key may be absent when another present key names the same tensor (tied copies; peft
    # without ensure_weight_tying writes only the output embedding).
    present = {id(expected[slots[k]]) for k in tensors if k in slots}
    missing = [k for k in slots if k not in tensors and id(expected[slots[k]]) not in present]
    if missing:
        raise AdapterFileError(f"{file_path} lacks {len(missing)} key(s) the config implies: {_list(missing)}; "
                               "the file does not belong to this config or model")
    unexpected = sorted(k for k in tensors if k not in slots and k not in optional)
    if unexpected:
        raise AdapterFileError(f"{file_path} has {len(unexpected)} unexpected key(s): {_list(unexpected)}; "
                               f"the config and this model expect only keys like {_list(list(slots), 2)}")
    for file_key, tensor in sorted(tensors.items()):  # sorted: the first problem named is stable
        target = expected[slots.get(file_key) or optional[file_key]]
        if tuple(tensor.shape) != tuple(target.shape):
            raise AdapterFileError(f"{file_path}: {file_key!r} has shape {tuple(tensor.shape)}, but the module "
                                   f"it belongs to needs {tuple(target.shape)}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise AdapterFileError(f"{file_path}: {file_key!r} has dtype {tensor.dtype}, which cannot be cast to "
                                   f"the adapter's {target.dtype}; adapter tensors are floating point")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise AdapterFileError(f"{file_path}: {file_key!r} has {bad} non-finite value(s) (NaN or inf); "
                                   "the adapter is broken (diverged training?)")


def _meta_clone(model: nn.Module) -> nn.Module:
    """A structural copy of the model whose parameters and buffers live on the meta device
    (no memory, no copying of values), for a dry-run inject."""
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


@contextlib.contextmanager
def _rng_untouched(model: nn.Module) -> Iterator[None]:
    # inject initialises the new factors at random before we overwrite them; loading should not
    # move the caller's random streams.
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        yield


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False, *, allow_pickle: bool = False) -> nn.Module:
    """Load a peft-format adapter folder into ``model`` (a base model, or one with adapters).

    The adapter is injected as ``adapter_config.json`` says and filled from the weights file. Into
    a base model it becomes the active adapter; into an injected model it is added inactive (see
    ``set_adapter``). ``is_trainable=False`` loads it for inference (frozen, as peft).

    Everything is checked before the model is touched; on any error the model is exactly as it was.

    Raises:
        AdapterFileError: missing or unparsable config, peft_type other than LORA, missing or
            corrupt weights, a pickle without ``allow_pickle``, missing or unexpected keys, a
            shape that does not fit (key, expected, found), a non-float dtype, non-finite values.
        ValueError: the adapter name exists already, or the config does not fit the model
            (e.g. its target modules are not in it), as ``inject`` raises.

    Returns:
        The same model object.
    """
    folder = os.fspath(path)
    config = _read_config(folder).replace(inference_mode=not is_trainable)
    tensors = _read_weights(folder, allow_pickle)
    file_path = os.path.join(folder, WEIGHTS_NAME if os.path.isfile(os.path.join(folder, WEIGHTS_NAME))
                             else PICKLE_NAME)

    dry = _meta_clone(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # they come once, from the real inject below
        inject(dry, config, adapter_name=adapter_name)
    slots, optional = _slots(dry, adapter_name), _optional_slots(dry)
    _check_tensors(file_path, tensors, slots, optional, dry.state_dict(keep_vars=True))
    del dry

    with _rng_untouched(model):
        inject(model, config, adapter_name=adapter_name)
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for file_key, tensor in tensors.items():
            target = targets[slots.get(file_key) or optional[file_key]]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    return model
