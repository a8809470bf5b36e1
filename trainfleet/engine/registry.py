"""Plugin registries of the engine, importable without torch.

The launcher validates ``--strategy``/``--precision`` against these names before
it imports anything heavy; the classes themselves load on first use.
"""
from trainfleet.utils.registry import Registry

STRATEGIES = Registry("strategy")
STRATEGIES.register("single", "trainfleet.engine.single:SingleDeviceStrategy")
STRATEGIES.register("dp", "trainfleet.engine.dp:DataParallelStrategy")
STRATEGIES.register("ddp", "trainfleet.engine.ddp:DDPStrategy")
STRATEGIES.register("horovod", "trainfleet.engine.horovod:HorovodStrategy")
STRATEGIES.register("fsdp", "trainfleet.engine.fsdp:FSDPStrategy")

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

