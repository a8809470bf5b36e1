"""``trainfleet``: every command under one name (``launch`` is also its own console script)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from trainfleet.cli.bench import add_bench_command
from trainfleet.cli.ckpt import add_ckpt_commands
from trainfleet.cli.common import OneLineParser, guarded
from trainfleet.cli.doctor import add_doctor_command
from trainfleet.cli.jobs import add_job_commands
from trainfleet.cli.launch import run_launch
from trainfleet.cli.launch_args import add_cluster_arguments, add_launch_arguments, attach_dash_values
from trainfleet.cli.registries import add_registry_commands
from trainfleet.cli.train import add_train_command
from trainfleet.cli.train import main as train_main


def build_parser() -> argparse.ArgumentParser:
    """``trainfleet`` with its subcommands."""
    parser = OneLineParser(prog="trainfleet", description="Run PyTorch training from a laptop to many nodes.")
    parser.add_argument("--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    launch_parser = sub.add_parser("launch", help="start workers for a training script")
    add_launch_arguments(launch_parser)
    add_cluster_arguments(launch_parser)
    launch_parser.set_defaults(func=lambda ns: run_launch(ns, ns.raw_argv))
    add_train_command(sub)
    add_ckpt_commands(sub)
    add_bench_command(sub)
    add_job_commands(sub)
    add_doctor_command(sub)
    add_registry_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``trainfleet``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the recipe parses its own options
        return train_main(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(attach_dash_values(argv) if argv[:1] == ["launch"] else argv)
    ns.raw_argv = argv[1:] if argv[:1] == ["launch"] else []
    if ns.version:
        from trainfleet import __version__

        print(f"trainfleet {__version__}")
        return 0
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    return guarded(lambda: ns.func(ns))
