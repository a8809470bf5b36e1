"""An asynchronous save copies an optimizer's parameters and state on its writer thread, during
the next forward and backward; the optimizer's next step waits for those copies (AsyncSaver's
``later``; the idea of CheckFreq's pipelined snapshot). What it holds is the step it was called at."""
import threading

import torch
import torch.nn.functional as F

from trainfleet.engine.checkpoint.files import AsyncSaver, storage_address
from trainfleet.engine.engine import Engine


def test_tensors_left_for_later_are_copied_by_the_writer_before_its_job():
    saver = AsyncSaver()
    weight, buffer = torch.ones(1000), torch.full((4,), 7.0)
    saver.stage({"w": weight, "b": buffer})  # the buffers now exist and hold 1s and 7s
    weight.fill_(2.0)
    buffer.fill_(8.0)
    staged = saver.stage({"w": weight, "b": buffer}, later={storage_address(weight)})
    assert staged["b"].eq(8.0).all()  # copied at once
    assert staged["w"].eq(1.0).all()  # not yet: the writer copies it
    seen: list[torch.Tensor] = []
    gate = threading.Event()

    def job():
        gate.wait(10)
        seen.append(staged["w"].clone())

    saver.submit(job)
    assert saver.wait_staged() >= 0.0 and staged["w"].eq(2.0).all()  # the copies land before the job runs
    weight.fill_(3.0)  # what an optimizer step does once wait_staged returned: not in this save
    gate.set()
    saver.wait()
    assert seen[0].eq(2.0).all()
    saver.close()


def _train(engine, model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 32, generator=generator), torch.randint(0, 4, (16,), generator=generator)
        engine.backward(F.cross_entropy(model(x), y))
        engine.step(optimizer)


def test_an_asynchronous_save_followed_by_steps_holds_the_step_it_was_called_at(tmp_path):
    """Adam's parameters, moments and step counters are written by each step right after the save
    returns; the file equals a synchronous save of the same step, and the steps after it moved on."""
    engine = Engine(strategy="single")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    model, optimizer = engine.setup(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    _train(engine, model, optimizer, 3, seed=1)
    engine.save(tmp_path / "sync.pt", model=model, optimizer=optimizer, step=3)
    engine.save(tmp_path / "async.pt", model=model, optimizer=optimizer, step=3, asynchronous=True)
    # (the parameters and Adam's moments were left to the writer: the steps below wait for its copies)
    assert {storage_address(p) for p in model.parameters()} <= engine._written_by_steps(optimizer)
    _train(engine, model, optimizer, 2, seed=2)
    engine.wait_for_checkpoint()
    sync, written = (torch.load(tmp_path / name, weights_only=True) for name in ("sync.pt", "async.pt"))
    for name, value in sync["model"].items():
        assert torch.equal(written["model"][name], value), name
        assert not torch.equal(model.state_dict()[name], value), name  # training did move on
    for key, state in sync["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(written["optimizer"]["state"][key][field], value), (key, field)
    engine.close()
