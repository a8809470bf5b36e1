"""Sharded (DCP) checkpoint folders: layout, atomicity, async, keep-last, damage, unsafe index, convert/inspect.

Resharding across world sizes and strategies through `launch` is in test_resume.py.
"""
import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

import trainfleet
from tests.conftest import run_cli
from trainfleet.engine.checkpoint.tools import read_checkpoint
from trainfleet.engine.engine import Engine
from trainfleet.utils.errors import UsageError


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def trained(engine):
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model, optimizer = engine.setup(model, optimizer)
    for _ in range(2):
        engine.backward(model(torch.randn(4, 6)).pow(2).mean())
        engine.step(optimizer)
    return model, optimizer


@pytest.fixture
def engine():
    engine = Engine(strategy="single", seed=0)
    yield engine
    engine.close()


@pytest.fixture
def saved(engine, tmp_path):
    model, optimizer = trained(engine)
    path = engine.save(tmp_path / "step2", model=model, optimizer=optimizer, sharded=True, step=2)
    return path, model, optimizer


def test_layout_and_exact_round_trip(engine, saved):
    path, model, optimizer = saved
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "trainfleet.pt"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    fresh, fresh_optimizer = net(seed=5), None
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.05)
    assert engine.load(path, model=fresh, optimizer=fresh_optimizer) == {"step": 2}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    saved_state, loaded_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    for index in saved_state:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved_state[index][key], loaded_state[index][key])
    # the sidecar is weights-only and the whole folder reads as one payload
    sidecar = torch.load(path / "trainfleet.pt", weights_only=True)
    assert sidecar["layout"] == "sharded" and sidecar["meta"]["world_size"] == 1
    assert trainfleet.load_state_dict(path).keys() == model.state_dict().keys()


def test_each_rank_writes_its_own_rng_state_and_gets_it_back(engine, tmp_path):
    model = net()
    engine.save(tmp_path / "r", model=model, sharded=True)
    expected = torch.get_rng_state()
    torch.rand(100)  # training moves the generator on
    engine.load(tmp_path / "r", model=model)
    assert torch.equal(torch.get_rng_state(), expected)
    assert torch.load(tmp_path / "r" / "trainfleet.pt", weights_only=True)["rng"] is None  # not gathered
    assert torch.equal(read_checkpoint(tmp_path / "r")["rng"][0]["torch"], expected)


