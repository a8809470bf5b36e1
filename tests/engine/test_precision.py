"""Every precision level on CPU: O0-O3, fp16 and bf16 autocast, loss scaling, master weights, checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainfleet.engine.engine import Engine
from trainfleet.engine.precision import AutocastPrecision, HalfModelPrecision, build_precision
from trainfleet.utils.errors import UsageError


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 10 * 10, 4))


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 12, 12, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :6].mean((1, 2, 3)) > 0).long()
    return x, y


def train(precision, steps=25, model=None):
    engine = Engine(strategy="single", precision=precision)
    model, optimizer = engine.setup(model or small_net(), torch.optim.SGD((model or small_net()).parameters(), lr=0.05))
    return engine, model, optimizer


def run_steps(engine, model, optimizer, steps):
    x, y = batch()
    losses = []
    for _ in range(steps):
        with engine.autocast():
            loss = F.cross_entropy(model(x), y)
        engine.backward(loss)
        engine.step(optimizer)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name, kind", [
    ("32", "32"), ("O0", "32"), ("16-mixed", "16-mixed"), ("fp16", "16-mixed"), ("O1", "16-mixed"),
    ("bf16-mixed", "bf16-mixed"), ("bf16", "bf16-mixed"), ("O2", "O2"), ("O3", "O3"),
])
def test_each_level_trains_with_finite_decreasing_loss(name, kind):
    engine = Engine(strategy="single", precision=name)
    assert engine.precision.name == kind
    model = small_net()
    model, optimizer = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    losses = run_steps(engine, model, optimizer, 25)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    engine.close()


def test_autocast_runs_the_forward_in_low_precision_on_cpu():
    for name, dtype in (("bf16", torch.bfloat16), ("16-mixed", torch.float16)):
        engine = Engine(strategy="single", precision=name)
        model = engine.setup(torch.nn.Linear(4, 2))
        with engine.autocast():
            assert model(torch.randn(3, 4)).dtype == dtype
        assert model.weight.dtype == torch.float32
        engine.close()


def test_o2_keeps_fp32_master_weights_while_the_model_runs_in_half():
    engine = Engine(strategy="single", precision="O2")
    model = small_net()
    initial = model[4].weight.detach().clone()
    model, optimizer = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    assert model[0].weight.dtype == model[4].weight.dtype == torch.float16
    assert model[1].weight.dtype == torch.float32  # BatchNorm stays fp32
    masters = engine.precision.masters
    assert torch.equal(masters[model[4].weight], initial)  # exact fp32 copy, not a rounded one
    x, y = batch()
    assert model(x).dtype == torch.float32  # outputs cast back for the loss
    run_steps(engine, model, optimizer, 3)
    assert all(m.dtype == torch.float32 for m in masters.values())
    assert optimizer.state[model[4].weight]["momentum_buffer"].dtype == torch.float32
    master = masters[model[4].weight]
    assert torch.equal(model[4].weight, master.half())  # the model holds the rounded masters
    assert not torch.equal(master, master.half().float())  # and the masters hold more than fp16
    engine.close()


def test_o3_is_pure_half():
    engine = Engine(strategy="single", precision="O3")
    model = small_net()
    model, optimizer = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    run_steps(engine, model, optimizer, 2)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert optimizer.state[model[4].weight]["momentum_buffer"].dtype == torch.float16
    engine.close()


@pytest.mark.parametrize("name", ["16-mixed", "O2"])
def test_fp16_scaler_skips_a_step_with_an_injected_inf(name):
    engine = Engine(strategy="single", precision=name)
    model = small_net()
    model, optimizer = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.05))
    run_steps(engine, model, optimizer, 2)
    skipped_before, weights = engine.precision.skipped_steps, model[4].weight.detach().clone()
    scale_before = engine.precision.state_dict().get("scale") or engine.precision.scaler.get_scale()
    x, y = batch()
    with engine.autocast():
        loss = F.cross_entropy(model(x), y) * float("inf")
    engine.backward(loss)
    assert engine.step(optimizer) is False
    assert engine.precision.skipped_steps == skipped_before + 1
    assert torch.equal(model[4].weight, weights)
    scale_after = engine.precision.state_dict().get("scale") or engine.precision.scaler.get_scale()
    assert scale_after == scale_before / 2
    assert all(p.grad is None for p in model.parameters())
    run_steps(engine, model, optimizer, 1)
    assert not torch.equal(model[4].weight, weights)  # training goes on
    engine.close()


def test_scaler_state_and_master_weights_round_trip(tmp_path):
    engine = Engine(strategy="single", precision="O2")
    model = small_net()
    model, optimizer = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    run_steps(engine, model, optimizer, 3)
    engine.precision.scale = 1024.0
    engine.save(tmp_path / "o2.pt", model=model, optimizer=optimizer)
    saved = torch.load(tmp_path / "o2.pt", weights_only=True)
    assert saved["model"]["4.weight"].dtype == torch.float32  # the masters, not the fp16 copies
    assert torch.equal(saved["model"]["4.weight"], engine.precision.masters[model[4].weight])
    assert saved["precision"]["scale"] == 1024.0

    again = Engine(strategy="single", precision="O2")
    fresh = small_net()
    fresh, fresh_opt = again.setup(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9))
    again.load(tmp_path / "o2.pt", model=fresh, optimizer=fresh_opt)
    assert again.precision.scale == 1024.0
    assert torch.equal(again.precision.masters[fresh[4].weight], saved["model"]["4.weight"])
    assert run_steps(again, fresh, fresh_opt, 2) == run_steps(engine, model, optimizer, 2)

    fp32 = Engine(strategy="single")
    plain = small_net()
    fp32.load(tmp_path / "o2.pt", model=plain)  # an O2 checkpoint loads into an fp32 model
    assert plain[4].weight.dtype == torch.float32
    assert torch.equal(plain[4].weight, saved["model"]["4.weight"])


def test_fp16_scaler_state_round_trip(tmp_path):
    engine = Engine(strategy="single", precision="16-mixed")
    model = small_net()
    model, optimizer = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.05))
    run_steps(engine, model, optimizer, 2)
    engine.precision.scaler.update(new_scale=512.0)
    engine.save(tmp_path / "fp16.pt", model=model, optimizer=optimizer)
    again = Engine(strategy="single", precision="16-mixed")
    fresh = again.setup(small_net())
    again.load(tmp_path / "fp16.pt", model=fresh)
    assert again.precision.scaler.get_scale() == 512.0


def test_precision_names_and_apex():
    assert isinstance(build_precision("bf16"), AutocastPrecision)
    assert isinstance(build_precision("O2"), HalfModelPrecision)
    with pytest.raises(UsageError, match=r"Unknown precision 'fp64'.*Available"):
        build_precision("fp64")
    with pytest.raises(UsageError, match="apex.amp, which is not importable.*removed amp upstream in 2025"):
        build_precision("O2", amp_backend="apex")
    with pytest.raises(UsageError, match="Unknown amp backend 'cuda'"):
        build_precision("O1", amp_backend="cuda")


RANK_SEEDED_O2 = """
import sys
import torch
import trainfleet

