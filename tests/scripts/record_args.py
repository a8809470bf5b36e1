"""Writes its arguments and task index to OUT/args.<index>.json (rank 0), for sweep tests.

    record_args.py OUT [anything ...]
"""
import json
import os
import sys
from pathlib import Path

if os.environ.get("RANK", "0") == "0":
    index = os.environ.get("TRAINFLEET_TASK_INDEX", "none")
    Path(sys.argv[1], f"args.{index}.json").write_text(json.dumps({
        "argv": sys.argv[2:], "index": index, "job_dir": os.environ.get("TRAINFLEET_JOB_DIR")}))
    print(f"task {index}: {' '.join(sys.argv[2:])}")
