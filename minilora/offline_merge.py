"""The offline merge: a peft-format adapter folded into a safetensors checkpoint, block by block.

:func:`merge_checkpoint` never builds the model with weights. The adapter is read and checked by
``minilora.peft_format`` (as ``load_adapter`` reads it); every checkpoint tensor is then streamed
in ``ops.row_blocks`` blocks of rows with plain file reads (no memory map, whose pages would count
as resident memory), merged, written and forgotten: peak memory is a few blocks plus the factors.

Bit-equality with ``merge_and_unload`` holds by construction: the same ``ops.lora_delta`` on the
same rows, W + delta computed in ``ops.merge_dtype`` and rounded once. DoRA merges to
(m / ‖V‖) ⊙ V with V = W + s·B@A, norms summed by ``ops.dora_merge_norm`` over the same blocks in
the same order as ``LoraLayer.merged_weights``; where outputs are columns (Conv1D, Embedding) a
first pass sums the norms and a second scales each block.

Trained token rows (``trainable_token_indices``) replace their rows of the weight, rounded to its
dtype, as ``TrainableTokens.merge`` writes them; every name tied to that weight (known from
config.json) gets the same rows, as the in-memory merge writes the one shared Parameter.

Tied weights: the checkpoint stores one tensor for the group. If every member merges to the same
values the group stays tied; otherwise each is written and ``tie_word_embeddings`` set to false,
as ``merge_and_unload`` unties a LoRA-adapted tied embedding. OUT is written with
``atomic.new_folder`` (complete or not at all), with new files' modes, never inside BASE.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minilora import atomic
from minilora.config import LoraConfig
from minilora.matching import closest_names, matches_name
from minilora.model_config import CONFIG_FILE, NotBuildable, expert_sources, meta_model
from minilora.ops import (dora_merge_norm, expert_factors, grouped_merge_problem, lora_delta, merge_dtype, param_delta,
                          row_blocks)
from minilora.params import factor_shapes, stack_transposed
from minilora.patterns import PatternError, time_budget
from minilora.peft_format import (CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, AdapterFileError, AdapterModule,
                                  TensorEntry, adapter_modules, check_digest, check_finite, check_tensor,
                                  header_bytes, param_module_key, read_config_file, read_header, read_json, read_tensor,
                                  tensor_bytes, token_rows)
from minilora.tree import vocabulary_ends

__all__ = ["merge_checkpoint", "MergeSummary"]

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Files that hold (unmerged) weights in another format: never copied into OUT, never unpickled.
_STALE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
# ... nor is any .safetensors file but the merged shards (Mistral's consolidated.safetensors, a
# model.safetensors beside an index): OUT must not carry a second, unmerged copy of the weights.
_UNMERGED_WEIGHTS = (*_STALE_WEIGHTS, ".safetensors")
#: DeepSeek-V3's index (91,000 tensors) is 9 MiB; this bounds the time and memory of reading one.
_MAX_INDEX_BYTES = 64 << 20
#: Entries (files and folders, counting through folder links) copied from BASE at most: real
#: checkpoints have tens; this bounds a tree of links that fans out exponentially.
_MAX_SIDE_ENTRIES = 100_000


@dataclass
class MergeSummary:
    """What ``merge_checkpoint`` wrote."""

    out: Path
    lora_modules: int
    replaced: int
    tensors: int
    shards: int
    bytes_written: int
    untied: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    renamed: tuple[str, str] | None = None  # (old prefix, new prefix) of the adapter's module names
    dora_modules: int = 0  # of lora_modules, those with a DoRA magnitude
    token_weights: int = 0  # weights given trained token rows (trainable_token_indices), tied names included
    vocab_size: int | None = None  # the vocabulary grown (or shrunk) before training, now in config.json


def _shard_name_ok(name: object) -> bool:
    """A shard named in an index must be a .safetensors file directly in BASE: a path with folders
    or '..' could point anywhere, and the merged shard is written under the same name."""
    return isinstance(name, str) and name.endswith(".safetensors") and not any(c in name for c in "/\\\0")


def _checkpoint(base: Path) -> tuple[dict[str, TensorEntry], dict[str, dict[str, str]], dict | None]:
    """All checkpoint tensors, per-shard metadata, and the index json (None for one file)."""
    index_path, single = base / INDEX_FILE, base / SINGLE_FILE
    if index_path.is_file():
        index = read_json(index_path, "a safetensors index (metadata and weight_map)", limit=_MAX_INDEX_BYTES)
        if not isinstance(index, dict):
            raise ValueError(f"{index_path} holds a JSON {type(index).__name__}, expected an object with a "
                             "'weight_map' of tensor name -> shard file")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map' object of tensor name -> shard file; it is not a "
                             "safetensors index")
        for key, shard in weight_map.items():
            if not _shard_name_ok(shard):
                shown = repr(shard) if len(repr(shard)) <= 60 else repr(shard)[:57] + "..."
                raise ValueError(f"{index_path}: weight_map maps {key!r} to {shown}; a shard must be the name of "
                                 "a .safetensors file directly in BASE (no folders, no '..')")
        if not isinstance(index.get("metadata", {}), (dict, type(None))):
            raise ValueError(f"{index_path}: 'metadata' is a {type(index['metadata']).__name__}, expected an object "
                             "such as {\"total_size\": ...}")
        shards = sorted(set(weight_map.values()))
    elif single.is_file():
        index, shards = None, [SINGLE_FILE]
    else:
        for path in (index_path, single):
            if path.exists():  # a folder or a pipe where the weights should be
                raise ValueError(f"{path} is not a regular file; BASE must hold the checkpoint's weights as "
                                 f"{SINGLE_FILE} or as shards named in {INDEX_FILE}")
        pickled = sorted(p.name for p in base.iterdir() if p.name.endswith(_STALE_WEIGHTS))
        hint = (f"; it has {pickled}, which minilora never unpickles: re-save the model with "
                "save_pretrained(..., safe_serialization=True)") if pickled else ""
        raise FileNotFoundError(f"BASE {base} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, dict[str, str]] = {}
    for shard in shards:
        if not (base / shard).is_file():
            what = "is not a regular file" if (base / shard).exists() else "does not exist"
            raise FileNotFoundError(f"{INDEX_FILE} in {base} names shard {shard!r}, which {what}")
        entries, metadata[shard] = read_header(base / shard)
        for key, entry in entries.items():
            if key in tensors:  # which copy a loader takes is up to the loader: refuse to guess
                raise ValueError(f"tensor {key!r} is in two shards of {base}, "
                                 f"{os.path.basename(tensors[key].file)} and {shard}; remove one")
            tensors[key] = entry
    if index is not None:
        missing = [k for k, shard in index["weight_map"].items() if k not in tensors]
        if missing:
            raise ValueError(f"{INDEX_FILE} in {base} lists {missing[0]!r} (and {len(missing) - 1} more) "
                             "that no shard holds; the checkpoint is incomplete")
    return tensors, metadata, index


# ---------------------------------------------------------------- understanding the adapter
def _read_adapter(adapter: Path, base: Path, ck_tensors: dict[str, TensorEntry]
                  ) -> tuple[LoraConfig, dict[str, TensorEntry], dict[str, AdapterModule], dict[str, str],
                             dict[str, tuple[str, list[int]]], _Facts]:
    """The config, the adapter tensors, LoRA modules by name, checkpoint key -> adapter key for
    tensors that replace a base tensor (modules_to_save copies, trained biases), module name ->
    (adapter key, token ids) for trained token rows, and the facts of the base model that reading
    the adapter's keys needed."""
    config_path, weights_path = adapter / CONFIG_NAME, adapter / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"ADAPTER {adapter} has no {CONFIG_NAME}; is it a peft adapter folder?")
    if not weights_path.is_file():
        pickled = (adapter / PICKLE_NAME).is_file()
        hint = f" (it has {PICKLE_NAME}, which minilora never unpickles; re-save it with peft or minilora)" \
            if pickled else ""
        raise FileNotFoundError(f"ADAPTER {adapter} has no {WEIGHTS_NAME}{hint}")
    config, config_data = read_config_file(adapter)
    tensors, metadata = read_header(weights_path)
    check_digest(str(weights_path), metadata, config_data)
    facts = _model_facts(base, config.target_parameters or [], {k: e.shape for k, e in ck_tensors.items()})
    if config.target_parameters and facts.conv1d is None:
        raise ValueError(f"{config_path} adapts parameters (target_parameters={config.target_parameters}); merging "
                         f"it needs the model built from {base / CONFIG_FILE} with transformers, because peft's keys "
                         "for several parameters of one module depend on the module's parameter order")
    try:
        with time_budget():  # rank/alpha patterns from the file are matched below
            modules, replace = adapter_modules(config, tensors, str(weights_path), facts.parameters)
            tokens = token_rows(config, tensors, str(weights_path))
    except PatternError as err:
        raise AdapterFileError(f"{config_path}: {err}") from None
    return config, tensors, modules, replace, tokens, facts


