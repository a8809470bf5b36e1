"""`launch --cluster slurm|local|debug` on a real SLURM cluster (scripts/dev-slurm.sh: node1 + node2)."""
import json
import re
import subprocess
import time

import pytest
import torch

from tests.conftest import SCRIPTS, run_cli

pytestmark = [pytest.mark.slurm]  # conftest skips without a cluster, fails under scripts/test.sh
PARITY, PREEMPT = str(SCRIPTS / "parity_train.py"), str(SCRIPTS / "preempt_train.py")
RECORD = str(SCRIPTS / "record_args.py")


@pytest.fixture
def cli(tmp_path):
    """``cli(name, *args)``: a console script run in tmp_path, jobs recorded under tmp_path."""
    env = {"TRAINFLEET_STATE_DIR": str(tmp_path / "state")}

    def run(name, *args, timeout=240):
        return run_cli(name, *args, timeout=timeout, env=env, cwd=tmp_path)

    return run


def job_id(result) -> str:
    match = re.search(r"submitted (?:job|array) (\S+)", result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1)


def sacct_state(job: str) -> str:
    out = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True).stdout
    return out.split()[0] if out.split() else ""


def wait_for(predicate, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def release(job: str, requeued_at: float, hold: float = 2.0) -> float:
    """Start a requeued job now instead of after SLURM's ~2-minute hold (``hold`` seconds after its
    requeue; returns when it was released). Not within the second of the requeue: slurmd refuses a
    job whose new credential is no newer than its revocation (one-second resolution: "Job
    credential revoked"), and the job then fails."""
    time.sleep(max(0.0, requeued_at + max(hold, 2.0) - time.time()))
    released = time.time()
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    return released


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_node_job_equals_a_local_one_node_run(tmp_path, cli):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "local").mkdir()
    result = cli("launch", "--cluster", "slurm", "--nodes", "2", "--gpus", "2", "--cpu", "--time", "5", "--wait",
                 PARITY, str(tmp_path / "slurm"), "--steps", "6", "--global-batch-size", "16")
    assert result.returncode == 0, result.stdout + result.stderr
    job = job_id(result)
    assert "state COMPLETED, exit code 0, nodes node[1-2]" in result.stdout
    folder = tmp_path / "runs" / job
    assert sorted(p.name for p in (folder / "logs").iterdir() if p.is_dir()) == ["node0", "node1"]
    assert (folder / f"{job}_submission.sh").is_file() and (folder / "trainfleet.json").is_file()
    status = cli("trainfleet", "status", job).stdout  # every rank's step time, from node 0's agent
    assert "per-rank step time" in status, status
    rows = [line.split()[0] for line in status.splitlines() if re.match(r"\s+\d+ \S+\s+\d+\s+[\d.]+ ", line)]
    assert sorted(map(int, rows)) == [0, 1, 2, 3], status
    local = cli("launch", "--gpus", "4", PARITY, str(tmp_path / "local"), "--steps", "6", "--global-batch-size", "16")
    assert local.returncode == 0, local.stderr
    slurm_losses = json.loads((tmp_path / "slurm" / "losses.json").read_text())
    local_losses = json.loads((tmp_path / "local" / "losses.json").read_text())
    assert slurm_losses["world_size"] == 4
    assert max(abs(a - b) for a, b in zip(slurm_losses["losses"], local_losses["losses"])) < 1e-5
    assert max_diff(weights(tmp_path / "slurm" / "final.pt"), weights(tmp_path / "local" / "final.pt")) < 1e-5


