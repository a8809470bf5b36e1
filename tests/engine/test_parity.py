"""Strategy parity: single, dp, ddp and horovod give the same losses and weights for the same global batch."""
import json

import pytest
import torch

from tests.conftest import SCRIPTS, horovod_available

SCRIPT = str(SCRIPTS / "parity_train.py")


def _run(launch, tmp_path, name, *launch_args):
    out = tmp_path / name
    out.mkdir()
    result = launch(*launch_args, SCRIPT, str(out), "--steps", "6", "--global-batch-size", "16")
    assert result.returncode == 0, result.stderr
    losses = json.loads((out / "losses.json").read_text())
    weights = torch.load(out / "final.pt", weights_only=True)["model"]
    return losses, weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.conftest import run_cli

    tmp = tmp_path_factory.mktemp("parity")

    def launch(*args):
        return run_cli("launch", "--log-dir", str(tmp / "logs"), *args, timeout=180)

    runs = {
        "single": _run(launch, tmp, "single", "--strategy", "single"),
        "ddp": _run(launch, tmp, "ddp", "--gpus", "2", "--strategy", "ddp"),
        "dp": _run(launch, tmp, "dp", "--gpus", "2", "--strategy", "dp"),
    }
    if horovod_available():
        runs["horovod"] = _run(launch, tmp, "horovod", "--gpus", "2", "--strategy", "horovod")
    return runs


OTHERS = ["ddp", "dp", pytest.param("horovod", marks=[pytest.mark.horovod, pytest.mark.skipif(
    not horovod_available(), reason="Horovod is not installed: run scripts/build-horovod.sh")])]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_runs_report_their_strategy_and_world(runs):
    assert (runs["single"][0]["strategy"], runs["single"][0]["world_size"]) == ("single", 1)
    assert (runs["ddp"][0]["strategy"], runs["ddp"][0]["world_size"]) == ("ddp", 2)
    assert (runs["dp"][0]["strategy"], runs["dp"][0]["world_size"]) == ("dp", 1)
    if "horovod" in runs:
        assert (runs["horovod"][0]["strategy"], runs["horovod"][0]["world_size"]) == ("horovod", 2)


@pytest.mark.parametrize("other", OTHERS)
def test_same_losses_every_step(runs, other):
    single, theirs = runs["single"][0]["losses"], runs[other][0]["losses"]
    assert len(single) == len(theirs) == 6
    assert single[-1] < single[0]  # it trains
    for step, (a, b) in enumerate(zip(single, theirs)):
        assert abs(a - b) < 1e-5, f"step {step}: single {a} vs {other} {b}"


@pytest.mark.parametrize("other", OTHERS)
def test_same_final_weights(runs, other):
    assert _max_diff(runs["single"][1], runs[other][1]) < 1e-5