def _check_values(modules, replace, ad_tensors, ck_tensors, tied_to, facts: _Facts, adapter: Path, rows) -> None:
    """Every adapter tensor is floating point and finite in the dtype it is used in (the merge
    dtype for factors, the checkpoint's for a replacing tensor or token rows), read in blocks of rows."""
    where = str(adapter / WEIGHTS_NAME)
    uses = [(getattr(m, f), merge_dtype((_stored(ck_tensors, tied_to, m.weight_key)
                                         or facts.stored_as(ck_tensors, m)).torch_dtype))
            for m in modules.values() for f in ("lora_A", "lora_B", "lora_bias", "magnitude")
            if getattr(m, f) is not None]
    uses += [(ad_key, _stored(ck_tensors, tied_to, key).torch_dtype) for key, ad_key in replace.items()]
    uses += list({(ad_key, _stored(ck_tensors, tied_to, key).torch_dtype) for key, (ad_key, _) in rows.items()})
    for ad_key, dtype in sorted(uses):
        entry = ad_tensors[ad_key]
        check_tensor(where, ad_key, entry.torch_dtype, entry.shape, dtype, entry.shape)
        check_finite(where, ad_key, (read_tensor(entry, rows) for rows in row_blocks(entry.shape)), dtype)


def _stored(ck_tensors: dict[str, TensorEntry], tied_to: dict[str, str], key: str) -> TensorEntry | None:
    """The checkpoint entry holding ``key``: its own, or the tied tensor stored in its place."""
    return ck_tensors.get(key) or ck_tensors.get(tied_to.get(key, ""))


@dataclass
class _Facts:
    """What the base model's classes tell about its checkpoint (``conv1d`` None: unknown)."""

    conv1d: set[str] | None = None  # names of transformers Conv1D modules
    groups: list[list[str]] = field(default_factory=list)  # tied parameter names
    parameters: dict[str, str] = field(default_factory=dict)  # peft's wrapper path -> parameter name
    transposed: set[str] = field(default_factory=set)  # expert stacks stored (experts, in, out)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # targeted parameter -> shape
    experts: dict[str, tuple[str, int, slice]] = field(default_factory=dict)  # see model_config.expert_sources
    parts: dict[str, list[str]] = field(default_factory=dict)  # parameter stored per expert -> its keys
    vocabulary: set[str] = field(default_factory=set)  # the weights of the token embedding and output head

    def stored_as(self, ck_tensors: dict[str, TensorEntry], m: AdapterModule) -> TensorEntry | None:
        """The checkpoint entry of a module's weight, or of the first part of a stack stored per expert."""
        parts = self.parts.get(m.weight_key) if m.parameter else None
        return ck_tensors[parts[0]] if parts else None


