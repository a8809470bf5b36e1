"""`trainfleet doctor`: one line per check, then a real all-reduce over the layout."""
import os
import socket

from tests.conftest import run_cli
from tests.launcher.test_nodes import free_port_pair


def test_doctor_passes_on_simulated_nodes():
    result = run_cli("trainfleet", "doctor", "--nodes", "2", "--gpus", "2", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "doctor: [ok] master address 127.0.0.1 resolves" in result.stdout
    assert "doctor: [ok] all-reduce over 4 ranks (ddp, cpu)" in result.stdout


def test_doctor_names_the_process_holding_the_port():
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_cli("trainfleet", "doctor", "--master-port", str(port))
    assert result.returncode == 1
    assert f"doctor: [FAIL] node 0: --master-port {port} on 127.0.0.1 is not available" in result.stdout
    assert f"held by pid {os.getpid()} (" in result.stdout  # this process (an xdist runner's command is not "pytest")


def test_doctor_on_a_node_whose_master_is_down():
    port = free_port_pair()
    result = run_cli("trainfleet", "doctor", "--nnodes", "2", "--node-rank", "1", "--master-port", str(port))
    assert result.returncode == 1
    assert f"doctor: [FAIL] node 1: master 127.0.0.1:{port} is unreachable" in result.stdout
