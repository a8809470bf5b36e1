"""When every process is alive but the job is wrong (issue 23): the fault matrix, each case a real
job through ``launch`` with one fault on rank 1, and a healthy run that must raise no alarm.

On the old code the hangs sat silent (until gloo's 30-minute timeout), the skipped step trained on
desynchronised until the data ran out, and no straggler or non-finite loss was ever named.
"""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import SCRIPTS

SCRIPT = str(SCRIPTS / "fault_train.py")


def _line_of(marker: str) -> int:
    """The line of fault_train.py that injects a fault (its comment says FAULT: <marker>)."""
    for number, line in enumerate((SCRIPTS / "fault_train.py").read_text().splitlines(), 1):
        if f"FAULT: {marker}" in line:
            return number
    raise AssertionError(marker)


def _run(launch, tmp_path, fault, *extra, launch_args=("--gpus", "2"), timeout=120):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return launch(*launch_args, SCRIPT, str(out), "--fault", fault, *extra, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("fault, marker, phase", [
    ("sleep", "a hang in Python", "forward"),
    ("deadlock", "deadlock", "forward"),
    ("loader", None, "data"),
])
def test_a_hang_names_the_rank_its_line_and_fails_the_job(launch, tmp_path, fault, marker, phase):
    result = _run(launch, tmp_path, fault, launch_args=("--gpus", "2", "--hang-timeout", "3"))
    err = result.stderr
    assert result.returncode == 1, err[-3000:]
    assert "failed first: hung: no rank made progress for" in err, err[-3000:]
    culprit = re.search(r"culprit: rank (\d+) on \S+ \(node 0\): not in the collective the others wait in "
                        r"\((\w+) #(\d+)\); step 5, phase (\w+)", err)
    assert culprit and culprit.group(1) == "1" and culprit.group(4) == phase, err[-3000:]
    where = (f'File "{SCRIPT}", line {_line_of(marker)}, in <module>' if marker
             else f'File "{SCRIPT}", line {_line_of_getitem()}, in __getitem__')
    frames = err[err.index("culprit:"):err.index("every rank:")]
    assert where in frames.splitlines()[1], frames  # the innermost frame of the culprit's main thread
    assert re.search(r"rank 0 \(\S+, node 0\): step 5, backward, issued (\d+)", err), err[-2000:]
    if fault == "deadlock":
        assert "(thread other)" in frames  # the other thread holding the lock is shown too
    assert "Traceback" not in err


def _line_of_getitem() -> int:
    lines = (SCRIPTS / "fault_train.py").read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if "time.sleep(3600)  # the dataset never returns" in line)


