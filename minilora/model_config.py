"""A transformers model described by its ``config.json`` alone: read it, build the model on the
meta device (shapes, no memory, no weights; a 70B config in about a second), list what LoRA can
adapt, and fold repeated blocks (``model.layers.{0..31}.self_attn.q_proj``). Used by
``minilora inspect`` and by the offline merge (which modules are Conv1D, which weights are tied).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn as nn

from minilora.layers import LoraConv, LoraConv1D, LoraEmbedding, lora_layer_class
from minilora.peft_format import read_json

__all__ = ["CONFIG_FILE", "NotBuildable", "read_model_config", "meta_model", "adaptable_modules",
           "adaptable_parameters", "expert_sources", "group_names", "one_line"]

CONFIG_FILE = "config.json"
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a numeric path segment: model.layers.<3>.mlp
#: Modules a meta-device build may register before it is stopped. The largest real models have
#: under 100,000 (DeepSeek-V3 with unfused experts: 61 layers x 256 experts x 4, ...); one costs
#: 60-100 us and 3 KB to build, so a config with an absurd layer count stops within ~15 s and 500 MB.
MAX_MODULES = 150_000


class NotBuildable(ValueError):
    """config.json is a readable JSON object, but transformers cannot build a model from it: an
    unknown model_type or architecture (custom code, never run), or field values it refuses."""


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """The JSON object of ``folder/config.json``, read with bounded size; FileNotFoundError
    without one, ValueError (naming the file) for anything but a regular file holding an object."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        if path.exists() and not path.is_dir():  # a pipe would block the read forever
            raise ValueError(f"{path} is not a regular file (a pipe or a device?); give the model's JSON config")
        if not path.exists():
            raise FileNotFoundError(f"MODEL_DIR {folder} has no {CONFIG_FILE}; give a transformers model folder")
    data = read_json(path, "a transformers model config")
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object of model config fields")
    return data


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _without_auto_map(value: Any) -> Any:
    """``value`` with every "auto_map" (custom code in the folder, which transformers would offer
    to run) removed."""
    if isinstance(value, dict):
        return {k: _without_auto_map(v) for k, v in value.items() if k != "auto_map"}
    if isinstance(value, list):
        return [_without_auto_map(v) for v in value]
    return value


