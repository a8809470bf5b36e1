"""The Engine API in one process: defaults, collectives as identities, registries."""
import pytest
import torch

import trainfleet
from trainfleet.engine.engine import Engine
from trainfleet.engine.schedules import StepSchedule, build_optimizer, build_scheduler
from trainfleet.engine.strategy import build_strategy
from trainfleet.utils.errors import UsageError


def test_plain_script_gets_single_on_cpu():
    engine = trainfleet.Engine()
    assert (engine.strategy.name, engine.rank, engine.world_size, engine.is_main) == ("single", 0, 1, True)
    assert engine.device == torch.device("cpu")
    engine.close()


def test_collectives_are_identities_in_a_world_of_one():
    engine = Engine(strategy="dp")
    t = torch.tensor([2.0, 4.0])
    assert engine.all_reduce(t, op="mean") is t
    assert engine.all_reduce(3, op="sum").item() == 3
    assert engine.broadcast({"a": 1}) == {"a": 1}
    engine.barrier()
    with pytest.raises(UsageError, match="Unknown reduce op 'avg'"):
        engine.all_reduce(t, op="avg")
    engine.close()


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(UsageError, match=r"Unknown strategy 'dpp'. Available: \['ddp', 'dp', 'fsdp', 'horovod', 'single'\]"):
        build_strategy("dpp")


def test_single_process_strategy_refuses_a_larger_world(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="strategy 'single' runs one process but WORLD_SIZE=2"):
        build_strategy("single")


def test_print_only_on_rank_zero(capsys):
    engine = Engine(strategy="single")
    engine.print("hello")
    assert capsys.readouterr().out == "hello\n"
    engine.close()


def test_seed_makes_init_reproducible():
    Engine(strategy="single", seed=5).close()
    a = torch.nn.Linear(3, 3).weight.clone()
    Engine(strategy="single", seed=5).close()
    assert torch.equal(a, torch.nn.Linear(3, 3).weight)


def test_step_zeroes_gradients():
    engine = Engine(strategy="single")
    model, optimizer = engine.setup(torch.nn.Linear(2, 1), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    param = optimizer.param_groups[0]["params"][0]
    engine.backward((param * 2).sum())
    assert engine.step(optimizer) is True
    assert param.grad is None and param.item() == pytest.approx(0.8)
    engine.close()


def _factors(name, steps=10, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, interval = build_scheduler(name, opt, steps_per_epoch=2, total_steps=steps, **kw)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return seen, interval


def test_schedules():
    assert _factors("none")[0] == [1.0] * 10
    assert _factors("step", step_size=2, gamma=0.5)[0] == [1, 1, 1, 1, .5, .5, .5, .5, .25, .25]
    assert _factors("multistep", milestones=[1, 3], gamma=0.1)[0][:8] == pytest.approx(
        [1, 1, .1, .1, .1, .1, .01, .01])
    assert _factors("exponential", gamma=0.5)[0][:4] == [1, 1, .5, .5]
    cosine = _factors("cosine")[0]
    assert cosine[0] == 1 and cosine[5] == pytest.approx(0.5) and cosine[-1] < 0.03
    assert _factors("poly", power=1.0)[0][5] == pytest.approx(0.5)
    warm = _factors("cosine", warmup_steps=4)[0]
    assert warm[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_schedule_state_is_weights_only_serialisable(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, _ = build_scheduler("cosine", opt, 2, 10, warmup_steps=2)
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["lr_lambdas"][0]["kind"] == "cosine"
    assert StepSchedule("cosine", 2, 10)(10) == pytest.approx(0.0)


def test_plateau_and_bad_schedule_options():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert build_scheduler("plateau", opt, 2, 10)[1] == "epoch"
    with pytest.raises(UsageError, match="cannot be combined"):
        build_scheduler("plateau", opt, 2, 10, warmup_steps=3)
    with pytest.raises(UsageError, match="needs --milestones"):
        build_scheduler("multistep", opt, 2, 10)
    with pytest.raises(UsageError, match="Unknown scheduler 'linear'"):
        build_scheduler("linear", opt, 2, 10)
    for name, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        assert isinstance(build_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], 0.1), cls)
    with pytest.raises(UsageError, match="Unknown optimizer 'lion'"):
        build_optimizer("lion", [], 0.1)