@pytest.mark.slow
def test_work_outside_the_engine_is_not_a_hang(launch, tmp_path):
    """Rank 1 computes for 8 s without calling the engine (its peers wait in the all-reduce):
    its busy CPU is progress, so --hang-timeout 3 does not fire (it did before CPU time counted,
    in the fsdp benchmark's hand-written loop)."""
    result = _run(launch, tmp_path, "busy_outside", "--pause", "8", "--steps", "8",
                  launch_args=("--gpus", "2", "--hang-timeout", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hang:" not in result.stderr


@pytest.mark.slow
def test_a_rank_holding_the_gil_is_read_from_outside(launch, tmp_path):
    """Its dump thread cannot run: py-spy reads its stack from outside (the tests install it), with
    the line; without py-spy the report says so and shows faulthandler's C-level dump."""
    result = _run(launch, tmp_path, "gil", launch_args=("--gpus", "2", "--hang-timeout", "3"))
    err = result.stderr
    assert result.returncode == 1, err[-3000:]
    assert re.search(r"culprit: rank 1 on \S+ \(node 0\): stopped first, outside any collective", err), err[-3000:]
    frames = err[err.index("culprit:"):err.index("every rank:")].splitlines()
    assert frames[1].strip().startswith("|   (py-spy) <module> (") and \
        frames[1].endswith(f"fault_train.py:{_line_of('C code that holds the GIL')})"), frames


@pytest.mark.slow
def test_a_hang_on_another_node_is_reported_by_node_0(launch, tmp_path):
    result = _run(launch, tmp_path, "sleep", launch_args=("--nodes", "2", "--gpus", "1", "--hang-timeout", "3"))
    err = result.stderr
    assert result.returncode == 1, err[-3000:]
    assert re.search(r"culprit: rank 1 on \S+ \(node 1\): not in the collective", err), err[-3000:]
    assert f'File "{SCRIPT}", line {_line_of("a hang in Python")}, in <module>' in err


@pytest.mark.slow
def test_a_hang_restarts_under_max_restarts(launch, tmp_path):
    """A hang is a failure: --max-restarts runs the job again (the fault is injected every attempt,
    so the second attempt hangs too and the job then fails)."""
    result = _run(launch, tmp_path, "sleep", launch_args=("--gpus", "2", "--hang-timeout", "2", "--max-restarts", "1"))
    assert result.returncode == 1, result.stderr[-3000:]
    # one report per attempt, as it happens (before failures were kept per attempt, the restart
    # could end at once on the first attempt's hang: test_control_attempts.py)
    assert result.stderr.count("  | hang: no rank made progress") == 2, result.stderr[-4000:]
    assert (tmp_path / "logs" / "node0" / "rank1.attempt1.log").exists(), "no second attempt"


@pytest.mark.slow
def test_a_skipped_step_is_a_desync_caught_before_the_run_goes_on(launch, tmp_path):
    result = _run(launch, tmp_path, "skip", "--steps", "200", "--save-every", "10")
    err = result.stderr
    assert result.returncode == 1, err[-3000:]
    found = re.search(r"desync: rank 1 on \S+ \(node 0\) is out of step with the others at step (\d+): "
                      r"batches fetched (\d+) \(the others (\d+)\)", err)
    assert found, err[-3000:]
    step = int(found.group(1))
    assert 6 <= step <= 9 and int(found.group(2)) == int(found.group(3)) + 1, err[-3000:]
    assert not (tmp_path / "out" / "ckpt" / "step10.pt").exists(), "a checkpoint was written after the desync"
    assert not (tmp_path / "out" / "done.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["extra_all_reduce", "mismatch"])
def test_a_collective_mismatch_is_caught_by_gloo_and_names_the_rank(launch, tmp_path, fault):
    result = _run(launch, tmp_path, fault)
    err = result.stderr
    assert result.returncode == 128 + 6, err[-3000:]  # gloo aborts the rank that received a wrong size
    assert re.search(r"launch: rank \d \(node 0, local rank \d\) failed first: signal SIGABRT", err), err[-3000:]
    assert "collective mismatch" in err


@pytest.mark.slow
@pytest.mark.parametrize("fault, factor, phase", [
    ("slow_forward", "3", "forward"),
    ("slow_forward", "1.3", "forward"),
    ("slow_loader", "3", "data"),
])
def test_a_straggler_is_named_with_its_phase_and_the_job_goes_on(launch, tmp_path, fault, factor, phase):
    result = _run(launch, tmp_path, fault, "--factor", factor, "--step-sleep", "0.05", "--steps", "40")
    err = result.stderr
    assert result.returncode == 0, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("launch: straggler:")]
    assert lines and all("rank 1 on" in line for line in lines), err[-3000:]
    assert f"slower than its peers in {phase}:" in lines[0], lines
    steps = int(re.search(r"median of the last (\d+) steps", lines[0]).group(1))
    assert steps <= 20  # flagged within 20 steps
    timings = json.loads((tmp_path / "logs" / "timings.json").read_text())
    assert set(timings) == {"0", "1"} and timings["1"]["med"][phase] > timings["0"]["med"][phase]


@pytest.mark.slow
def test_a_non_finite_loss_is_named_by_rank_and_is_not_a_hang(launch, tmp_path):
    result = _run(launch, tmp_path, "nan")
    err = result.stderr
    assert result.returncode == 0, err[-3000:]
    assert re.search(r"non-finite loss: first on rank 1 on \S+ \(node 0\) at step 6;", err), err[-3000:]
    assert "hang:" not in err and "desync" not in err


@pytest.mark.slow
def test_a_healthy_run_raises_no_alarm(launch, tmp_path):
    """2,000 steps with saves and evaluation passes, after a 10 s pause before the first step, under
    the default (adaptive) hang threshold: no hang, desync or straggler report."""
    result = _run(launch, tmp_path, "pause_first", "--pause", "10", "--steps", "2000", "--step-sleep", "0",
                  "--save-every", "250", "--eval-every", "400", timeout=400)
    err = result.stderr
    assert result.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "out" / "done.json").read_text())["step"] == 2000
    for word in ("hang:", "desync", "straggler", "non-finite"):
        assert word not in err, err[-3000:]
    assert "per-rank step time" in err  # the final table


