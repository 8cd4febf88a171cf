"""ModulesToSave: a module trained in full (a classifier head, lm_head, embed_tokens) per adapter."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from minilora.tree import AdapterHost

__all__ = ["ModulesToSave"]


class ModulesToSave(AdapterHost):
    """Holds the original module (frozen) and one trainable copy per adapter.

    State-dict keys follow peft's wrapper (``<name>.original_module.*`` and
    ``<name>.modules_to_save.<adapter>.*``); on disk the wrapper path is dropped, as in peft.
    Forward runs the active adapter's copy, or the original when no adapter with a copy is active
    or adapters are disabled.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.original_module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.train(original.training)  # keep the model's train/eval mode

    def add_copy(self, name: str) -> nn.Module:
        trained = copy.deepcopy(self.original_module)
        trained.requires_grad_(True)
        self.modules_to_save[name] = trained
        return trained

    def adapter_modules(self) -> nn.ModuleDict:
        return self.modules_to_save

    def unwrap(self) -> nn.Module:
        """The active adapter's trained copy (the original module when none is active)."""
        return self.modules_to_save[self.active[0]] if self.active else self.original_module

    @property
    def current(self) -> nn.Module:
        """The module forward runs now."""
        return self.original_module if self.disabled else self.unwrap()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.row_adapters is not None and not self.disabled:
            return self._forward_rows(*args, **kwargs)
        return self.current(*args, **kwargs)

    def _forward_rows(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed batch: each adapter's copy runs on its rows; rows whose adapter has no copy here
        (or '__base__') run the original module. Tensor arguments are split along dim 0."""
        names = self.row_adapters
        groups: dict[int, tuple[nn.Module, tuple[int, ...]]] = {}
        for name in names.distinct():
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            rows = groups.get(id(module), (module, ()))[1] + names.rows_of(name)
            groups[id(module)] = (module, tuple(sorted(rows)))

        def pick(value: Any, rows: tuple[int, ...]) -> Any:
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                return value
            if value.shape[0] != len(names):
                raise ValueError(f"per-row adapters: an input has {value.shape[0]} rows, but "
                                 f"{len(names)} row adapters were given")
            return value.index_select(0, names.index(rows, value.device))

        out = None
        for module, rows in groups.values():
            part = module(*(pick(v, rows) for v in args), **{k: pick(v, rows) for k, v in kwargs.items()})
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"per-row adapters need a module returning a tensor; "
                                f"{type(module).__name__} returned {type(part).__name__}")
            if out is None:
                out = part.new_empty((len(names), *part.shape[1:]))
            out[names.index(rows, out.device)] = part
        return out

    def __getattr__(self, name: str) -> Any:
        # Code that reads e.g. ``lm_head.weight`` or ``embed_tokens.num_embeddings`` sees the module
        # that forward runs.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current, name)
