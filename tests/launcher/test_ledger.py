"""The job's ledger (launcher/ledger.py): every second of the wall time in one row, the injected
costs found in the right rows, the rows adding up to the wall time."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainfleet.launcher.ledger import Ledger
from trainfleet.utils.ledger_file import FILE, KEYS, read, table

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ledger_train.py"
LAUNCH = str(Path(sys.executable).with_name("launch"))


def account(began: float, count: int, base: int = 0, **seconds: float) -> dict:
    return {"began": began, "first": 0.0, "steps": 0.0, "save": 0.0, "load": 0.0, "eval": 0.0, "detect": 0.0,
            "recover": 0.0, "count": count, "base": base, **seconds}


def test_steps_again_after_a_restart_are_recomputed_not_productive(tmp_path):
    ledger = Ledger(tmp_path)
    t = ledger.started + 1.0
    ledger.begin_attempt(now=t)  # attempt 0: steps 1..8 (1 s each), killed during step 9
    ledger.watch(account(t + 0.5, 1, first=1.5))
    ledger.watch(account(t + 0.5, 8, first=1.5, steps=7.0, save=0.5))
    ledger.end_attempt("failed", now=t + 10.5)
    ledger.begin("restart", now=t + 11)
    ledger.begin_attempt(now=t + 12)  # attempt 1: resumed from step 5, steps 6..12
    ledger.watch(account(t + 12.5, 7, base=5, first=1.0, steps=6.0, load=0.25))
    ledger.end_attempt("ok", now=t + 20.5)
    result = ledger.finish(now=t + 21)
    rows = result["rows"]
    assert result["recomputed_steps"] == 3  # 6, 7, 8 again
    assert rows["recomputed"] == pytest.approx(2.0)  # 7 and 8 (6 was the attempt's first step)
    assert rows["productive"] == pytest.approx(7.0 + 4.0)
    assert rows["first_step"] == pytest.approx(1.5) and rows["save"] == 0.5 and rows["load"] == 0.25
    assert rows["detection"] == pytest.approx(10.5 - 0.5 - 9.0)  # after the last event, until the failure
    # teardown's end to the next attempt, its processes' start, its first step (the warm-up again)
    assert rows["restart"] == pytest.approx(1.0 + 0.5 + 1.0)
    assert rows["teardown"] == pytest.approx(0.5 + 0.75 + 0.5)  # after each attempt, and to the report
    assert rows["startup"] == pytest.approx(1.0 + 0.5)
    assert sum(rows.values()) == pytest.approx(result["wall"])
    assert result["goodput"] == pytest.approx(11.0 / result["wall"])
    assert read(tmp_path) == json.loads((tmp_path / FILE).read_text())
    text = "\n".join(table(result))
    assert "(3 step(s) computed again)" in text and "goodput" in text


def test_a_requeued_slurm_job_continues_its_ledger_and_counts_the_wait(tmp_path):
    (tmp_path / FILE).write_text(json.dumps({"job": "77", "wall": 30.0, "ended": time.time() - 20.0, "high": 12,
                                             "rows": {**dict.fromkeys(KEYS, 0.0), "productive": 25.0,
                                                      "startup": 5.0}, "runs": 1}))
    again = Ledger(tmp_path, "77", origin=time.monotonic())  # this run starts now
    assert again.rows["productive"] == 25.0 and again.high == 12 and again.runs == 2
    assert again.rows["requeue"] == pytest.approx(20.0, abs=0.1)  # from the first run's end to this run's start
    waited = again.rows["requeue"]
    result = again.finish()
    assert result["wall"] == pytest.approx(30.0 + waited + (time.monotonic() - again.started), abs=0.1)
    assert sum(result["rows"].values()) == pytest.approx(result["wall"])
    assert Ledger(tmp_path, "78").rows["requeue"] == 0.0  # another job's ledger is not continued
    assert Ledger(tmp_path, None).rows["productive"] == 0.0  # nor outside SLURM


@pytest.mark.parametrize("content", ["not json", "[]", '{"job": "77", "rows": 5}',
                                     '{"job": "77", "rows": {"productive": "x"}, "ended": 1.0, "high": "y"}'])
def test_a_malformed_ledger_file_starts_afresh(tmp_path, content):
    (tmp_path / FILE).write_text(content)
    ledger = Ledger(tmp_path, "77")
    assert ledger.rows["productive"] == 0.0 and ledger.high == -1
    assert ledger.finish()["wall"] >= 0


def _run(tmp_path: Path, name: str, *args: str) -> tuple[dict, float, str]:
    out = tmp_path / name
    out.mkdir()
    started = time.monotonic()
    result = subprocess.run([LAUNCH, "--gpus", "2", "--log-dir", str(out / "logs"), str(SCRIPT), str(out), *args],
                            capture_output=True, text=True, timeout=240, cwd=out)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "logs" / FILE).read_text()), wall, result.stderr


def _close_to(value: float, expected: float, share: float = 0.10) -> bool:
    return abs(value - expected) <= share * expected


def test_injected_costs_are_found_in_their_rows(tmp_path):
    """A 5 s sleep before the first step, a 3 s synchronous save and 2 s of evaluation, beside the
    same job without them: each cost in its row within 10%, the rows adding up to the wall time
    measured from here within 1%. The first step's row also holds the job's one-time work (setup,
    the loader, the first all-reduce: ~1.6 s here, 2.0 s once under the full suite's load), which
    varies between the two runs by more than 10% of 5 s: that row holds the 5 s and at most twice
    the plain run's first step besides, and no other row grew by as much as half of it."""
    base, _, _ = _run(tmp_path, "plain", "--steps", "30")
    costly, wall, stderr = _run(tmp_path, "costly", "--steps", "30", "--sleep-before-first", "5",
                                "--save-stall", "3", "--save-at", "10", "--eval-at", "20", "--eval-time", "2")
    rows, plain = costly["rows"], base["rows"]
    assert 5.0 <= rows["first_step"] <= 5.0 + 2 * plain["first_step"], (rows, plain)  # slept after Engine()
    assert all(rows[name] - plain[name] < 2.5 for name in ("startup", "productive", "idle")), (rows, plain)
    assert _close_to(rows["save"] - plain["save"], 3.0), rows
    assert _close_to(rows["eval"] - plain["eval"], 2.0), rows
    for ledger in (base, costly):
        assert sum(ledger["rows"].values()) == pytest.approx(ledger["wall"], rel=0.01)
    # from here the wall time includes starting `launch` and its exit (about 50 ms in all)
    assert costly["wall"] == pytest.approx(wall, rel=0.01), (costly["wall"], wall)
    assert "where the" in stderr and "goodput (productive / wall)" in stderr
    assert "checkpoint stalls (saves)" in stderr and "evaluation" in stderr


def test_a_killed_rank_shows_as_detection_restart_and_the_steps_computed_again(tmp_path):
    """Rank 1 is killed (SIGKILL) during step 9 of the first attempt; checkpoints every 5 steps:
    the restart resumes from step 5 and computes 6, 7 and 8 again."""
    ledger, wall, _ = _run_killed(tmp_path)
    rows = ledger["rows"]
    assert ledger["recomputed_steps"] == 3 and ledger["attempts"] == 2
    assert rows["detection"] > 0 and rows["restart"] > 0 and rows["load"] > 0
    per_step = rows["productive"] / 19  # 2..8 and 9..20 (each attempt's first step is its own row)
    assert _close_to(rows["recomputed"], 2 * per_step), rows  # 7 and 8 (6 was the new attempt's first)
    assert sum(rows.values()) == pytest.approx(ledger["wall"], rel=0.01)
    # what the ledger cannot count: the launcher's exit after it printed the account (its control
    # thread's last round, the exit handlers): 0.09-0.14 s here, measured; the job's own time within 1%
    assert ledger["wall"] == pytest.approx(wall, rel=0.01, abs=0.25)


def _run_killed(tmp_path: Path) -> tuple[dict, float, str]:
    out = tmp_path / "killed"
    out.mkdir()
    started = time.monotonic()
    result = subprocess.run([LAUNCH, "--gpus", "2", "--max-restarts", "1", "--log-dir", str(out / "logs"),
                             str(SCRIPT), str(out), "--steps", "20", "--step-time", "0.2", "--checkpoint-every", "5",
                             "--kill-at", "9"], capture_output=True, text=True, timeout=240, cwd=out)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "steps.1").read_text().split() == [str(n) for n in range(6, 21)]
    return json.loads((out / "logs" / FILE).read_text()), wall, result.stderr


@pytest.mark.parametrize("result", [{"wall": "x", "rows": {"productive": float("nan"), "save": -3}},
                                    {"wall": 10.0, "rows": {"idle": True}, "goodput": 7, "runs": "two",
                                     "recomputed_steps": "3"},
                                    {"wall": float("inf"), "rows": []}])
def test_the_table_of_a_hostile_file_shows_zeros_not_errors(tmp_path, result):
    """`trainfleet status` prints the ledger from the job's folder: untrusted input."""
    lines = table(result)
    assert lines[0].startswith("where the") and "goodput" in lines[-1]
    (tmp_path / FILE).write_text(json.dumps(result).replace("NaN", "0").replace("Infinity", "1"))
    assert read(tmp_path) is None or table(read(tmp_path))
