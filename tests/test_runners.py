"""scripts/test.sh runs the suite on two runners (pytest-xdist, ``-n 2 --dist loadgroup``): the tests
that depend on time or share something machine-wide one after another on one runner, the rest on
the other beside them (conftest.py: SERIAL, runner_unit, the orphan check per runner)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import ONE_UNIT, REPO, XDIST_WORKER, _orphan_workers, runner_unit


def test_every_test_that_needs_a_machine_wide_part_is_serial():
    """The SLURM cluster, network namespaces and sshd are shared by the whole machine: a test
    marked for them runs on the serial runner only (and so does a benchmark's smoke run that
    uses them)."""
    listed = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                             "-m", "slurm or multinode or ssh"], capture_output=True, text=True, cwd=REPO, timeout=120)
    marked = [line for line in listed.stdout.splitlines() if "::" in line]
    assert len(marked) > 20 and any("hosts_startup" in nodeid for nodeid in marked), listed.stdout[-2000:]
    assert [nodeid for nodeid in marked if runner_unit(nodeid) != "serial"] == []
    assert all(runner_unit(f"{path}::test_x") == path for path in ONE_UNIT)
    assert runner_unit("tests/engine/test_data.py::test_x[1]") == "tests/engine/test_data.py::test_x[1]"
    assert runner_unit("tests/bench/test_bench.py::test_benchmark_smoke[fsdp_bench-lines4]") != "serial"


def _orphan(tmp_path, name: str, runner: str | None) -> int:
    """A process that looks like a worker whose launcher died (adopted by init), started from
    ``runner`` (None: from no runner); its pid."""
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    env.pop(XDIST_WORKER, None)
    if runner is not None:
        env[XDIST_WORKER] = runner
    pid_file = tmp_path / name
    subprocess.run([sys.executable, "-c", "import os, sys, time\nif os.fork(): os._exit(0)\nos.setsid()\n"
                    f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)"], env=env, check=True)
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return int(pid_file.read_text())


def test_a_runner_counts_as_orphans_only_the_workers_it_started(tmp_path):
    """The other runner's tests kill agents, and their workers are orphans for a moment: this
    runner's leak check must neither fail on them nor kill them. One started by no runner (a
    plain pytest) counts, as before."""
    mine = os.environ.get(XDIST_WORKER) or None
    pids = {"other": _orphan(tmp_path, "other", "gw-other"), "mine": _orphan(tmp_path, "mine", mine)}
    if mine is not None:
        pids["none"] = _orphan(tmp_path, "none", None)
    try:
        found = _orphan_workers()
        assert pids["other"] not in found
        assert pids["mine"] in found and pids.get("none", pids["mine"]) in found
    finally:
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)


SAMPLE = '''
import json, os, time

def test_{name}_{index}():
    record = os.path.join({record!r}, "{name}_{index}")
    start = time.monotonic()
    time.sleep(0.3)
    open(record, "w").write(json.dumps([os.environ["PYTEST_XDIST_WORKER"], start, time.monotonic()]))
'''


def test_serial_tests_run_one_after_another_on_one_runner_and_the_rest_beside_them(tmp_path):
    """Two runners over a small suite laid out like this one: the serial files' tests on one
    runner, never overlapping; the others spread over both (so some run beside the serial ones)."""
    files = {"tests/launcher/test_ledger.py": "ledger", "tests/launcher/test_elastic.py": "elastic",
             "tests/engine/test_data.py": "data"}
    for path, name in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        tests = (SAMPLE.format(name=name, index=i, record=str(tmp_path / "record")) for i in range(4))
        (tmp_path / path).write_text("\n".join(tests))
    (tmp_path / "record").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(XDIST_WORKER, None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
                             "-n", "2", "--dist", "loadgroup", "--rootdir", str(tmp_path), *files],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = {path.name: json.loads(path.read_text()) for path in (tmp_path / "record").iterdir()}
    assert len(runs) == 12, sorted(runs)
    serial = sorted((start, end, runner) for name, (runner, start, end) in runs.items() if not name.startswith("data"))
    assert len({runner for _, _, runner in serial}) == 1, serial
    assert all(later[0] >= earlier[1] for earlier, later in zip(serial, serial[1:])), serial
    assert {runs[f"data_{i}"][0] for i in range(4)} - {serial[0][2]}, runs  # the other runner took some
