"""peft's adapter files as untrusted input: names, keys, and reading with bounded time and memory.

The one home for what both readers need, ``load_adapter`` (into a model) and the offline merge
(into a checkpoint), so that a file refused by one is refused by the other. Values are checked
finite *after* the cast to the dtype they are used in (an fp64 1e300 is refused for an fp32
adapter, an fp32 1e5 for an fp16 model).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from minilora.config import LoraConfig
from minilora.matching import matches_name

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_NAME", "PEFT_PREFIX", "FACTOR_KEYS", "TOKEN_KEY", "DIGEST_KEY",
           "MAX_CONFIG_BYTES", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "AdapterFileError", "TensorEntry", "read_json",
           "param_module_key", "read_config_file", "config_digest", "check_digest", "read_header", "read_tensor",
           "check_tensor", "check_finite", "header_bytes", "tensor_bytes", "safetensors_bytes", "AdapterModule",
           "adapter_modules", "token_rows"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> your model, in every peft file key

#: LoraAdapter parameter -> peft's key suffix, by whether the layer is an Embedding. peft keeps
#: embedding factors as bare Parameters (no ".weight") and has no lora_bias for embeddings.
#: DoRA's magnitude has one name for every kind, without ".weight".
FACTOR_KEYS: dict[bool, dict[str, str]] = {
    False: {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_bias": "lora_B.bias",
            "magnitude": "lora_magnitude_vector"},
    True: {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B", "magnitude": "lora_magnitude_vector"},
}
#: peft's key suffix for a module's trained token rows (``trainable_token_indices``): (k, dim).
TOKEN_KEY = "token_adapter.trainable_tokens_delta"
#: peft's key suffix for the base weight of a token embedding or output head (written with
#: ``save_embedding_layers``), by what wraps the module: LoRA, trainable tokens, modules_to_save
#: (the original module's), or nothing.
BASE_WEIGHT_KEYS = {"lora": "base_layer.weight", "tokens": "token_adapter.base_layer.weight",
                    "modules_to_save": "original_module.weight", "plain": "weight"}


def param_module_key(module: str, index: int, count: int) -> str:
    """peft's module path for LoRA on the ``index``-th of ``count`` adapted parameters of
    ``module`` (in the module's parameter order): peft nests one wrapper per parameter, the first
    innermost, each under the next one's ``base_layer``. ``index == count`` gives the path of the
    module's own tensors, below every wrapper. E.g. ``experts`` with (gate_up_proj, down_proj):
    ``experts.base_layer`` (gate_up_proj's factors), ``experts`` (down_proj's),
    ``experts.base_layer.base_layer`` (the stacks themselves)."""
    return module + ".base_layer" * (count - 1 - index if index < count else count)


#: Metadata key of the weights file holding :func:`config_digest` of the config saved with it.
DIGEST_KEY = "minilora.config_sha256"

#: A real adapter_config.json is a few KiB; 16 MiB bounds the time and memory of reading one.
MAX_CONFIG_BYTES = 16 << 20
#: safetensors' own limit on a header (its reader refuses anything larger).
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype -> torch dtype (those torch can hold; others are refused by name).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):  # newer torch versions
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AdapterFileError(ValueError):
    """An adapter folder or file that cannot be loaded as it is (the message says what and why)."""


# ---------------------------------------------------------------- JSON and the config
#: JSON nesting accepted in a config or index: real ones nest a few levels (a vision config inside a
#: model config); transformers walks config dicts recursively, so a deep one would crash it later.
MAX_JSON_DEPTH = 64


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json(path: str | os.PathLike, what: str, limit: int = MAX_CONFIG_BYTES) -> Any:
    """A JSON file read with its size (``limit`` bytes) and nesting bounded; every failure is an
    AdapterFileError naming ``path`` and ``what`` it should hold (e.g. "peft's adapter config")."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(limit + 1)
    except IsADirectoryError:
        raise AdapterFileError(f"{path} is a folder, expected a file with {what}") from None
    except OSError as err:
        raise AdapterFileError(f"{path} cannot be read ({err.strerror or err})") from None
    if len(raw) > limit:
        raise AdapterFileError(f"{path} is larger than {limit >> 20} MiB, far more than {what} needs; "
                               "it is not one")
    try:
        data = json.loads(raw.decode("utf-8"))
        too_deep = _depth(data) > MAX_JSON_DEPTH
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError; an int of over 4300 digits
        raise AdapterFileError(f"{path} is not valid JSON ({err}); expected {what}") from None
    except RecursionError:  # the parser's own limit, far past ours
        too_deep = True
    if too_deep:
        raise AdapterFileError(f"{path} nests JSON values more than {MAX_JSON_DEPTH} deep, which {what} never does")
    return data


def read_config_file(folder: str | os.PathLike) -> tuple[LoraConfig, dict[str, Any]]:
    """The LoraConfig of an adapter folder, and the JSON object it was built from; an
    AdapterFileError (naming the file and field) for anything LoraConfig or this module refuses."""
    path = os.path.join(os.fspath(folder), CONFIG_NAME)
    if not os.path.isfile(path):
        hint = "" if os.path.isdir(folder) else " (the folder itself does not exist)"
        raise AdapterFileError(f"{path} is missing{hint}; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}, "
                               "as written by save_adapter or peft's save_pretrained")
    data = read_json(path, "peft's adapter config")
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(data).__name__}, expected an object with peft's "
                               "LoraConfig fields")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFileError(f"{path} has peft_type={peft_type!r}; minilora loads only LoRA adapters "
                               "(peft_type 'LORA')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown fields are kept for the round trip
            return LoraConfig.from_dict(data), data
    except (TypeError, ValueError) as err:  # PatternError is a ValueError
        raise AdapterFileError(f"{path}: {err}") from None


# Fields that only describe where an adapter came from or how to open it: editing them by hand
# must not make the weights file refuse its config.
_NOT_DIGESTED = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")


def config_digest(data: Mapping[str, Any]) -> str:
    """sha256 of a config's JSON object in canonical form, leaving out provenance-only fields."""
    kept = {k: v for k, v in data.items() if k not in _NOT_DIGESTED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------- safetensors, lazily
@dataclass
class TensorEntry:
    """Where one tensor's bytes lie in a safetensors file, and what they are (from the header)."""

    file: str
    key: str
    dtype: str                  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int                  # absolute byte offset of the data
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def _fail(path: str, why: str) -> AdapterFileError:
    return AdapterFileError(f"{path} is not a valid safetensors file ({why}); it is probably truncated or corrupt")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the header names {key!r} twice")
        out[key] = value
    return out


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Every tensor's entry and the metadata of a safetensors file, without reading tensor data.

    The whole layout is validated (an AdapterFileError otherwise), so that reading a tensor later
    cannot fail or read outside its range: known dtypes, byte sizes matching shapes, ranges that
    tile the data region exactly, a file exactly as long as the header says.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _fail(path, f"it is {size} bytes long, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise _fail(path, f"it declares a {n}-byte header in a {size}-byte file")
        raw = handle.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _fail(path, f"its header is not a JSON object: {err}") from None
    if not isinstance(header, dict):
        raise _fail(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "its __metadata__ is not a map of strings")
    entries: dict[str, TensorEntry] = {}
    spans = []
    for key, info in header.items():
        entries[key] = entry = _entry(path, key, info, 8 + n)
        spans.append((entry.start, entry.start + entry.nbytes, key))
    expected = 8 + n
    for begin, end, key in sorted(spans):
        if begin != expected:
            raise _fail(path, f"tensor {key!r} starts at data byte {begin - 8 - n}, but the previous tensor ends "
                              f"at {expected - 8 - n} (tensors must tile the data without gaps or overlaps)")
        expected = end
    if expected != size:
        raise _fail(path, f"its tensors end at byte {expected}, but the file has {size} bytes")
    return entries, metadata


def _entry(path: str, key: str, info: Any, data_start: int) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _fail(path, f"the header entry of {key!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise AdapterFileError(f"{path}: tensor {key!r} has dtype {dtype!r}, which minilora cannot read "
                               f"(known: {', '.join(sorted(_DTYPES))})")
    ints = lambda xs, n=None: isinstance(xs, list) and (n is None or len(xs) == n) and all(  # noqa: E731
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
    if not ints(shape) or len(shape) > 8 or not ints(offsets, 2) or offsets[0] > offsets[1]:
        raise _fail(path, f"the header entry of {key!r} has shape {shape!r} and data_offsets {offsets!r}")
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _fail(path, f"tensor {key!r} holds {offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs {nbytes}")
    return TensorEntry(path, key, dtype, tuple(shape), data_start + offsets[0], nbytes)


def header_bytes(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> bytes:
    """The bytes before the data of a safetensors file holding ``(key, dtype, shape)`` tensors in
    that order: the 8-byte header length, then the JSON header padded to 8 bytes, as safetensors
    lays it out. Metadata keys are sorted (safetensors' own writer orders them at random, which
    would make two saves of the same adapter differ)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key, dtype, shape in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's data as safetensors stores it (little-endian, row-major), without a copy for a
    contiguous CPU tensor."""
    return memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A whole safetensors file, tensors in key order: the same bytes for the same tensors."""
    keys = sorted(tensors)
    head = header_bytes([(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in keys], metadata)
    return head + b"".join(tensor_bytes(tensors[k]) for k in keys)


def read_tensor(entry: TensorEntry, rows: slice | None = None) -> torch.Tensor:
    """A tensor (or rows ``rows`` of its dim 0) read with plain file reads. No memory map: pages
    read through a map kept open count as resident memory (the RSS grew by the file size)."""
    rows = rows if rows is not None else slice(0, entry.shape[0] if entry.shape else 1)
    count = rows.stop - rows.start
    row_bytes = entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else entry.nbytes
    buf = bytearray(row_bytes * count)
    with open(entry.file, "rb") as handle:
        handle.seek(entry.start + rows.start * row_bytes)
        if handle.readinto(buf) != len(buf):
            raise AdapterFileError(f"{entry.file} ended while reading tensor {entry.key!r}; it changed on disk "
                                   "while being read, or is truncated")
    shape = (count, *entry.shape[1:]) if entry.shape else ()
    if not buf:
        return torch.empty(shape, dtype=entry.torch_dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(entry.torch_dtype).reshape(shape)


# ---------------------------------------------------------------- one adapter tensor
def check_tensor(where: str, key: str, dtype: torch.dtype, shape: tuple[int, ...], target_dtype: torch.dtype,
                 target_shape: tuple[int, ...], load: Any = None) -> torch.Tensor | None:
    """Check one adapter tensor's shape and dtype against the tensor it fills; with ``load`` (a
    callable reading it), also its values, and return it cast to ``target_dtype``.

    Raises:
        AdapterFileError: a wrong shape, a non-float dtype, or non-finite values after the cast.
    """
    if tuple(shape) != tuple(target_shape):
        raise AdapterFileError(f"{where}: {key!r} has shape {tuple(shape)}, but the module it belongs to needs "
                               f"{tuple(target_shape)}")
    if dtype not in _FLOAT_DTYPES:
        raise AdapterFileError(f"{where}: {key!r} has dtype {dtype}, but adapter tensors are floating point "
                               f"(it would become {target_dtype})")
    if load is None:
        return None
    tensor = load().to(target_dtype)
    check_finite(where, key, [tensor], target_dtype)
    return tensor


def check_finite(where: str, key: str, chunks: Iterable[torch.Tensor], target_dtype: torch.dtype) -> None:
    """Every value of an adapter tensor, given in ``chunks`` (e.g. blocks of rows), is finite once
    cast to ``target_dtype``; else an AdapterFileError says how many are not."""
    bad = sum(int((~torch.isfinite(chunk.to(target_dtype))).sum()) for chunk in chunks)
    if bad:
        raise AdapterFileError(f"{where}: {key!r} has {bad} value(s) that are NaN or inf as {target_dtype} (the "
                               "dtype they are used in); the adapter is broken (diverged training?) or holds "
                               "values beyond that dtype's range")


def check_digest(weights_path: str, metadata: Mapping[str, str], config_data: Mapping[str, Any]) -> None:
    """A weights file saved by minilora names the config it was saved with (a save killed between
    its two renames leaves another one beside it): an AdapterFileError for another one."""
    digest = metadata.get(DIGEST_KEY)
    if digest is not None and digest != config_digest(config_data):
        raise AdapterFileError(
            f"{weights_path} was saved together with another {CONFIG_NAME} than the one beside it (the digest "
            f"in its metadata differs): the save that wrote them was interrupted between its two files, or "
            f"one of them was replaced or edited. Loading would apply the weights with the wrong settings; "
            f"save the adapter again")


# ---------------------------------------------------------------- an adapter file's keys
# file key suffix -> (LoraAdapter parameter, whether the suffix means an Embedding). DoRA's
# "lora_magnitude_vector" is the same for every kind: it tells nothing.
_UNDER_WRAPPERS = re.compile(r"(?:\.base_layer)+\.")  # peft nests wrappers of parameters: base_layer.base_layer
_SUFFIXES = {f".{suffix}": (param, embedding and suffix not in FACTOR_KEYS[False].values())
             for embedding, keys in FACTOR_KEYS.items() for param, suffix in keys.items()}


@dataclass
class AdapterModule:
    """One LoRA module of an adapter file: the file keys of its tensors, its scaling, its layout.
    ``transposed`` (the weight is stored (in, out)) is set by the offline merge once it knows the weight."""

    name: str
    lora_A: str | None = None
    lora_B: str | None = None
    lora_bias: str | None = None
    magnitude: str | None = None  # DoRA's lora_magnitude_vector
    embedding: bool = False
    scaling: float = 1.0
    transposed: bool = False
    parameter: bool = False  # LoRA on a parameter (target_parameters): ``name`` is the parameter's

    @property
    def weight_key(self) -> str:
        """The model key of the tensor the module's delta is added to."""
        return self.name if self.parameter else self.name + ".weight"


def adapter_modules(config: LoraConfig, tensors: Mapping[str, TensorEntry], where: str,
                    parameters: Mapping[str, str] | None = None) -> tuple[dict[str, AdapterModule], dict[str, str]]:
    """The LoRA modules of an adapter file by name, and model key -> file key for the tensors
    that replace a model tensor (modules_to_save copies, trained biases).

    ``parameters`` maps peft's module path of a LoRA on a parameter (:func:`param_module_key`)
    to the parameter's full name, which becomes the module's name; only the model knows it.

    Run it under ``patterns.time_budget()``: the config's rank/alpha patterns are matched here.

    Raises:
        ValueError: a key not in peft's format, another LoRA variant, a module lacking a factor, a
            scalar factor, a rank other than the config's (``rank_pattern``).
        AdapterFileError: DoRA magnitudes missing or present against the config's ``use_dora``.
    """
    modules: dict[str, AdapterModule] = {}
    replace: dict[str, str] = {}
    beside: dict[str, str] = {}
    for key in tensors:
        name = key[len(PEFT_PREFIX):]
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"adapter tensor {key!r} does not start with {PEFT_PREFIX!r}; {where} is not in peft's "
                             "format")
        if not name:
            raise ValueError(f"{where}: adapter tensor {key!r} names no module after {PEFT_PREFIX!r}; the file is "
                             "not in peft's format")
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if name.endswith("." + TOKEN_KEY):
            continue  # token rows: see token_rows
        if suffix is not None:
            factor, embedding = _SUFFIXES[suffix]
            module = modules.setdefault(name[: -len(suffix)], AdapterModule(name[: -len(suffix)]))
            setattr(module, factor, key)
            module.embedding |= embedding
        elif ".lora_" in name:
            raise ValueError(f"adapter tensor {key!r} is neither LoRA nor DoRA (another variant?); minilora merge "
                             "knows lora_A / lora_B / lora_embedding_A / lora_embedding_B / lora_magnitude_vector")
        elif ".base_layer." in name:  # an adapted module's own tensor saved anew: a trained bias
            # (bias="lora_only"), an untied embedding, the base weight of a resized vocabulary (also
            # under trainable tokens' wrapper)
            name = name.replace(f".{BASE_WEIGHT_KEYS['tokens']}", f".{BASE_WEIGHT_KEYS['lora']}")
            replace[_UNDER_WRAPPERS.sub(".", name)] = key
        elif ".original_module." in name or ".modules_to_save." in name:
            # peft's save_embedding_layers beside a modules_to_save copy writes the original's rows
            # and the copy once more: the rows stand in where no copy does, the copy is the same
            beside[name.replace(".original_module.", ".").replace(".modules_to_save.", ".")] = key
        else:  # a modules_to_save copy's parameter, or a trained bias of a plain module
            replace[name] = key
    for name, key in beside.items():
        replace.setdefault(name, key)
    for path, module in list(modules.items()):
        if parameters and path in parameters:
            del modules[path]
            module.name, module.parameter = parameters[path], True
            modules[module.name] = module
    for module in modules.values():
        _check_factors(config, module, tensors, where)
    _check_dora(config, modules, where)
    return modules, replace


def _check_factors(config: LoraConfig, module: AdapterModule, tensors: Mapping[str, TensorEntry], where: str) -> None:
    """Both factors present and not scalars, the rank the config gives the module; sets its scaling."""
    if module.lora_A is None or module.lora_B is None:
        has = ("lora_A" if module.lora_A is not None else "lora_B" if module.lora_B is not None
               else "lora_magnitude_vector" if module.magnitude is not None else "lora_B.bias")
        lacks = ("neither lora_A nor lora_B" if module.lora_A is None and module.lora_B is None
                 else f"not {'lora_A' if module.lora_A is None else 'lora_B'}")
        raise ValueError(f"adapter has {has} but {lacks} for {module.name!r}; the file is incomplete")
    for factor in (module.lora_A, module.lora_B):  # (more on dims once the weight is known)
        if not tensors[factor].shape:
            raise ValueError(f"{where}: {factor!r} is a scalar; LoRA factors have 2 or more dims, so the adapter "
                             "file is malformed")
    r = tensors[module.lora_A].shape[0]
    want_r, alpha = config.rank_and_alpha(module.name)
    if module.parameter and r % want_r == 0:  # E experts stack E rank-r pairs (checked against E later)
        r = want_r
    if r != want_r:
        raise ValueError(f"{CONFIG_NAME} gives {module.name!r} rank {want_r}, but its lora_A has rank {r}; the "
                         "config and the weights do not belong together")
    module.scaling = config.scaling_for(r, alpha)


def _check_dora(config: LoraConfig, modules: Mapping[str, AdapterModule], where: str) -> None:
    """A DoRA magnitude for every module when the config says ``use_dora``, and none otherwise:
    the keys ``load_adapter`` would find missing or unexpected, refused in the same terms."""
    odd = sorted(m.name for m in modules.values() if (m.magnitude is None) == config.use_dora)
    if not odd:
        return
    more = f" (and {len(odd) - 1} more module(s))" if len(odd) > 1 else ""
    if config.use_dora:
        raise AdapterFileError(
            f"{where} lacks {PEFT_PREFIX + odd[0] + '.' + FACTOR_KEYS[False]['magnitude']!r}{more}, the DoRA "
            f"magnitude of LoRA module {odd[0]!r} that the config implies ({CONFIG_NAME} says use_dora=true); the "
            "file does not belong to this config")
    raise AdapterFileError(
        f"{where} has the unexpected key {modules[odd[0]].magnitude!r}{more}, a DoRA magnitude of LoRA module "
        f"{odd[0]!r}, but {CONFIG_NAME} says use_dora=false; the file does not belong to this config")


def token_rows(config: LoraConfig, tensors: Mapping[str, TensorEntry], where: str) -> dict[str, tuple[str, list[int]]]:
    """Module name -> (file key, token ids) for every module whose token rows the adapter file
    holds (``trainable_token_indices``); each ``(k, dim)`` with k the config's ids for it.

    Raises:
        ValueError: token rows without ``trainable_token_indices`` in the config, rows of a module
            the config gives no ids, a shape that is not (number of ids, dim), or a module of the
            config's dict form that the file has no rows for.
    """
    found: dict[str, tuple[str, list[int]]] = {}
    for key in tensors:
        name = key[len(PEFT_PREFIX):-len(TOKEN_KEY) - 1]
        if not key.startswith(PEFT_PREFIX) or not key.endswith("." + TOKEN_KEY) or not name:
            continue
        ids = config.token_indices_for(name)
        if ids is None:
            given = config.trainable_token_indices
            raise ValueError(f"{where} has token rows {key!r}, but {CONFIG_NAME} gives {name!r} no token ids "
                             f"(trainable_token_indices={given!r}); the config and the weights do not belong together")
        shape = tuple(tensors[key].shape)
        if len(shape) != 2 or shape[0] != len(ids):
            raise ValueError(f"{where}: token rows {key!r} have shape {list(shape)}, but {CONFIG_NAME} gives "
                             f"{name!r} {len(ids)} token ids, so they must be [{len(ids)}, dim]; the file is malformed")
        found[name] = (key, ids)
    value = config.trainable_token_indices
    wanted = list(value) if isinstance(value, dict) else ["the input embedding"] if value else []
    missing = [w for w in wanted if not any(isinstance(value, list) or matches_name(n, [w]) for n in found)]
    if missing:
        raise AdapterFileError(f"{where} lacks the token rows ({TOKEN_KEY}) that {CONFIG_NAME} implies for "
                               f"{missing[0]!r} (trainable_token_indices={value!r}); the file does not belong to "
                               "this config")
    return found
