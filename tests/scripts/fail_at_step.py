"""Rank 1 raises at step 3 while rank 0 waits in a collective (and holds a grandchild process).

    fail_at_step.py OUT_DIR
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import trainfleet

out = Path(sys.argv[1])
engine = trainfleet.Engine()
sleeper = subprocess.Popen(["sleep", "300"])  # a grandchild the launcher must also stop
(out / f"pids.rank{engine.rank}").write_text(f"{os.getpid()} {sleeper.pid}")
engine.barrier()
for step in range(10):
    if engine.rank == 1 and step == 3:
        (out / "failed_at").write_text(repr(time.time()))
        raise RuntimeError("injected failure at step 3")
    if engine.rank == 0 and step == 3:
        time.sleep(0.5)  # rank 1 fails first; rank 0 then blocks in the all_reduce below
    engine.all_reduce(torch.ones(1))
