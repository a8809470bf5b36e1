"""Restarts, signals reaching every worker, collective timeouts and pre-flight checks."""
import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import BIN, SCRIPTS, pid_alive, run_cli
from tests.launcher.test_nodes import free_port_pair

LONG = str(SCRIPTS / "long_train.py")


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_max_restarts_recovers_from_one_crash(tmp_path):
    result = run_cli("launch", "--nodes", "2", "--gpus", "1", "--max-restarts", "1", "--log-dir",
                     str(tmp_path / "logs"), LONG, str(tmp_path), "--steps", "8", "--crash-rank", "1",
                     "--crash-step", "3", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "rank 1 on node 1 failed (exit code 1); restarting every node (restart 1 of 1)" in result.stderr
    done = json.loads((tmp_path / "done.json").read_text())
    assert done == {"step": 8, "attempt": 1, "world": 2}
    pid, attempt, resumed_at = (tmp_path / "ready.rank1").read_text().split()
    assert attempt == "1" and int(resumed_at) == 3  # continued from its latest checkpoint
    assert (tmp_path / "logs" / "node1" / "rank1.attempt1.log").exists()


def test_without_restarts_the_crash_fails_the_job(tmp_path):
    result = run_cli("launch", "--gpus", "2", "--log-dir", str(tmp_path / "logs"), LONG, str(tmp_path),
                     "--steps", "8", "--crash-rank", "1", timeout=120)
    assert result.returncode == 1
    assert "RuntimeError: injected crash at step 3" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT (Ctrl-C)"])
def test_a_stop_signal_reaches_every_worker_on_every_node_which_checkpoints(tmp_path, signum):
    process = subprocess.Popen([str(BIN / "launch"), "--nodes", "2", "--gpus", "1", "--grace-period", "20",
                                "--log-dir", str(tmp_path / "logs"), LONG, str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: all((tmp_path / f"ready.rank{r}").exists() for r in range(2)))
    time.sleep(0.5)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    assert f"stopped by {signum.name}" in stderr and "Traceback" not in stderr
    for rank in range(2):  # both nodes' workers saw the stop request
        assert (tmp_path / f"stop.rank{rank}").read_text() == str(int(signum))
    latest = json.loads((tmp_path / "ckpt" / "latest.json").read_text())["latest"]
    assert json.loads((tmp_path / "done.json").read_text())["step"] == int(latest.split("-")[1].split(".")[0])
    for rank in range(2):
        assert not pid_alive(int((tmp_path / f"ready.rank{rank}").read_text().split()[0]))


@pytest.mark.parametrize("timeout_s", [3, 6])
def test_rank_divergent_collective_times_out_naming_rank_and_line(tmp_path, timeout_s):
    """The README's bound for this fault is S: the job ends S seconds (plus the teardown) after
    rank 1 entered the barrier, not at torch's 30-minute default."""
    script = tmp_path / "diverge.py"
    script.write_text(
        "import pathlib, sys, time, trainfleet\n"
        "engine = trainfleet.Engine()\n"
        "if engine.rank == 1:\n"
        "    pathlib.Path(sys.argv[1]).write_text(repr(time.time())); engine.barrier()  # rank 0 never comes\n"
        "else:\n"
        "    time.sleep(60)\n")
    entered = tmp_path / "entered"
    result = run_cli("launch", "--gpus", "2", "--collective-timeout", str(timeout_s), "--log-dir",
                     str(tmp_path / "logs"), str(script), str(entered), timeout=120)
    ended = time.time()
    assert result.returncode == 1
    assert f"rank 1: barrier at {script}:4 (<module>) timed out after {timeout_s:.1f}s" in result.stderr
    assert "rank 1 (node 0, local rank 1) failed first" in result.stderr
    waited = ended - float(entered.read_text())
    assert timeout_s <= waited < timeout_s + 5, f"the job ended {waited:.1f}s after rank 1 entered the barrier"


def test_nccl_watchdog_abort_is_explained(tmp_path):
    # Without a blocking wait, NCCL's watchdog prints this line and aborts the worker (no GPU
    # here: the worker prints torch 2.13's line and aborts itself, as the watchdog does).
    script = tmp_path / "watchdog.py"
    script.write_text(
        "import os, sys, time, trainfleet\n"
        "engine = trainfleet.Engine()\n"
        "if engine.rank == 1:\n"
        "    print('[rank1]:[E1124 15:02:11.5 ProcessGroupNCCL.cpp:685] [PG ID 0 PG GUID 0(default_pg) Rank 1] '\n"
        "          'Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE, NumelIn=1, '\n"
        "          'NumelOut=1, Timeout(ms)=5000) ran for 5087 milliseconds before timing out.', file=sys.stderr)\n"
        "    sys.stderr.flush(); os.abort()\n"
        "time.sleep(60)\n")
    result = run_cli("launch", "--gpus", "2", "--log-dir", str(tmp_path / "logs"), str(script), timeout=120)
    assert result.returncode == 128 + 6, result.stderr
    assert "rank 1 (node 0, local rank 1) failed first: signal SIGABRT after" in result.stderr
    assert ("s: NCCL's watchdog ended it: its collective #7 (ALLREDUCE) waited 5s for ranks that never joined. "
            "HINT: do all ranks reach the same collectives?") in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_that_left_a_daemon_behind_is_still_seen_to_fail(tmp_path):
    # The daemon inherits the worker's end of the pipe the agent watches for its exit: the
    # worker's exit shows only as a zombie. The job must still end at once, not with the daemon.
    script = tmp_path / "daemon.py"
    script.write_text(
        "import os, pathlib, sys, time, trainfleet\n"
        "engine = trainfleet.Engine()\n"
        "if engine.rank == 1:\n"
        "    if os.fork() == 0:\n"
        "        os.setsid(); pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(120); os._exit(0)\n"
        "    sys.exit('rank 1 gives up')\n"
        "time.sleep(60)\n")
    daemon = tmp_path / "daemon.pid"
    try:
        result = run_cli("launch", "--gpus", "2", "--log-dir", str(tmp_path / "logs"), str(script), str(daemon),
                         timeout=45)
        assert result.returncode == 1, result.stderr
        assert "rank 1 (node 0, local rank 1) failed first: exit code 1" in result.stderr
    finally:
        os.kill(int(daemon.read_text()), signal.SIGKILL)


def test_preflight_unreachable_master(tmp_path):
    port = free_port_pair()
    result = run_cli("launch", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                     "--master-port", str(port), "--rendezvous-timeout", "2", LONG, str(tmp_path), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert f"node 1: the master 127.0.0.1:{port} is unreachable after 2s" in lines[0] and "HINT" in lines[0]


def test_preflight_mismatched_gpus_across_nodes(tmp_path):
    port = free_port_pair()
    common = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "--log-dir",
              str(tmp_path / "logs"), LONG, str(tmp_path)]
    agents = [subprocess.Popen([str(BIN / "launch"), "--node-rank", str(n), "--gpus", str(2 - n), *common],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    results = [a.communicate(timeout=120) + (a.returncode,) for a in agents]
    for _, stderr, code in results:
        assert code == 2, stderr
        assert "node 1" in stderr and "was started with --gpus 1 but node 0" in stderr and "--gpus 2" in stderr
    assert not list(tmp_path.glob("ready.rank*"))  # no worker started


def _separate_agents(tmp_path, port):
    """Two agents started apart, like two machines: node 0 and node 1, one worker each."""
    return [subprocess.Popen([str(BIN / "launch"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                              "--master-addr", "127.0.0.1", "--master-port", str(port), "--grace-period", "20",
                              "--log-dir", str(tmp_path / "logs"), LONG, str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]


def test_sigusr1_to_one_agent_reaches_every_worker_on_every_node(tmp_path):
    """The signal SLURM sends before a preemption, delivered to node 1's agent only: both ranks
    agree to stop at the same step, checkpoint, and the job ends normally on both nodes."""
    agents = _separate_agents(tmp_path, free_port_pair())
    assert wait_for(lambda: all((tmp_path / f"ready.rank{r}").exists() for r in range(2)))
    time.sleep(0.5)
    agents[1].send_signal(signal.SIGUSR1)
    outputs = [agent.communicate(timeout=60) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    for rank in range(2):
        assert (tmp_path / f"stop.rank{rank}").read_text() == str(int(signal.SIGUSR1)), rank
    done = json.loads((tmp_path / "done.json").read_text())
    latest = json.loads((tmp_path / "ckpt" / "latest.json").read_text())["latest"]
    assert done["world"] == 2 and f"step-{done['step']}.pt" == latest  # the last step is checkpointed
    for rank in range(2):
        assert not pid_alive(int((tmp_path / f"ready.rank{rank}").read_text().split()[0]))


SIBLING = """
import os, signal, time
rank = int(os.environ["RANK"])
if rank == 1:
    if {hold_sentinel} and os.fork() == 0:  # a daemon-like child keeps the worker's sentinel open
        time.sleep(30)
        os._exit(0)
    time.sleep({kill_at})
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(1.0)
raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1234: Connection reset by peer")
"""


@pytest.mark.parametrize("hold_sentinel, kill_at", [(True, 0.99), (False, 1.1)],
                         ids=["reaped in the same poll", "reaped a moment after its peer"])
def test_the_killed_rank_is_named_not_the_sibling_that_lost_its_connection(tmp_path, hold_sentinel, kill_at):
    script = tmp_path / "sibling.py"
    script.write_text(SIBLING.format(hold_sentinel=hold_sentinel, kill_at=kill_at))
    result = run_cli("launch", "--gpus", "2", str(script), timeout=60)
    assert result.returncode != 0
    assert "rank 1 (node 0, local rank 1) failed first: signal SIGKILL" in result.stderr, result.stderr


def test_a_worker_held_by_a_debugger_is_not_frozen():
    """A debugger that attaches (gdb, py-spy, debugpy) puts the worker in a tracing stop (state t):
    the job waits for its user. ``kill -STOP`` (state T) is still a frozen worker. On the old code
    6 s under a debugger failed the job."""
    import ctypes
    import os
    from types import SimpleNamespace

    from trainfleet.launcher.worker_group import Worker, WorkerGroup
    from trainfleet.utils.process import process_state

    libc = ctypes.CDLL(None, use_errno=True)
    held, stopped = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    try:
        assert libc.ptrace(16, held.pid, 0, 0) == 0, ctypes.get_errno()  # PTRACE_ATTACH, as gdb does
        os.waitpid(held.pid, 0)
        stopped.send_signal(signal.SIGSTOP)
        while process_state(stopped.pid) != "T":
            time.sleep(0.01)
        assert process_state(held.pid) == "t"
        group = WorkerGroup([], "fork", None)
        group.workers = [Worker(SimpleNamespace(rank=r), SimpleNamespace(pid=p.pid), time.monotonic())
                         for r, p in enumerate((held, stopped))]
        group.frozen(0.0)
        time.sleep(0.2)
        assert group.frozen(0.1).spec.rank == 1
        group.workers.pop()
        assert group.frozen(0.1) is None
    finally:
        libc.ptrace(17, held.pid, 0, 0)  # PTRACE_DETACH
        for process in (held, stopped):
            process.kill()
            process.wait()
