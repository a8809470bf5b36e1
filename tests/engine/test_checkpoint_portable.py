"""Checkpoints made the way other code makes them; crashes during saves; keep-last, async, CLI."""
import json
import random
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import trainfleet
from tests.conftest import SCRIPTS, run_cli
from trainfleet.engine.engine import Engine
from trainfleet.utils.errors import UsageError


class Net(torch.nn.Module):
    def __init__(self, hidden=3):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(4, hidden), torch.nn.Linear(hidden, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def reference():
    torch.manual_seed(0)
    return Net()


def assert_same_weights(model, ref):
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key].cpu(), value), key


def test_dataparallel_state_dict_saved_on_cuda3(tmp_path, monkeypatch):
    ref = reference()
    state = torch.nn.DataParallel(ref).state_dict()
    # Tag every storage as living on cuda:3, as a 4-GPU box writes it.
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:3")
    torch.save(state, tmp_path / "dp_cuda3.pt")
    monkeypatch.undo()
    with zipfile.ZipFile(tmp_path / "dp_cuda3.pt") as archive:  # the file really says cuda:3
        assert b"cuda:3" in archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    with pytest.raises(RuntimeError, match="CUDA"):  # what plain torch.load does here
        torch.load(tmp_path / "dp_cuda3.pt", weights_only=True)
    loaded = trainfleet.load_state_dict(tmp_path / "dp_cuda3.pt")
    assert set(loaded) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert all(t.device.type == "cpu" for t in loaded.values())
    model = Net()
    Engine(strategy="single").load(tmp_path / "dp_cuda3.pt", model=model)
    assert_same_weights(model, ref)


def test_training_dict_with_module_prefix(tmp_path):
    ref = reference()
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.1)
    wrapped = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": wrapped, "optimizer": optimizer.state_dict(), "epoch": 7}, tmp_path / "c.pt")
    model = Net()
    engine = Engine(strategy="single")
    assert engine.load(tmp_path / "c.pt", model=engine.setup(model)) == {}
    assert_same_weights(model, ref)


def test_compiled_model_state_dict(tmp_path):
    ref = reference()
    torch.save(torch.compile(ref).state_dict(), tmp_path / "compiled.pt")  # keys carry _orig_mod.
    assert all(k.startswith("_orig_mod.") for k in torch.load(tmp_path / "compiled.pt", weights_only=True))
    model = Net()
    Engine(strategy="single").load(tmp_path / "compiled.pt", model=model)
    assert_same_weights(model, ref)


def test_whole_pickled_model_refused_then_trusted(tmp_path):
    whole = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    torch.save(whole, tmp_path / "whole.pt")
    result = run_cli("trainfleet", "ckpt", "inspect", str(tmp_path / "whole.pt"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not a weights-only checkpoint" in result.stderr and "--trust-pickle" in result.stderr
    result = run_cli("trainfleet", "ckpt", "convert", "--trust-pickle", str(tmp_path / "whole.pt"),
                     str(tmp_path / "ok.pt"))
    assert result.returncode == 0, result.stderr
    converted = torch.load(tmp_path / "ok.pt", weights_only=True)
    assert torch.equal(converted["model"]["0.weight"], whole[0].weight.detach())


def test_trusted_pickle_of_a_class_not_importable_is_one_line(tmp_path):
    torch.save(reference(), tmp_path / "net.pt")  # Net lives in this test module
    result = run_cli("trainfleet", "ckpt", "inspect", "--trust-pickle", str(tmp_path / "net.pt"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot unpickle" in result.stderr and "No module named 'tests'" in result.stderr


def test_bit_flip_is_caught_by_the_crc(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"w": torch.randn(10_000)}, path)  # 40 kB of tensor data fills the middle of the file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["w"].shape == (10_000,)  # plain torch.load does not notice
    with pytest.raises(UsageError, match=r"c.pt' is corrupt: record '.*/data/0' fails its CRC32 check"):
        trainfleet.load_state_dict(path)


def test_checkpoint_of_another_model(tmp_path):
    engine = Engine(strategy="single")
    engine.save(tmp_path / "c.pt", model=reference())
    with pytest.raises(UsageError, match=r"c.pt' does not match Net: mismatched: fc1.bias, fc1.weight, fc2.weight"):
        engine.load(tmp_path / "c.pt", model=Net(hidden=5))


def test_keep_last_and_latest_pointer(tmp_path):
    engine = Engine(strategy="single")
    model = reference()
    for step in range(1, 5):
        engine.save(tmp_path / f"step-{step}.pt", model=model, keep_last=2, step=step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-3.pt", "step-4.pt"]
    assert json.loads((tmp_path / "latest.json").read_text())["latest"] == "step-4.pt"
    assert engine.load(tmp_path, model=Net()) == {"step": 4}


def test_async_save_copies_before_returning(tmp_path):
    engine = Engine(strategy="single")
    model = torch.nn.Linear(512, 512)
    with torch.no_grad():
        model.weight.fill_(1.0)
    engine.save(tmp_path / "a.pt", model=model, asynchronous=True, step=1)
    with torch.no_grad():
        model.weight.fill_(2.0)  # training goes on while the file is written
    engine.wait_for_checkpoint()
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    assert saved["model"]["weight"].eq(1.0).all() and saved["extra"] == {"step": 1}
    engine.close()


def test_inspect_and_convert_cli(tmp_path):
    ref = reference()
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "f.pt")
    result = run_cli("trainfleet", "ckpt", "convert", str(tmp_path / "f.pt"), str(tmp_path / "tf.pt"))
    assert result.returncode == 0, result.stderr
    result = run_cli("trainfleet", "ckpt", "inspect", str(tmp_path / "tf.pt"))
    assert result.returncode == 0, result.stderr
    assert "format:     trainfleet v1" in result.stdout and "fc1.weight" in result.stdout and "3x4" in result.stdout
    result = run_cli("trainfleet", "ckpt", "convert", "--to-state-dict", str(tmp_path / "tf.pt"), str(tmp_path / "sd.pt"))
    assert result.returncode == 0
    plain = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert set(plain) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def _check_folder(folder):
    latest = json.loads((folder / "latest.json").read_text())
    for name in latest["checkpoints"]:
        payload = torch.load(folder / name, weights_only=True)  # every recorded checkpoint is whole
        assert payload["model"]["weight"].eq(payload["extra"]["step"]).all()
    same = trainfleet.load_state_dict(folder / "same.pt")
    assert same["weight"].eq(same["weight"].flatten()[0]).all()
    return int(latest["latest"].split("-")[1].split(".")[0])


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    rng = random.Random(1234)
    last = 0
    for trial in range(6):
        process = subprocess.Popen([sys.executable, str(SCRIPTS / "save_loop.py"), str(tmp_path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            progress = tmp_path / "progress"
            if progress.exists() and progress.read_text() and int(progress.read_text()) >= 1:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # land somewhere inside a save
        process.send_signal(signal.SIGKILL)
        process.wait()
        last = _check_folder(tmp_path)
        assert last >= 1
    # The next save in the folder removes temporaries a killed saver left behind.
    Engine(strategy="single").save(tmp_path / "after.pt", model=torch.nn.Linear(1, 1))
    assert not list(tmp_path.glob(".*.tmp-*"))
