"""Strategy options, importable without torch.

The launcher checks ``--strategy-opt`` against these before any worker starts; the
strategies check their keyword arguments against the same table.
"""
from __future__ import annotations

from typing import Iterable

from trainfleet.utils.errors import UsageError

# Options each strategy takes (``Engine(strategy=..., **options)``, ``launch --strategy-opt``).
# Kept here, torch-free, so the launcher rejects a misplaced option before any worker starts.
STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "single": (),
    "dp": (),
    "ddp": ("timeout_s", "find_unused_parameters", "broadcast_buffers", "bucket_cap_mb",
            "gradient_as_bucket_view", "static_graph", "sync_batchnorm"),
    "horovod": ("backward_passes_per_step", "compression"),
    "fsdp": ("timeout_s", "wrap", "reshard_after_forward", "cpu_offload", "activation_checkpointing",
             "sharding", "shard_size", "sync_batchnorm"),
}


def check_strategy_options(strategy: str, options: Iterable[str]) -> None:
    """Raise a UsageError for an option ``strategy`` does not take, naming who takes it.

    Raises:
        UsageError: ``fsdp`` given ``find_unused_parameters`` (a ddp option), or a typo.
    """
    valid = STRATEGY_OPTIONS.get(strategy, ())
    for option in options:
        if option in valid:
            continue
        owners = [name for name, names in STRATEGY_OPTIONS.items() if option in names]
        where = f"a {'/'.join(owners)} option" if owners else "not an option of any strategy"
        raise UsageError(f"strategy option {option!r} is {where}; {strategy} takes {list(valid)}.",
                         f"drop it, or use --strategy {owners[0]}." if owners else "check the spelling.")


def parse_strategy_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` from the command line: booleans, ints and floats become Python values.

    Raises:
        UsageError: no ``=``.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--strategy-opt {text!r}: expected KEY=VALUE.", "e.g. --strategy-opt sharding=hybrid")
    lowered = raw.strip().lower()
    if lowered in ("true", "yes", "on", "false", "no", "off"):
        return key.strip(), lowered in ("true", "yes", "on")
    for kind in (int, float):
        try:
            return key.strip(), kind(raw)
        except ValueError:
            pass
    return key.strip(), raw


SHARDINGS = ("full", "hybrid")


def mesh_shape(world_size: int, sharding: str, shard_size: object, local_world_size: int) -> tuple[int, ...]:
    """fsdp's DeviceMesh shape: ``(world,)`` for full sharding, ``(replicas, shard_size)`` for hybrid.

    Torch-free, so ``launch`` answers a bad layout before any worker starts.

    Raises:
        UsageError: an unknown sharding, ``shard_size`` without hybrid, or a world size the
            shard groups do not divide.
    """
    if sharding not in SHARDINGS:
        raise UsageError(f"Unknown fsdp sharding {sharding!r}. Available: {list(SHARDINGS)}")
    if sharding == "full":
        if shard_size is not None:
            raise UsageError(f"shard_size={shard_size} applies to sharding=hybrid only.",
                             "add --strategy-opt sharding=hybrid, or drop shard_size.")
        return (world_size,)
    size = local_world_size if shard_size is None else shard_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1 or world_size % size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise UsageError(f"fsdp hybrid sharding: world size {world_size} does not divide into shard groups "
                         f"of {size!r}.", f"use a shard_size in {divisors}.")
    return (world_size // size, size)
