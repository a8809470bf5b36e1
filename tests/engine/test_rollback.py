"""``--on-nan rollback``: a non-finite loss on any rank returns every rank to the last step,
held in memory (engine/snapshot.py), and drops that batch exactly.

The reference is the same script told to skip those batches before their forward: the model has
BatchNorm (buffers a forward changes) and dropout (RNG a forward draws), so only a full return
to the last step's state equals it. On the old code the flag did not exist (exit 2), and a NaN
spread to every rank's weights.
"""
from __future__ import annotations

import json
import random
import subprocess

import pytest
import torch

from tests.conftest import BIN, SCRIPTS

SCRIPT = str(SCRIPTS / "rollback_train.py")
STEPS = 30


def _train(tmp_path, name, *args, strategy="ddp", launch_args=()):
    out = tmp_path / name
    out.mkdir()
    result = subprocess.run([str(BIN / "launch"), "--gpus", "2", "--strategy", strategy, "--log-dir",
                             str(out / "logs"), *launch_args, SCRIPT, str(out), "--steps", str(STEPS), *args],
                            capture_output=True, text=True, timeout=180)
    return out, result


def _weights(out):
    return torch.load(out / "final.pt", weights_only=True)


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, seed", [("ddp", 0), ("ddp", 1), ("fsdp", 2), ("fsdp", 3)])
def test_a_rollback_equals_a_run_that_skipped_those_batches(tmp_path, strategy, seed):
    """Five NaNs a run at random steps on random ranks (four runs: 20 trials in all)."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(2, STEPS + 1), 5))
    inject = [(step, rng.randrange(2)) for step in steps]
    rolled, result = _train(tmp_path, "rolled", "--inject", ",".join(f"{s}:{r}" for s, r in inject),
                            strategy=strategy, launch_args=("--on-nan", "rollback", "--max-rollbacks", "5"))
    assert result.returncode == 0, result.stderr[-3000:]
    reference, result = _train(tmp_path, "reference", "--skip", ",".join(map(str, steps)), strategy=strategy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((rolled / "rollbacks.json").read_text()) == [[s, [r]] for s, r in inject]
    weights = _weights(rolled)
    assert all(bool(t.isfinite().all()) for t in weights.values())
    assert _max_difference(weights, _weights(reference)) <= 1e-5
    for step, rank in inject:  # each one said on the console, by rank and step
        assert f"non-finite loss on rank(s) {rank} at step {step}; every rank returned" in result.stderr or \
            f"non-finite loss on rank(s) {rank} at step {step}; every rank returned" in \
            (rolled / "logs" / "node0" / "rank0.log").read_text()


@pytest.mark.slow
def test_without_the_flag_a_nan_spreads_as_before(tmp_path):
    out, result = _train(tmp_path, "plain", "--inject", "5:1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training goes on" in result.stderr
    assert not all(bool(t.isfinite().all()) for t in _weights(out).values())


@pytest.mark.slow
def test_past_max_rollbacks_the_job_fails_saying_why(tmp_path):
    out, result = _train(tmp_path, "limit", "--inject", "5:1,9:1", launch_args=("--on-nan", "rollback",
                                                                                "--max-rollbacks", "1"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "non-finite loss on rank(s) 1 at step 9, after 1 rollback(s) (the limit, --max-rollbacks 1)" \
        in result.stderr, result.stderr[-3000:]
    assert not (out / "final.pt").exists()


def test_a_bad_on_nan_value_is_one_line(tmp_path):
    result = subprocess.run([str(BIN / "launch"), "--on-nan", "skip", SCRIPT, str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --on-nan 'skip': expected report or rollback. HINT: rollback returns every rank to the last step "
        "on a NaN/inf loss and drops that batch."], result.stderr
    assert "Traceback" not in result.stderr


def test_the_snapshot_restores_the_buffers_and_a_whole_one_is_not_aliased():
    """In one process: a forward after the capture changed BatchNorm's running statistics: restore
    puts them back and leaves the parameters (still the step's) alone. A whole snapshot (what a
    peer sends) restored twice gives the same state: the optimizer kept the tensors it was given
    and changed them in place, before _fresh."""
    from trainfleet.engine.snapshot import StateSnapshot

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    class Plain:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    def train_step():
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()
    snap = StateSnapshot()
    snap.capture(1, model, optimizer, Plain(), {}, [])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(5, 4) * 100)  # a forward whose batch is dropped: the running statistics moved
    assert not torch.equal(model[1].running_mean, weights["1.running_mean"])
    snap.restore(model, optimizer, Plain(), lambda rng: None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())

    whole = snap.whole(model, optimizer)
    held = {k: v.clone() for k, v in whole.optimizer["state"][0].items() if torch.is_tensor(v)}
    for _ in range(2):
        whole.restore(model, optimizer, Plain(), lambda rng: None)
        train_step()
        train_step()
    assert all(torch.equal(whole.optimizer["state"][0][k], v) for k, v in held.items())
