"""Per-row adapter names for mixed batches, with their row indices built once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["RowAdapters"]


class RowAdapters(Sequence[str]):
    """One adapter name per batch row (``"__base__"``: none), as ``per_sample_adapters`` sets it
    on every LoRA layer and modules_to_save wrapper.

    The rows of each group and their index tensors are built once per device and shared by all
    layers: building them per layer and call would cost a host-to-device copy each time.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._rows: dict[str, tuple[int, ...]] = {}
        for i, name in enumerate(self.names):
            self._rows[name] = (*self._rows.get(name, ()), i)
        self._index: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):  # type: ignore[override]
        return self.names[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def rows_of(self, name: str) -> tuple[int, ...]:
        """The rows that run adapter ``name``, in order (distinct names in first-row order)."""
        return self._rows[name]

    def distinct(self) -> list[str]:
        return list(self._rows)

    def index(self, rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``rows`` as an int64 index tensor on ``device`` (cached)."""
        key = (rows, torch.device(device))
        if key not in self._index:
            self._index[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._index[key]
