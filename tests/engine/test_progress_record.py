"""The progress record a worker writes and its agent reads (engine/progress_record.py)."""
import subprocess
import sys

from trainfleet.engine import progress_record

WRITER = """
import sys, time
from trainfleet.engine.progress_record import ProgressRecord
record = ProgressRecord(sys.argv[1])
print("mapped", flush=True)
end = time.monotonic() + 3
while time.monotonic() < end:
    record.publish(1, 2, 0, 3, 4, 5, 0.1)
    record.write_ring(7, 1, 2, 3)
"""


def test_making_the_record_again_while_a_worker_writes_it_does_not_kill_the_worker(tmp_path):
    """In-place recovery: the agent makes the next attempt's records while the same worker keeps its
    own mapped and writes on. On the old code ``create`` truncated the file first: the worker's next
    write past the file's end was SIGBUS (the full suite: rank 0 of a three-host fsdp job, signal 7)."""
    path = str(tmp_path / "rank0.progress")
    progress_record.create(path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "mapped"
    while writer.poll() is None:
        progress_record.create(path)  # what each new attempt's diagnosis does
    assert writer.returncode == 0, f"the writer died: exit code {writer.returncode} (SIGBUS is -7)"
    fresh = progress_record.ProgressRecord(path)  # still a record of the right size
    fresh.close()
