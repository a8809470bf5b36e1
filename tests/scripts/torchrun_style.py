"""A script written for torchrun: it reads only the environment and uses torch.distributed."""
import json
import os
import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID"]
record = {"sum": value.item(), "env": {k: os.environ.get(k) for k in keys}, "pid": os.getpid(),
          "argv": sys.argv[1:]}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as handle:
    json.dump(record, handle)
print(f"hello from rank {rank} of {world}", flush=True)
dist.destroy_process_group()
