"""``minilora merge BASE ADAPTER OUT``: fold a peft-format adapter into a safetensors checkpoint.

The model is never built with weights. The adapter's ``adapter_config.json`` and tensors are
read, then every checkpoint tensor is streamed in blocks of rows: read the block's bytes with
plain file reads (no memory map, whose pages would count as resident memory), add the block's
rows of ``s·B@A`` where an adapter touches it, write them into the new shard, forget them. Peak
memory is therefore a few blocks (about 4 MiB of fp32 each) plus the adapter factors, whatever
the size of the model or of its largest tensor (a 128k-vocabulary embedding's fp32 delta alone
would be 4 GiB); the test measures it.

The output is written into a temporary folder beside OUT and renamed at the end, so OUT either
appears complete or not at all.

Tied weights (``tie_word_embeddings``): the checkpoint stores one tensor for the whole group
(e.g. ``model.embed_tokens.weight``, with ``lm_head.weight`` absent). Each member's merged value
is computed separately (its own modules_to_save copy, its own LoRA); if all members come out
equal the group stays tied (one tensor, flag unchanged), exactly as minilora's shared
modules_to_save copy keeps it; otherwise every member is written and ``tie_word_embeddings``
is set to false in config.json, as ``merge_and_unload`` unties a LoRA-adapted tied embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minilora.config import LoraConfig
from minilora.matching import closest_names, pattern_key

__all__ = ["merge_checkpoint", "MergeSummary", "add_arguments", "run"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
_PEFT_PREFIX = "base_model.model."
# peft key suffix -> (factor, is_embedding). Embedding factors are bare parameters (no ".weight").
_LORA_SUFFIXES = {
    ".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False), ".lora_B.bias": ("lora_bias", False),
    ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
}
# Files that hold (unmerged) weights in another format: never copied into OUT, never unpickled.
_STALE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class _Tensor:
    """Where a tensor lives and what it is (read from a safetensors header, no data)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int = 0  # byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        n = _DTYPES[self.dtype].itemsize if self.dtype in _DTYPES else 0
        for d in self.shape:
            n *= d
        return n


@dataclass
class _LoraModule:
    """One adapted module: adapter keys of its factors, its scaling and how its delta is laid out."""

    name: str
    A: str | None = None
    B: str | None = None
    lora_bias: str | None = None
    embedding: bool = False
    scaling: float = 1.0
    transposed: bool = False  # Conv1D / fan_in_fan_out: the weight is stored (in, out)


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


