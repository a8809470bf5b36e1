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


def test_allocation_modes_and_ports():
    from trainfleet.slurm.allocation import allocation, job_port

    batch = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2"}
    assert allocation({}) is None
    assert allocation(batch)[0] == "batch"
    assert allocation({**batch, "SLURM_PROCID": "0", "SLURM_NODEID": "0"})[0] == "batch"  # the batch script
    assert allocation({**batch, "SLURM_PROCID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0"})[0] == "task"
    assert job_port("4242") == job_port("4242") == 20000 + 4242
    assert 20000 <= job_port("123456_7") < 40000


def test_geometry_errors_say_what_slurm_gave():
    from trainfleet.slurm.allocation import check_geometry, srun_command
    from trainfleet.slurm.nodelist import slurm_task

    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2"}
    task = slurm_task(env)
    with pytest.raises(UsageError, match=r"SLURM gave 2 node\(s\) \(node1,node2\) but --nodes 4 was requested"):
        check_geometry(task, 4, env)
    inside = {**env, "SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}
    with pytest.raises(UsageError, match="SLURM started 8 tasks on 2 node.*one agent per node"):
        check_geometry(slurm_task(inside), 2, inside)
    command = srun_command(task, ["/py", "-m", "trainfleet.cli", "launch"], ["--nodes", "2", "train.py"])
    assert command[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert command[5:] == ["/py", "-m", "trainfleet.cli", "launch", "--nodes", "2", "train.py"]


def test_launch_inside_an_srun_task_takes_its_place_from_slurm(monkeypatch, tmp_path):
    import argparse

    from trainfleet.cli import launch, launch_args

    for key, value in {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
                       "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0"}.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    launch_args.add_launch_arguments(parser)
    ns = parser.parse_args(["--nodes", "2", "--gpus", "2", "train.py"])
    code, placed = launch._in_allocation(ns, [])
    assert code is None
    assert (placed["node_rank"], placed["master_addr"], placed["master_port"]) == (1, "gpu07", 20077)
    ns = parser.parse_args(["--nodes", "3", "train.py"])
    with pytest.raises(UsageError, match=r"SLURM gave 2 node\(s\) \(gpu07,gpu08\) but --nodes 3"):
        launch._in_allocation(ns, [])
