"""`launch --hosts` / `--hostfile`: every node started from one command over real ssh.

Two 'hosts' are network namespaces, each with its own address and its own sshd on port 22
(tests/sshhosts.py). The launcher runs in host A; node 0 runs there, node 1 on host B over ssh.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests import sshhosts, twohosts
from tests.conftest import BIN, SCRIPTS, run_cli
from trainfleet.launcher import host_list
from trainfleet.launcher import hosts as hosts_module
from trainfleet.utils.errors import UsageError

PARITY, LONG = str(SCRIPTS / "parity_train.py"), str(SCRIPTS / "long_train.py")


# ----- parsing (no hosts needed) -------------------------------------------------------------
def test_host_lists_and_hostfiles(tmp_path):
    parsed = host_list.parse_hosts("a:2, user@b:2,c")
    assert [(h.name, h.slots) for h in parsed] == [("a", 2), ("user@b", 2), ("c", None)]
    (tmp_path / "hostfile").write_text("# the cluster\nworker-1 slots=4\n\nworker-2 slots=4  # second\n")
    assert [(h.name, h.slots) for h in host_list.parse_hostfile(str(tmp_path / "hostfile"))] == \
        [("worker-1", 4), ("worker-2", 4)]


@pytest.mark.parametrize("call, message", [
    (lambda: host_list.parse_hosts("a:0"), "slots '0' must be a positive integer"),
    (lambda: host_list.parse_hosts(","), "names no host"),
    (lambda: host_list.plan_from_args("a,a", None, None, None), "host 'a' is listed twice"),
    (lambda: host_list.plan_from_args("a", None, None, ["TRAINFLEET_NOT_SET_ANYWHERE"]),
     "--env TRAINFLEET_NOT_SET_ANYWHERE: it is not set here"),
    (lambda: host_list.workers_per_host(host_list.plan_from_args("a:2,b:4", None, None, None), None),
     "different slot counts"),
    (lambda: host_list.workers_per_host(host_list.plan_from_args("a:2,b:2", None, None, None), 4),
     "--gpus 4 but the hosts have 2 slots each"),
])
def test_bad_host_lists(call, message):
    with pytest.raises(UsageError, match=message):
        call()


def test_bad_hostfile_line_and_missing_file_from_launch(tmp_path):
    (tmp_path / "hostfile").write_text("node1 gpus=4\n")
    for args, needle in ((["--hostfile", str(tmp_path / "hostfile")], "expected 'host slots=N'"),
                         (["--hostfile", str(tmp_path / "nope")], "cannot be read"),
                         (["--hosts", "a,b", "--node-rank", "1"], "the hosts' order gives the node ranks")):
        result = run_cli("launch", *args, LONG, str(tmp_path))
        assert result.returncode == 2 and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_forwarded_environment(monkeypatch):
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth9")
    monkeypatch.setenv("MY_TOKEN", "x")
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    env = hosts_module.forwarded_env(["MY_TOKEN"])
    assert env["NCCL_DEBUG"] == "INFO" and env["MY_TOKEN"] == "x"
    assert "GLOO_SOCKET_IFNAME" not in env  # each host finds its own interface to the master
    assert "WANDB_API_KEY" not in env  # a secret travels only when named (--env WANDB_API_KEY)
    assert hosts_module.forwarded_env(["WANDB_API_KEY"])["WANDB_API_KEY"] == "secret"


# ----- real hosts over ssh -------------------------------------------------------------------
def launch_on(hosts, tmp_path, *args, key="client", hostlist=None, **popen):
    env = {k: v for k, v in os.environ.items() if not k.endswith("SOCKET_IFNAME")}
    hostlist = hostlist or f"{hosts.addrs[0]}:2,{hosts.addrs[1]}:2"
    command = [str(BIN / "launch"), "--hosts", hostlist, "--ssh-opt", hosts.ssh_opts(key),
               "--log-dir", str(tmp_path / "logs"), *args]
    return hosts.popen(0, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


@pytest.mark.ssh
def test_two_hosts_by_two_equal_a_local_one_by_four(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    result = run_cli("launch", "--gpus", "4", "--log-dir", str(tmp_path / "local-logs"), PARITY, str(local),
                     "--steps", "6", "--global-batch-size", "16", timeout=240)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "hosts"
    out.mkdir()
    with sshhosts.SshHosts(tmp_path) as hosts:
        launcher = launch_on(hosts, tmp_path, PARITY, str(out), "--steps", "6", "--global-batch-size", "16")
        stdout, stderr = launcher.communicate(timeout=240)
        assert launcher.returncode == 0, stderr
        assert hosts.leftovers() == []
    ours, theirs = (json.loads((d / "losses.json").read_text()) for d in (out, local))
    assert ours["world_size"] == 4
    assert max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"])) < 1e-5
    a, b = (torch.load(d / "final.pt", weights_only=True)["model"] for d in (out, local))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert (tmp_path / "logs" / "node1" / "rank3.log").exists()  # node 1's logs, written on host B
    ledger = json.loads((tmp_path / "logs" / "ledger.json").read_text())  # node 0's account of the job
    assert ledger["rows"]["productive"] > 0 and sum(ledger["rows"].values()) == pytest.approx(ledger["wall"], rel=0.01)
    assert "where the" in stderr and "goodput" in stderr


@pytest.mark.ssh
def test_node_0_on_a_remote_first_host(tmp_path):
    """The launcher's machine is not in the list's first place: every agent runs over ssh, node 0
    (the master) on host B, and rank 0's output still comes back to this terminal."""
    with sshhosts.SshHosts(tmp_path) as hosts:
        hostlist = f"{hosts.addrs[1]}:2,{hosts.addrs[0]}:2"
        launcher = launch_on(hosts, tmp_path, LONG, str(tmp_path), "--steps", "5", hostlist=hostlist)
        stdout, stderr = launcher.communicate(timeout=180)
        assert launcher.returncode == 0, stderr
        assert json.loads((tmp_path / "done.json").read_text()) == {"step": 5, "attempt": 0, "world": 4}
        assert "running 4 CPU worker(s)" in stderr and f"[{hosts.addrs[0]}]" not in stdout
        assert hosts.leftovers() == []


