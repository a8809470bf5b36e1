"""`launch` inside allocations of a real SLURM cluster (scripts/dev-slurm.sh: slurmctld + node1 + node2)."""
import json
import subprocess
import time

import pytest
import torch

from tests.conftest import BIN, SCRIPTS, run_cli

pytestmark = [pytest.mark.slurm]  # conftest skips without a cluster, fails under scripts/test.sh
PARITY = str(SCRIPTS / "parity_train.py")


def sbatch(tmp_path, nodes, command, timeout=180):
    """Submit ``command`` as a batch job on ``nodes`` nodes; wait; return (state, stderr)."""
    job = subprocess.run(["sbatch", "--parsable", "-N", str(nodes), "--ntasks-per-node=1",
                          "-o", str(tmp_path / "out.txt"), "-e", str(tmp_path / "err.txt"), "--wrap", command],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    deadline, state = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        state = subprocess.run(["sacct", "-j", job, "-n", "-X", "-o", "State"], capture_output=True,
                               text=True).stdout.strip()
        if state and state.split()[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job])
    return state.split()[0] if state else "", (tmp_path / "err.txt").read_text()


def test_two_node_job_through_srun_equals_a_local_run(tmp_path):
    state, err = sbatch(tmp_path, 2, f"{BIN / 'launch'} --nodes 2 --gpus 2 --log-dir {tmp_path / 'logs'} "
                                     f"{PARITY} {tmp_path} --steps 6 --global-batch-size 16")
    assert state == "COMPLETED", err
    slurm = json.loads((tmp_path / "losses.json").read_text())
    assert slurm["world_size"] == 4
    assert sorted(p.name for p in (tmp_path / "logs").iterdir() if p.is_dir()) == ["node0", "node1"]
    local = tmp_path / "local"
    local.mkdir()
    result = run_cli("launch", "--gpus", "4", "--log-dir", str(local / "logs"), PARITY, str(local),
                     "--steps", "6", "--global-batch-size", "16")
    assert result.returncode == 0, result.stderr
    reference = json.loads((local / "losses.json").read_text())
    assert max(abs(a - b) for a, b in zip(slurm["losses"], reference["losses"])) < 1e-5
    a = torch.load(tmp_path / "final.pt", weights_only=True)["model"]
    b = torch.load(local / "final.pt", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_allocation_that_does_not_match_the_request(tmp_path):
    state, err = sbatch(tmp_path, 2, f"{BIN / 'launch'} --nodes 3 --gpus 1 {PARITY} {tmp_path}")
    assert state == "FAILED"
    assert "SLURM gave 2 node(s) (node1,node2) but --nodes 3 was requested" in err
    assert "Traceback" not in err


def test_elastic_job_goes_on_when_a_node_of_the_allocation_is_lost(tmp_path):
    """`launch --nodes 1:2` in a 2-node allocation: kill -9 of node 1's agent (SLURM: task 1 killed)
    and the job completes on node 0, with the weights of an uninterrupted run."""
    import os
    import signal

    from tests.launcher import test_elastic as elastic

    reference = tmp_path / "reference"
    result = run_cli("launch", "--nodes", "3", "--gpus", "1", "--log-dir", str(reference / "logs"),
                     *elastic.script(reference))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    job = subprocess.run(["sbatch", "--parsable", "--no-kill", "-N", "2", "--ntasks-per-node=1",
                          "-o", str(tmp_path / "out.txt"), "-e", str(tmp_path / "err.txt"), "--wrap",
                          " ".join([str(BIN / "launch"), "--nodes", "1:2", "--gpus", "1", "--log-dir",
                                    str(tmp_path / "logs"), *elastic.script(out, *elastic.SLOW_STEP)])],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    try:
        elastic.wait_for(out, 6, timeout=180)
        os.kill(elastic.agent_of(out, 1), signal.SIGKILL)
        deadline, state = time.monotonic() + 180, ""
        while time.monotonic() < deadline and state not in ("COMPLETED", "FAILED", "CANCELLED"):
            time.sleep(0.5)
            state = (subprocess.run(["sacct", "-j", job, "-n", "-X", "-o", "State"], capture_output=True,
                                    text=True).stdout.split() or [""])[0]
    finally:
        subprocess.run(["scancel", job])
    err = (tmp_path / "err.txt").read_text()
    assert state == "COMPLETED", err
    assert "lost node 1" in err and "attempt 1 on nodes 0 (1 of --nodes 1:2)" in err, err
    assert elastic.worlds(out)[0] == 2 and elastic.worlds(out)[-1] == 1
    elastic.assert_exact(out, reference)
