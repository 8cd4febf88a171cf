"""Training at scale: what minilora adds for DDP, FSDP2, gradient checkpointing and the HF Trainer.

DDP, FSDP2 and gradient checkpointing take an injected model as it is (docs/training-at-scale.md
says why). What is here: :func:`require_input_grads` (reentrant checkpointing on a model without
``get_input_embeddings``), :func:`prepare_model_for_kbit_training`, :func:`save_adapter_sharded`,
and ``SaveAdapterCallback`` for the HF Trainer (transformers is imported on its first use).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from minilora import atomic
from minilora.checkpoint import gather_tensors, save_adapter
from minilora.inject import lora_state, update_trainable
from minilora.peft_format import safetensors_bytes
from minilora.tree import input_requires_grad

__all__ = ["require_input_grads", "prepare_model_for_kbit_training", "save_adapter_sharded", "SaveAdapterCallback"]

# quantization_method values of transformers models whose parameters peft leaves uncast.
_KEEP_DTYPES = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def require_input_grads(module: nn.Module) -> RemovableHandle:
    """Make ``module``'s output require grad in training (grad enabled, ``module.training``).

    For reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``) over a frozen
    input: the checkpointed blocks only backpropagate, into their adapters, when their input
    requires grad. ``inject`` does this for the module ``model.get_input_embeddings()`` returns;
    call it on the first module of a model that has no such method. Values are unchanged.

    Returns:
        The hook's handle (``.remove()`` undoes it).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"require_input_grads needs an nn.Module (the model's first module, e.g. its embedding), "
                        f"got {type(module).__name__}")
    return module.register_forward_hook(input_requires_grad)


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Get a (quantized) transformers model ready for LoRA training, as peft's function of this name.

    1. Every parameter is frozen.
    2. fp16/bf16 parameters that are not 4-bit packed weights (layer norms, embeddings, ``lm_head``)
       are cast to fp32 for stable training, unless the model is GPTQ/AQLM/EETQ/torchao/HQQ
       quantized (as peft).
    3. For a quantized model (bitsandbytes 4/8-bit, GPTQ, ...) with ``use_gradient_checkpointing``: the input
       embeddings' output requires grad (needed by reentrant checkpointing; skipped when
       ``gradient_checkpointing_kwargs`` says ``use_reentrant=False``), and
       ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`` is called.

    Call it before ``minilora.inject`` (as with peft) or after: on an injected model the active
    adapters are made trainable again.

    Returns:
        The same model.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for p in model.parameters():
        p.requires_grad_(False)
    keep_dtypes = getattr(model, "quantization_method", None) in _KEEP_DTYPES or getattr(model, "hqq_quantized", False)
    if not keep_dtypes:
        bnb = sys.modules.get("bitsandbytes")
        packed = (bnb.nn.Params4bit,) if bnb is not None else ()
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and not isinstance(p, packed):
                p.data = p.data.to(torch.float32)
    quantized = keep_dtypes or getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if quantized and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            model.get_input_embeddings().register_forward_hook(input_requires_grad)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora_state(model) is not None:
        update_trainable(model)
    return model


def save_adapter_sharded(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Save the adapter(s) of a model sharded with FSDP2 (``fully_shard``) in peft's format.

    Call on every rank (it is collective): each adapter tensor, and only those, is all-gathered
    (``DTensor.full_tensor()``), rank 0 writes exactly the files ``save_adapter`` writes for the
    same weights in one process, and all ranks return once they are on disk. Works unchanged on a
    DDP or unsharded model (nothing to gather). Without an initialised process group it is
    ``save_adapter``.
    """
    import torch.distributed as dist

    sharded = dist.is_available() and dist.is_initialized()
    save_adapter(model, path, adapter_name, is_main_process=not sharded or dist.get_rank() == 0)
    if sharded:
        dist.barrier()  # nobody reads the folder (or exits) before rank 0 has written it


# The Trainer's weight files (transformers' names): one file, or shards listed by an index.
_TRAINER_WEIGHTS = "model.safetensors"
_TRAINER_INDEX = "model.safetensors.index.json"
_TRAINER_PICKLE = "pytorch_model.bin"


def _slim_trainer_weights(model: nn.Module, folder: str, is_main_process: bool) -> None:
    """Replace the Trainer's full-model weights in ``folder`` by the trainable tensors only,
    under the model's own state-dict keys (what ``Trainer._load_from_checkpoint`` loads)."""
    keys = [name for name, p in model.named_parameters() if p.requires_grad]
    tensors = gather_tensors(model, keys)  # collective on a sharded model: every rank calls it
    if not is_main_process:
        return
    index = os.path.join(folder, _TRAINER_INDEX)
    stale = [_TRAINER_PICKLE, _TRAINER_INDEX]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            stale += sorted(set(json.load(handle)["weight_map"].values()))
    # The full file is never half-replaced (minilora.atomic); transformers expects format "pt".
    atomic.write_file(os.path.join(folder, _TRAINER_WEIGHTS), safetensors_bytes(tensors, {"format": "pt"}))
    for name in stale:
        if name != _TRAINER_WEIGHTS:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def __getattr__(name: str) -> Any:
    # PEP 562: SaveAdapterCallback is defined on first use, since its base class comes from
    # transformers (optional and slow to import); ``global`` makes it a plain module global
    # (qualname and pickling included), so this runs once.
    if name != "SaveAdapterCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import TrainerCallback

    global SaveAdapterCallback

    class SaveAdapterCallback(TrainerCallback):
        """Write the peft-format adapter into each Trainer checkpoint.

        ``Trainer(..., callbacks=[SaveAdapterCallback()])`` writes ``adapter_config.json`` and
        ``adapter_model.safetensors`` to ``<output_dir>/checkpoint-<step>/<subfolder>`` whenever
        the Trainer saves, from every rank (an FSDP2-sharded model gathers only its adapter
        tensors; the main process writes).

        The Trainer's own checkpoint files are what its ``resume_from_checkpoint`` reads. By
        default they are left alone: its ``model.safetensors`` then holds the whole model, base
        weights included. ``slim_trainer_checkpoint=True`` replaces that file (atomically) by one
        holding only the trainable tensors: resuming still works, because the Trainer loads
        checkpoint weights non-strictly into the model you built (it logs the frozen keys as
        missing), and a checkpoint costs the adapter, not the model.

        Args:
            adapter_name: which adapter (default: all, extra ones in sub-folders, as peft).
            subfolder: folder inside the checkpoint ("" writes into the checkpoint folder itself).
            slim_trainer_checkpoint: keep only trainable tensors in the Trainer's weights file.
        """

        def __init__(self, adapter_name: str | None = None, subfolder: str = "adapter",
                     slim_trainer_checkpoint: bool = False) -> None:
            self.adapter_name, self.subfolder = adapter_name, subfolder
            self.slim_trainer_checkpoint = slim_trainer_checkpoint

        def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
            if model is None:
                raise ValueError("SaveAdapterCallback needs the model; the Trainer passes it to callbacks")
            # The Trainer hands callbacks its unwrapped model; a DDP wrapper or a torch.compile'd module
            # given by hand would prefix every key (module., _orig_mod.), so look through them.
            if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
                model = model.module
            model = getattr(model, "_orig_mod", model)
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_adapter(model, os.path.join(folder, self.subfolder), self.adapter_name,
                         is_main_process=args.should_save)
            if self.slim_trainer_checkpoint:
                _slim_trainer_weights(model, folder, is_main_process=args.should_save)

    return SaveAdapterCallback
