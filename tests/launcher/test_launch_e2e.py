"""End-to-end runs of the ``launch`` console script with real worker processes over gloo."""
import json
import subprocess
import time

from tests.conftest import BIN, REPO, SCRIPTS, pid_alive

TORCHRUN_STYLE = str(SCRIPTS / "torchrun_style.py")


def test_two_workers_get_torchrun_environment(launch, tmp_path):
    result = launch("--gpus", "2", TORCHRUN_STYLE, str(tmp_path), "extra-arg")
    assert result.returncode == 0, result.stderr
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert record["sum"] == 3.0  # 1 + 2: a real all_reduce across both workers
        env = record["env"]
        assert env["RANK"] == str(rank) and env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["GROUP_RANK"] == "0" and env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert record["argv"] == [str(tmp_path), "extra-arg"]
    assert records[0]["env"]["MASTER_PORT"] == records[1]["env"]["MASTER_PORT"]
    # The console shows rank 0's lines as they are and rank 1's with its rank; every rank has its own log file.
    assert result.stdout.splitlines().count("hello from rank 0 of 2") == 1
    assert result.stdout.splitlines().count("[rank 1] hello from rank 1 of 2") == 1
    assert "running 2 CPU worker(s)" in result.stderr
    logs = tmp_path / "logs" / "node0"
    assert "hello from rank 1 of 2" in (logs / "rank1.log").read_text()
    assert "hello from rank 0 of 2" in (logs / "rank0.log").read_text()


def test_module_form_runs_builtin_recipe(launch, tmp_path):
    result = launch("--gpus", "2", "-m", "trainfleet.train", "--model", "mlp", "--max-steps", "3",
                    "--num-samples", "96", "--global-batch-size", "16", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["world_size"] == 2
    assert "done: 3 steps" in result.stdout


def test_debug_runs_in_the_launchers_own_process(tmp_path):
    process = subprocess.Popen([str(BIN / "launch"), "--debug", TORCHRUN_STYLE, str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    record = json.loads((tmp_path / "rank0.json").read_text())
    assert record["pid"] == process.pid
    assert record["env"]["WORLD_SIZE"] == "1" and record["sum"] == 1.0
    assert "hello from rank 0 of 1" in stdout


def test_debug_lets_exceptions_reach_the_debugger(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("import trainfleet\nengine = trainfleet.Engine()\nraise ValueError('boom')\n")
    result = subprocess.run([str(BIN / "launch"), "--debug", str(script)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: boom" in result.stderr


def test_worker_exit_code_is_propagated(launch, tmp_path):
    script = tmp_path / "exit3.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    result = launch("--gpus", "2", str(script))
    assert result.returncode == 3
    assert "rank 1 (node 0, local rank 1) failed first: exit code 3" in result.stderr


def test_fail_fast_stops_every_process_within_5_seconds(launch, tmp_path):
    started = time.time()
    result = launch("--gpus", "2", str(SCRIPTS / "fail_at_step.py"), str(tmp_path), timeout=120)
    ended = time.time()
    assert result.returncode != 0
    failed_at = float((tmp_path / "failed_at").read_text())
    assert started < failed_at < ended
    assert ended - failed_at < 5.0, f"launch took {ended - failed_at:.1f}s after the failure"
    assert "rank 1 (node 0, local rank 1) failed first: exit code 1" in result.stderr
    assert "RuntimeError: injected failure at step 3" in result.stderr
    pids = [int(p) for r in range(2) for p in (tmp_path / f"pids.rank{r}").read_text().split()]
    deadline = time.monotonic() + 2
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if pid_alive(p)], "a worker or its child survived the launcher"


def test_sigterm_to_launcher_stops_workers_and_reports_signal(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(
        "import os, sys, time\n"
        f"open(os.path.join({str(tmp_path)!r}, 'pid' + os.environ['RANK']), 'w').write(str(os.getpid()))\n"
        "time.sleep(300)\n")
    process = subprocess.Popen([str(BIN / "launch"), "--gpus", "2", "--log-dir", str(tmp_path / "logs"),
                                str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"pid{r}").exists() for r in range(2)) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(15)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + 15
    assert "stopped by SIGTERM" in stderr
    for rank in range(2):
        assert not pid_alive(int((tmp_path / f"pid{rank}").read_text()))


def test_spawn_start_method_also_works(launch, tmp_path):
    result = launch("--gpus", "2", "--start-method", "spawn", TORCHRUN_STYLE, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "rank1.json").read_text())["sum"] == 3.0


def test_flags_come_from_environment(launch, tmp_path):
    result = launch(TORCHRUN_STYLE, str(tmp_path), env={"TRAINFLEET_GPUS": "2"})
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "rank0.json").read_text())["env"]["WORLD_SIZE"] == "2"


def test_torchrun_aliases_are_accepted(launch, tmp_path):
    result = launch("--nnodes", "1", "--nproc-per-node", "2", TORCHRUN_STYLE, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rank1.json").exists()
