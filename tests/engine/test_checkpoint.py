"""Checkpoint files: atomic writes, weights-only loading, wrapper prefixes, key reports."""
import os

import pytest
import torch

from trainfleet.engine import checkpoint as ckpt
from trainfleet.engine.engine import Engine
from trainfleet.utils.errors import UsageError


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "c.pt"
    ckpt.save_atomic({"a": torch.ones(2)}, target)
    ckpt.save_atomic({"a": torch.zeros(2)}, target)
    assert torch.load(target, weights_only=True)["a"].sum() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_failed_save_keeps_the_previous_file(tmp_path):
    target = tmp_path / "c.pt"
    ckpt.save_atomic({"a": torch.ones(2)}, target)
    with pytest.raises(Exception):
        ckpt.save_atomic({"bad": lambda: None}, target)  # cannot be pickled
    assert torch.load(target, weights_only=True)["a"].sum() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_whole_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(small_model(), path)
    with pytest.raises(UsageError, match="not a weights-only checkpoint.*torch.nn.modules.container.Sequential.*trust=True"):
        ckpt.load_file(path)
    assert isinstance(ckpt.load_file(path, trust=True), torch.nn.Module)


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(UsageError, match="refusing to load.*posix.system"):
        ckpt.load_file(path)
    assert not marker.exists()


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(small_model().state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UsageError, match=r"t.pt' is truncated or corrupt"):
        ckpt.load_file(path)


def test_prefixes_are_stripped():
    state = {"module._orig_mod.0.weight": 1, "module.2.bias": 2, "enc._orig_mod.w": 3}
    assert ckpt.clean_state_dict(state) == {"0.weight": 1, "2.bias": 2, "enc.w": 3}


def test_foreign_layouts_load(tmp_path):
    model = small_model()
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    for payload in (model.state_dict(), {"state_dict": wrapped, "epoch": 3}, {"model_state_dict": wrapped}):
        state = ckpt.extract_model_state(payload)
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        report = ckpt.apply_model_state(fresh, state)
        assert len(report["loaded"]) == 4
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_wrong_model_is_a_clear_error_and_non_strict_reports():
    state = small_model().state_dict()
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2), torch.nn.Linear(2, 2))
    with pytest.raises(UsageError, match="does not match Sequential.*missing: 3.bias, 3.weight.*mismatched"):
        ckpt.apply_model_state(other, state, strict=True)
    report = ckpt.apply_model_state(other, state, strict=False)
    assert report["mismatched"] == ["0.bias", "0.weight", "2.weight"]
    assert report["loaded"] == ["2.bias"] and report["missing"] == ["3.bias", "3.weight"]


def test_engine_round_trip_unwrapped_on_cpu(tmp_path):
    engine = Engine(strategy="single")
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = engine.setup(model, optimizer)
    model(torch.randn(2, 4)).sum().backward()
    engine.step(optimizer)
    engine.save(tmp_path / "c.pt", model=torch.nn.DataParallel(model), optimizer=optimizer, epoch=4, note="x")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format"] == "trainfleet" and not any(k.startswith("module.") for k in raw["model"])
    assert all(t.device.type == "cpu" for t in raw["model"].values())
    fresh = small_model()
    fresh_opt = torch.optim.Adam(fresh.parameters())
    extra = engine.load(tmp_path / "c.pt", model=fresh, optimizer=fresh_opt)
    assert extra == {"epoch": 4, "note": "x"}
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    engine.close()


def test_cuda_generator_states_follow_the_rank_not_the_device_index():
    from trainfleet.engine.checkpoint.training_state import cuda_states_for

    gens = [torch.full((4,), float(i)) for i in range(8)]  # stand-ins for 8 GPUs' generator states
    # rank 3 of an 8-GPU node computed on cuda:3 (all 8 visible); resumed with CUDA_VISIBLE_DEVICES
    # masking it to one GPU, its state goes to cuda:0, not index 0's state to cuda:0
    saved = {"cuda": gens, "cuda_own": gens[3], "cuda_every_gpu": False}
    restored = cuda_states_for(saved, torch.device("cuda", 0), count=1)
    assert list(restored) == [0] and torch.equal(restored[0], gens[3])
    assert torch.equal(cuda_states_for(saved, torch.device("cuda", 1), count=2)[1], gens[3])
    # dp drove every GPU: each gets its own back when as many are visible, else the first's goes to cuda:0
    dp = {"cuda": gens[:2], "cuda_own": gens[0], "cuda_every_gpu": True}
    assert {i: int(t[0]) for i, t in cuda_states_for(dp, torch.device("cuda", 0), count=2).items()} == {0: 0, 1: 1}
    assert {i: int(t[0]) for i, t in cuda_states_for(dp, torch.device("cuda", 0), count=4).items()} == {0: 0}
    # a CPU resume of a GPU checkpoint touches no GPU; an older checkpoint restores by index, as it was written
    assert cuda_states_for(saved, torch.device("cpu"), count=0) == {}
    assert list(cuda_states_for({"cuda": gens}, torch.device("cuda", 0), count=2)) == [0, 1]


def test_async_staging_keeps_one_copy_of_the_last_state():
    saver = ckpt.AsyncSaver()
    first = saver.stage({"model": {"w": torch.ones(3, 4), "b": torch.zeros(4)}, "optimizer": {}})
    reused = saver.stage({"model": {"w": torch.full((3, 4), 2.0), "b": torch.ones(4)}, "optimizer": {}})
    assert reused["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # the same buffer, refilled
    assert torch.equal(reused["model"]["w"], torch.full((3, 4), 2.0))
    # the model grew a layer and lost one: the old buffer is freed, not kept for the engine's life
    saver.stage({"model": {"w": torch.ones(5, 4), "extra": torch.ones(2)}, "optimizer": {}})
    assert sorted((key[0], key[1]) for key in saver._buffers) == [(("model", "extra"), (2,)), (("model", "w"), (5, 4))]
    saver.close()
    assert not saver._buffers
