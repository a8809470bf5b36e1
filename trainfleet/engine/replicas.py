"""Each rank's shards of the last step, copied into host memory on a rank of the next node.

Under fsdp a rank's parameters and optimizer state exist nowhere else: when its node dies they
are gone, and the survivors could only restart from the last checkpoint on disk. After every
optimizer step the engine hands this rank's pieces (engine/fsdp.py's :func:`shard_pieces`) to
:class:`ShardRing`, which:

- stages them into one host buffer (a copy, no pickling; allocated once) headed by the step, and
  sends it with ``isend`` on a gloo group of its own to the same local rank of the next node (a
  ring over the nodes: any one node's death leaves each of its ranks' state on a live node);
- posts an ``irecv`` of the previous node's rank's buffer into one of two slots, so a receive in
  flight never overwrites the last complete one.

Neither waits: the transfers run on gloo's threads while the next step computes. The next push
first waits for both (over loopback or a network they finished long before), so a buffer is
never restaged while it is sent. A copy is used only once its receive completed, and then it is
the complete state of the step in its header, or not used at all.

On a loss (``Engine._recover``) :meth:`ShardRing.settle` gives an in-flight receive a moment to
complete, before the old groups are left; the survivors then say which old ranks' pieces they
hold at which step (:meth:`holdings`), and the newest step for which every old rank's pieces are
alive is put together again (:meth:`pieces`). When two adjacent nodes die, a rank's pieces and
their copy are both gone: the engine says so and the job restarts from the last checkpoint.
"""
from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

SETTLE_S = 1.0  # how long a recovery waits for a copy still arriving
ALIGN = 16  # each tensor's bytes start at a multiple of this (its dtype's view needs it aligned)
HEADER = 16  # the step (int64), then padding


def _layout(pieces: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, dtype, shape, byte offset) of each tensor piece, packed after the header."""
    layout, offset = [], HEADER
    for name, value in pieces.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: {type(value).__name__} (only tensors are copied to a peer)")
        layout.append((name, str(value.dtype).removeprefix("torch."), tuple(value.shape), offset))
        offset += -(-value.numel() * value.element_size() // ALIGN) * ALIGN
    return layout


def _size(layout: list) -> int:
    if not layout:
        return HEADER
    name, dtype, shape, offset = layout[-1]
    numel = 1
    for n in shape:
        numel *= n
    return offset + numel * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _view(buffer: torch.Tensor, dtype: str, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    kind = getattr(torch, dtype)
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=kind).element_size()
    return buffer[offset:offset + nbytes].view(kind).view(shape)


class ShardRing:
    """This rank's side of the ring (see the module). Made lazily at the first push, by every
    rank at once (a new gloo group is a collective); ``sockets`` records its connections."""

    def __init__(self, rank: int, world_size: int, local_world_size: int, timeout_s: float):
        self.rank, self.world_size = rank, world_size
        self.local = max(1, local_world_size)
        self.to = (rank + self.local) % world_size  # the same local rank on the next node
        self.source = (rank - self.local) % world_size
        self.timeout_s = timeout_s
        self.group: Any = None
        self.layouts: list | None = None  # every rank's layout (the source's tells what arrives)
        self.mine: list | None = None
        self.send_buffer: torch.Tensor | None = None
        self.slots: list[torch.Tensor | None] = [None, None]
        self.complete: int | None = None  # the slot holding the last complete copy
        self.sending: Any = None
        self.receiving: tuple[Any, int] | None = None  # (work, slot)
        self.broken = False  # a transfer failed (a peer went away): nothing more until the next group
        self.sockets: set[str] = set()

    @property
    def enabled(self) -> bool:
        """One node only: there is no other node to hold a copy."""
        return self.world_size > self.local

    def push(self, step: int, pieces: dict[str, Any]) -> None:
        """Stage this rank's pieces of ``step`` and send them on; receive the source's."""
        if not self.enabled or self.broken:
            return
        try:
            self._finish_transfers()
            layout = _layout(pieces)
            if layout != self.mine:  # the first push, or the optimizer's state appeared: on every rank at once
                self._exchange_layouts(layout)
            buffer = self.send_buffer
            buffer[:8].view(torch.int64)[0] = step
            for (name, dtype, shape, offset) in layout:
                _view(buffer, dtype, shape, offset).copy_(pieces[name])
            slot = 1 if self.complete == 0 else 0
            self.sending = dist.isend(buffer, dst=self.to, group=self.group)
            self.receiving = (dist.irecv(self.slots[slot], src=self.source, group=self.group), slot)
        except RuntimeError:  # a peer went away: the step's own collectives say so, and recovery follows
            self.broken = True

    def _finish_transfers(self) -> None:
        if self.sending is not None:
            self.sending.wait()
            self.sending = None
        if self.receiving is not None:
            work, slot = self.receiving
            work.wait()
            self.receiving, self.complete = None, slot

    def _exchange_layouts(self, layout: list) -> None:
        from trainfleet.engine.recovery import GroupSockets

        if self.group is None:
            sockets = GroupSockets()
            with sockets.recording():
                self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
            self.sockets = sockets.inodes
        layouts: list = [None] * self.world_size
        dist.all_gather_object(layouts, layout, group=self.group)
        self.layouts, self.mine = layouts, layout
        self.send_buffer = torch.zeros(_size(layout), dtype=torch.uint8)
        self.slots = [torch.zeros(_size(layouts[self.source]), dtype=torch.uint8) for _ in range(2)]
        self.complete = None

    def settle(self) -> None:
        """A loss: let a copy still arriving complete (a moment at most), then stop transferring."""
        if self.receiving is not None:
            work, slot = self.receiving
            try:
                if work.wait(datetime.timedelta(seconds=SETTLE_S)):
                    self.complete = slot
            except RuntimeError:
                pass
        self.receiving = self.sending = None
        self.group = None  # left with the old default group (destroy_process_group takes every group)
        self.broken = True

    def holdings(self, live_step: int) -> dict[int, int]:
        """Old rank -> the step whose pieces this rank holds for it: its own (live) and its source's copy."""
        held = {self.rank: live_step}
        copy = self.copy_step()
        if copy is not None and self.source != self.rank:
            held[self.source] = copy
        return held

    def copy_step(self) -> int | None:
        if self.complete is None or self.slots[self.complete] is None or self.layouts is None:
            return None
        return int(self.slots[self.complete][:8].view(torch.int64)[0])

    def copy_pieces(self) -> dict[str, torch.Tensor]:
        """The source's pieces from the last complete copy (new tensors)."""
        buffer = self.slots[self.complete]
        return {name: _view(buffer, dtype, shape, offset).clone()
                for (name, dtype, shape, offset) in self.layouts[self.source]}

    def nbytes(self) -> int:
        """Host memory the ring holds: the staging buffer and the two receive slots."""
        return sum(t.numel() for t in (self.send_buffer, *self.slots) if t is not None)

    @staticmethod
    def nbytes_for(pieces: dict[str, Any]) -> int:
        """What a ring would hold for ``pieces`` (the staging buffer and two slots of a peer's like
        them): ``trainfleet bench`` reports it with the state copy's size."""
        return 3 * _size(_layout(pieces))
