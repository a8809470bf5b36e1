"""Two real 'hosts' (network namespaces with their own addresses), one agent in each.

The test sets no interface variables: the launcher must pick the interface that routes
to the master (torchrun out of the box resolves the hostname to 127.0.0.1 here and the
other node cannot connect). Each fault must take both agents down within its bound and
leave nothing running in either namespace.
"""
import json
import os
import subprocess
import time

import pytest

from tests import twohosts
from tests.conftest import BIN, SCRIPTS

pytestmark = [pytest.mark.multinode]  # conftest skips without netns, fails under scripts/test.sh
LONG = str(SCRIPTS / "long_train.py")
PORT = "29555"  # inside our own namespaces: nothing else listens there


def start_job(hosts, tmp_path, *script_args, gpus=2):
    env = {k: v for k, v in os.environ.items() if not k.endswith("SOCKET_IFNAME")}
    agents = []
    for node in (0, 1):
        command = [str(BIN / "launch"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", str(gpus),
                   "--master-addr", hosts.addrs[0], "--master-port", PORT, "--log-dir", str(tmp_path / "logs"),
                   LONG, str(tmp_path), *script_args]
        agents.append(hosts.popen(node, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return agents


def time_to_exit(agents, since, timeout=60):
    """Seconds from ``since`` until the last agent exited, and their outputs."""
    ended = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(agents) and time.monotonic() < deadline:
        for i, agent in enumerate(agents):
            if i not in ended and agent.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.02)
    outputs = [agent.communicate(timeout=10) for agent in agents]
    assert len(ended) == len(agents), outputs
    return max(ended.values()) - since, outputs


def assert_clean(hosts):
    assert hosts.leftovers() == [], "processes left in the namespaces"


def test_training_completes_across_two_hosts(tmp_path):
    with twohosts.TwoHosts() as hosts:
        agents = start_job(hosts, tmp_path, "--steps", "20", "--step-sleep", "0")
        outputs = [a.communicate(timeout=180) for a in agents]
        assert [a.returncode for a in agents] == [0, 0], outputs
        assert json.loads((tmp_path / "done.json").read_text()) == {"step": 20, "attempt": 0, "world": 4}
        assert_clean(hosts)


@pytest.mark.parametrize("fault, bound", [("kill -9 worker", 5.0), ("kill -STOP worker", 10.0),
                                          ("kill -9 agent", 10.0), ("link down", 15.0)])
def test_fault_takes_both_hosts_down(tmp_path, fault, bound):
    with twohosts.TwoHosts() as hosts:
        agents = start_job(hosts, tmp_path)
        pids = twohosts.wait_ready(tmp_path)
        time.sleep(1.0)
        injected = time.monotonic()
        hosts.inject(fault, pids, agents)
        elapsed, outputs = time_to_exit(agents, injected)
        assert elapsed < bound, f"{fault}: the last agent exited {elapsed:.1f}s after the fault"
        assert agents[0].returncode != 0
        if fault != "kill -9 agent":
            assert agents[1].returncode != 0
        master_err, node_err = outputs[0][1], outputs[1][1]
        if fault == "link down":
            assert "lost node 1" in master_err, master_err
            assert "lost the master" in node_err, node_err
        elif fault == "kill -STOP worker":
            assert "rank 3 (node 1, local rank 1) failed first: frozen" in master_err, master_err
        elif fault == "kill -9 worker":
            assert "rank 3 (node 1, local rank 1) failed first: signal SIGKILL" in master_err, master_err
        assert_clean(hosts)