def test_hang_detection_can_be_turned_off(launch, tmp_path):
    """--hang-timeout 0: no record, no thread; the flag is refused when negative."""
    result = _run(launch, tmp_path, "none", "--steps", "3", launch_args=("--gpus", "2", "--hang-timeout", "0"))
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "logs").rglob("*.progress"))
    bad = _run(launch, tmp_path, "none", launch_args=("--hang-timeout", "-1"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


GUARDED_SAVE = """
import sys, torch, trainfleet
engine = trainfleet.Engine(seed=0)
model, optimizer = engine.setup(torch.nn.Linear(4, 1), torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), lr=0.1))
loader = engine.dataloader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=2)
for step, (x,) in enumerate(loader):
    engine.backward(model(x).sum())
    engine.step(optimizer)
    if step == 1:
        if engine.rank == 1:
            next(iter(loader))  # one batch more than the others: this rank is a step ahead in its data
        engine.save(sys.argv[1], model=model)
        break
"""


def test_an_out_of_step_job_writes_no_checkpoint(launch, tmp_path):
    """The engine's own guard: before a save every rank's signature must be rank 0's (through the
    store, faster than the agent's check); on the old code the checkpoint was written."""
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED_SAVE)
    target = tmp_path / "model.pt"
    result = launch("--gpus", "2", str(script), str(target))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "DesyncError: rank 1 is out of step with rank 0 at checkpoint #1: batches fetched 3 (rank 0: 2)" \
        in result.stderr, result.stderr[-3000:]
    assert not target.exists() and not list(tmp_path.glob("*.tmp*"))


def _rank(step=10, idle=0.0, phase="forward", med_step=0.1, n=20, **med):
    return {"step": step, "idle": idle, "phase": phase, "alive": True, "n": n, "node": 0, "host": "h",
            "med": {"step": med_step, "data": 0.0, "forward": 0.05, "optimizer": 0.0, "idle": 0.0, **med}, "ring": []}


def test_the_hang_threshold_adapts_to_the_step_and_allows_first_steps_and_checkpoints():
    from trainfleet.launcher.diagnosis import FIRST_STEP_ALLOWANCE, FLOOR, STEPS, JobWatch

    watch = JobWatch(None)
    assert watch.threshold({0: _rank(), 1: _rank()})[0] == FLOOR  # 20 x 0.1 s is below the floor
    assert watch.threshold({0: _rank(med_step=2.0), 1: _rank(med_step=2.0)})[0] == STEPS * 2.0
    assert watch.threshold({0: _rank(step=0), 1: _rank()})[0] == FIRST_STEP_ALLOWANCE
    assert watch.threshold({0: _rank(phase="checkpoint"), 1: _rank()})[0] == FIRST_STEP_ALLOWANCE
    assert watch.hung({0: _rank(idle=FLOOR + 1), 1: _rank(idle=FLOOR - 1)}) is None  # rank 1 still moves
    assert watch.hung({0: _rank(idle=FLOOR + 1), 1: _rank(idle=FLOOR)})[0] == FLOOR
    assert JobWatch(0).hung({0: _rank(idle=1e6)}) is None  # --hang-timeout 0: off
    assert JobWatch(3).threshold({0: _rank()})[0] == 3


def test_a_straggler_is_said_once_and_again_only_when_it_changes():
    from trainfleet.launcher.diagnosis import JobWatch

    watch = JobWatch(None)
    slow = {0: _rank(), 1: _rank(forward=0.15)}
    first = watch.straggler_lines(slow)
    assert len(first) == 1
    assert "rank 1 on h (node 0) is 3.0x slower than its peers in forward: 150 ms vs 50 ms" in first[0]
    assert watch.straggler_lines(slow) == []
    assert watch.straggler_lines({0: _rank(), 1: _rank()}) == ["stragglers: none now"]
    assert watch.straggler_lines({0: _rank(data=0.02), 1: _rank()})[0].startswith("straggler: rank 0")


def test_the_timing_table_reads_a_hostile_file_without_failing(tmp_path):
    from trainfleet.utils.timings import read_timings, timing_table

    (tmp_path / "timings.json").write_text(json.dumps({
        "0": {"n": 3, "step": 3, "host": "a\x1b[2Jb", "med": {"step": 0.1, "data": "x", "forward": float("nan")}},
        "x": {"n": 1, "med": {}}, "1": "not a rank", "2": {"n": 1, "med": []}}))
    lines = timing_table(read_timings(tmp_path))
    assert len(lines) == 3 and "\x1b" not in "".join(lines) and lines[2].split()[:4] == ["0", "a?[2Jb", "3", "100.0"]
    (tmp_path / "timings.json").write_text("[1, 2]")
    assert timing_table(read_timings(tmp_path)) == []