def test_keep_last_deletes_old_folders_and_latest_names_a_whole_one(engine, tmp_path):
    model, optimizer = trained(engine)
    for step in range(1, 5):
        engine.save(tmp_path / f"step{step}", model=model, optimizer=optimizer, sharded=True, keep_last=2, step=step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step3", "step4"]
    assert json.loads((tmp_path / "latest.json").read_text())["latest"] == "step4"
    assert engine.load(tmp_path, model=net()) == {"step": 4}
    assert engine.resume(net(), path=tmp_path) == {"step": 4}


def test_saving_over_a_folder_replaces_it_whole(engine, tmp_path):
    model = net()
    engine.save(tmp_path / "same", model=model, sharded=True, step=1)
    with torch.no_grad():
        model[0].weight.fill_(7.0)
    engine.save(tmp_path / "same", model=model, sharded=True, step=2)
    assert read_checkpoint(tmp_path / "same")["model"]["0.weight"].eq(7.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]


def test_stale_temporary_folder_of_a_dead_writer_is_removed(engine, tmp_path):
    from tests.engine.test_checkpoint_safety import _dead_process_owner

    stale = tmp_path / f".step1.tmp-{_dead_process_owner()}-deadbeef"  # a real process of this host, exited
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    engine.save(tmp_path / "step2", model=net(), sharded=True)
    assert not stale.exists() and (tmp_path / "step2" / ".metadata").is_file()


def test_async_sharded_save_stages_before_returning(engine, tmp_path):
    model = net()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    engine.save(tmp_path / "a", model=model, sharded=True, asynchronous=True, step=1)
    with torch.no_grad():
        model[0].weight.fill_(2.0)  # training goes on while the folder is written
    engine.wait_for_checkpoint()
    assert read_checkpoint(tmp_path / "a")["model"]["0.weight"].eq(1.0).all()


def _one_line_exit_2(path, expected):
    result = run_cli("trainfleet", "ckpt", "inspect", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_missing_shard_is_one_line_naming_the_rank(engine, saved):
    path = saved[0]
    (path / "__0_0.distcp").unlink()
    with pytest.raises(UsageError, match=r"is incomplete: __0_0.distcp \(written by rank 0\) is missing"):
        engine.load(path, model=net())
    _one_line_exit_2(path, "__0_0.distcp (written by rank 0) is missing")


def test_truncated_shard_is_one_line(engine, saved):
    path = saved[0]
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UsageError, match=r"__0_0.distcp \(written by rank 0\) is truncated to 100 bytes"):
        engine.load(path, model=net())
    _one_line_exit_2(path, "is truncated to 100 bytes")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_index_that_pickles_code_is_refused_and_never_runs(engine, saved, tmp_path):
    path = saved[0]
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    (path / ".metadata").write_bytes(pickle.dumps(exploit))
    with pytest.raises(UsageError, match=r"its .metadata pickles posix.system, which could run code"):
        engine.load(path, model=net())
    _one_line_exit_2(path, "which could run code on load")
    assert not marker.exists()


def test_non_tensor_entry_is_refused(engine, tmp_path):
    dcp.save({"model.0.weight": torch.ones(5, 6), "note": {"any": "object"}}, checkpoint_id=str(tmp_path / "f"),
             no_dist=True)
    with pytest.raises(UsageError, match="entry 'note.any' is a pickled object, not a tensor"):
        engine.load(tmp_path / "f", model=net(), strict=False)


def test_foreign_dcp_folder_loads_model_weights(engine, tmp_path):
    ref = net(seed=3)
    dcp.save({"model": ref.state_dict()}, checkpoint_id=str(tmp_path / "foreign"), no_dist=True)  # torch's own way
    model = net()
    assert engine.load(tmp_path / "foreign", model=model) == {}
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_other_model_is_refused_with_the_keys(engine, saved):
    other = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    with pytest.raises(UsageError, match=r"step2' does not match Sequential: mismatched: 0.bias, 0.weight, 2.weight"):
        engine.load(saved[0], model=other)


def test_convert_both_ways_and_inspect(saved, tmp_path):
    path, model, _ = saved
    result = run_cli("trainfleet", "ckpt", "convert", str(path), str(tmp_path / "one.pt"))
    assert result.returncode == 0, result.stderr
    single = torch.load(tmp_path / "one.pt", weights_only=True)
    assert single["extra"] == {"step": 2} and set(single["optimizer"]["state"]) == {"0.weight", "0.bias",
                                                                                     "2.weight", "2.bias"}
    result = run_cli("trainfleet", "ckpt", "convert", "--to", "sharded", str(tmp_path / "one.pt"),
                     str(tmp_path / "again"))
    assert result.returncode == 0, result.stderr
    again = read_checkpoint(tmp_path / "again")
    for key, value in model.state_dict().items():
        assert torch.equal(again["model"][key], value)
    assert torch.equal(again["optimizer"]["state"]["0.weight"]["exp_avg"],
                       single["optimizer"]["state"]["0.weight"]["exp_avg"])
    result = run_cli("trainfleet", "ckpt", "inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "sharded (torch.distributed.checkpoint): 1 shard files from 1 ranks" in result.stdout
    assert "optimizer:  state for 4 parameters" in result.stdout and "0.weight" in result.stdout


def test_async_sharded_save_under_fsdp_is_the_step_it_was_called_at(tmp_path):
    """Two fsdp ranks: the asynchronous folder equals the synchronous one of the same step, tensor for
    tensor and shard for shard, although the optimizer changed the shards while it was written."""
    from tests.conftest import SCRIPTS
    from trainfleet.engine.checkpoint.sharded_load import read_index

    result = run_cli("launch", "--log-dir", str(tmp_path / "logs"), "--strategy", "fsdp", "--gpus", "2",
                     str(SCRIPTS / "async_sharded_save.py"), str(tmp_path), timeout=180)
    assert result.returncode == 0, result.stderr
    sync, later = read_checkpoint(tmp_path / "sync"), read_checkpoint(tmp_path / "later")
    written = read_checkpoint(tmp_path / "async")
    assert written["extra"]["step"] == 2 and later["extra"]["step"] == 5
    for name, value in sync["model"].items():
        assert torch.equal(written["model"][name], value), name
        assert not torch.equal(later["model"][name], value), name  # training did move on
    for key, state in sync["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(written["optimizer"]["state"][key][field], value), (key, field)

    def chunks(folder):
        index = read_index(folder)
        return {key: sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks)
                for key, meta in index.state_dict_metadata.items() if hasattr(meta, "chunks")}

    assert chunks(tmp_path / "async") == chunks(tmp_path / "sync")  # each rank wrote its own shard
    assert any(len(c) == 2 for c in chunks(tmp_path / "sync").values())
