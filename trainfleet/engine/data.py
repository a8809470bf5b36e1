"""Sharded data loading whose global order depends only on (seed, epoch).

Global batch ``b`` of an epoch is ``order[b*G:(b+1)*G]`` of one permutation, and
rank ``r`` of ``W`` takes the ``r``-th of ``W`` equal slices of it. The samples in
a global batch are therefore the same at any world size, which is what makes a
1-worker run and an N-worker run with the same global batch give the same losses,
and what lets a run resume at another world size.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from trainfleet.utils.errors import UsageError


def elastic_global_batch(batch_size: int | None, global_batch_size: int | None, sizes: list[int],
                         spec: str) -> int:
    """The global batch of an elastic job: the same at every world size in ``sizes``.

    ``global_batch_size`` is kept; a ``batch_size`` alone is the per-worker batch at the
    largest size. Either must divide over every size, so a lost node never changes the
    training: the error comes when the job starts, not hours later when a node dies.
    """
    total = global_batch_size if global_batch_size is not None else (batch_size or 1) * sizes[-1]
    bad = [size for size in sizes if total % size]
    if bad:
        step = math.lcm(*sizes)
        given = f"global batch size {total}" + ("" if global_batch_size is not None else
                                                 f" (batch_size={batch_size} x {sizes[-1]} workers)")
        raise UsageError(f"{given} does not divide over {', '.join(map(str, bad))} workers, world sizes "
                         f"that --nodes {spec} can run at ({', '.join(map(str, sizes))}).",
                         f"use a global batch size that is a multiple of {step}, e.g. {step} or {2 * step}, "
                         "or narrow --nodes.")
    return total


def resolve_batch_sizes(batch_size: int | None, global_batch_size: int | None,
                        world_size: int) -> tuple[int, int]:
    """Return ``(per_worker, global)`` batch sizes from either one of them.

    Raises:
        UsageError: the global batch does not divide over the workers, or the two disagree.
    """
    if batch_size is None and global_batch_size is None:
        batch_size = 1
    if global_batch_size is None:
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size}: expected a positive integer.")
        return batch_size, batch_size * world_size
    if global_batch_size < 1 or global_batch_size % world_size:
        lower = max(world_size, global_batch_size // world_size * world_size)
        raise UsageError(
            f"global batch size {global_batch_size} does not divide over {world_size} workers.",
            f"use a multiple of {world_size}, e.g. {lower} or {lower + world_size}.",
        )
    per_worker = global_batch_size // world_size
    if batch_size is not None and batch_size != per_worker:
        raise UsageError(
            f"batch_size={batch_size} and global_batch_size={global_batch_size} disagree "
            f"at world size {world_size} (expected batch_size={per_worker}).",
            "give only one of them.",
        )
    return per_worker, global_batch_size


class GlobalOrderSampler(Sampler[int]):
    """Yields this rank's indices, global batch after global batch.

    Args:
        num_samples: dataset length.
        global_batch_size: samples per optimizer step over all ranks.
        world_size, rank: this rank's place.
        shuffle: permute with ``seed + epoch``; in order otherwise.
        seed: base seed of the permutation.
        drop_last: drop a final global batch smaller than ``global_batch_size``.
        even: pad a final partial global batch by wrapping around so every rank gets
            the same number of samples (training, where ranks meet in collectives
            every step); when False the tail is split unevenly (evaluation).
    """

    def __init__(self, num_samples: int, global_batch_size: int, world_size: int = 1,
                 rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, even: bool = True):
        if num_samples < 1:
            raise UsageError("the dataset is empty: expected at least one sample.")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.world_size, self.rank = world_size, rank
        self.per_rank = global_batch_size // world_size
        self.shuffle, self.seed = shuffle, seed
        self.drop_last, self.even = drop_last, even
        self.epoch = 0
        self.start = 0  # global samples of this epoch already consumed (resume)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the permutation of ``epoch`` and skip its first ``start`` global samples."""
        self.epoch, self.start = epoch, start

    def global_order(self, epoch: int | None = None) -> list[int]:
        """The permutation of one epoch, identical on every rank and world size."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def global_batches(self) -> int:
        """Number of global batches in a full epoch."""
        full, tail = divmod(self.num_samples, self.global_batch_size)
        return full if (self.drop_last or tail == 0) else full + 1

    def epoch_length(self) -> int:
        """Global samples an epoch consumes (padding included, dropped tail excluded)."""
        if self.drop_last:
            return self.global_batches() * self.global_batch_size
        if self.even:
            return self.global_batches() * self.global_batch_size
        return self.num_samples

    def _rank_slice(self, chunk: Sequence[int]) -> Sequence[int]:
        if len(chunk) == self.global_batch_size:
            return chunk[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        base, extra = divmod(len(chunk), self.world_size)  # uneven tail, evaluation only
        begin = self.rank * base + min(self.rank, extra)
        return chunk[begin:begin + base + (1 if self.rank < extra else 0)]

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        size = self.global_batch_size
        for begin in range(self.start, self.num_samples, size):
            chunk = order[begin:begin + size]
            if len(chunk) < size:
                if self.drop_last:
                    return
                if self.even:
                    chunk = chunk + (order * math.ceil(size / len(order)))[:size - len(chunk)]
            yield from self._rank_slice(chunk)

    def __len__(self) -> int:
        remaining = max(self.epoch_length() - self.start, 0)
        if self.even or self.drop_last:
            return remaining // self.world_size
        full, tail = divmod(remaining, self.global_batch_size)
        base, extra = divmod(tail, self.world_size)
        return full * self.per_rank + base + (1 if self.rank < extra else 0)


class DatasetShapeError(ValueError):
    """Samples of one batch disagree in shape; names the dataset indices involved."""


class _Indexed(Dataset):
    """Returns ``(index, sample)`` so collation can name the offending sample."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def _fields(sample: Any) -> list[tuple[str, Any]]:
    if isinstance(sample, dict):
        return [(repr(key), value) for key, value in sample.items()]
    if isinstance(sample, (tuple, list)):
        return [(str(i), value) for i, value in enumerate(sample)]
    return [("0", sample)]


