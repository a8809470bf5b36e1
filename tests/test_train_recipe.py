"""The built-in recipe: registry models and datasets, schedules, evaluation, TensorBoard, --init-from."""
import json

import torch

from tests.filedata import write_cifar10, write_mnist
from trainfleet.launcher.cli import parse_train_args
from trainfleet.train import run


def test_issue_command_resnet18_cifar10_two_workers(launch, tmp_path):
    write_cifar10(tmp_path / "data", per_batch=8, test=8)
    result = launch("--gpus", "2", "-m", "trainfleet.train", "--model", "resnet18", "--dataset", "cifar10",
                    "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--global-batch-size", "8",
                    "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["world_size"] == 2
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert list((tmp_path / "out").glob("events.out.tfevents.*")), "no TensorBoard event file"


def test_mnist_lenet_learns_in_process(tmp_path):
    write_mnist(tmp_path / "data", train=256, test=64)
    cfg = parse_train_args(["--model", "lenet", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                            "--epochs", "8", "--global-batch-size", "32", "--optimizer", "adam", "--lr", "0.003",
                            "--scheduler", "step", "--step-size", "3", "--log-every", "4", "--no-progress",
                            "--output-dir", str(tmp_path / "out"), "--save", str(tmp_path / "final.pt")])
    result = run(cfg)
    losses = [loss for _, loss in result["train_losses"]]
    assert losses[-1] < losses[0] * 0.7
    assert result["test_accuracy"] > 0.5
    saved = torch.load(tmp_path / "final.pt", weights_only=True)
    assert saved["extra"]["step"] == 64 and saved["scheduler"]["last_epoch"] == 64


def test_init_from_reports_keys(tmp_path, capsys):
    from trainfleet.models import build_model

    donor = build_model("lenet", num_classes=4, in_channels=3).state_dict()
    donor = {f"module.{k}": v for k, v in donor.items()}
    donor["module.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": donor, "epoch": 9}, tmp_path / "pretrained.pt")
    cfg = parse_train_args(["--model", "lenet", "--max-steps", "2", "--num-samples", "32", "--no-eval",
                            "--no-progress", "--global-batch-size", "16", "--output-dir", str(tmp_path / "out"),
                            "--init-from", str(tmp_path / "pretrained.pt")])
    run(cfg)
    out = capsys.readouterr().out
    assert "init-from" in out and "8 loaded, 0 missing, 1 unexpected, 2 mismatched" in out
    assert "unexpected: extra.weight" in out and "mismatched: classifier.5.weight" in out


def test_warmup_plateau_and_schedules_run(tmp_path):
    for extra in (["--scheduler", "plateau"], ["--scheduler", "poly", "--warmup-steps", "2"],
                  ["--scheduler", "multistep", "--milestones", "1", "--optimizer", "adamw"],
                  ["--scheduler", "exponential", "--gamma", "0.9"]):
        cfg = parse_train_args(["--model", "mlp", "--epochs", "2", "--num-samples", "32", "--no-progress",
                                "--global-batch-size", "16", "--output-dir", str(tmp_path / extra[1]), *extra])
        assert run(cfg)["steps"] == 4