def _model_facts(base: Path, target_parameters: list[str] | tuple[()] = (),
                 ck_shapes: dict[str, tuple[int, ...]] | None = None) -> _Facts:
    """The facts from the model ``model_config.meta_model`` builds; unknown (shapes then decide
    alone) without config.json, transformers, or a model it can build without guessing the class.
    A config.json that is not a readable JSON object is an error: OUT would get a copy of it."""
    if not (base / CONFIG_FILE).exists():
        return _Facts()
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return _Facts()
    try:
        model = meta_model(base, guess_class=False)
    except NotBuildable:
        return _Facts()
    facts = _Facts({n for n, m in model.named_modules() if isinstance(m, Conv1D)})
    ends = [end for end in vocabulary_ends(model) if end is not None]
    facts.vocabulary = {f"{n}.weight" for n, m in model.named_modules() if any(m is end for end in ends)}
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    facts.groups = [g for g in groups.values() if len(g) > 1]
    for name, module in model.named_modules() if target_parameters else ():
        chosen = [p for p in module._parameters if matches_name(f"{name}.{p}", target_parameters)]
        for index, param in enumerate(chosen):
            facts.shapes[f"{name}.{param}"] = tuple(module._parameters[param].shape)
            # The adapter may name the backbone alone (its first component dropped): both spellings.
            for module_name in {name, name.partition(".")[2] or name}:
                facts.parameters[param_module_key(module_name, index, len(chosen))] = f"{module_name}.{param}"
                if stack_transposed(module._parameters[param], module):
                    facts.transposed.add(f"{module_name}.{param}")
    if facts.shapes and ck_shapes is not None:
        facts.experts = expert_sources(model, ck_shapes, set(facts.shapes) - set(ck_shapes))
        for key, (param, _, _) in sorted(facts.experts.items()):
            facts.parts.setdefault(param, []).append(key)
    return facts


def _not_found(key: str, what: str, tensors: dict[str, TensorEntry], base: Path) -> ValueError:
    close = closest_names(key, list(tensors))
    hint = f" (closest: {', '.join(close)})" if close else ""
    return ValueError(f"adapter does not fit the checkpoint: {what} needs {key!r}, which is not in {base}{hint}")


def _align_prefix(modules: dict[str, AdapterModule], replace: dict[str, str], known: set[str]
                  ) -> tuple[dict[str, AdapterModule], dict[str, str], tuple[str, str] | None]:
    """An adapter trained on the bare backbone (``layers.0...``) merged into a checkpoint of the
    model with a head (``model.layers.0...``), or the other way round: drop the names' one common
    first component, or add one of the checkpoint's, if that makes every name fit. Returns the
    (possibly renamed) modules and replace map, and (old, new) prefix or None."""
    def fits(strip: str, add: str) -> bool:
        return (all(add + m.weight_key[len(strip):] in known for m in modules.values())
                and all(add + key[len(strip):] in known for key in replace))

    names = [*modules, *replace]
    if not names or fits("", ""):
        return modules, replace, None
    firsts = {n.split(".", 1)[0] for n in names}
    candidates = [(next(iter(firsts)) + ".", "")] if len(firsts) == 1 and all("." in n for n in names) else []
    candidates += [("", head + ".") for head in sorted({k.split(".", 1)[0] for k in known if "." in k})]
    for strip, add in candidates:
        if fits(strip, add):
            for m in modules.values():
                m.name = add + m.name[len(strip):]
            return ({m.name: m for m in modules.values()},
                    {add + k[len(strip):]: v for k, v in replace.items()}, (strip, add))
    return modules, replace, None


def _factor_problem(m: AdapterModule, A: tuple[int, ...], B: tuple[int, ...], W: tuple[int, ...]) -> str | None:
    """What is wrong with a module's LoRA factors on their own, or None: a Linear, Conv1D or
    Embedding weight (2-D) takes 2-D factors, a ConvNd weight A (r, in, *kernel) and B (out, r, 1, ...);
    the ranks agree (a grouped conv's B has r // groups, refused once the weight is known)."""
    if len(W) < 2:
        return (f"its weight is {list(W)}, which LoRA cannot adapt (Linear, Embedding and Conv weights have 2 or "
                "more dims)")
    dims = 2 if len(W) == 2 or m.embedding else len(W)
    if len(A) != dims or len(B) != dims:
        return f"lora_A {list(A)} and lora_B {list(B)} must both be {dims}-D for its {len(W)}-D weight {list(W)}"
    if any(d != 1 for d in B[2:]):
        return f"lora_B {list(B)} must be 1 in every kernel dim (a 1x1 conv)"
    if B[1] != A[0] if dims == 2 else (B[1] == 0 or A[0] % B[1]):
        return f"lora_A {list(A)} has rank {A[0]} but lora_B {list(B)} has rank {B[1]}"
    return None


def _check_parameter(m: AdapterModule, A: tuple[int, ...], B: tuple[int, ...], W: tuple[int, ...],
                     config: LoraConfig, adapter: Path) -> None:
    """A LoRA on a parameter: 2-D (out, in) takes A (r, in), B (out, r); a stack of E experts
    (E, out, in), or (E, in, out) when transposed, takes A (E·r, in), B (out, E·r)."""
    if len(W) not in (2, 3):
        raise ValueError(f"adapter does not fit the checkpoint: parameter {m.name!r} has shape {list(W)}; LoRA on "
                         "a parameter needs a 2-D (out, in) or 3-D (experts, ...) one")
    r = config.rank_and_alpha(m.name)[0]
    want = factor_shapes(W, r, m.transposed)
    if (A, B) != want:
        raise ValueError(f"adapter does not fit the checkpoint: parameter {m.name!r} has shape {list(W)}, which "
                         f"takes lora_A {list(want[0])} and lora_B {list(want[1])} at rank {r}, but the adapter "
                         f"has {list(A)} and {list(B)} (in {adapter / WEIGHTS_NAME}); was it trained on another "
                         "model?")


def _check_parts(m: AdapterModule, facts: _Facts, ck_tensors: dict[str, TensorEntry]) -> None:
    """A stack stored one tensor per expert: every expert present, each part (rows, in)."""
    shape = facts.shapes[m.name]
    keys = facts.parts[m.name]
    experts = {facts.experts[k][1] for k in keys}
    if m.transposed or len(shape) != 3 or experts != set(range(shape[0])):
        raise ValueError(f"the checkpoint stores {m.name!r} {list(shape)} one tensor per expert, but not as "
                         f"(rows, in) parts of experts 0..{shape[0] - 1} (found experts {sorted(experts)}); "
                         "minilora merge cannot add its LoRA there")
    for key in keys:
        rows = facts.experts[key][2]
        want = (rows.stop - rows.start, shape[2])
        if tuple(ck_tensors[key].shape) != want or rows.stop > shape[1]:
            raise ValueError(f"the checkpoint's {key!r} has shape {list(ck_tensors[key].shape)}, but as part of "
                             f"{m.name!r} {list(shape)} it must be {list(want)}")


