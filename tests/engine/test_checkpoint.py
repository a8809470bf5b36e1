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
