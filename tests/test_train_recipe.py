"""The built-in recipe: registry models and datasets, schedules, evaluation, TensorBoard, --init-from."""
import json

import torch

from tests.filedata import write_cifar10, write_mnist
from trainfleet.cli.train import parse_train_args
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


def test_a_stopped_recipe_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGUSR2 (what SLURM sends before preemption) mid-run: every rank stops at the same
    step and saves; the next run resumes from TRAINFLEET_CHECKPOINT_DIR and ends equal."""
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import BIN, REPO

    def command(out):
        return [str(BIN / "launch"), "--gpus", "2", "--log-dir", str(tmp_path / "logs" / out.name), "-m",
                "trainfleet.train", "--model", "lenet", "--num-samples", "256", "--epochs", "40", "--no-eval",
                "--global-batch-size", "16", "--log-every", "1", "--no-progress", "--output-dir", str(out)]

    env = {**os.environ, "TRAINFLEET_CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    first = subprocess.Popen(command(tmp_path / "a"), cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    events = tmp_path / "a"
    deadline = time.monotonic() + 60
    while not list(events.glob("events.out.tfevents.*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # some steps in
    first.send_signal(signal.SIGUSR2)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0 and "stopped at step" in out, out
    assert not (tmp_path / "a" / "metrics.json").exists()
    resumed = subprocess.run(command(tmp_path / "a"), cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr
    plain = subprocess.run(command(tmp_path / "b"), cwd=REPO, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["train_losses"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["train_losses"]
    assert len(a) == len(b) == 640
    assert max(abs(x[1] - y[1]) for x, y in zip(a, b)) < 1e-5