def _weight_shape(m: AdapterModule, ck_tensors: dict[str, TensorEntry], tied_to: dict[str, str], facts: _Facts,
                  base: Path) -> tuple[int, ...]:
    """The shape of the tensor a module's delta goes into, stored whole or (a stack) per expert."""
    entry = _stored(ck_tensors, tied_to, m.weight_key)
    if entry is not None:
        return tuple(entry.shape)
    if ".base_layer." in m.name or m.name + ".in_proj_weight" in ck_tensors:
        attention = m.name.split(".base_layer.")[0]
        raise ValueError(f"LoRA module {m.name!r} is part of LoRA on the nn.MultiheadAttention {attention!r} "
                         "(its in_proj_weight and out_proj), which minilora merge does not merge; load the model, "
                         "minilora.load_adapter, minilora.merge_and_unload, then save it")
    if m.name not in facts.parts:
        raise _not_found(m.weight_key, f"LoRA module {m.name!r}", ck_tensors, base)
    _check_parts(m, facts, ck_tensors)
    return facts.shapes[m.name]


def _plan_shapes(modules, replace, ad_tensors, ck_tensors, tied_to, facts, config, base, adapter) -> None:
    """Check every adapter tensor against the checkpoint before anything is written."""
    conv1d = facts.conv1d
    for m in modules.values():
        W = _weight_shape(m, ck_tensors, tied_to, facts, base)
        A, B = tuple(ad_tensors[m.lora_A].shape), tuple(ad_tensors[m.lora_B].shape)
        if m.parameter:
            _check_parameter(m, A, B, W, config, adapter)
            continue
        problem = _factor_problem(m, A, B, W)
        if problem is not None:
            raise ValueError(f"{adapter / WEIGHTS_NAME}: LoRA module {m.name!r}: {problem}; the adapter file is "
                             "malformed")
        if m.embedding:  # stored (num, dim): transposed, as LoraEmbedding
            m.transposed = True
            want, fits = (A[1], B[0]), W == (A[1], B[0])
        elif len(A) > 2:  # ConvNd: A (r, in, *k), B (out, r // groups, 1..)
            want, fits = (B[0], A[1], *A[2:]), W == (B[0], A[1], *A[2:])
            if not fits and len(W) == len(A) and W[0] == B[0] and W[2:] == A[2:] and W[1] and A[1] % W[1] == 0:
                raise ValueError(f"{m.name!r}: {grouped_merge_problem(A[1] // W[1])}")
            if fits and B[1] != A[0]:
                raise ValueError(f"{adapter / WEIGHTS_NAME}: LoRA module {m.name!r}: lora_B {list(B)} is a "
                                 f"grouped conv's (rank {A[0]} / {A[0] // B[1]} groups), but the weight {list(W)} "
                                 "is not grouped")
        else:
            plain, flipped = (B[0], A[1]), (A[1], B[0])
            m.transposed = (m.name in conv1d if conv1d is not None else config.fan_in_fan_out) \
                if W == plain == flipped else W == flipped
            want, fits = (flipped if m.transposed else plain), W in (plain, flipped)
        if not fits:
            raise ValueError(f"adapter does not fit the checkpoint: {m.name!r} has weight {list(W)} in {base}, "
                             f"but the adapter's delta is {list(want)} (lora_A {list(A)}, lora_B {list(B)}); "
                             "was it trained on another model?")
        if m.magnitude is not None:  # one value per output (B[0]), laid out as peft saves it
            got = tuple(ad_tensors[m.magnitude].shape)
            want = (1, B[0], *(1,) * (len(W) - 2)) if len(A) > 2 else (B[0],)
            if got != want:
                raise ValueError(f"{adapter / WEIGHTS_NAME}: LoRA module {m.name!r}: its DoRA magnitude "
                                 f"(lora_magnitude_vector) has shape {list(got)}, but its weight {list(W)} has "
                                 f"{B[0]} outputs, so it must be {list(want)}; the adapter file is malformed")
        if m.lora_bias is not None:
            bias = _stored(ck_tensors, tied_to, m.name + ".bias")
            if bias is None:
                raise ValueError(f"adapter has a lora_bias for {m.name!r} but the checkpoint has no "
                                 f"{m.name + '.bias'!r} to merge it into")
            got = tuple(ad_tensors[m.lora_bias].shape)
            if got != (B[0],) or tuple(bias.shape) != (B[0],):  # (a shape of (1,) would broadcast silently)
                raise ValueError(f"adapter does not fit the checkpoint: the lora_bias of {m.name!r} has shape "
                                 f"{list(got)} and its bias in {base} {list(bias.shape)}, but lora_B {list(B)} "
                                 f"makes {B[0]} outputs")
    for key, ad_key in replace.items():
        entry = _stored(ck_tensors, tied_to, key)
        if entry is None:
            raise _not_found(key, f"adapter tensor {ad_key!r}", ck_tensors, base)
        if entry.shape != ad_tensors[ad_key].shape:
            raise ValueError(f"adapter does not fit the checkpoint: {ad_key!r} has shape "
                             f"{list(ad_tensors[ad_key].shape)} but {key!r} in {base} is {list(entry.shape)}")