# ---------------------------------------------------------------- reading safetensors lazily
def _header(path: Path) -> tuple[dict[str, _Tensor], dict[str, str]]:
    """Keys -> (dtype, shape) and the metadata of one safetensors file, without reading data."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # validates the header and the data layout
        entries = {k: _Tensor(path, f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                   for k in f.keys()}
        metadata = dict(f.metadata() or {})
    # safe_open does not expose where each tensor's bytes lie; the header it just accepted does.
    with open(path, "rb") as raw:
        (n,) = struct.unpack("<Q", raw.read(8))
        header = json.loads(raw.read(n))
    for k, entry in entries.items():
        begin, end = header[k]["data_offsets"]
        entry.start = 8 + n + begin
        if end - begin != entry.nbytes:
            raise ValueError(f"{path}: tensor {k!r} holds {end - begin} bytes, but {entry.dtype} "
                             f"{list(entry.shape)} needs {entry.nbytes}; the file is corrupt")
    return entries, metadata


def _load(entry: _Tensor, key: str) -> torch.Tensor:
    """A whole (adapter) tensor."""
    return _read_rows(entry, slice(0, entry.shape[0] if entry.shape else 1))


def _read_rows(entry: _Tensor, rows: slice) -> torch.Tensor:
    """Rows ``rows`` (of dim 0) of a checkpoint tensor, read with plain file reads: a memory map
    kept open counts every page read through it as resident memory (measured: RSS grew by the
    file size), so none is used."""
    shape = (rows.stop - rows.start, *entry.shape[1:]) if entry.shape else ()
    row_bytes = entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else entry.nbytes
    buf = bytearray(row_bytes * (rows.stop - rows.start))
    with open(entry.file, "rb") as f:
        f.seek(entry.start + rows.start * row_bytes)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"{entry.file} ends before the data of a tensor it declares; the file is truncated")
    if not buf:
        return torch.empty(shape, dtype=_DTYPES[entry.dtype])
    return torch.frombuffer(buf, dtype=torch.uint8).view(_DTYPES[entry.dtype]).reshape(shape)


# Rows per block: about 1M elements (4 MiB as fp32), but never fewer than 256 rows. The floor keeps
# each block's s·B@A on the same BLAS kernel as the whole product (a handful of rows goes down a
# GEMV path whose summation order differs), so the merged bits equal merge_and_unload's.
_BLOCK_ELEMENTS, _MIN_BLOCK_ROWS = 1 << 20, 256


def _row_blocks(shape: tuple[int, ...]) -> list[slice]:
    rows = shape[0] if shape else 1
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    step = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // max(per_row, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


def _checkpoint(base: Path) -> tuple[dict[str, _Tensor], dict[str, dict[str, str]], dict | None]:
    """All checkpoint tensors, per-shard metadata, and the index json (None for one file)."""
    index_path, single = base / INDEX_FILE, base / SINGLE_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map'; it is not a safetensors index")
        shards = sorted(set(weight_map.values()))
    elif single.is_file():
        index, shards = None, [SINGLE_FILE]
    else:
        found = sorted(p.name for p in base.iterdir()) if base.is_dir() else []
        pickled = [n for n in found if n.endswith(_STALE_WEIGHTS)]
        hint = (f"; it has {pickled}, which minilora never unpickles: re-save the model with "
                "save_pretrained(..., safe_serialization=True)") if pickled else ""
        raise FileNotFoundError(f"BASE {base} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    tensors: dict[str, _Tensor] = {}
    metadata: dict[str, dict[str, str]] = {}
    for shard in shards:
        if not (base / shard).is_file():
            raise FileNotFoundError(f"{INDEX_FILE} in {base} names shard {shard!r}, which does not exist")
        entries, metadata[shard] = _header(base / shard)
        tensors.update(entries)
    if index is not None:
        missing = [k for k, shard in index["weight_map"].items() if k not in tensors]
        if missing:
            raise ValueError(f"{INDEX_FILE} in {base} lists {missing[0]!r} (and {len(missing) - 1} more) "
                             "that no shard holds; the checkpoint is incomplete")
    return tensors, metadata, index


# ---------------------------------------------------------------- understanding the adapter
def _read_adapter(adapter: Path) -> tuple[LoraConfig, dict[str, _Tensor], dict[str, _LoraModule], dict[str, str]]:
    """The config, the adapter tensors, LoRA modules by name, and checkpoint key -> adapter key
    for tensors that replace a base tensor (modules_to_save copies, trained biases)."""
    config_path, weights_path = adapter / ADAPTER_CONFIG, adapter / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"ADAPTER {adapter} has no {ADAPTER_CONFIG}; is it a peft adapter folder?")
    if not weights_path.is_file():
        pickled = (adapter / "adapter_model.bin").is_file()
        hint = " (it has adapter_model.bin, which minilora never unpickles; re-save it with peft or minilora)" \
            if pickled else ""
        raise FileNotFoundError(f"ADAPTER {adapter} has no {ADAPTER_WEIGHTS}{hint}")
    try:
        config = LoraConfig.from_dict(json.loads(config_path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err})") from None
    tensors, _ = _header(weights_path)
    modules: dict[str, _LoraModule] = {}
    replace: dict[str, str] = {}
    for key in tensors:
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"adapter tensor {key!r} does not start with {_PEFT_PREFIX!r}; "
                             f"{weights_path} is not in peft's format")
        name = key[len(_PEFT_PREFIX):]
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            factor, embedding = _LORA_SUFFIXES[suffix]
            module = modules.setdefault(name[: -len(suffix)], _LoraModule(name[: -len(suffix)]))
            setattr(module, factor, key)
            module.embedding |= embedding
        elif ".lora_" in name:
            raise ValueError(f"adapter tensor {key!r} is not plain LoRA (DoRA or another variant?); "
                             "minilora merge knows lora_A / lora_B / lora_embedding_A / lora_embedding_B")
        elif ".base_layer." in name:  # an adapted module's own tensor saved anew: a trained bias
            replace[name.replace(".base_layer.", ".")] = key  # (bias="lora_only"), an untied embedding
        else:  # a modules_to_save copy's parameter, or a trained bias of a plain module
            replace[name] = key
    for module in modules.values():
        if module.A is None or module.B is None:
            raise ValueError(f"adapter has {'lora_B' if module.A is None else 'lora_A'} but not "
                             f"{'lora_A' if module.A is None else 'lora_B'} for {module.name!r}; the file is incomplete")
        r = tensors[module.A].shape[0]
        key_r, key_a = pattern_key(config.rank_pattern, module.name), pattern_key(config.alpha_pattern, module.name)
        want_r = config.rank_pattern[key_r] if key_r is not None else config.r
        if r != want_r:
            raise ValueError(f"{ADAPTER_CONFIG} gives {module.name!r} rank {want_r}, but its lora_A has "
                             f"rank {r}; the config and the weights do not belong together")
        alpha = config.alpha_pattern[key_a] if key_a is not None else config.lora_alpha
        module.scaling = config.scaling_for(r, alpha)
    return config, tensors, modules, replace


def _model_facts(base: Path) -> tuple[set[str], list[list[str]]] | None:
    """(names of transformers Conv1D modules, groups of tied parameter names) from config.json,
    with the model built on the meta device (no memory, ~0.1 s even for 7B). None when
    transformers is missing or does not know the architecture: shapes then decide alone."""
    try:
        # Without "architectures" the model class (and so its module names) would be a guess.
        if not json.loads((base / "config.json").read_text()).get("architectures"):
            return None
        from transformers.pytorch_utils import Conv1D

        from minilora.cli.inspect import meta_model

        model = meta_model(base)
    except Exception:  # noqa: BLE001 -- optional knowledge: any failure means "use the shapes"
        return None
    conv1d = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return conv1d, [g for g in groups.values() if len(g) > 1]


def _not_found(key: str, what: str, tensors: dict[str, _Tensor], base: Path) -> ValueError:
    close = closest_names(key, list(tensors))
    hint = f" (closest: {', '.join(close)})" if close else ""
    return ValueError(f"adapter does not fit the checkpoint: {what} needs {key!r}, which is not in {base}{hint}")


def _align_prefix(modules: dict[str, _LoraModule], replace: dict[str, str], known: set[str]
                  ) -> tuple[dict[str, _LoraModule], dict[str, str], tuple[str, str] | None]:
    """An adapter trained on the bare backbone (``LlamaModel``: ``layers.0...``) merged into a
    checkpoint of the model with a head (``model.layers.0...``), or the other way round: when no
    adapter name is in the checkpoint as it is, but all of them are after dropping their one
    common first component or adding one of the checkpoint's first components, use that mapping.
    Returns the (possibly renamed) modules and replace map, and (old, new) prefix or None."""
    def fits(strip: str, add: str) -> bool:
        return (all(add + name[len(strip):] + ".weight" in known for name in modules)
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


def _plan_shapes(modules, replace, ad_tensors, ck_tensors, tied_to, conv1d, config, base) -> None:
    """Check every adapter tensor against the checkpoint before anything is written."""
    def stored(key: str) -> _Tensor | None:
        return ck_tensors.get(key) or ck_tensors.get(tied_to.get(key, ""))

    for m in modules.values():
        entry = stored(m.name + ".weight")
        if entry is None:
            raise _not_found(m.name + ".weight", f"LoRA module {m.name!r}", ck_tensors, base)
        A, B, W = ad_tensors[m.A].shape, ad_tensors[m.B].shape, entry.shape
        if m.embedding:
            want, fits = (A[1], B[0]), W == (A[1], B[0])
        elif len(A) > 2:  # ConvNd: A (r, in, *k), B (out, r // groups, 1..)
            want, fits = (B[0], A[1], *A[2:]), W == (B[0], A[1], *A[2:])
            if not fits and len(W) == len(A) and W[0] == B[0] and W[2:] == A[2:] and A[1] % W[1] == 0:
                raise ValueError(f"{m.name!r} is a grouped conv (groups={A[1] // W[1]}); its LoRA cannot be "
                                 "merged into a grouped weight (A mixes channels across groups)")
        else:
            plain, flipped = (B[0], A[1]), (A[1], B[0])
            m.transposed = (m.name in conv1d if conv1d is not None else config.fan_in_fan_out) \
                if W == plain == flipped else W == flipped
            want, fits = (flipped if m.transposed else plain), W in (plain, flipped)
        if not fits:
            raise ValueError(f"adapter does not fit the checkpoint: {m.name!r} has weight {list(W)} in {base}, "
                             f"but the adapter's delta is {list(want)} (lora_A {list(A)}, lora_B {list(B)}); "
                             "was it trained on another model?")
        if m.lora_bias is not None and stored(m.name + ".bias") is None:
            raise ValueError(f"adapter has a lora_bias for {m.name!r} but the checkpoint has no "
                             f"{m.name + '.bias'!r} to merge it into")
    for key, ad_key in replace.items():
        entry = stored(key)
        if entry is None:
            raise _not_found(key, f"adapter tensor {ad_key!r}", ck_tensors, base)
        if entry.shape != ad_tensors[ad_key].shape:
            raise ValueError(f"adapter does not fit the checkpoint: {ad_key!r} has shape "
                             f"{list(ad_tensors[ad_key].shape)} but {key!r} in {base} is {list(entry.shape)}")


# ---------------------------------------------------------------- the merge itself
def _delta(m: _LoraModule, A: torch.Tensor, B: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of s·B@A in fp32, in the weight's stored layout: the same arithmetic as the
    LoRA layers' delta_weight (so the result equals ``merge_and_unload`` bit for bit), scaled in
    place to keep one block-sized temporary. Transposed layouts (Conv1D, fan_in_fan_out,
    embeddings) store rows of (B@A).T, i.e. columns of A."""
    if m.embedding or m.transposed:
        return (B.float() @ A.float()[:, rows]).mul_(m.scaling).T
    if A.dim() > 2:  # ConvNd: B (out, r, 1..) flattened to (out, r), A (r, in, *k)
        return torch.einsum("or,r...->o...", B.float().flatten(1)[rows], A.float()).mul_(m.scaling)
    return (B.float()[rows] @ A.float()).mul_(m.scaling)