def _kind(value: Any) -> str:
    return {bool: "a bool", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _suspects(fields: dict[str, Any], config_class: type) -> str:
    """After transformers refused a config: a hint naming the fields whose JSON type differs from
    the config class's default (a list where the default is a number is fine: token ids)."""
    try:
        defaults = config_class().to_dict()
    except Exception:  # noqa: BLE001 -- no defaults to compare with: no hint
        return ""
    odd = [f"{k!r} is {_short(v)} where {config_class.__name__} has {_kind(defaults[k])} ({_short(defaults[k])})"
           for k, v in fields.items()
           if defaults.get(k) is not None and v is not None and _kind(v) != _kind(defaults[k])
           and not (_kind(defaults[k]) == "a number" and _kind(v) == "a list")]
    return f"; check {', '.join(odd[:3])}" if odd else ""


@contextlib.contextmanager
def _quiet_bounded_build(path: Path) -> Iterator[None]:
    """No transformers log lines or warnings (a CLI error is one line), and at most MAX_MODULES
    modules registered (a config is untrusted input: its layer count bounds time and memory)."""
    import transformers
    from torch.nn.modules.module import register_module_module_registration_hook

    count = 0

    def budget(module: nn.Module, name: str, sub: nn.Module | None) -> None:
        nonlocal count
        count += 1
        if count > MAX_MODULES:
            raise NotBuildable(f"{path} describes a model of more than {MAX_MODULES:,d} modules (the largest real "
                               "models have under 100,000); check its layer and expert counts")

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    handle = register_module_module_registration_hook(budget)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        handle.remove()
        transformers.logging.set_verbosity(verbosity)


def _model_class(transformers: Any, arch: str, path: Path) -> type | None:
    """transformers' own class named ``arch`` (never code from the folder), or None."""
    if not arch.isidentifier():
        return None
    try:
        cls = getattr(transformers, arch, None)
    except Exception as err:  # noqa: BLE001 -- the lazy import of its module failed (a missing extra package)
        raise NotBuildable(f"{path} names architecture {arch!r}, which transformers cannot import here: "
                           f"{one_line(err)}") from None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def meta_model(folder: str | Path, *, guess_class: bool = True) -> nn.Module:
    """The model described by ``folder/config.json``, built on the meta device (no weights),
    from transformers' own classes only: nothing from the folder (``auto_map``) is ever run.

    Args:
        guess_class: without ``architectures``, build what ``AutoModel`` picks for the config
            (else that is NotBuildable: a caller relying on module names should not guess).

    Raises:
        FileNotFoundError / ValueError: as :func:`read_model_config`, or fields of the wrong type.
        NotBuildable: transformers does not know the model_type or the architecture (e.g. a
            trust_remote_code model), or refuses the config's values.
    """
    import torch
    import transformers

    path = Path(folder) / CONFIG_FILE
    fields = read_model_config(folder)
    model_type, arch, cls = _checked_names(transformers, fields, path, guess_class)
    with _quiet_bounded_build(path):
        config_class, config = _config(transformers, fields, model_type, path)
        wanted = getattr(cls, "config_class", None)
        if isinstance(wanted, type) and not isinstance(config, wanted):
            raise NotBuildable(f"{path} names architecture {arch!r}, which takes a {wanted.__name__}, but its "
                               f"model_type {model_type!r} makes a {type(config).__name__}")
        try:
            with torch.device("meta"):
                if cls is not None:
                    return cls(config)
                return transformers.AutoModel.from_config(config, trust_remote_code=False)
        except NotBuildable:
            raise
        except Exception as err:  # noqa: BLE001 -- a model's __init__ fails on odd values in many ways
            raise NotBuildable(f"{path}: transformers {transformers.__version__} could not build "
                               f"{arch or 'a model'} from it: {one_line(err)}"
                               f"{_suspects(fields, config_class)}") from None


def _checked_names(transformers: Any, fields: dict[str, Any], path: Path, guess_class: bool,
                   ) -> tuple[str, str | None, type | None]:
    """(model_type, architecture or None, transformers' class for it or None), each checked
    against what this transformers knows (see ``meta_model`` for the errors)."""
    version = f"transformers {transformers.__version__}"
    archs, model_type = fields.get("architectures"), fields.get("model_type")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ValueError(f"{path}: 'architectures' is {_short(archs)}, expected a list of model class names such as "
                       "['LlamaForCausalLM']")
    if model_type is not None and not isinstance(model_type, str):
        raise ValueError(f"{path}: 'model_type' is {_short(model_type)}, expected a name such as 'llama'")
    arch = archs[0] if archs else None
    if arch is None and not guess_class:
        raise NotBuildable(f"{path} names no architecture")
    custom = (" (its auto_map names custom code in the folder, which minilora never runs)"
              if "auto_map" in fields else "")
    if model_type is None:
        raise NotBuildable(f"{path} has no 'model_type', which names the config class transformers should use")
    if model_type not in transformers.CONFIG_MAPPING:
        raise NotBuildable(f"{path} has model_type {model_type!r}, which {version} does not know{custom}")
    cls = _model_class(transformers, arch, path) if arch is not None else None
    if arch is not None and cls is None:
        raise NotBuildable(f"{CONFIG_FILE} names architecture {arch!r}, which {version} does not have "
                           f"(custom code is never run){custom}")
    return model_type, arch, cls


def _config(transformers: Any, fields: dict[str, Any], model_type: str, path: Path) -> tuple[type, Any]:
    """(config class, config) of ``model_type`` from the fields, without any auto_map."""
    version = f"transformers {transformers.__version__}"
    try:
        config_class = transformers.CONFIG_MAPPING[model_type]
    except Exception as err:  # noqa: BLE001 -- the lazy import of its module failed (a missing extra package)
        raise NotBuildable(f"{path}: {version} cannot import the config of model_type {model_type!r} here: "
                           f"{one_line(err)}") from None
    try:
        return config_class, config_class.from_dict(_without_auto_map(fields))
    except Exception as err:  # noqa: BLE001 -- transformers validates fields with many exception types
        raise NotBuildable(f"{path}: {version} refuses it as a model_type {model_type!r} config: "
                           f"{one_line(err)}{_suspects(fields, config_class)}") from None


def _describe(module: nn.Module) -> str:
    """'Linear 4096->11008', 'Conv1D 768->2304', 'Embedding 32000x4096', 'Conv2d 4->8 k3x3'."""
    cls = lora_layer_class(module)
    if isinstance(module, nn.MultiheadAttention):
        return f"MultiheadAttention {module.embed_dim}, {module.num_heads} heads"
    w = module.weight
    if cls is LoraConv1D:
        return f"Conv1D {w.shape[0]}->{w.shape[1]}"
    if cls is LoraEmbedding:
        return f"Embedding {w.shape[0]}x{w.shape[1]}"
    if cls is LoraConv:
        kernel = "x".join(map(str, module.kernel_size))
        return f"{type(module).__name__} {module.in_channels}->{module.out_channels} k{kernel}"
    return f"{type(module).__name__} {w.shape[1]}->{w.shape[0]}"


def adaptable_modules(model: nn.Module) -> dict[str, str]:
    """Every module LoRA supports, name -> short description, in model order. An
    nn.MultiheadAttention's out_proj is not one: the attention never calls it (target the attention)."""
    attention = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return {n: _describe(m) for n, m in model.named_modules()
            if n and n not in attention and lora_layer_class(m) is not None}


def adaptable_parameters(model: nn.Module) -> dict[str, str]:
    """Every 2-D or 3-D parameter outside the modules LoRA adapts as modules (fused MoE expert
    stacks, custom layers), full name -> shape, in model order: the candidates for
    ``target_parameters``. A 3-D parameter (experts, ., .) gets one update per expert."""
    out = {}
    for name, module in model.named_modules():
        if lora_layer_class(module) is not None:
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                out[f"{name}.{pname}" if name else pname] = f"{param.shape[0]} experts x {tuple(param.shape[1:])}"
            elif param.dim() == 2:
                out[f"{name}.{pname}" if name else pname] = f"Parameter {tuple(param.shape)}"
    return out


def expert_sources(model: nn.Module, shapes: dict[str, tuple[int, ...]], wanted: set[str]
                   ) -> dict[str, tuple[str, int, slice]]:
    """Where the checkpoint keeps the fused expert parameters named in ``wanted``, when it stores
    one tensor per expert (Mixtral's ``block_sparse_moe.experts.3.w1.weight``, Qwen-MoE's
    ``mlp.experts.3.gate_proj.weight``) and transformers stacks and concatenates them on load:
    checkpoint key -> (parameter name, expert, its rows within that expert's (out, in) slice).
    Read from transformers' own conversion rules; only stacking along experts (``MergeModulelist``
    on dim 0), then concatenating along dim 1 (``Concatenate``), is understood.

    Args:
        shapes: every checkpoint key -> its shape (the rows of a concatenated part).
    Raises:
        ValueError: a wanted parameter is built from the checkpoint in another way.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, apply_renamings,
                                                     rename_source_key)
    except ImportError:
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    parts: dict[tuple[str, int], dict[int, str]] = {}  # (parameter, expert) -> {source number: key}
    for key in shapes:
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if pattern is None or target not in wanted:
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        ops = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        if ops not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
            raise ValueError(f"the checkpoint stores {target!r} as {key!r} and more, which transformers converts "
                             f"with {converter.operations}; minilora merge can add LoRA only to expert stacks "
                             "stored whole or one tensor per expert (stacked, then concatenated along dim 1)")
        expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), apply_renamings(key, renamings))
        parts.setdefault((target, int(expert[1])), {})[converter.source_patterns.index(pattern)] = key
    out = {}
    for (target, expert), keys in parts.items():
        start = 0
        for number in sorted(keys):
            rows = shapes[keys[number]][0]
            out[keys[number]] = (target, expert, slice(start, start + rows))
            start += rows
    return out


def _span(values: list[int]) -> str:
    values = sorted(set(values))
    if len(values) == 1:  # the same number in every member (t5's "layer.0"): no braces
        return str(values[0])
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def group_names(described: dict[str, str]) -> list[tuple[str, str, int]]:
    """Fold names that differ only in their layer numbers (and have the same description):
    [('model.layers.{0..31}.self_attn.q_proj', 'Linear 4096->4096', 32), ...] in model order."""
    groups: dict[tuple[str, str], list[list[int]]] = {}
    for name, what in described.items():
        key = (_INDEX.sub("#", name), what)
        groups.setdefault(key, []).append([int(i) for i in _INDEX.findall(name)])
    out = []
    for (pattern, what), indices in groups.items():
        if len(indices) == 1:
            out.append((pattern.replace("#", "{}").format(*indices[0]), what, 1))
            continue
        spans = [_span([ix[pos] for ix in indices]) for pos in range(len(indices[0]))]
        out.append((pattern.replace("#", "{}").format(*spans), what, len(indices)))
    return out


# "TypeError: " / "safetensors_rust.SafetensorError: " inside a message (libraries nest causes so).
_CLASS_PREFIX = re.compile(r"\b(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception): ")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line, without exception class names in it."""
    text = str(err) or type(err).__name__
    if isinstance(err, KeyError):  # str(KeyError('x')) is "'x'": say what it was
        text = f"missing key {text}"
    return _CLASS_PREFIX.sub("", " ".join(text.split()))