def _grow_vocabulary(replace: dict[str, str], ad_tensors: dict[str, TensorEntry], ck_tensors: dict[str, TensorEntry],
                     tied_to: dict[str, str], facts: _Facts, lora: set[str], base: Path) -> int | None:
    """The vocabulary size of an adapter trained after tokens were added: its rows for the token
    embedding and output head (modules_to_save copies, or base weights saved with them) outnumber
    (or undercut) the checkpoint's. Those checkpoint entries then take the new shape, and their
    values come from the adapter: a tied name without rows of its own takes its group's (one
    weight, as in the model). Every vocabulary weight must get rows of that size, or nothing is
    grown."""
    def stored(key: str) -> str | None:
        return key if key in ck_tensors else tied_to.get(key)

    grown = {}
    for key, ad_key in replace.items():
        entry, shape = _stored(ck_tensors, tied_to, key), tuple(ad_tensors[ad_key].shape)
        if key in facts.vocabulary and entry is not None and len(shape) == 2 and len(entry.shape) == 2 \
                and shape[1] == entry.shape[1] and shape[0] != entry.shape[0]:
            grown[key] = shape[0]
    if not grown:
        return None
    size = max(grown.values())
    changed = {stored(k) for k in grown}
    for group in facts.groups:
        if any(stored(k) in changed for k in group):
            source = replace.get(stored(group[0])) or replace[next(k for k in group if k in grown)]
            bare = [k for k in group if k not in replace]
            adapted = [k for k in group if k in lora]
            if bare and adapted:
                # resize_token_embeddings may leave these one module (T5's shared and its stacks'
                # embed_tokens: all took the LoRA) or one weight of several modules (only one did)
                raise ValueError(f"the adapter puts LoRA on {adapted[0]!r} of a grown vocabulary, and {bare} share "
                                 "that weight with no rows of their own in the adapter: whether the LoRA reached "
                                 "them depends on how the resized model held them, which the checkpoint cannot "
                                 "tell. Merge in memory: minilora.from_pretrained, then merge_and_unload")
            for key in bare:
                replace[key] = source
    for key in sorted(facts.vocabulary):
        entry = _stored(ck_tensors, tied_to, key)
        if entry is not None and stored(key) not in changed:
            raise ValueError(f"the adapter gives {sorted(grown)} {size} rows (tokens added before training), but holds "
                             f"no rows for {key!r} ({entry.shape[0]} in {base}): its new rows are unknown. Save the "
                             "adapter with save_embedding_layers=True from the model it was trained on")
    disagree = {k: ad_tensors[a].shape[0] for k, a in replace.items() if stored(k) in changed}
    if set(disagree.values()) != {size}:
        raise ValueError(f"adapter does not fit the checkpoint: its rows for the token embedding and output head "
                         f"disagree on the vocabulary size ({dict(sorted(disagree.items()))})")
    for key in changed:
        entry = ck_tensors[key]
        ck_tensors[key] = dataclasses.replace(entry, shape=(size, *entry.shape[1:]),
                                              nbytes=entry.nbytes // entry.shape[0] * size)
    return size


def _same_values(a: TensorEntry, b: TensorEntry) -> bool:
    """Whether two adapter tensors hold the same values, compared a block of rows at a time."""
    return a.shape == b.shape and a.dtype == b.dtype and all(
        torch.equal(read_tensor(a, rows), read_tensor(b, rows)) for rows in row_blocks(a.shape))


def _check_repeats(adapter: Path, ad_tensors: dict[str, TensorEntry], replace: dict[str, str],
                   groups: list[list[str]]) -> None:
    """Tensors the file holds twice for one weight must agree, as load_adapter requires: peft's
    repeated modules_to_save copy, and the base rows of tied names (which one would win is no answer)."""
    pairs = [(k, k.replace(".modules_to_save.", ".")) for k in ad_tensors
             if k.endswith(".modules_to_save.weight") and k.replace(".modules_to_save.", ".") in ad_tensors]
    for group in groups:
        rows = sorted({replace[k] for k in group if k in replace and (".base_layer." in replace[k]
                                                                     or ".original_module." in replace[k])})
        pairs += [(rows[0], other) for other in rows[1:]]
    for a, b in pairs:
        if not _same_values(ad_tensors[a], ad_tensors[b]):
            raise AdapterFileError(f"{adapter / WEIGHTS_NAME}: {a!r} and {b!r} are one weight of the model (tied, or "
                                   "written twice) but hold different values; the file is inconsistent")


def _plan_tokens(tokens, renamed, modules, replace, ad_tensors, ck_tensors, tied_to, groups, base: Path
                 ) -> dict[str, tuple[str, list[int]]]:
    """Checkpoint weight name -> (adapter key, token ids) for every weight that token rows
    write: the module's own and, as the in-memory merge writes the one shared Parameter, every
    name tied to it."""
    strip, add = renamed or ("", "")
    lora = {m.weight_key for m in modules.values()}
    out: dict[str, tuple[str, list[int]]] = {}
    for name, (ad_key, ids) in tokens.items():
        key = (add + name[len(strip):] if name.startswith(strip) else name) + ".weight"
        entry = _stored(ck_tensors, tied_to, key)
        if entry is None:
            raise _not_found(key, f"token rows {ad_key!r}", ck_tensors, base)
        W, D = tuple(entry.shape), tuple(ad_tensors[ad_key].shape)
        if len(W) != 2 or D[1] != W[1] or max(ids) >= W[0]:
            raise ValueError(f"adapter does not fit the checkpoint: token rows {ad_key!r} {list(D)} for token ids up "
                             f"to {max(ids)} need a weight [> {max(ids)}, {D[1]}], but {key!r} in {base} is {list(W)}")
        group = next((g for g in groups if key in g), [key])
        if all(k in out for k in group):  # a tied head's copy of its embedding's rows (peft's save_embedding_layers)
            first, first_ids = out[group[0]]
            if first_ids != ids or not _same_values(ad_tensors[first], ad_tensors[ad_key]):
                raise AdapterFileError(f"{ad_key!r} and {first!r} are the token rows of one tied weight but hold "
                                       "other token ids or values; the file is inconsistent")
            continue
        for k in group:
            # (a base weight saved beside the rows, for a resized vocabulary, is what they go into)
            if k in out or (k in replace and ".base_layer." not in replace[k]) or k in lora:
                raise ValueError(f"the adapter trains token rows of {key!r} and also changes {k!r} otherwise (LoRA, "
                                 "a modules_to_save copy or other token rows); minilora cannot merge both into one "
                                 "weight")
            out[k] = (ad_key, ids)
    return out


# ---------------------------------------------------------------- the merge itself

def _check_merged(key: str, base: torch.Tensor, merged: torch.Tensor, dora: bool = False) -> None:
    # Finite factors can still overflow the weight's dtype (a huge scaling, an fp16 checkpoint):
    # never write an inf or NaN where the base weight was finite.
    bad = int((~torch.isfinite(merged) & torch.isfinite(base)).sum())
    if bad:
        what = "DoRA's rescaled weight m / ‖W + s·B@A‖ · (W + s·B@A)" if dora else "the update (scaling * B @ A)"
        raise ValueError(f"merging the adapter into {key!r} gives {bad} inf or NaN value(s) in {merged.dtype}: "
                         f"{what} is beyond that dtype's range; check lora_alpha and the adapter's values. "
                         "Nothing was written")


def _check_norm(key: str, norm: torch.Tensor, first: int = 0) -> None:
    """DoRA divides by ‖W_i + s·(B@A)_i‖: every norm must be finite and positive, or output i
    would be NaN or silently zero. ``first``: the output number of ``norm[0]``."""
    bad = ~(torch.isfinite(norm) & (norm > 0))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        value = float(norm[i])
        why = ("W + s·B@A is all zeros there" if value == 0 else
               "the checkpoint's weight holds NaN there" if value != value else
               f"its sum of squares overflows {norm.dtype}")
        raise ValueError(f"merging the DoRA adapter into {key!r}: ‖W + s·B@A‖ of output {first + i} is {value:g} "
                         f"({why}), so DoRA's scale m / ‖W + s·B@A‖ is not finite there. Nothing was written")


class _Merger:
    """Computes merged checkpoint tensors one block of rows at a time."""

    def __init__(self, ad_tensors, modules, replace, ck_tensors, tied_to, facts, rows):
        self.ad_tensors, self.ck_tensors, self.tied_to, self.facts = ad_tensors, ck_tensors, tied_to, facts
        self.replace, self.rows = replace, rows
        self.by_weight = {m.weight_key: m for m in modules.values()}
        self._experts_of: str | None = None  # the parameter whose factors _experts holds
        self.by_bias = {m.name + ".bias": m for m in modules.values() if m.lora_bias is not None}

    def _adapter(self, key: str) -> torch.Tensor:
        return read_tensor(self.ad_tensors[key])

    def touches(self, key: str) -> bool:
        return (key in self.replace or key in self.by_weight or key in self.by_bias or key in self.rows
                or key in self.facts.experts)

    def blocks(self, key: str) -> Iterator[torch.Tensor]:
        """The merged tensor for checkpoint name ``key`` (stored under its own or its tied name),
        as consecutive blocks of rows in the stored dtype."""
        if key in self.facts.experts:
            yield from self._expert_part_blocks(key)
            return
        stored = key if key in self.ck_tensors else self.tied_to[key]
        entry = self.ck_tensors[stored]
        dtype = entry.torch_dtype
        source = self.ad_tensors[self.replace[key]] if key in self.replace else entry
        m, mb = self.by_weight.get(key), self.by_bias.get(key)
        # The adapter factors are small (r x features); read once per tensor, not per block.
        A, B = (self._adapter(m.lora_A), self._adapter(m.lora_B)) if m is not None else (None, None)
        if m is not None and m.magnitude is not None:
            yield from self._dora_blocks(key, m, source, entry, A, B, self._adapter(m.magnitude))
            return
        bias = self._adapter(mb.lora_bias) if mb is not None else None
        tokens = self._token_rows(key, dtype)
        for rows in row_blocks(entry.shape):
            base = read_tensor(source, rows).to(dtype)
            t = base
            if m is not None:
                # W + fp32 delta adds in fp32 and rounds once, as LoraLayer.merged_weights does
                # (in place into the delta: the sum is the same bits, with one temporary less).
                t = (param_delta(A, B, m.scaling, merge_dtype(dtype), entry.shape, transposed=m.transposed, rows=rows)
                     if m.parameter else
                     lora_delta(A, B, m.scaling, merge_dtype(dtype), transposed=m.transposed, rows=rows)).add_(t)
                t = t.to(dtype)
            if bias is not None:
                t = (t + mb.scaling * bias[rows]).to(dtype)
            if tokens is not None:
                t = self._write_rows(t, rows, *tokens)
            if t is not base and t.is_floating_point():
                _check_merged(key, base, t)
            yield t

    def _expert_part_blocks(self, key: str) -> Iterator[torch.Tensor]:
        """``blocks`` for one expert's part of a stack stored per expert: the rows ``rows`` of
        delta[expert], by ``lora_delta`` on that expert's factors, as ``param_delta`` computes each
        expert, one block of rows at a time (the same bits: see ``row_blocks``)."""
        param, expert, rows = self.facts.experts[key]
        m, entry = self.by_weight[param], self.ck_tensors[key]
        dtype = entry.torch_dtype
        A3, B3 = self._expert_factors(param, m)
        for block in row_blocks(entry.shape):
            base = read_tensor(entry, block).to(dtype)
            inner = slice(rows.start + block.start, rows.start + block.stop)
            t = lora_delta(A3[expert], B3[expert], m.scaling, merge_dtype(dtype), rows=inner).add_(base).to(dtype)
            _check_merged(key, base, t)
            yield t

    def _expert_factors(self, param: str, m: AdapterModule) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert's (A_e, B_e) of ``param``, read once for the run of its parts (the writer
        goes through a shard's keys in order, so one stack's parts come together)."""
        if self._experts_of != param:
            experts = self.facts.shapes[param][0]
            self._experts = expert_factors(self._adapter(m.lora_A), self._adapter(m.lora_B), experts)
            self._experts_of = param
        return self._experts

    def _token_rows(self, key: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token ids (k,), their rows (k, dim) rounded to ``dtype``) written into ``key``, or None."""
        if key not in self.rows:
            return None
        ad_key, ids = self.rows[key]
        # As TrainableTokens.merge: the trained rows replace the old ones, rounded to the weight dtype.
        return torch.tensor(ids, dtype=torch.long), self._adapter(ad_key).to(dtype)

    @staticmethod
    def _write_rows(block: torch.Tensor, rows: slice, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``block`` (rows ``rows`` of a weight) with the token rows among them replaced."""
        inside = (ids >= rows.start) & (ids < rows.stop)
        if not inside.any():
            return block
        return block.index_copy(0, ids[inside] - rows.start, values[inside])

    @staticmethod
    def _dora_blocks(key: str, m: AdapterModule, source: TensorEntry, entry: TensorEntry, A: torch.Tensor,
                     B: torch.Tensor, magnitude: torch.Tensor) -> Iterator[torch.Tensor]:
        """``blocks`` for a DoRA module's weight (see the module docstring)."""
        dtype = entry.torch_dtype
        work = merge_dtype(dtype)
        blocks = row_blocks(entry.shape)
        mag = magnitude.to(work).flatten()  # (out,): peft's (1, out, 1, ...) for a ConvNd

        def merged(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            """(rows of W, the same rows of V in ``work``). V row-major, as the in-memory merge holds
            it (W + delta): a transposed layout's delta is a column-major view, and the order in which
            ``dora_merge_norm`` sums a block depends on its layout."""
            base = read_tensor(source, rows).to(dtype)
            return base, lora_delta(A, B, m.scaling, work, transposed=m.transposed, rows=rows).add_(base).contiguous()

        if m.transposed:  # outputs are columns: every block holds part of every norm
            norm = dora_merge_norm((merged(rows)[1] for rows in blocks), transposed=True)
            _check_norm(key, norm)
            scale = (mag / norm).view(1, -1)
            for rows in blocks:
                base, v = merged(rows)
                t = v.mul_(scale).to(dtype)  # in place: one block-sized temporary less
                _check_merged(key, base, t, dora=True)
                yield t
        else:  # outputs are rows (Linear, ConvNd): a block's norms are its own rows'
            for rows in blocks:
                base, v = merged(rows)
                norm = dora_merge_norm([v], transposed=False)
                _check_norm(key, norm, first=rows.start)
                t = v.mul_((mag[rows] / norm).view(-1, *(1,) * (v.dim() - 1))).to(dtype)
                _check_merged(key, base, t, dora=True)
                yield t


def _write_safetensors(path: Path, keys: list[tuple[str, TensorEntry]], metadata: dict[str, str],
                       blocks: Callable[[str], Iterator[torch.Tensor]], tick: Callable[[], None]) -> int:
    """Stream tensors into one safetensors file: the header is known up front (a merge changes no
    dtype or shape), so each block is written and dropped before the next is computed."""
    head = header_bytes([(key, entry.torch_dtype, entry.shape) for key, entry in keys], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for key, entry in keys:
            n = 0
            for t in blocks(key):
                if t.dtype != entry.torch_dtype or tuple(t.shape[1:]) != entry.shape[1:]:
                    raise AssertionError(f"internal error: {key} came out {t.dtype} {list(t.shape)}")
                n += f.write(tensor_bytes(t))
                del t
            if n != entry.nbytes:
                raise AssertionError(f"internal error: {key} wrote {n} of {entry.nbytes} bytes")
            tick()
        f.flush()
        os.fsync(f.fileno())
    return sum(entry.nbytes for _, entry in keys)


def _same(a: Iterator[torch.Tensor], b: Iterator[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _kind_of(mode: int) -> str:
    return ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")


def _copy_file(src: str, dst: Path) -> None:
    """Copy the bytes only (the copy gets a new file's mode, not the source's), fsynced."""
    shutil.copyfile(src, dst)
    with open(dst, "rb") as handle:
        os.fsync(handle.fileno())


def _copy_side_files(base: Path, tmp: Path, weight_files: set[str]) -> list[str]:
    """Copy every other file of ``base`` into ``tmp``, sub-folders included, except weight files
    (returned, relative to ``base``): they hold unmerged weights. Symlinks are followed (a Hugging
    Face snapshot is links to blobs); a folder link to an ancestor is refused as a loop."""
    def ident(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    real = Path(os.path.realpath(base))
    # folder -> where it is, for BASE and every folder above it: copying any of them never ends.
    above_base = {ident(os.stat(p)): str(p) for p in (real, *real.parents)}
    writing = ident(os.stat(tmp))
    skipped: list[str] = []
    stack: list[tuple[Path, Path, dict[tuple[int, int], str]]] = [(base, tmp, above_base)]
    seen = 0
    while stack:
        src, dst, above = stack.pop()
        with os.scandir(src) as it:
            items = sorted(it, key=lambda e: e.name)
        seen += len(items)
        if seen > _MAX_SIDE_ENTRIES:
            raise ValueError(f"BASE {base} holds more than {_MAX_SIDE_ENTRIES:,d} files and folders (counting through "
                             "folder links); a checkpoint folder holds tens: check for links that fan out")
        for item in items:
            rel = os.path.relpath(item.path, base)
            if src == base and (item.name in weight_files or item.name == INDEX_FILE):
                continue  # written anew
            try:
                st = os.stat(item.path)  # follows links
            except FileNotFoundError:
                raise ValueError(f"BASE {base}: {rel} is a symlink to {os.readlink(item.path)!r}, which does not "
                                 "exist; restore the target or remove the link") from None
            if stat.S_ISDIR(st.st_mode):
                key = ident(st)
                if key in above:
                    raise ValueError(f"BASE {base}: the folder link {rel} leads back to {above[key]}, which contains "
                                     "it (a symlink loop); remove the link or replace it by a real folder")
                if key == writing:
                    raise ValueError(f"BASE {base}: the folder link {rel} leads into the merge's own output; remove it")
                (dst / item.name).mkdir()
                stack.append((Path(item.path), dst / item.name, {**above, key: os.path.join(str(base), rel)}))
            elif not stat.S_ISREG(st.st_mode):
                raise ValueError(f"BASE {base}: {rel} is {_kind_of(st.st_mode)}, not a file or folder, so it cannot "
                                 "be copied into OUT; move it out of BASE")
            elif item.name.endswith(_UNMERGED_WEIGHTS):
                skipped.append(rel)
            else:
                _copy_file(item.path, dst / item.name)
    return sorted(skipped)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=path.name != INDEX_FILE) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _check_out(base: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"OUT {out} already exists; give a new folder name (nothing is overwritten)")
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise FileNotFoundError(f"the parent folder of OUT, {out.parent}, {what}")
    real_base, real_out = Path(os.path.realpath(base)), Path(os.path.realpath(out.parent)) / out.name
    if real_out.is_relative_to(real_base):
        # OUT inside BASE would change the input while it is copied, and every later copy of
        # BASE would carry the merged checkpoint along (cp -r refuses the same).
        raise ValueError(f"OUT {out} is inside BASE {base}; the merge copies BASE and never writes into it: "
                         f"give a folder outside it, such as {base.parent / (base.name + '-merged')}")


#: ``progress(done, total, shard)``: called after each tensor is written (e.g. to drive a bar).
Progress = Callable[[int, int, str], None]


@dataclass
class _Plan:
    """Everything read and checked before a byte is written."""

    ck_tensors: dict[str, TensorEntry]
    shard_meta: dict[str, dict[str, str]]
    index: dict | None
    modules: dict[str, AdapterModule]
    replace: dict[str, str]
    tied_groups: list[list[str]]
    renamed: tuple[str, str] | None
    merger: _Merger
    vocab_size: int | None = None  # a vocabulary grown before training: config.json gets it


def _plan(base: Path, adapter: Path) -> _Plan:
    ck_tensors, shard_meta, index = _checkpoint(base)
    config, ad_tensors, modules, replace, tokens, facts = _read_adapter(adapter, base, ck_tensors)
    groups = facts.groups
    for m in modules.values():
        m.transposed = m.parameter and m.name in facts.transposed
    # Tied names absent from the checkpoint point at the member that is stored.
    tied_groups = [g for g in groups if sum(k in ck_tensors for k in g) == 1]
    tied_to = {k: next(s for s in g if s in ck_tensors) for g in tied_groups for k in g if k not in ck_tensors}
    modules, replace, renamed = _align_prefix(modules, replace, set(ck_tensors) | set(tied_to) | set(facts.parts))
    vocab_size = _grow_vocabulary(replace, ad_tensors, ck_tensors, tied_to, facts,
                                  {m.weight_key for m in modules.values()}, base)
    _check_repeats(adapter, ad_tensors, replace, groups)
    _plan_shapes(modules, replace, ad_tensors, ck_tensors, tied_to, facts, config, base, adapter)
    rows = _plan_tokens(tokens, renamed, modules, replace, ad_tensors, ck_tensors, tied_to, groups, base)
    _check_values(modules, replace, ad_tensors, ck_tensors, tied_to, facts, adapter, rows)
    return _Plan(ck_tensors, shard_meta, index, modules, replace, tied_groups, renamed,
                 _Merger(ad_tensors, modules, replace, ck_tensors, tied_to, facts, rows), vocab_size)


def merge_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
                     progress: Progress | None = None) -> MergeSummary:
    """Write ``base`` + ``adapter`` merged into the new folder ``out`` (``minilora merge``).

    Args:
        base: a transformers checkpoint folder: ``model.safetensors`` or shards with
            ``model.safetensors.index.json``, plus config / tokenizer files (copied).
        adapter: a peft-format adapter folder (``adapter_config.json``,
            ``adapter_model.safetensors``), as written by peft or ``minilora.save_adapter``.
        out: the folder to create; must not exist, nor lie inside ``base``. It appears complete
            or not at all.
        progress: called as ``progress(done, total, shard)`` after each tensor written.

    Raises:
        FileNotFoundError: a folder or required file is missing.
        FileExistsError: ``out`` exists.
        ValueError: the adapter does not fit the checkpoint (missing module, shape mismatch,
            rank not matching its config, DoRA magnitudes present or missing against the config's
            ``use_dora``, token rows not fitting the weight or the config's token ids, token rows
            and another change to one weight) or is another LoRA variant, or a file of either is malformed; a DoRA norm
            ‖W + s·B@A‖ is zero or not finite; ``out`` is inside ``base``; a file in ``base``
            cannot be copied (a symlink loop, a pipe). Nothing is written.
        OSError: writing failed (a read-only folder, the disk full, ...). Nothing is written.
    """
    base, adapter, out = Path(base), Path(adapter), Path(out)
    for what, folder in (("BASE", base), ("ADAPTER", adapter)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} {folder} is not a folder")
    _check_out(base, out)
    plan = _plan(base, adapter)
    tmp = None
    try:
        with atomic.new_folder(out) as tmp:
            summary = _write(plan, base, tmp, out, progress)
    except OSError as err:
        if tmp is None:  # a read-only folder, ...: say which folder, not our temporary's name
            raise OSError(f"cannot write into the parent folder of OUT, {out.parent} ({err.strerror or err})") from None
        if err.strerror:  # the disk is full, a file cannot be read, ...
            where = f"{err.filename}: " if err.filename else ""
            raise OSError(f"merging into OUT {out} failed ({where}{err.strerror}); nothing was written") from err
        raise
    return summary


def _write(plan: _Plan, base: Path, tmp: Path, out: Path, progress: Progress | None) -> MergeSummary:
    """Write the merged checkpoint into ``tmp``, the temporary folder that becomes ``out``."""
    merger, ck_tensors = plan.merger, plan.ck_tensors
    # Tied groups the adapter touches: keep them tied only if every member merges to the same values.
    untied: list[str] = []
    extra: dict[str, list[str]] = {}  # stored key -> members to write beside it
    for g in plan.tied_groups:
        if any(merger.touches(k) for k in g):
            stored = next(s for s in g if s in ck_tensors)
            others = [k for k in g if k != stored]
            if not all(_same(merger.blocks(stored), merger.blocks(k)) for k in others):
                extra[stored] = others
                untied += others
    by_shard: dict[str, list[tuple[str, TensorEntry]]] = {}
    for key, entry in ck_tensors.items():
        shard = os.path.basename(entry.file)
        by_shard.setdefault(shard, []).append((key, entry))
        by_shard[shard] += [(k, entry) for k in extra.get(key, [])]
    total, done = sum(len(v) for v in by_shard.values()), 0
    weight_map, written = {}, 0
    for shard in sorted(by_shard):
        def tick(shard: str = shard) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total, shard)

        written += _write_safetensors(tmp / shard, by_shard[shard], plan.shard_meta[shard], merger.blocks, tick)
        weight_map.update({k: shard for k, _ in by_shard[shard]})
    skipped = _copy_side_files(base, tmp, set(by_shard))
    if plan.index is not None:
        new_index = {**plan.index, "metadata": {**(plan.index.get("metadata") or {}), "total_size": written},
                     "weight_map": dict(sorted(weight_map.items()))}
        _write_json(tmp / INDEX_FILE, new_index)
    if (untied or plan.vocab_size) and (tmp / CONFIG_FILE).is_file():  # (both need model facts: it was read)
        config = read_json(tmp / CONFIG_FILE, "a transformers model config")
        if untied:
            config["tie_word_embeddings"] = False
        if plan.vocab_size:  # a multimodal config keeps its text model's under text_config
            text = config["text_config"] if "vocab_size" not in config and "text_config" in config else config
            text["vocab_size"] = plan.vocab_size
        _write_json(tmp / CONFIG_FILE, config)
    return MergeSummary(out, len(plan.modules), len(plan.replace), total, len(by_shard), written, untied, skipped,
                        plan.renamed, sum(m.magnitude is not None for m in plan.modules.values()), len(merger.rows),
                        plan.vocab_size)
