"""Plugin registries of the engine, importable without torch.

The launcher validates ``--strategy``/``--precision`` against these names before
it imports anything heavy; the classes themselves load on first use.
"""
from typing import Iterable

from trainfleet.utils.errors import UsageError
from trainfleet.utils.registry import Registry

STRATEGIES = Registry("strategy")
STRATEGIES.register("single", "trainfleet.engine.single:SingleDeviceStrategy")
STRATEGIES.register("dp", "trainfleet.engine.dp:DataParallelStrategy")
STRATEGIES.register("ddp", "trainfleet.engine.ddp:DDPStrategy")
STRATEGIES.register("horovod", "trainfleet.engine.horovod:HorovodStrategy")
STRATEGIES.register("fsdp", "trainfleet.engine.fsdp:FSDPStrategy")

# Options each strategy takes (``Engine(strategy=..., **options)``, ``launch --strategy-opt``).
# Kept here, torch-free, so the launcher rejects a misplaced option before any worker starts.
STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "single": (),
    "dp": (),
    "ddp": ("timeout_s", "find_unused_parameters", "broadcast_buffers", "bucket_cap_mb",
            "gradient_as_bucket_view", "static_graph"),
    "horovod": ("backward_passes_per_step", "compression"),
    "fsdp": ("timeout_s", "wrap", "reshard_after_forward", "cpu_offload", "activation_checkpointing",
             "sharding", "shard_size"),
}

PRECISIONS = Registry("precision")
_PRECISION_ALIASES = {
    "fp32": ("32", "32-true", "fp32", "O0"),
    "fp16_mixed": ("16-mixed", "16", "fp16", "O1"),
    "bf16_mixed": ("bf16-mixed", "bf16"),
    "apex_o2": ("O2",),
    "apex_o3": ("O3",),
}
for _factory, _aliases in _PRECISION_ALIASES.items():
    for _alias in _aliases:
        PRECISIONS.register(_alias, f"trainfleet.engine.precision:{_factory}")


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