def test_a_two_by_two_sweep_is_one_array_of_four(tmp_path, cli):
    result = cli("launch", "--cluster", "slurm", "--gpus", "1", "--cpu", "--time", "5", "--wait",
                 "--sweep", "lr=0.1,0.01", "--sweep", "bs=32,64", RECORD, str(tmp_path), "--tag", "run{index}",
                 "--bs", "{bs}")
    assert result.returncode == 0, result.stdout + result.stderr
    job = job_id(result)
    assert "array" in result.stdout and "(4 tasks" in result.stdout
    seen = {json.loads((tmp_path / f"args.{i}.json").read_text())["index"]:
            json.loads((tmp_path / f"args.{i}.json").read_text())["argv"] for i in range(4)}
    assert seen == {"0": ["--tag", "run0", "--bs", "32", "--lr", "0.1"],
                    "1": ["--tag", "run1", "--bs", "64", "--lr", "0.1"],
                    "2": ["--tag", "run2", "--bs", "32", "--lr", "0.01"],
                    "3": ["--tag", "run3", "--bs", "64", "--lr", "0.01"]}
    # one SLURM array: every task is <job>_<i> of the same job id
    expected = [f"{job}_{i}|COMPLETED" for i in range(4)]
    accounted = lambda: sorted(subprocess.run(  # noqa: E731  (accounting may lag the end by seconds)
        ["sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True, text=True).stdout.split())
    wait_for(lambda: accounted() == expected, timeout=30, what=f"sacct to list {expected}")
    status = cli("trainfleet", "status", job)
    assert status.returncode == 0, status.stderr
    assert "4 completed" in status.stdout
    rows = [line.split() for line in status.stdout.splitlines() if re.match(r"\s+\d\s+COMPLETED", line)]
    assert [(r[0], r[-2], r[-1]) for r in rows] == [("0", "lr=0.1", "bs=32"), ("1", "lr=0.1", "bs=64"),
                                                    ("2", "lr=0.01", "bs=32"), ("3", "lr=0.01", "bs=64")]
    for i in range(4):  # each task its own folder
        assert (tmp_path / "runs" / job / f"task{i}" / "logs" / "node0" / "rank0.log").is_file()


def test_array_with_parallelism_runs_tasks_one_at_a_time(tmp_path, cli):
    result = cli("launch", "--cluster", "slurm", "--cpu", "--time", "5", "--array", "2", "--array-parallelism", "1",
                 "--wait", RECORD, str(tmp_path), "--seed", "{index}")
    assert result.returncode == 0, result.stdout + result.stderr
    job = job_id(result)
    script = (tmp_path / "runs" / job / f"{job}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%1" in script and "#SBATCH --signal=USR2@90" in script
    for i in range(2):
        assert json.loads((tmp_path / f"args.{i}.json").read_text())["argv"] == ["--seed", str(i)]
    sacct = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "Start,End"], capture_output=True,
                           text=True).stdout.split()
    (_, end0), (start1, _) = (row.split("|") for row in sorted(sacct))
    assert start1 >= end0  # %1: the second task started after the first ended


def test_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(tmp_path, cli):
    (tmp_path / "ref").mkdir()
    result = cli("launch", "--cluster", "slurm", "--nodes", "2", "--gpus", "1", "--cpu", "--time", "10",
                 PREEMPT, str(tmp_path), "--steps", "16", "--step-sleep", "0.4")
    assert result.returncode == 0, result.stderr
    job = job_id(result)
    folder = tmp_path / "runs" / job
    progress = tmp_path / "progress"
    wait_for(lambda: progress.is_file() and int(progress.read_text() or 0) >= 4, what="step 4")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state = lambda: json.loads((folder / "task.json").read_text())  # noqa: E731
    wait_for(lambda: state()["state"] == "REQUEUED", what="the requeue")
    stopped_at = json.loads((folder / "checkpoints" / "latest.json").read_text())["latest"]
    assert 4 <= int(stopped_at.removeprefix("step").removesuffix(".pt")) < 16
    first = json.loads((folder / "logs" / "ledger.json").read_text())  # the first run's account, at its end
    assert first["runs"] == 1 and first["rows"]["productive"] > 0
    # SLURM holds a requeued job ~2 minutes (BeginTime); release it after 12 s (the requeue wait injected).
    wait_for(lambda: sacct_state(job) == "PENDING", what="the requeued job to pend")
    log = folder / "logs/node0/rank0.log"
    before = log.stat().st_mtime
    released = release(job, state()["requeued_at"], hold=12.0)
    restarted = wait_for(lambda: log.stat().st_mtime != before and log.stat().st_mtime, what="the second run's log")
    wait_for(lambda: sacct_state(job) == "COMPLETED", timeout=180, what="the resumed job to complete")
    assert state()["requeues"] == 1 and state()["exit_code"] == 0
    assert f"resumed from {folder / 'checkpoints' / stopped_at}" in log.read_text()
    status = cli("trainfleet", "status", job)
    assert "state COMPLETED, exit code 0" in status.stdout and "requeues 1" in status.stdout
    # the ledger went on across the requeue: the wait between the runs in its row, the rows adding up
    ledger = json.loads((folder / "logs" / "ledger.json").read_text())
    assert ledger["runs"] == 2 and ledger["rows"]["productive"] > first["rows"]["productive"]
    waited = ledger["rows"]["requeue"]
    assert released - first["ended"] <= waited <= restarted - first["ended"], (waited, released, restarted, first)
    assert sum(ledger["rows"].values()) == pytest.approx(ledger["wall"], rel=0.01)
    assert "requeue waits" in status.stdout and "over 2 runs of this SLURM job" in status.stdout

    ref = cli("launch", "--gpus", "2", PREEMPT, str(tmp_path / "ref"), "--steps", "16")
    assert ref.returncode == 0, ref.stderr
    resumed = json.loads((tmp_path / "losses.json").read_text())["losses"]
    uninterrupted = json.loads((tmp_path / "ref" / "losses.json").read_text())["losses"]
    assert len(resumed) == 16 and max(abs(a - b) for a, b in zip(resumed, uninterrupted)) < 1e-6
    assert max_diff(weights(tmp_path / "final.pt"), weights(tmp_path / "ref" / "final.pt")) < 1e-6


def test_a_preempted_array_task_is_requeued_alone(tmp_path, cli):
    for i in range(2):
        (tmp_path / f"out{i}").mkdir()
    result = cli("launch", "--cluster", "slurm", "--gpus", "1", "--cpu", "--time", "10", "--array", "2",
                 PREEMPT, str(tmp_path / "out{index}"), "--steps", "12", "--step-sleep", "0.4")
    job = job_id(result)
    progress = tmp_path / "out1" / "progress"
    wait_for(lambda: progress.is_file() and int(progress.read_text() or 0) >= 3, what="task 1 at step 3")
    subprocess.run(["scancel", "--signal=USR2", f"{job}_1"], check=True)
    task1 = tmp_path / "runs" / job / "task1"
    wait_for(lambda: json.loads((task1 / "task.json").read_text())["state"] == "REQUEUED", what="the requeue")
    wait_for(lambda: sacct_state(f"{job}_1") == "PENDING", what="task 1 to pend")
    release(f"{job}_1", json.loads((task1 / "task.json").read_text())["requeued_at"])
    wait_for(lambda: sacct_state(f"{job}_1") == "COMPLETED", timeout=180, what="task 1 to complete")
    wait_for(lambda: sacct_state(f"{job}_0") == "COMPLETED", what="task 0 to complete")
    status = cli("trainfleet", "status", job).stdout
    rows = {line.split()[0]: line.split() for line in status.splitlines() if re.match(r"\s+\d\s", line)}
    assert rows["0"][1:4] == ["COMPLETED", "0", "0"] and rows["1"][1:4] == ["COMPLETED", "0", "1"], status
    assert (task1 / "checkpoints" / "latest.json").is_file()
    assert not (tmp_path / "runs" / job / "task0" / "checkpoints").exists()
    for i in range(2):
        assert len(json.loads((tmp_path / f"out{i}" / "losses.json").read_text())["losses"]) == 12


def test_max_requeues_zero_ends_the_job_at_the_checkpoint(tmp_path, cli):
    result = cli("launch", "--cluster", "slurm", "--gpus", "1", "--cpu", "--time", "10", "--max-requeues", "0",
                 PREEMPT, str(tmp_path), "--steps", "40", "--step-sleep", "0.3")
    job = job_id(result)
    progress = tmp_path / "progress"
    wait_for(lambda: progress.is_file() and int(progress.read_text() or 0) >= 2, what="step 2")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for(lambda: sacct_state(job) in ("FAILED", "COMPLETED"), what="the job to end")
    task = json.loads((tmp_path / "runs" / job / "task.json").read_text())
    assert task["state"] == "STOPPED" and task["requeues"] == 0 and "--max-requeues 0" in task["reason"]
    assert (tmp_path / "runs" / job / "checkpoints" / "latest.json").is_file()
    assert "state STOPPED" in cli("trainfleet", "status", job).stdout


def test_logs_and_cancel_from_another_shell(tmp_path, cli):
    result = cli("launch", "--cluster", "slurm", "--gpus", "1", "--cpu", "--time", "5", PREEMPT, str(tmp_path),
                 "--steps", "200", "--step-sleep", "0.5")
    job = job_id(result)
    progress = tmp_path / "progress"
    wait_for(lambda: progress.is_file() and int(progress.read_text() or 0) >= 1, what="step 1")
    running = cli("trainfleet", "status", job)
    assert "state RUNNING" in running.stdout, running.stdout
    assert cli("trainfleet", "logs", job).returncode == 0
    cancelled = cli("trainfleet", "cancel", job)
    assert cancelled.returncode == 0 and f"cancelled job {job}" in cancelled.stdout
    wait_for(lambda: sacct_state(job) == "CANCELLED", what="the cancel")
    assert "state CANCELLED" in cli("trainfleet", "status", job).stdout
    missing = cli("trainfleet", "status", "999999")
    assert missing.returncode == 2 and "no trainfleet job '999999'" in missing.stderr


def test_wait_exits_with_the_jobs_exit_code(tmp_path, cli):
    result = cli("launch", "--cluster", "slurm", "--nodes", "1", "--gpus", "2", "--cpu", "--time", "5", "--wait",
                 str(SCRIPTS / "fail_at_step.py"), str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "state FAILED, exit code 1" in result.stdout


def test_local_and_debug_clusters_give_the_same_result(tmp_path, cli):
    for name in ("local", "debug"):
        (tmp_path / name).mkdir()
    local = cli("launch", "--cluster", "local", "--gpus", "2", "--cpu", "--wait", PARITY, str(tmp_path / "local"),
                "--steps", "6", "--global-batch-size", "16")
    assert local.returncode == 0, local.stdout + local.stderr
    debug = cli("launch", "--cluster", "debug", PARITY, str(tmp_path / "debug"), "--steps", "6",
                "--global-batch-size", "16")
    assert debug.returncode == 0, debug.stdout + debug.stderr
    a = json.loads((tmp_path / "local" / "losses.json").read_text())
    b = json.loads((tmp_path / "debug" / "losses.json").read_text())
    assert (a["world_size"], b["world_size"]) == (2, 1)
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) < 1e-5
    assert max_diff(weights(tmp_path / "local" / "final.pt"), weights(tmp_path / "debug" / "final.pt")) < 1e-5
    assert "state COMPLETED" in cli("trainfleet", "status", job_id(local)).stdout


@pytest.mark.parametrize("args, expected", [
    (["--partition", "gpu"], "--partition gpu: no such partition on this cluster. Available: ['debug']"),
    (["--nodes", "3"], "--nodes 3 but partition 'debug' has 2 node(s)."),
    (["--gpus", "4"], "needs 4 CPUs per node but partition 'debug' has 2."),
    (["--sweep", "lr=0.1,,0.2"], "--sweep 'lr=0.1,,0.2' has an empty value"),
    (["--sweep", "lr"], "--sweep 'lr' is malformed"),
    (["--slurm-opt", "colour=blue"], "unknown sbatch option 'colour'. Valid: ["),
    (["--slurm-opt", "reservation=nope"], "sbatch refused the job"),
    (["--time", "0"], "--time 0: expected a whole number of at least 1 (minutes)."),
])
def test_bad_input_is_one_line_and_submits_nothing(tmp_path, cli, args, expected):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    result = cli("launch", "--cluster", "slurm", "--cpu", *args, RECORD, str(tmp_path))
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "runs").exists()


def test_gpus_on_a_partition_without_gpus_points_to_cpu(tmp_path, cli):
    result = cli("launch", "--cluster", "slurm", "--gpus", "2", RECORD, str(tmp_path))
    assert result.returncode == 2
    assert "--gpus 2 per node but partition 'debug' has 0 GPUs per node" in result.stderr and "--cpu" in result.stderr
