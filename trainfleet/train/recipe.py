"""The built-in training recipe: ``python -m trainfleet.train`` (or through ``launch``); its options
are parsed in ``trainfleet/cli/train.py``.

Classification with a model and dataset from the registries, SGD/Adam/AdamW, LR
schedules with warm-up, evaluation accuracy, a tqdm bar and TensorBoard scalars on
rank 0, and ``--init-from`` for pretrained weights. Options: ``--help``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainfleet.engine.contract import JobSettings, WorkerSettings
from trainfleet.utils.errors import UsageError


@dataclass
class TrainConfig:
    """Options of the recipe (see ``python -m trainfleet.train --help``)."""

    model: str = "resnet18"
    dataset: str = "synthetic"
    data_dir: str | None = None
    download: bool = False
    num_samples: int = 2048
    image_size: int | None = None
    epochs: int = 2
    max_steps: int | None = None
    global_batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    warmup_steps: int = 0
    gamma: float = 0.1
    step_size: int = 30
    milestones: list[int] = field(default_factory=list)
    power: float = 1.0
    eval: bool = True
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    output_dir: str | None = None
    save: str | None = None
    init_from: str | None = None
    trust_pickle: bool = False
    resume: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 and not self.max_steps:
            raise UsageError(f"--epochs {self.epochs}: expected at least 1 (or give --max-steps).")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps {self.max_steps}: expected a positive number of steps.")
        if self.global_batch_size < 1:
            raise UsageError(f"--global-batch-size {self.global_batch_size}: expected a positive size.")
        if self.resume and not Path(self.resume).exists():
            raise UsageError(f"--resume {self.resume}: no such checkpoint or folder.",
                             "pass a checkpoint file or a folder with latest.json.")
        job_dir = JobSettings.from_env().job_dir
        if self.output_dir is None and job_dir:  # launch --cluster: the job's folder
            self.output_dir = os.path.join(job_dir, "train")
        if self.output_dir is None:
            self.output_dir = f"runs/{self.model}-{self.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _datasets(cfg: TrainConfig):
    from trainfleet.datasets import build_dataset

    options: dict[str, Any] = {"data_dir": cfg.data_dir}
    if cfg.dataset == "synthetic":
        options.update(num_samples=cfg.num_samples, seed=cfg.seed)
    else:
        options["download"] = cfg.download
    if cfg.dataset == "imagefolder" and cfg.image_size:
        options["image_size"] = cfg.image_size
    train = build_dataset(cfg.dataset, "train", **options)
    if cfg.dataset == "synthetic":
        options["num_samples"] = max(cfg.num_samples // 4, 1)
    test = build_dataset(cfg.dataset, "test", **options) if cfg.eval else None
    return train, test


def init_from(engine, model, path: str, trust: bool) -> dict[str, list[str]]:
    """Load pretrained weights non-strictly and print which keys matched."""
    from trainfleet.engine.checkpoint.keys import apply_model_state, extract_model_state
    from trainfleet.engine.checkpoint.tools import read_checkpoint

    payload = read_checkpoint(path, trust=trust)  # any format: timm, Lightning, safetensors, HF, DCP ...
    report = apply_model_state(model, extract_model_state(payload, path), strict=False, path=path)
    engine.print(f"init-from {path}: " + ", ".join(f"{len(v)} {k}" for k, v in report.items()))
    for kind in ("missing", "unexpected", "mismatched"):
        for key in report[kind]:
            engine.print(f"  {kind}: {key}")
    return report


def evaluate(engine, model, loader) -> dict[str, float]:
    """Loss and accuracy over the whole loader, summed over every rank."""
    import torch
    import torch.nn.functional as F

    module = engine.unwrap(model)  # plain forward: no DDP buffer sync, uneven shards are fine
    module.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)
    with torch.no_grad():
        for x, y in loader:
            with engine.autocast():
                logits = module(x)
            totals[0] += F.cross_entropy(logits.float(), y, reduction="sum").item()
            totals[1] += (logits.argmax(dim=1) == y).sum().item()
            totals[2] += y.numel()
    totals = engine.all_reduce(totals, op="sum")
    module.train()
    count = max(totals[2].item(), 1)
    return {"loss": totals[0].item() / count, "accuracy": totals[1].item() / count}


class _Scalars:
    """TensorBoard scalars on rank 0; other ranks get a no-op."""

    def __init__(self, engine, log_dir: str):
        self.writer = None
        if engine.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RecipeRun:
    """One run of the recipe: built in ``__init__``, then epochs, then :meth:`finish`."""

    def __init__(self, cfg: TrainConfig):
        from trainfleet.datasets import dataset_info
        from trainfleet.engine.engine import Engine
        from trainfleet.engine.schedules import build_optimizer, build_scheduler
        from trainfleet.models import build_model

        self.cfg = cfg
        self.engine = engine = Engine(seed=cfg.seed)
        train_set, test_set = _datasets(cfg)
        info = dataset_info(train_set)
        model = build_model(cfg.model, num_classes=info["num_classes"] or 10, input_shape=info["input_shape"])
        if cfg.init_from:
            init_from(engine, model, cfg.init_from, cfg.trust_pickle)
        optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
        self.model, self.optimizer = engine.setup(model, optimizer)
        self.loader = engine.dataloader(train_set, global_batch_size=cfg.global_batch_size,
                                        num_workers=cfg.num_workers)
        self.test_loader = engine.dataloader(test_set, global_batch_size=cfg.global_batch_size, shuffle=False,
                                             num_workers=cfg.num_workers) if test_set is not None else None
        per_epoch = max(len(self.loader), 1)
        self.total = cfg.max_steps or cfg.epochs * per_epoch
        self.epochs = -(-cfg.max_steps // per_epoch) if cfg.max_steps else cfg.epochs
        self.scheduler, self.interval = build_scheduler(
            cfg.scheduler, self.optimizer, per_epoch, self.total, cfg.warmup_steps, cfg.gamma,
            cfg.step_size, cfg.milestones, cfg.power)
        engine.print(f"training {cfg.model} on {cfg.dataset}: {len(train_set)} samples, world size "
                     f"{engine.world_size} ({engine.strategy.name}, {engine.device}), {self.total} steps")
        self.scalars = _Scalars(engine, cfg.output_dir)
        told = WorkerSettings.from_env().tty
        on_tty = sys.stderr.isatty() if told is None else told
        self.bar = _progress(self.total, engine.is_main and cfg.progress and on_tty)
        self.step, self.epoch, self.losses, self.metrics = 0, 0, [], {}
        self.stopped = False
        self._resume(cfg.resume or JobSettings.from_env().checkpoint_dir)
        self.started = time.perf_counter()

    def _resume(self, where: str | None) -> None:
        """Continue from ``where`` (a checkpoint, or a folder's latest; under ``launch --cluster``
        the job's checkpoint folder, so a requeued job picks up where it was stopped)."""
        if not where:
            return
        state = self.engine.resume(self.model, self.optimizer, self.scheduler, self.loader, path=where)
        self.step, self.epoch = int(state.get("step", 0)), int(state.get("epoch", 0))
        self.losses = [tuple(pair) for pair in state.get("losses", [])]
        self.bar.update(self.step)

    def _stop_here(self) -> None:
        """Every rank agreed to stop (preemption, time limit, Ctrl-C): save where we are."""
        engine = self.engine
        path = engine.save(engine.checkpoint_dir / f"step{self.step}.pt", model=self.model, optimizer=self.optimizer,
                           scheduler=self.scheduler, dataloader=self.loader, keep_last=2, step=self.step,
                           epoch=self.epoch, losses=[list(pair) for pair in self.losses])
        self.stopped = True
        engine.print(f"stopped at step {self.step}/{self.total}: checkpoint {path}; run again to resume")

    def train_epoch(self, epoch: int) -> bool:
        """Train one pass over the loader; True once the step budget is spent."""
        import torch.nn.functional as F

        engine, cfg = self.engine, self.cfg
        self.epoch = epoch
        for x, y in self.loader:
            with engine.autocast():
                loss = F.cross_entropy(self.model(x), y)
            engine.backward(loss)
            engine.step(self.optimizer)
            if self.interval == "step":
                self.scheduler.step()
            self.step += 1
            self.bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == self.total:
                self._log_loss(engine.all_reduce(loss.detach(), op="mean").item())
            if self.step >= self.total:
                return True
            if engine.should_stop():
                self._stop_here()
                return True
        return False

    def _log_loss(self, mean_loss: float) -> None:
        self.losses.append((self.step, mean_loss))
        self.scalars.add("train/loss", mean_loss, self.step)
        self.scalars.add("train/lr", self.optimizer.param_groups[0]["lr"], self.step)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=self.epoch)

    def end_epoch(self) -> None:
        """Evaluate, step an epoch-wise schedule, and print a summary line on rank 0."""
        if self.test_loader is not None:
            self.metrics = evaluate(self.engine, self.model, self.test_loader)
            self.scalars.add("test/loss", self.metrics["loss"], self.step)
            self.scalars.add("test/accuracy", self.metrics["accuracy"], self.step)
            if self.interval == "epoch":
                self.scheduler.step(self.metrics["loss"])
        if self.engine.is_main:
            summary = f"epoch {self.epoch}: step {self.step}/{self.total}"
            if self.losses:
                summary += f", train loss {self.losses[-1][1]:.4f}"
            if self.metrics:
                summary += f", test loss {self.metrics['loss']:.4f}, accuracy {self.metrics['accuracy']:.2%}"
            self.bar.write(summary)

    def finish(self) -> dict[str, Any]:
        """Save, write metrics.json (rank 0), tear down; returns the final metrics."""
        cfg, engine = self.cfg, self.engine
        self.bar.close()
        self.scalars.close()
        result = {"steps": self.step, "epochs": self.epoch + 1, "seconds": time.perf_counter() - self.started,
                  "world_size": engine.world_size, "train_losses": self.losses,
                  **{f"test_{k}": v for k, v in self.metrics.items()}}
        if cfg.save:
            engine.save(cfg.save, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        dataloader=self.loader, step=self.step, epoch=self.epoch)
        if engine.is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "metrics.json").write_text(json.dumps({"config": asdict(cfg), **result}, indent=1))
            final = f"{self.losses[-1][1]:.4f}" if self.losses else "n/a"
            accuracy = f", test accuracy {self.metrics['accuracy']:.2%}" if self.metrics else ""
            print(f"done: {self.step} steps in {result['seconds']:.1f}s, final train loss {final}{accuracy}; "
                  f"TensorBoard: {cfg.output_dir}", flush=True)
        engine.close()
        return result


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc="train", dynamic_ncols=True)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns the final metrics (rank 0 writes them to JSON)."""
    recipe = RecipeRun(cfg)
    for epoch in range(recipe.epoch, recipe.epochs):
        done = recipe.train_epoch(epoch)
        if recipe.stopped:
            recipe.engine.close()
            return {"steps": recipe.step, "stopped": True}
        recipe.end_epoch()
        if done:
            break
    return recipe.finish()
