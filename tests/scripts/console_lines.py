"""Every rank prints, in step (a gloo barrier per round): a line of its own, a warning that only
ranks 1 and 3-7 print, and a line every rank prints; each line's writing time goes to
OUT/written.<rank>.json (tests/launcher/test_console.py, benchmarks/console_merge.py).

    console_lines.py OUT [--rounds N]
"""
import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

out = Path(sys.argv[1])
rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
dist.init_process_group("gloo")
rank = dist.get_rank()
written = []


def say(text: str) -> None:
    print(text, flush=True)
    written.append((text, time.time()))


for i in range(rounds):
    dist.barrier()
    say(f"rank {rank} alone, round {i}")
    if rank in (1, 3, 4, 5, 6, 7):
        say(f"warning: loss scale reduced, round {i}")
    say(f"every rank, round {i}")
    time.sleep(0.3)
dist.barrier()
(out / f"written.{rank}.json").write_text(json.dumps(written))
dist.destroy_process_group()
os._exit(0)
