"""Checkpoints the ecosystem writes, made by the real libraries, loaded back safely and equal.

Each format is written by its own library (timm's CheckpointSaver, a Lightning Trainer,
huggingface_hub's save_torch_state_dict, Accelerate's save_state, safetensors); a malicious
pickle inside each container is refused and never runs.
"""
import argparse
import os
import subprocess

import pytest
import torch

import trainfleet
from tests.conftest import BIN
from trainfleet.engine.checkpoint import foreign as formats
from trainfleet.engine.checkpoint.tools import convert_checkpoint, format_inspection, inspect_checkpoint
from trainfleet.utils.errors import UsageError


def same(a, b):
    assert a.keys() == b.keys(), (sorted(a)[:5], sorted(b)[:5])
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


def mlp(width=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def step(model, optimizer):
    loss = model(torch.randn(8, 4)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


class Evil:
    """Pickles as a call to os.system: loading it with full unpickling would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_refused(call, marker, needle="posix.system"):
    with pytest.raises(UsageError, match=needle):
        call()
    assert not marker.exists(), "the pickle ran"


# ----- timm --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    import timm
    from timm.utils import CheckpointSaver, ModelEmaV3

    folder = tmp_path_factory.mktemp("timm")
    model = timm.create_model("resnet10t", num_classes=4, pretrained=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = ModelEmaV3(model, decay=0.5)
    loss = model(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    optimizer.step()
    ema.update(model)
    args = argparse.Namespace(model="resnet10t", lr=0.1, epochs=3)  # what timm's train.py stores
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder))
    saver.save_checkpoint(epoch=2, metric=0.25)
    return folder / "last.pth.tar", model, optimizer, ema


def test_timm_checkpoint_loads_weights_only_with_its_namespace(timm_checkpoint):
    path, model, _, ema = timm_checkpoint
    same(trainfleet.load_state_dict(path, map_location="cpu"), model.state_dict())
    same(trainfleet.load_state_dict(path, map_location="cpu", ema=True), ema.module.state_dict())
    assert not torch.equal(model.state_dict()["fc.weight"], ema.module.state_dict()["fc.weight"])


def test_timm_checkpoint_restores_model_and_optimizer_through_the_engine(timm_checkpoint):
    import timm

    path, model, optimizer, _ = timm_checkpoint
    engine = trainfleet.Engine(strategy="single")
    fresh = timm.create_model("resnet10t", num_classes=4, pretrained=False)
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh, opt = engine.setup(fresh, opt)
    extra = engine.load(path, model=fresh, optimizer=opt)
    same(fresh.state_dict(), model.state_dict())
    saved = optimizer.state_dict()["state"]
    assert all(torch.equal(opt.state_dict()["state"][i]["momentum_buffer"], saved[i]["momentum_buffer"])
               for i in saved)
    assert extra["epoch"] == 2 and extra["args"]["model"] == "resnet10t" and extra["metric"] == 0.25
    engine.close()


def test_a_timm_like_file_with_a_malicious_namespace_is_refused(tmp_path):
    marker = tmp_path / "ran"
    args = argparse.Namespace(model="x", hook=Evil(marker))
    torch.save({"arch": "x", "state_dict": mlp().state_dict(), "args": args, "epoch": 1}, tmp_path / "bad.pth.tar")
    assert_refused(lambda: trainfleet.load_state_dict(tmp_path / "bad.pth.tar"), marker)


# ----- Lightning ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory):
    import lightning as L

    class Net(L.LightningModule):
        def __init__(self, width=8, lr=0.1):
            super().__init__()
            self.save_hyperparameters()
            self.model = mlp(width)

        def training_step(self, batch, _index):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    folder = tmp_path_factory.mktemp("lightning")
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    module = Net()
    trainer = L.Trainer(max_epochs=1, default_root_dir=str(folder), accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(folder / "last.ckpt")
    return folder / "last.ckpt", module, trainer


def test_lightning_checkpoint_loads_into_the_bare_model_prefix_detected(lightning_checkpoint):
    path, module, trainer = lightning_checkpoint
    engine = trainfleet.Engine(strategy="single")
    bare = mlp()
    opt = torch.optim.SGD(bare.parameters(), lr=0.1, momentum=0.9)
    bare, opt = engine.setup(bare, opt)
    extra = engine.load(path, model=bare, optimizer=opt)  # keys are "model.0.weight" ...: "model." found
    same(bare.state_dict(), module.model.state_dict())
    saved = trainer.optimizers[0].state_dict()["state"]
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], saved[0]["momentum_buffer"])
    assert extra["step"] == 4 and extra["hyper_parameters"] == {"width": 8, "lr": 0.1}
    engine.close()


def test_lightning_prefix_by_name(lightning_checkpoint):
    path, module, _ = lightning_checkpoint
    assert "model.0.weight" in trainfleet.load_state_dict(path, map_location="cpu")
    same(trainfleet.load_state_dict(path, map_location="cpu", prefix="model."), module.model.state_dict())
    with pytest.raises(UsageError, match="prefix 'net.': no key of the checkpoint starts with it"):
        trainfleet.load_state_dict(path, prefix="net")


def test_a_lightning_file_with_malicious_hyper_parameters_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": mlp().state_dict(),
                "hyper_parameters": {"width": Evil(marker)}}, tmp_path / "bad.ckpt")
    assert_refused(lambda: trainfleet.load_state_dict(tmp_path / "bad.ckpt"), marker)


# ----- Hugging Face: safetensors, sharded index, pytorch_model.bin -----------------------------
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("shard", ["1KB", "5GB"], ids=["sharded", "single"])
def test_huggingface_folders_load(tmp_path, safe, shard):
    from huggingface_hub import save_torch_state_dict

    state = mlp(64).state_dict()
    save_torch_state_dict(state, tmp_path, max_shard_size=shard, safe_serialization=safe)
    index = [p for p in tmp_path.iterdir() if p.name.endswith(".index.json")]
    assert bool(index) == (shard == "1KB")
    same(trainfleet.load_state_dict(tmp_path, map_location="cpu"), state)
    if index:
        same(trainfleet.load_state_dict(index[0], map_location="cpu"), state)


def test_a_missing_shard_and_a_malicious_bin_shard_are_refused(tmp_path):
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(mlp(64).state_dict(), tmp_path, max_shard_size="1KB", safe_serialization=False)
    shards = sorted(tmp_path.glob("pytorch_model-*.bin"))
    marker = tmp_path / "ran"
    torch.save({"0.weight": Evil(marker)}, shards[0])
    assert_refused(lambda: trainfleet.load_state_dict(tmp_path), marker)
    shards[1].unlink()
    with pytest.raises(UsageError, match="names shards the folder lacks"):
        trainfleet.load_state_dict(tmp_path)


def test_a_truncated_safetensors_file_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file(mlp().state_dict(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        trainfleet.load_state_dict(tmp_path / "model.safetensors")


# ----- Accelerate ---------------------------------------------------------------------------
def test_accelerate_save_state_folder_restores_model_optimizer_scheduler(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step(model, optimizer)
    scheduler.step()
    accelerator.save_state(str(tmp_path / "state"))
    marker = tmp_path / "ran"
    with open(tmp_path / "state" / "random_states_0.pkl", "wb") as handle:  # a plain pickle: never read
        import pickle

        pickle.dump(Evil(marker), handle)

    engine = trainfleet.Engine(strategy="single")
    fresh = mlp(8)
    opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    fresh, opt = engine.setup(fresh, opt)
    extra = engine.load(tmp_path / "state", model=fresh, optimizer=opt, scheduler=sched)
    same(fresh.state_dict(), accelerator.unwrap_model(model).state_dict())
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert sched.state_dict()["last_epoch"] == 1 and extra["not_read"] == ["random_states_0.pkl"]
    assert not marker.exists()
    engine.close()


def test_a_malicious_accelerate_optimizer_is_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "state").mkdir()
    save_file(mlp().state_dict(), tmp_path / "state" / "model.safetensors")
    marker = tmp_path / "ran"
    torch.save({"state": {}, "param_groups": [Evil(marker)]}, tmp_path / "state" / "optimizer.bin")
    assert_refused(lambda: trainfleet.load_state_dict(tmp_path / "state"), marker)


# ----- safetensors out ---------------------------------------------------------------------
def test_engine_saves_safetensors_that_hf_tools_read(tmp_path):
    from huggingface_hub import load_torch_model
    from safetensors.torch import load_file

    engine = trainfleet.Engine(strategy="single")
    model = mlp()
    tied = torch.nn.ModuleDict({"a": model, "b": torch.nn.Linear(4, 8)})
    tied["b"].weight = model[0].weight  # shared storage: safetensors refuses it unless copied
    engine.save(tmp_path / "w.safetensors", model=tied, format="safetensors", step=7)
    loaded = load_file(tmp_path / "w.safetensors")
    same(loaded, tied.state_dict())
    target = torch.nn.ModuleDict({"a": mlp(), "b": torch.nn.Linear(4, 8)})
    load_torch_model(target, tmp_path / "w.safetensors")
    same(target.state_dict(), tied.state_dict())
    with pytest.raises(UsageError, match="writes model weights only, but it was given optimizer"):
        engine.save(tmp_path / "x.safetensors", model=tied, optimizer=torch.optim.SGD(tied.parameters(), lr=1),
                    format="safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    engine.close()


def test_convert_to_sharded_safetensors_loads_with_huggingface_hub(tmp_path, lightning_checkpoint):
    from huggingface_hub import load_torch_model

    path, module, _ = lightning_checkpoint
    out = convert_checkpoint(path, tmp_path / "hf", to="safetensors", prefix="model.", max_shard_size=200)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    target = mlp()
    load_torch_model(target, out)
    same(target.state_dict(), module.model.state_dict())
    same(trainfleet.load_state_dict(out, map_location="cpu"), module.model.state_dict())


def test_inspect_names_the_format(tmp_path, timm_checkpoint, lightning_checkpoint):
    from huggingface_hub import save_torch_state_dict

    text = format_inspection(inspect_checkpoint(timm_checkpoint[0]))
    assert "timm training checkpoint" in text and "epoch=2" in text and "args=['epochs', 'lr', 'model']" in text
    text = format_inspection(inspect_checkpoint(lightning_checkpoint[0]))
    assert "PyTorch Lightning checkpoint" in text and "optimizer:  state for 4 parameters" in text
    (tmp_path / "hf").mkdir()
    save_torch_state_dict(mlp(64).state_dict(), tmp_path / "hf", max_shard_size="1KB")
    text = format_inspection(inspect_checkpoint(tmp_path / "hf"))
    assert "sharded Hugging Face weights (index + shards)" in text and "model:      4 tensors, 450 values" in text


def test_cli_convert_and_its_bad_input(tmp_path, lightning_checkpoint):
    path = lightning_checkpoint[0]
    run = lambda *args: subprocess.run([str(BIN / "trainfleet"), "ckpt", "convert", *args], capture_output=True,
                                       text=True, timeout=120)
    result = run(str(path), str(tmp_path / "m.safetensors"), "--to", "safetensors", "--prefix", "model.")
    assert result.returncode == 0 and "(safetensors)" in result.stdout, result.stderr
    same(formats.read_safetensors(tmp_path / "m.safetensors"), lightning_checkpoint[1].model.state_dict())
    for args, needle in ((["--to", "safetensors", "--max-shard-size", "lots"], "--max-shard-size 'lots'"),
                         (["--max-shard-size", "1MB"], "applies to --to safetensors")):
        result = run(str(path), str(tmp_path / "bad"), *args)
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("64KiB", 65536),
                                        ("1048576", 1048576), ("1.5 GB", 1_500_000_000)])
def test_parse_size(text, size):
    assert formats.parse_size(text) == size


def test_recipe_init_from_safetensors(tmp_path, capsys):
    from trainfleet.cli.train import parse_train_args
    from trainfleet.models import build_model
    from trainfleet.train import run

    formats.save_safetensors(build_model("lenet", num_classes=10, in_channels=3).state_dict(),
                             tmp_path / "w.safetensors")
    run(parse_train_args(["--model", "lenet", "--max-steps", "1", "--num-samples", "16", "--no-eval",
                          "--no-progress", "--global-batch-size", "16", "--output-dir", str(tmp_path / "out"),
                          "--init-from", str(tmp_path / "w.safetensors")]))
    assert "10 loaded, 0 missing, 0 unexpected, 0 mismatched" in capsys.readouterr().out
