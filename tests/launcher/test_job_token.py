"""The job token: a process that merely reaches the master's port cannot stop, signal, fail or
join the job (issue 22, item 7). On the old code a well-formed ``job/signal`` written by anyone
stopped every worker, and a forged ``job/end`` ended the job."""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import BIN, SCRIPTS


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(path, job, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), "the job never started training"


FORGED = {
    "job/signal": "0 15",  # SIGTERM to every worker of attempt 0
    "job/end": "the outsider says so",
    "job/failure/0": json.dumps({"node": 1, "rank": 1, "how": "exit code 7", "lines": ["forged"]}),
    "failure/0/1": json.dumps({"node": 1, "rank": 1, "how": "exit code 7", "lines": ["forged"]}),
    "join/1": json.dumps({"nodes": "2", "gpus": 1, "strategy": "ddp", "precision": "32", "host": "x"}),
    "left/1": "1",
    "job/done": "0",
}


@pytest.mark.slow
def test_an_outsider_cannot_stop_fail_or_end_the_job(tmp_path):
    import torch.distributed as dist

    port, out = _free_port(), tmp_path / "out"
    out.mkdir()
    job = subprocess.Popen([str(BIN / "launch"), "--nodes", "2", "--gpus", "1", "--master-port", str(port),
                            "--log-dir", str(tmp_path / "logs"), str(SCRIPTS / "long_train.py"), str(out),
                            "--steps", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "ready.rank0", job)
        outsider = dist.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=5))
        for key, value in FORGED.items():
            outsider.set(key, value)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 0, stderr[-3000:]
    assert (out / "done.json").exists(), "the job did not train to its end"
    assert not list(out.glob("stop.rank*")), "a worker obeyed the forged signal"
    assert "ignoring job/signal in the control store" in stderr and "not signed with this job's token" in stderr


def test_a_signed_value_does_not_verify_at_another_key_or_with_another_token():
    import torch.distributed as dist

    from trainfleet.launcher.store_auth import UNSIGNED, SignedStore

    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, None, True, datetime.timedelta(seconds=5), wait_for_workers=False)
    plain = dist.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=5))
    ours, theirs = SignedStore(plain, "a" * 32, "test"), SignedStore(plain, "b" * 32, "test")
    ours.set("job/attempt", "3")
    assert ours.get("job/attempt") == b"3" and ours.check(["job/attempt"])
    assert not theirs.check(["job/attempt"]) and theirs.get("job/attempt") == UNSIGNED
    plain.set("job/done", plain.get("job/attempt"))  # replayed at another key
    assert not ours.check(["job/done"]) and "job/done" in ours.rejected
    # compare-and-set: "" means absent or (signed) empty; the first writer wins
    assert ours.compare_set("job/failure", "", "first") == b"first"
    assert ours.compare_set("job/failure", "", "second") == b"first"
    ours.set("job/failure", "")
    assert ours.compare_set("job/failure", "", "third") == b"third"
    del plain, server


def _agent(port: int, node: int, token: str | None, out, tmp_path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRAINFLEET_JOB_TOKEN"}
    if token is not None:
        env["TRAINFLEET_JOB_TOKEN"] = token
    return subprocess.Popen([str(BIN / "launch"), "--nodes", "2", "--gpus", "1", "--node-rank", str(node),
                             "--master-port", str(port), "--rendezvous-timeout", "30",
                             "--log-dir", str(tmp_path / f"logs{node}"), str(SCRIPTS / "long_train.py"), str(out),
                             "--steps", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [("t" * 32, "u" * 32), ("t" * 32, None), (None, "u" * 32)],
                         ids=["different", "only-node-0", "only-node-1"])
def test_node_rank_agents_with_different_tokens_are_told_at_once(tmp_path, tokens):
    port, out = _free_port(), tmp_path / "out"
    out.mkdir()
    master = _agent(port, 0, tokens[0], out, tmp_path)
    try:
        time.sleep(0.5)  # node 0 first, as a user would start them; node 1 retries until it is up
        node = _agent(port, 1, tokens[1], out, tmp_path)
        started = time.monotonic()
        _, stderr = node.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        master.kill()
        master.communicate()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert node.returncode == 2, stderr
    assert "another job token" in lines[-1] and "TRAINFLEET_JOB_TOKEN" in lines[-1], stderr
    assert "Traceback" not in stderr
    assert took < 20, f"node 1 took {took:.1f}s to refuse (its rendezvous timeout is 30s)"


@pytest.mark.slow
def test_matching_tokens_train_and_no_worker_sees_the_token(tmp_path):
    port, out = _free_port(), tmp_path / "out"
    out.mkdir()
    script = tmp_path / "env.py"
    script.write_text("import os, sys\nfrom pathlib import Path\n"
                      "Path(sys.argv[1], 'env' + os.environ['RANK']).write_text(repr(dict(os.environ)))\n")
    env = {**os.environ, "TRAINFLEET_JOB_TOKEN": "s3cret" * 6}
    agents = [subprocess.Popen([str(BIN / "launch"), "--nodes", "2", "--gpus", "1", "--node-rank", str(node),
                                "--master-port", str(port), "--log-dir", str(tmp_path / f"logs{node}"),
                                str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env) for node in (0, 1)]
    results = [agent.communicate(timeout=120) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], results
    for rank in (0, 1):
        assert "s3cret" not in (out / f"env{rank}").read_text()
    assert "s3cret" not in " ".join(stdout + stderr for stdout, stderr in results)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
