"""Nodelist expansion, checked against what `scontrol show hostnames` prints for the same input."""
import pytest

from trainfleet.slurm.nodelist import expand_nodelist, slurm_task
from trainfleet.utils.errors import UsageError


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[01-03,7],login1", ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("rack1-node[008-010]", ["rack1-node008", "rack1-node009", "rack1-node010"]),
    ("x[9-10]", ["x9", "x10"]),
])
def test_expand(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-2", "node[a-b]"])
def test_malformed(bad):
    with pytest.raises(UsageError, match="nodelist"):
        expand_nodelist(bad)


def test_task_from_environment():
    assert slurm_task({}) is None
    task = slurm_task({"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2",
                       "SLURM_NODEID": "1"})
    assert (task.job_id, task.nnodes, task.node_rank, task.master_addr, task.procid) == ("42", 2, 1, "node1", None)
    with pytest.raises(UsageError, match="SLURM gave 2 hosts .* but SLURM_NNODES=3"):
        slurm_task({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "3"})
