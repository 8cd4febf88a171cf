"""Per-row adapter names for mixed batches, with their row indices built once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["RowAdapters", "RowSlots"]


@dataclass(frozen=True)
class RowSlots:
    """Where each row's adapter sits in a layer's stack of adapters (``ops.StackedLora``), and the
    rows grouped by slot, built on the host once per batch and stack.

    slots: (R,) int64, the slot of each row, -1 for a row whose adapter is not in the stack.
    rows: (R',) int64, the rows with a slot, or None when every row has one; row_slots: their slots.

    For the batched products of the PyTorch path, the rows with a slot are dealt into ``n_chunks``
    chunks of ``chunk`` rows, each chunk one slot's rows (the last chunk of a slot padded with
    repeats of its first row, whose results are never read): ``chunk_rows`` (n_chunks·chunk,)
    gathers them, ``chunk_slots`` (n_chunks,) gives each chunk's slot, and ``pos`` (R',) is each
    row of ``rows``' place in the gathered layout. A chunk of ⌈R'/groups⌉ rows pads at most one
    chunk per slot, so the layout holds fewer than 2·R' rows. Each of the three is None where it
    would be the identity (no gather needed).

    For the kernels, the rows grouped by slot: ``sorted_rows`` (R',) int32, and per group g (slots
    in increasing order) ``seg_slot[g]`` and its rows ``sorted_rows[seg_start[g]:seg_start[g + 1]]``
    (int32); ``max_rows``: the largest group.
    """

    slots: torch.Tensor
    rows: torch.Tensor | None
    row_slots: torch.Tensor
    chunk: int
    chunk_rows: torch.Tensor | None
    chunk_slots: torch.Tensor | None
    pos: torch.Tensor | None
    sorted_rows: torch.Tensor
    seg_slot: torch.Tensor
    seg_start: torch.Tensor
    max_rows: int

    @classmethod
    def build(cls, slots: list[int], n_slots: int, device: torch.device) -> RowSlots:
        """From each row's slot (-1: none) among ``n_slots``."""
        present = [i for i, s in enumerate(slots) if s >= 0]
        groups: dict[int, list[int]] = {}
        for i in present:
            groups.setdefault(slots[i], []).append(i)
        order = sorted(groups)
        chunk = -(-len(present) // max(len(groups), 1))
        chunk_rows, chunk_slots = [], []
        for slot in order:
            g = groups[slot]
            for start in range(0, len(g), chunk):
                part = g[start:start + chunk]
                chunk_rows += part + [part[0]] * (chunk - len(part))
                chunk_slots.append(slot)
        place = {row: j for j, row in reversed(list(enumerate(chunk_rows)))}  # first place of a row
        pos = [place[i] for i in present]
        starts = [0]
        for slot in order:
            starts.append(starts[-1] + len(groups[slot]))

        def tensor(values, dtype=torch.long, identity=None):
            return None if values == identity else torch.tensor(values, dtype=dtype, device=device)

        return cls(tensor(slots), tensor(present, identity=list(range(len(slots)))),
                   tensor([slots[i] for i in present]), chunk,
                   tensor(chunk_rows, identity=list(range(len(slots)))),
                   tensor(chunk_slots, identity=list(range(n_slots))),
                   tensor(pos, identity=list(range(len(present)))),
                   tensor([i for slot in order for i in groups[slot]], torch.int32),
                   tensor(order, torch.int32), tensor(starts, torch.int32),
                   max((len(g) for g in groups.values()), default=0))


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
        self._slots: dict[tuple[tuple[str, ...], torch.device], RowSlots] = {}

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

    def slots(self, stacked: tuple[str, ...], device: torch.device) -> RowSlots:
        """Each row's slot among the adapters ``stacked`` (in stack order), cached: layers with
        the same stacked adapters share one set of tensors."""
        key = (stacked, torch.device(device))
        if key not in self._slots:
            where = {name: i for i, name in enumerate(stacked)}
            self._slots[key] = RowSlots.build([where.get(name, -1) for name in self.names], len(stacked), device)
        return self._slots[key]
