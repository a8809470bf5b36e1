"""The CUDA/NCCL paths on one GPU. Marked ``gpu``: skipped with the reason on a machine without
one, run for real where there is one (scripts/test.sh with TRAINFLEET_REQUIRE=gpu fails the skip).
Each test names the torch behaviour it holds the engine to."""
import csv
import json
import zipfile

import pytest
import torch
import torch.nn.functional as F

import trainfleet
from tests.conftest import SCRIPTS, run_cli
from trainfleet.engine import checkpoint as ckpt
from trainfleet.engine.engine import Engine

pytestmark = pytest.mark.gpu

PROBE = """
import json, sys
import torch, torch.distributed as dist, trainfleet
engine = trainfleet.Engine()
model = engine.setup(torch.nn.Linear(4, 2))
json.dump({"backend": dist.get_backend() if dist.is_initialized() else None, "device": str(engine.device),
           "current": torch.cuda.current_device(), "param": str(next(model.parameters()).device),
           "model": type(model).__name__, "stop": engine.should_stop()}, open(sys.argv[1], "w"))
"""


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def batch(device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g).to(device), torch.randint(0, 4, (32,), generator=g).to(device)


def train_steps(engine, steps=3):
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = engine.setup(model, optimizer)
    x, y = batch(engine.device)
    for _ in range(steps):
        with engine.autocast():
            loss = F.cross_entropy(model(x), y)
        engine.backward(loss)
        engine.step(optimizer)
    return model, optimizer, loss


def test_single_runs_on_cuda0():
    engine = Engine(strategy="single")
    model, _, loss = train_steps(engine)
    assert engine.device == torch.device("cuda", 0)
    assert next(model.parameters()).device == torch.device("cuda", 0) and torch.isfinite(loss)