@pytest.mark.ssh
@pytest.mark.parametrize("fault", ["kill -9 worker on host B", "lost ssh connection"])
def test_a_failure_on_host_b_brings_every_host_down(tmp_path, fault):
    with sshhosts.SshHosts(tmp_path) as hosts:
        launcher = launch_on(hosts, tmp_path, LONG, str(tmp_path))
        pids = twohosts.wait_ready(tmp_path)
        time.sleep(1.0)
        started = time.monotonic()
        if fault.startswith("kill"):
            os.kill(pids[3], signal.SIGKILL)
        else:  # the ssh client that carries node 1: its agent sees end-of-file and stops
            ssh = [p for p in hosts.pids(0) if open(f"/proc/{p}/comm").read().strip() == "ssh"]
            assert ssh, "no ssh client found"
            for pid in ssh:
                os.kill(pid, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=60)
        elapsed = time.monotonic() - started
        assert launcher.returncode != 0, stderr
        assert elapsed < 5 if fault.startswith("kill") else elapsed < 15, f"{fault}: down after {elapsed:.1f}s"
        if fault.startswith("kill"):
            assert "rank 3 (node 1, local rank 1) failed first: signal SIGKILL" in stderr, stderr
        assert hosts.leftovers() == [], "processes left on a host"


@pytest.mark.ssh
def test_ctrl_c_stops_every_host(tmp_path):
    with sshhosts.SshHosts(tmp_path) as hosts:
        launcher = launch_on(hosts, tmp_path, "--grace-period", "20", LONG, str(tmp_path))
        twohosts.wait_ready(tmp_path)
        time.sleep(0.5)
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=60)
        assert launcher.returncode == 128 + signal.SIGINT, stderr
        for rank in range(4):  # every worker on both hosts saw it and stopped at the same step
            assert (tmp_path / f"stop.rank{rank}").read_text() == str(int(signal.SIGINT))
        assert hosts.leftovers() == [], "processes left on a host"


