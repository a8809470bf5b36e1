"""Several nodes on one host: simulated agents (--nodes N) and separate agents (--node-rank)."""
import json
import socket
import subprocess
import time

import pytest
import torch

from tests.conftest import BIN, SCRIPTS, pid_alive, run_cli

PARITY = str(SCRIPTS / "parity_train.py")


def parity_run(tmp_path, name, *launch_args):
    out = tmp_path / name
    out.mkdir()
    result = run_cli("launch", "--log-dir", str(tmp_path / "logs" / name), *launch_args, PARITY, str(out),
                     "--steps", "6", "--global-batch-size", "16", timeout=240)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "losses.json").read_text()), torch.load(out / "final.pt", weights_only=True)["model"]


def assert_same(a, b):
    assert max(abs(x - y) for x, y in zip(a[0]["losses"], b[0]["losses"])) < 1e-5
    assert max((a[1][k] - b[1][k]).abs().max().item() for k in a[1]) < 1e-5


def free_port_pair() -> int:
    """A port P with P and P + 1 free right now (the Horovod rendezvous takes P + 1)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def one_by_four(tmp_path_factory):
    return parity_run(tmp_path_factory.mktemp("nodes"), "1x4", "--gpus", "4")


def test_simulated_two_nodes_by_two_equal_one_by_four(tmp_path, one_by_four):
    two_by_two = parity_run(tmp_path, "2x2", "--nodes", "2", "--gpus", "2")
    assert two_by_two[0]["world_size"] == 4
    assert_same(two_by_two, one_by_four)
    assert (tmp_path / "logs" / "2x2" / "node1" / "rank3.log").exists()


@pytest.mark.horovod
def test_horovod_across_two_simulated_nodes(tmp_path, one_by_four):
    horovod = parity_run(tmp_path, "hvd", "--nodes", "2", "--gpus", "2", "--strategy", "horovod")
    assert (horovod[0]["strategy"], horovod[0]["world_size"]) == ("horovod", 4)
    assert_same(horovod, one_by_four)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("horovod", marks=pytest.mark.horovod)])
def test_two_separate_agents_like_two_machines(tmp_path, one_by_four, strategy):
    port = free_port_pair()
    out = tmp_path / "out"
    out.mkdir()
    agents = []
    for node in (1, 0):  # the second node may start first: it waits for the master
        agents.append(subprocess.Popen(
            [str(BIN / "launch"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", "--master-port", str(port), "--strategy", strategy,
             "--log-dir", str(tmp_path / "logs"), PARITY, str(out), "--steps", "6", "--global-batch-size", "16"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [agent.communicate(timeout=240) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    result = (json.loads((out / "losses.json").read_text()), torch.load(out / "final.pt", weights_only=True)["model"])
    assert result[0]["world_size"] == 4
    assert_same(result, one_by_four)


def test_failure_on_one_simulated_node_stops_every_node(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, time\nimport trainfleet\n"
        "engine = trainfleet.Engine()\n"
        f"open(os.path.join({str(tmp_path)!r}, f'pid{{engine.rank}}'), 'w').write(str(os.getpid()))\n"
        "engine.barrier()\n"
        "if engine.rank == 3:\n    raise SystemExit(7)\n"
        "time.sleep(300)\n")
    started = time.monotonic()
    result = run_cli("launch", "--nodes", "2", "--gpus", "2", "--log-dir", str(tmp_path / "logs"), str(script),
                     timeout=120)
    assert result.returncode == 7, result.stderr
    assert time.monotonic() - started < 30
    assert "rank 3 (node 1, local rank 1) failed first: exit code 7" in result.stderr
    assert not [r for r in range(4) if pid_alive(int((tmp_path / f"pid{r}").read_text()))]
