"""Horovod behind the Strategy interface: missing-module error, checkpoints across strategies."""
import json
import sys

import pytest
import torch

from tests.conftest import SCRIPTS, run_cli
from trainfleet.engine.strategy import build_strategy
from trainfleet.utils.errors import UsageError


def test_missing_horovod_is_one_line_in_the_engine(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod", None)  # hides the module: import raises ImportError
    with pytest.raises(UsageError, match=r"strategy 'horovod' needs Horovod.*HINT: run scripts/build-horovod.sh"):
        build_strategy("horovod")


def test_missing_horovod_is_one_line_from_launch(tmp_path):
    hidden = tmp_path / "hide"
    (hidden / "horovod").mkdir(parents=True)
    (hidden / "horovod" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    result = run_cli("launch", "--gpus", "2", "--strategy", "horovod", str(SCRIPTS / "torchrun_style.py"),
                     str(tmp_path), env={"PYTHONPATH": str(hidden)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "strategy 'horovod' needs Horovod" in lines[0] and "scripts/build-horovod.sh" in lines[0]


@pytest.mark.horovod
@pytest.mark.parametrize("before, after", [("ddp2", "horovod2"), ("horovod2", "single"), ("horovod2", "ddp1")])
def test_resume_across_horovod(tmp_path, before, after):
    from tests.engine import test_resume as resume

    resume.LAYOUTS.setdefault("horovod2", ["--gpus", "2", "--strategy", "horovod"])
    resume.train(tmp_path, "single", "ref")
    tag = f"{before}-{after}"
    resume.train(tmp_path, before, f"{tag}.a", "--stop-at", str(resume.STOP))
    resume.train(tmp_path, after, f"{tag}.b", "--resume-from", str(tmp_path / f"ckpt.{tag}.a.pt"))
    ref = torch.load(tmp_path / "final.ref.pt", weights_only=True)["model"]
    final = torch.load(tmp_path / f"final.{tag}.b.pt", weights_only=True)["model"]
    assert max((ref[k] - final[k]).abs().max().item() for k in ref) < 1e-5
    interrupted = resume.seen(tmp_path, f"{tag}.a")["1"] + resume.seen(tmp_path, f"{tag}.b")["1"]
    assert sorted(interrupted) == sorted(resume.seen(tmp_path, "ref")["1"])


@pytest.mark.horovod
def test_horovod_with_mixed_precision_and_accumulation(tmp_path):
    script = tmp_path / "acc.py"
    script.write_text(
        "import torch, torch.nn.functional as F, trainfleet\n"
        "engine = trainfleet.Engine(backward_passes_per_step=2)\n"
        "model = torch.nn.Linear(8, 2)\n"
        "model, opt = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))\n"
        "x = torch.randn(16, 8, generator=torch.Generator().manual_seed(engine.rank)); y = (x[:, 0] > 0).long()\n"
        "losses = []\n"
        "for step in range(20):\n"
        "    for micro in range(2):\n"
        "        with engine.autocast():\n"
        "            loss = F.cross_entropy(model(x[micro::2]), y[micro::2]) / 2\n"
        "        engine.backward(loss)\n"
        "    engine.step(opt)\n"
        "    losses.append(engine.all_reduce(loss.detach().float()).item())\n"
        "w = engine.broadcast(model.weight.detach().clone(), src=1)\n"
        "assert torch.equal(w, model.weight.detach()), 'ranks diverged'\n"
        "assert losses[-1] < losses[0], losses\n"
        "engine.print('ok', engine.precision.name, losses[0], losses[-1])\n")
    result = run_cli("launch", "--gpus", "2", "--strategy", "horovod", "--precision", "bf16",
                     "--log-dir", str(tmp_path / "logs"), str(script))
    assert result.returncode == 0, result.stderr
    assert "ok bf16-mixed" in result.stdout


OVERFLOW = '''
import json, sys, torch, torch.nn.functional as F, trainfleet
engine = trainfleet.Engine(seed=0)
model = torch.nn.Linear(8, 2)
model, opt = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
x = torch.randn(16, 8, generator=torch.Generator().manual_seed(engine.rank)); y = (x[:, 0] > 0).long()
scales, stepped = [], []
for step in range(6):
    with engine.autocast():
        loss = F.cross_entropy(model(x), y)
    if step == 2 and engine.rank == 1:
        loss = loss * float("inf")  # an overflow on one rank only
    engine.backward(loss)
    stepped.append(engine.step(opt))
    scales.append(engine.precision.scaler.get_scale())
weight = engine.unwrap(model).weight.detach().clone()
same = torch.equal(engine.broadcast(weight.clone(), src=1), weight)
with open(f"{sys.argv[1]}/rank{engine.rank}.json", "w") as handle:
    json.dump({"scales": scales, "stepped": stepped, "skipped": engine.precision.skipped_steps, "same": same,
               "finite": bool(torch.isfinite(weight).all())}, handle)
'''


@pytest.mark.parametrize("strategy", [pytest.param("horovod", marks=pytest.mark.horovod), "ddp"])
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path, strategy):
    """The scaler must look at the reduced gradients: otherwise only the overflowing rank skips
    and the ranks' weights part ways. ddp is the reference for the same property."""
    script = tmp_path / "overflow.py"
    script.write_text(OVERFLOW)
    result = run_cli("launch", "--gpus", "2", "--strategy", strategy, "--precision", "16-mixed",
                     "--log-dir", str(tmp_path / "logs"), str(script), str(tmp_path))
    assert result.returncode == 0, result.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks  # the same steps skipped, the same scale, on both ranks
    info = ranks[0]
    assert info["same"] and info["finite"] and info["skipped"] == 1 and info["stepped"][2] is False
    assert info["scales"][2] == info["scales"][1] / 2  # the scale backs off once


@pytest.mark.horovod
def test_a_cpu_only_horovod_refuses_gpu_training_in_one_line():
    """The Horovod built here has no CUDA/NCCL: on a GPU node it would fail at the first broadcast."""
    import horovod.torch as hvd

    from trainfleet.engine.horovod import check_build

    check_build(hvd, "cpu")
    with pytest.raises(UsageError, match="built for CPU only .* TRAINFLEET_HOROVOD_GPU=1 .* --cpu"):
        check_build(hvd, "cuda")