engine = trainfleet.Engine()
torch.manual_seed(100 + engine.rank)  # every rank starts from weights of its own
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = engine.setup(model, optimizer)
x, y = torch.randn(4, 6, generator=torch.Generator().manual_seed(engine.rank)), torch.tensor([0, 1, 2, 0])
engine.backward(torch.nn.functional.cross_entropy(model(x.half()).float(), y))
engine.step(optimizer)
weights = [p.detach().float() for p in engine.unwrap(model).parameters()]
masters = list(engine.precision.masters.values())
torch.save({"weights": weights, "masters": masters}, sys.argv[1] + f"/rank{engine.rank}.pt")
"""


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("horovod", marks=pytest.mark.horovod)])
def test_o2_masters_are_rank_zeros_after_the_wrap(launch, tmp_path, strategy):
    # DDP and Horovod copy rank 0's weights to every rank when they wrap the model; O2's fp32
    # masters, taken before, must follow, or the first step puts each rank's own start back.
    script = tmp_path / "train.py"
    script.write_text(RANK_SEEDED_O2)
    result = launch("--gpus", "2", "--cpu", "--strategy", strategy, "--precision", "O2", str(script), str(tmp_path))
    assert result.returncode == 0, result.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for a, b in zip(ranks[0]["weights"] + ranks[0]["masters"], ranks[1]["weights"] + ranks[1]["masters"]):
        assert torch.equal(a, b)


def test_dp_replicas_compute_in_the_precision_dtype():
    # DataParallel's replica threads enter autocast with the device's default dtype; run like
    # one (a fresh thread, autocast on without a dtype: bf16 on CPU) with fp16 asked for.
    import threading

    from trainfleet.engine.dp import AutocastInReplicas

    wrapped = AutocastInReplicas(torch.nn.Linear(4, 2), torch.float16)
    seen = {}

    def replica():
        with torch.amp.autocast("cpu", enabled=True):
            seen["autocast"] = wrapped(torch.ones(3, 4)).dtype
        seen["plain"] = wrapped(torch.ones(3, 4)).dtype  # autocast off: left alone

    thread = threading.Thread(target=replica)
    thread.start()
    thread.join()
    assert seen == {"autocast": torch.float16, "plain": torch.float32}
    assert Engine(strategy="single").unwrap(wrapped) is wrapped.module