@pytest.mark.ssh
@pytest.mark.parametrize("case", ["unreachable host", "wrong key", "script missing on host B"])
def test_preflight_failures_are_one_line_naming_the_host(tmp_path, case):
    script_dir = tmp_path / "code"
    script_dir.mkdir()
    script = script_dir / "train.py"
    script.write_text((SCRIPTS / "long_train.py").read_text())
    hide = script_dir if case == "script missing on host B" else None
    with sshhosts.SshHosts(tmp_path, hide_on_b=hide) as hosts:
        absent = hosts.addrs[1].rsplit(".", 1)[0] + ".77"  # in B's subnet, nobody there
        hostlist = f"{hosts.addrs[0]}:2,{absent if case == 'unreachable host' else hosts.addrs[1]}:2"
        launcher = launch_on(hosts, tmp_path, str(script), str(tmp_path), hostlist=hostlist,
                             key="stranger" if case == "wrong key" else "client")
        _, stderr = launcher.communicate(timeout=120)
        assert launcher.returncode == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        expected = {"unreachable host": f"host {absent} is unreachable over ssh",
                    "wrong key": f"host {hosts.addrs[1]} refused the ssh login",
                    "script missing on host B": f"host {hosts.addrs[1]} has no script {script}"}[case]
        assert expected in lines[0], lines[0]
        assert not list(tmp_path.glob("ready.rank*")) and hosts.leftovers() == []


@pytest.mark.ssh
def test_a_busy_master_port_is_one_line(tmp_path):
    with sshhosts.SshHosts(tmp_path) as hosts:
        holder = hosts.popen(0, [sys.executable, "-c", "import socket, time; s = socket.socket(); "
                                 f"s.bind(('{hosts.addrs[0]}', 29577)); s.listen(); print('up', flush=True); "
                                 "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "up"
        launcher = launch_on(hosts, tmp_path, "--master-port", "29577", LONG, str(tmp_path))
        _, stderr = launcher.communicate(timeout=60)
        holder.kill()
        holder.wait()
        assert launcher.returncode == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert f"--master-port 29577 on {hosts.addrs[0]} is not available" in stderr
        assert not list(tmp_path.glob("ready.rank*")) and hosts.leftovers() == []


@pytest.mark.ssh
def test_elastic_job_goes_on_when_a_hosts_connection_is_lost(tmp_path):
    """`launch --hosts A:1,B:1 --nodes 1:2`: the ssh client carrying node 1 is killed. Node 1's
    agent sees end-of-file and leaves (its SIGTERM is not relayed to the job); the workers stop at
    a checkpoint and node 0 goes on alone, with the weights of an uninterrupted run."""
    from tests.launcher import test_elastic as elastic

    reference = tmp_path / "reference"
    result = run_cli("launch", "--gpus", "1", "--log-dir", str(reference / "logs"), *elastic.script(reference),
                     timeout=240)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    with sshhosts.SshHosts(tmp_path) as hosts:
        launcher = launch_on(hosts, tmp_path, "--nodes", "1:2", *elastic.script(out, *elastic.SLOW_STEP),
                             hostlist=f"{hosts.addrs[0]}:1,{hosts.addrs[1]}:1")
        elastic.wait_for(out, 6, timeout=180)
        for pid in [p for p in hosts.pids(0) if open(f"/proc/{p}/comm").read().strip() == "ssh"]:
            os.kill(pid, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=240)
        assert launcher.returncode == 0, stderr
        assert "lost node 1 (left the job)" in stderr and "attempt 1 on nodes 0 (1 of --nodes 1:2)" in stderr, stderr
        assert hosts.leftovers() == [], "processes left on a host"
    assert elastic.worlds(out)[0] == 2 and elastic.worlds(out)[-1] == 1
    elastic.assert_exact(out, reference)


@pytest.mark.ssh
def test_a_hang_on_host_b_is_reported_by_node_0_with_its_stack(tmp_path):
    """Issue 23 over real ssh: rank 1 (host B's only worker) hangs in Python; node 0 names it, its
    host and the line, and nothing is left on either host."""
    out = tmp_path / "out"
    out.mkdir()
    script = str(SCRIPTS / "fault_train.py")
    with sshhosts.SshHosts(tmp_path) as hosts:
        launcher = launch_on(hosts, tmp_path, "--hang-timeout", "3", script, str(out), "--fault", "sleep",
                             hostlist=f"{hosts.addrs[0]}:1,{hosts.addrs[1]}:1")
        _, stderr = launcher.communicate(timeout=120)
        assert launcher.returncode == 1, stderr[-3000:]
        assert hosts.leftovers() == []
    line = next(n for n, text in enumerate(open(script).read().splitlines(), 1) if "FAULT: a hang in Python" in text)
    assert "culprit: rank 1 on " in stderr and "(node 1): not in the collective the others wait in" in stderr, stderr
    assert f'File "{script}", line {line}, in <module>' in stderr, stderr[-3000:]
