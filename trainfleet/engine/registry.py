"""Plugin registries of the engine, importable without torch.

The launcher validates ``--strategy``/``--precision`` against these names before
it imports anything heavy; the classes themselves load on first use.
"""
from trainfleet.utils.registry import Registry

STRATEGIES = Registry("strategy")
STRATEGIES.register("single", "trainfleet.engine.single:SingleDeviceStrategy")
STRATEGIES.register("dp", "trainfleet.engine.dp:DataParallelStrategy")
STRATEGIES.register("ddp", "trainfleet.engine.ddp:DDPStrategy")

PRECISIONS = Registry("precision")
for _alias in ("32", "fp32", "O0"):
    PRECISIONS.register(_alias, "trainfleet.engine.precision:Precision")
