"""Each rank records the wall-clock time once it is past init_process_group and a barrier."""
import json
import os
import sys
import time

import torch.distributed as dist

dist.init_process_group("gloo")
dist.barrier()
with open(os.path.join(sys.argv[1], f"ready{dist.get_rank()}.json"), "w") as handle:
    json.dump({"t": time.time()}, handle)
dist.destroy_process_group()