@pytest.mark.parametrize("strategy", ["ddp", "dp"])
def test_launch_on_a_gpu_picks_nccl_and_sets_the_device_before_init(tmp_path, strategy):
    # set_device before init_process_group (and device_id on it); the launcher forks its workers
    # after importing torch without touching CUDA, or the workers' CUDA init would fail
    # ("Cannot re-initialize CUDA in forked subprocess")
    out = tmp_path / "probe.json"
    (tmp_path / "probe.py").write_text(PROBE)
    result = run_cli("launch", "--gpus", "1", "--strategy", strategy, "--log-dir", str(tmp_path / "logs"),
                     str(tmp_path / "probe.py"), str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(out.read_text())
    if strategy == "ddp":
        assert (seen["backend"], seen["model"]) == ("nccl", "DistributedDataParallel")
    else:
        assert (seen["backend"], seen["model"]) == (None, "DataParallel")  # one process: no group
    assert (seen["device"], seen["current"], seen["param"], seen["stop"]) == ("cuda:0", 0, "cuda:0", False)


@pytest.mark.parametrize("precision, dtype", [("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)])
def test_autocast_on_cuda(precision, dtype):
    engine = Engine(strategy="single", precision=precision)
    model, _, loss = train_steps(engine)
    with engine.autocast():
        assert model(batch(engine.device)[0]).dtype == dtype
    assert torch.isfinite(loss)
    scaler = engine.precision.scaler
    assert (scaler is not None) == (dtype == torch.float16)  # bf16 needs no loss scaling


def test_fp16_scaler_skips_a_step_with_inf_gradients_on_cuda():
    engine = Engine(strategy="single", precision="16-mixed")
    model, optimizer, _ = train_steps(engine, steps=1)
    scale, weights = engine.precision.scaler.get_scale(), model[0].weight.detach().clone()
    x, y = batch(engine.device)
    with engine.autocast():
        loss = F.cross_entropy(model(x), y)
    engine.backward(loss * float("inf"))
    assert not engine.step(optimizer)  # skipped, and said so
    assert torch.equal(model[0].weight, weights) and engine.precision.skipped_steps == 1
    assert engine.precision.scaler.get_scale() == scale / 2


def test_o2_masters_are_fp32_on_the_gpu_and_the_model_fp16():
    engine = Engine(strategy="single", precision="O2")
    model, _, loss = train_steps(engine)
    assert next(model.parameters()).dtype == torch.float16 and torch.isfinite(loss)
    masters = list(engine.precision.masters.values())
    assert masters and all(m.dtype == torch.float32 and m.is_cuda for m in masters)


def test_async_save_from_cuda_goes_through_pinned_buffers_and_equals_a_sync_save(tmp_path):
    engine = Engine(strategy="single")
    model, optimizer, _ = train_steps(engine)
    engine.save(tmp_path / "sync.pt", model=model, optimizer=optimizer)
    engine.save(tmp_path / "async.pt", model=model, optimizer=optimizer, asynchronous=True)
    buffers = list(engine._saver._buffers.values())
    engine.wait_for_checkpoint()
    # every tensor copied from the GPU lands in pinned memory (the CPU's own, the RNG states, need not)
    assert sum(b.is_pinned() for b in buffers) >= len(list(model.parameters()))
    a, b = (torch.load(tmp_path / name, weights_only=True) for name in ("sync.pt", "async.pt"))
    for key in a["model"]:
        assert a["model"][key].device.type == "cpu" and torch.equal(a["model"][key], b["model"][key]), key
    assert json.dumps(a["optimizer"]["param_groups"]) == json.dumps(b["optimizer"]["param_groups"])


def test_checkpoint_from_cuda3_loads_onto_cuda0(tmp_path, monkeypatch):
    engine = Engine(strategy="single")
    model, _, _ = train_steps(engine)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with monkeypatch.context() as patch:  # every storage tagged cuda:3, as a 4-GPU box writes it
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:3")
        torch.save(state, tmp_path / "cuda3.pt")
    with zipfile.ZipFile(tmp_path / "cuda3.pt") as archive:  # the file really says cuda:3
        assert b"cuda:3" in archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    if torch.cuda.device_count() < 4:  # plain torch.load honours the tag and fails here
        with pytest.raises(RuntimeError):
            torch.load(tmp_path / "cuda3.pt", weights_only=True)
    fresh = Engine(strategy="single")
    target = fresh.setup(net())
    fresh.load(tmp_path / "cuda3.pt", model=target)
    for key, value in target.state_dict().items():
        assert value.device == torch.device("cuda", 0) and torch.equal(value, state[key])
    assert all(v.device.type == "cpu" for v in trainfleet.load_state_dict(tmp_path / "cuda3.pt").values())


def test_cuda_generator_is_saved_and_restored(tmp_path):
    engine = Engine(strategy="single")
    model, optimizer, _ = train_steps(engine, steps=1)
    engine.save(tmp_path / "rng.pt", model=model, optimizer=optimizer)
    expected = torch.rand(5, device="cuda")
    torch.rand(100, device="cuda")  # move the generator on
    engine.load(tmp_path / "rng.pt", model=model, optimizer=optimizer)
    assert torch.equal(torch.rand(5, device="cuda"), expected)


def test_bench_on_a_gpu_records_synchronised_times_and_cuda_memory(tmp_path):
    result = run_cli("trainfleet", "bench", "--model", "lenet", "--strategies", "ddp", "--gpus", "1", "--steps", "3",
                     "--warmup", "1", "--rounds", "1", "--batch-size", "8", "--out", str(tmp_path / "bench"),
                     "--no-progress", timeout=300)
    assert result.returncode == 0, result.stderr
    row = next(csv.DictReader(open(tmp_path / "bench" / "results.csv")))
    assert row["status"] == "ok" and float(row["step_ms"]) > 0 and float(row["peak_mb_per_rank"]) > 0
    assert "cuda" in (tmp_path / "bench" / "results.md").read_text().lower()


def test_parity_script_runs_ddp_with_one_nccl_rank(tmp_path):
    result = run_cli("launch", "--gpus", "1", "--strategy", "ddp", "--log-dir", str(tmp_path / "logs"),
                     str(SCRIPTS / "parity_train.py"), str(tmp_path), "--steps", "3", timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "losses.json").read_text())
    assert (info["device"], info["strategy"], info["world_size"]) == ("cuda:0", "ddp", 1)
    assert ckpt.load_file(tmp_path / "final.pt")["meta"]["world_size"] == 1


POISON = """
import sys, torch
from trainfleet.engine.recovery import device_fault
device = torch.device("cuda", 0)
print("before:", device_fault(device))
x = torch.ones(4, device=device)
try:  # an index out of range on the device: a device-side assert, sticky for the process's life
    x[torch.tensor([40], device=device)].sum().item()
except Exception:  # (torch.AcceleratorError, a RuntimeError, in recent torch)
    pass
print("after:", device_fault(device))
"""


def test_a_poisoned_cuda_context_is_named_so_the_process_is_not_reused(tmp_path):
    """After a device-side assert every CUDA call of the process fails (torch: the error is sticky):
    in-place recovery must not reuse such a survivor (Engine._recover raises InPlaceImpossible
    naming it). The probe says a healthy context is fine and names the poisoned one."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", POISON], capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert "before: None" in lines, result.stdout + result.stderr
    after = [line for line in lines if line.startswith("after:")]
    assert after and "its CUDA context is unusable (" in after[0], result.stdout + result.stderr