def _shape_problem(indices: Sequence[int], samples: Sequence[Any]) -> str | None:
    first = {name: tuple(value.shape) for name, value in _fields(samples[0]) if hasattr(value, "shape")}
    for index, sample in zip(indices[1:], samples[1:]):
        for name, value in _fields(sample):
            if hasattr(value, "shape") and name in first and tuple(value.shape) != first[name]:
                return (f"dataset sample {index} has shape {tuple(value.shape)} in field {name}, but sample "
                        f"{indices[0]} of the same batch has {first[name]}. HINT: resize or crop samples to "
                        "one shape (e.g. a Resize transform), or pass collate_fn= to pad them.")
    return None


def checked_collate(batch: Sequence[tuple[int, Any]]) -> Any:
    """``default_collate``; when it fails on samples of different shapes, the error names them.
    The shapes are compared only then: checking every batch cost ~90 us a step (32 samples)."""
    samples = [sample for _, sample in batch]
    try:
        return default_collate(samples)
    except Exception:
        problem = _shape_problem([index for index, _ in batch], samples)
        if problem is None:
            raise
    raise DatasetShapeError(problem)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside ``batch`` (nested tuples, lists, dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


class DeviceDataLoader:
    """A DataLoader over a :class:`GlobalOrderSampler` that yields batches on ``device``.

    Each new ``iter()`` starts the next epoch, so ``for epoch ...: for batch in loader``
    reshuffles by itself. The position (epoch, global samples consumed) is kept for
    checkpoints through :meth:`state_dict`/:meth:`load_state_dict`.
    """

    def __init__(self, loader: DataLoader, sampler: GlobalOrderSampler, device: torch.device,
                 timer: Any = None, reseed: bool = False, board: Any = None):
        self.loader, self.sampler, self.device, self.timer = loader, sampler, device, timer
        self.board = board  # the rank's progress board (launch): the wait for a batch is the data phase
        # With reseed, loader.generator is ours: each epoch seeds it from (seed, epoch, rank), so
        # starting an epoch does not draw from the global RNG (DataLoader draws its workers' base
        # seed from it otherwise, and a resumed run would then see other dropout masks).
        self.reseed = reseed
        self.dataset = loader.dataset.dataset if isinstance(loader.dataset, _Indexed) else loader.dataset
        self._next_epoch = 0
        self._next_start = 0
        self.consumed = 0  # global samples consumed in the current epoch
        self.on_start: Any = None  # called as each pass begins (the engine's first state snapshot)
        self._moved = False  # reshard(): the pass under way continues from the position loaded

    @property
    def epoch(self) -> int:
        """The epoch currently (or last) iterated."""
        return self.sampler.epoch

    @property
    def batch_size(self) -> int:
        return self.sampler.per_rank

    @property
    def global_batch_size(self) -> int:
        return self.sampler.global_batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.sampler.per_rank) if len(self.sampler) else 0

    def __iter__(self) -> Iterator[Any]:
        if self.on_start is not None:
            self.on_start()
        epoch, start = self._next_epoch, self._next_start
        self._moved = False  # a pass that begins here starts at the position reshard() loaded (a joining rank's)
        self.sampler.set_epoch(epoch, start)
        self._next_epoch, self._next_start = epoch + 1, 0
        self.consumed = start
        if self.reseed:
            self.loader.generator.manual_seed(
                (self.sampler.seed * 1_000_003 + epoch) * 4_099 + self.sampler.rank)
        batches = iter(self.loader)
        training = self.sampler.even  # an even loader gives every rank the same batches
        evaluating = self.board if not training else None  # an evaluation pass: its time is evaluation
        if evaluating is not None:
            evaluating.begin("eval")
        try:
            yield from self._batches(batches, training)
        finally:
            if evaluating is not None:
                evaluating.end()

    def _batches(self, batches: Any, training: bool) -> Iterator[Any]:
        while True:
            waited = time.perf_counter()
            if self._moved:  # in-place recovery: same global order, this rank's share of the new world
                self._moved = False
                epoch, start = self._next_epoch, self._next_start
                self.sampler.set_epoch(epoch, start)
                self._next_epoch, self._next_start = epoch + 1, 0
                self.consumed = start
                batches = iter(self.loader)
            board = self.board  # read per batch: it can be switched off (the diagnosis overhead benchmark)
            if board is not None:
                board.data_wait()
            try:
                batch = next(batches)
            except StopIteration:
                if board is not None:
                    board.base_idle()
                return
            if self.device.type != "cpu":
                batch = move_to_device(batch, self.device)
            if self.timer is not None:
                self.timer.batch(time.perf_counter() - waited, self.batch_size)
            if board is not None:
                board.batch_arrived(training)
            self.consumed = min(self.consumed + self.global_batch_size, self.sampler.epoch_length())
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the data stands: the next global sample to read."""
        return {
            "seed": self.sampler.seed,
            "epoch": self.sampler.epoch,
            "consumed": self.consumed,
            "global_batch_size": self.global_batch_size,
            "num_samples": self.sampler.num_samples,
        }

    def reshard(self, world_size: int, rank: int, state: dict[str, int] | None) -> None:
        """The world changed under a pass (in-place recovery): this rank's share of each global
        batch from now on, continuing at ``state``'s position (the batch after it comes next, in
        the pass under way)."""
        sampler = self.sampler
        if sampler.global_batch_size % world_size:
            raise UsageError(f"global batch {sampler.global_batch_size} does not divide by the new world size "
                             f"{world_size}.")
        sampler.world_size, sampler.rank = world_size, rank
        sampler.per_rank = sampler.global_batch_size // world_size
        if self.loader.batch_sampler is not None:
            self.loader.batch_sampler.batch_size = sampler.per_rank
        if state is not None:
            self.load_state_dict(state)
            self._moved = True

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position: the next ``iter()`` resumes mid-epoch."""
        if state["num_samples"] != self.sampler.num_samples:
            raise UsageError(
                f"the saved data position is for a dataset of {state['num_samples']} samples, "
                f"this one has {self.sampler.num_samples}.",
                "resume with the same dataset.",
            )
        self.sampler.seed = state["seed"]
        epoch, consumed = state["epoch"], state["consumed"]
        if consumed >= self.sampler.epoch_length():
            epoch, consumed = epoch + 1, 0
        if consumed % self.global_batch_size:
            raise UsageError(
                f"the saved position ({consumed} samples into epoch {epoch}) is not a multiple of "
                f"the global batch size {self.global_batch_size}.",
                f"resume with --global-batch-size {state['global_batch_size']}.",
            )
        self._next_epoch, self._next_start = epoch, consumed
        self.sampler.set_epoch(epoch, consumed)
        self.consumed = consumed


def build_loader(dataset: Any, sampler: GlobalOrderSampler, device: torch.device, num_workers: int,
                 collate_fn: Any, timer: Any, loader_kwargs: dict[str, Any], board: Any = None) -> DeviceDataLoader:
    """The DataLoader over ``sampler``, wrapped to deliver batches on ``device``."""
    if collate_fn is None:
        dataset, collate_fn = _Indexed(dataset), checked_collate
    loader_kwargs.setdefault("pin_memory", device.type == "cuda")
    reseed = "generator" not in loader_kwargs  # keep iter() off the global RNG (see DeviceDataLoader)
    if reseed:
        loader_kwargs["generator"] = torch.Generator()
    loader = DataLoader(dataset, batch_size=sampler.per_rank, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_fn, **loader_kwargs)
    return DeviceDataLoader(loader, sampler, device, timer=timer, reseed=reseed, board=board)
