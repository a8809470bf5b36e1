"""The built-in recipe's options: ``python -m trainfleet.train`` and ``trainfleet train``."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from trainfleet.cli.common import OneLineParser
from trainfleet.train.recipe import TrainConfig
from trainfleet.utils.errors import UsageError


def build_train_parser() -> argparse.ArgumentParser:
    """Options of the built-in recipe ``python -m trainfleet.train``."""
    d = TrainConfig.__dataclass_fields__
    parser = OneLineParser(prog="python -m trainfleet.train",
                           description="Train a registry model on a registry dataset.")
    add = parser.add_argument
    add("--model", default=d["model"].default, help="a name from `trainfleet models` (default resnet18)")
    add("--dataset", default=d["dataset"].default, help="synthetic, mnist, cifar10 or imagefolder")
    add("--data-dir", help="where the dataset's files are (default ./data)")
    add("--download", action="store_true", help="let torchvision download a missing dataset")
    add("--num-samples", type=int, default=d["num_samples"].default, help="synthetic dataset size")
    add("--image-size", type=int, help="imagefolder crop size")
    add("--epochs", type=int, default=d["epochs"].default)
    add("--max-steps", type=int, help="stop after this many optimizer steps")
    add("--global-batch-size", "--batch-size", dest="global_batch_size", type=int,
        default=d["global_batch_size"].default, help="samples per step over all workers (default 64)")
    add("--optimizer", default=d["optimizer"].default, help="sgd, adam or adamw")
    add("--lr", type=float, default=d["lr"].default)
    add("--momentum", type=float, default=d["momentum"].default)
    add("--weight-decay", type=float, default=d["weight_decay"].default)
    add("--scheduler", default=d["scheduler"].default,
        help="none, step, multistep, exponential, cosine, plateau or poly (default cosine)")
    add("--warmup-steps", type=int, default=0, help="linear warm-up over this many steps")
    add("--gamma", type=float, default=d["gamma"].default, help="decay factor of step/multistep/exponential/plateau")
    add("--step-size", type=int, default=d["step_size"].default, help="epochs between step decays")
    add("--milestones", type=int, nargs="*", default=[], help="epochs of multistep decays")
    add("--power", type=float, default=d["power"].default, help="exponent of poly decay")
    add("--no-eval", dest="eval", action="store_false", help="skip evaluation on the test split")
    add("--log-every", type=int, default=d["log_every"].default, help="steps between logged losses")
    add("--seed", type=int, default=0)
    add("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    add("--output-dir", help="TensorBoard scalars and metrics.json (default runs/<model>-<dataset>-<time>)")
    add("--save", help="write a checkpoint here at the end")
    add("--init-from", help="load pretrained weights non-strictly from this file")
    add("--resume", help="continue from this checkpoint (or folder's latest); under launch --cluster the "
                         "job's own checkpoints are resumed without it")
    add("--trust-pickle", action="store_true", help="allow --init-from files that need full unpickling")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def parse_train_args(argv: Sequence[str] | None = None):
    """Parse the recipe's options into a validated TrainConfig."""
    return TrainConfig(**vars(build_train_parser().parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``python -m trainfleet.train``; bad options exit 2 with one line."""
    from trainfleet.train.recipe import run

    try:  # not guarded(): a KeyboardInterrupt goes on up, to the worker's report
        run(parse_train_args(argv))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def add_train_command(sub: Any) -> None:
    train_parser = sub.add_parser("train", help="the built-in recipe (python -m trainfleet.train)", add_help=False)
    train_parser.add_argument("train_args", nargs=argparse.REMAINDER)
    train_parser.set_defaults(func=lambda ns: main(ns.train_args))