class _Merger:
    """Computes merged checkpoint tensors one block of rows at a time."""

    def __init__(self, ad_tensors, modules, replace, ck_tensors, tied_to):
        self.ad_tensors, self.ck_tensors, self.tied_to = ad_tensors, ck_tensors, tied_to
        self.replace = replace
        self.by_weight = {m.name + ".weight": m for m in modules.values()}
        self.by_bias = {m.name + ".bias": m for m in modules.values() if m.lora_bias is not None}

    def _adapter(self, key: str) -> torch.Tensor:
        return _load(self.ad_tensors[key], key)

    def touches(self, key: str) -> bool:
        return key in self.replace or key in self.by_weight or key in self.by_bias

    def blocks(self, key: str) -> Iterator[torch.Tensor]:
        """The merged tensor for checkpoint name ``key`` (stored under its own or its tied name),
        as consecutive blocks of rows in the stored dtype."""
        stored = key if key in self.ck_tensors else self.tied_to[key]
        entry = self.ck_tensors[stored]
        dtype = _DTYPES[entry.dtype]
        source = self.ad_tensors[self.replace[key]] if key in self.replace else entry
        m, mb = self.by_weight.get(key), self.by_bias.get(key)
        # The adapter factors are small (r x features); read once per tensor, not per block.
        A, B = (self._adapter(m.A), self._adapter(m.B)) if m is not None else (None, None)
        bias = self._adapter(mb.lora_bias) if mb is not None else None
        for rows in _row_blocks(entry.shape):
            t = _read_rows(source, rows).to(dtype)
            if m is not None:
                # W + fp32 delta adds in fp32 and rounds once, as LoraLayer.merged_weights does
                # (in place into the delta: the sum is the same bits, with one temporary less).
                t = _delta(m, A, B, rows).add_(t).to(dtype)
            if bias is not None:
                t = (t + mb.scaling * bias[rows]).to(dtype)
            yield t


def _write_safetensors(path: Path, keys: list[tuple[str, _Tensor]], metadata: dict[str, str],
                       blocks: Callable[[str], Iterator[torch.Tensor]], tick: Callable[[], None]) -> int:
    """Stream tensors into one safetensors file: the header is known up front (a merge changes no
    dtype or shape), so each block is written and dropped before the next is computed."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, entry in keys:
        header[key] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, entry in keys:
            n = 0
            for t in blocks(key):
                if t.dtype != _DTYPES[entry.dtype] or tuple(t.shape[1:]) != entry.shape[1:]:
                    raise AssertionError(f"internal error: {key} came out {t.dtype} {list(t.shape)}")
                n += f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
                del t
            if n != entry.nbytes:
                raise AssertionError(f"internal error: {key} wrote {n} of {entry.nbytes} bytes")
            tick()
        f.flush()
        os.fsync(f.fileno())
    return offset


def _same(a: Iterator[torch.Tensor], b: Iterator[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _copy_side_files(base: Path, tmp: Path, weight_files: set[str]) -> list[str]:
    """Config, tokenizer and any other files; old-format weight files are left out (returned)."""
    skipped = []
    for item in sorted(base.iterdir()):
        if item.name in weight_files or item.name == INDEX_FILE:
            continue
        if item.is_file() and item.name.endswith(_STALE_WEIGHTS):
            skipped.append(item.name)
        elif item.is_dir():
            shutil.copytree(item, tmp / item.name)
        elif item.is_file():
            shutil.copy2(item, tmp / item.name)
    return skipped


def merge_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
                     progress: bool = True) -> MergeSummary:
    """Write ``base`` + ``adapter`` merged into the new folder ``out`` (the library form of
    ``minilora merge``).

    Args:
        base: a transformers checkpoint folder: ``model.safetensors`` or shards with
            ``model.safetensors.index.json``, plus config / tokenizer files (copied).
        adapter: a peft-format adapter folder (``adapter_config.json``,
            ``adapter_model.safetensors``), as written by peft or ``minilora.save_adapter``.
        out: the folder to create; must not exist. It appears complete or not at all.
        progress: show a tqdm progress bar (on stderr).

    Raises:
        FileNotFoundError: a folder or required file is missing.
        FileExistsError: ``out`` exists.
        ValueError: the adapter does not fit the checkpoint (missing module, shape mismatch,
            rank not matching its config) or is not plain LoRA. Nothing is written.
    """
    base, adapter, out = Path(base), Path(adapter), Path(out)
    for what, folder in (("BASE", base), ("ADAPTER", adapter)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} {folder} is not a folder")
    if out.exists():
        raise FileExistsError(f"OUT {out} already exists; give a new folder name (nothing is overwritten)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the parent folder of OUT, {out.parent}, does not exist")
    ck_tensors, shard_meta, index = _checkpoint(base)
    config, ad_tensors, modules, replace = _read_adapter(adapter)
    facts = _model_facts(base)
    conv1d, groups = (facts if facts is not None else (None, []))
    # Tied names absent from the checkpoint point at the member that is stored.
    tied_groups = [g for g in groups if sum(k in ck_tensors for k in g) == 1]
    tied_to = {k: next(s for s in g if s in ck_tensors) for g in tied_groups for k in g if k not in ck_tensors}
    modules, replace, renamed = _align_prefix(modules, replace, set(ck_tensors) | set(tied_to))
    _plan_shapes(modules, replace, ad_tensors, ck_tensors, tied_to, conv1d, config, base)
    merger = _Merger(ad_tensors, modules, replace, ck_tensors, tied_to)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # Tied groups the adapter touches: keep them tied only if every member merges to the same values.
        untied: list[str] = []
        extra: dict[str, list[str]] = {}  # stored key -> members to write beside it
        for g in tied_groups:
            if any(merger.touches(k) for k in g):
                stored = next(s for s in g if s in ck_tensors)
                others = [k for k in g if k != stored]
                if not all(_same(merger.blocks(stored), merger.blocks(k)) for k in others):
                    extra[stored] = others
                    untied += others
        by_shard: dict[str, list[tuple[str, _Tensor]]] = {}
        for key, entry in ck_tensors.items():
            shard = entry.file.name
            by_shard.setdefault(shard, []).append((key, entry))
            by_shard[shard] += [(k, entry) for k in extra.get(key, [])]
        total = sum(len(v) for v in by_shard.values())
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="tensor", desc="merging", disable=not progress, file=sys.stderr)
        weight_map, written = {}, 0
        with bar:
            for shard in sorted(by_shard):
                bar.set_postfix_str(shard)
                written += _write_safetensors(tmp / shard, by_shard[shard], shard_meta[shard],
                                              merger.blocks, bar.update)
                weight_map.update({k: shard for k, _ in by_shard[shard]})
        skipped = _copy_side_files(base, tmp, set(by_shard))
        if index is not None:
            new_index = {**index, "metadata": {**index.get("metadata", {}), "total_size": written},
                         "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(new_index, indent=2) + "\n")
        if untied and (tmp / "config.json").is_file():
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["tie_word_embeddings"] = False
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        os.rename(tmp, out)  # atomic on one file system; OUT appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeSummary(out, len(modules), len(replace), total, len(by_shard), written, untied, skipped, renamed)


# ---------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="checkpoint folder (model.safetensors or shards + index.json)")
    parser.add_argument("adapter", metavar="ADAPTER", help="peft-format adapter folder")
    parser.add_argument("out", metavar="OUT", help="new folder to write the merged checkpoint to (must not exist)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    s = merge_checkpoint(args.base, args.adapter, args.out, progress=not args.no_progress)
    print(f"merged {s.lora_modules} LoRA modules and replaced {s.replaced} tensors (modules_to_save / biases): "
          f"{s.tensors} tensors in {s.shards} shard(s), {s.bytes_written / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s -> {s.out}")
    if s.untied:
        print(f"tied weights {s.untied} now differ from the embedding they were tied to: written separately, "
              "tie_word_embeddings set to false in config.json")
    if s.renamed:
        old, new = s.renamed
        print(f"the adapter's module names start with {old or '(nothing)'!r} where the checkpoint's start with "
              f"{new or '(nothing)'!r} (trained on the backbone vs the model with a head): mapped accordingly")
    if s.skipped_files:
        print(f"not copied (old-format weight files that would hold unmerged weights): {s.skipped_files}")
    return 0
