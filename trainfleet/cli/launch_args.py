"""The ``launch`` command line, built from the one flag table (:mod:`trainfleet.launcher.flags`),
and the submission flags of ``--cluster``. Shared by ``launch``, ``trainfleet launch`` and
``trainfleet doctor``.

Every flag can also come from the environment as ``TRAINFLEET_<FLAG>`` (``TRAINFLEET_GPUS=4``);
torchrun's spellings are accepted as aliases.
"""
from __future__ import annotations

import argparse
import os

from trainfleet.cli.common import OneLineParser
from trainfleet.engine import contract
from trainfleet.launcher.config import LaunchConfig
from trainfleet.launcher.flags import FLAGS_BY_DEST, LAUNCH_FLAGS, launch_config

# What a submitted job's nodes run: ``python -m trainfleet.cli launch ...``.
CLI_MODULE = "trainfleet.cli"
CLUSTER_VARIABLE = "TRAINFLEET_CLUSTER"  # the user's default for --cluster (a job's own launch drops it)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``launch`` flags (shared by ``launch``, ``trainfleet launch`` and ``trainfleet doctor``)."""
    for flag in LAUNCH_FLAGS:
        options = {"dest": flag.dest, "default": flag.env_default(), "help": flag.help}
        if flag.action is not None:
            options["action"] = flag.action
        if flag.type is not None:
            options["type"] = flag.type
        if flag.metavar is not None:
            options["metavar"] = flag.metavar
        parser.add_argument(*flag.names, **options)
    parser.add_argument("-m", "--module", action="store_true", help="run TARGET as a module, like python -m")
    parser.add_argument("target", nargs="?", help="the training script (or module with -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``launch --cluster slurm|local|debug`` and its resources, arrays and sweeps."""
    group = parser.add_argument_group("submitting (--cluster)")
    add = group.add_argument
    add("--cluster", default=os.environ.get(CLUSTER_VARIABLE),
        help="submit through submitit: slurm, local (same job without SLURM) or debug (in-process)")
    add("--partition", help="SLURM partition (default: the cluster's default)")
    add("--account", help="SLURM account")
    add("--qos", help="SLURM quality of service")
    add("--constraint", help="SLURM node features, e.g. a100")
    add("--exclusive", action="store_true", help="whole nodes")
    add("--cpus-per-task", dest="cpus_per_task", type=int, help="CPUs per node (default: one per worker)")
    add("--mem-gb", dest="mem_gb", type=float, help="memory per node in GB")
    add("--time", type=int, default=60, help="time limit in minutes (default 60)")
    add("--job-name", dest="job_name", help="SLURM job name (default: the script's name)")
    add("--slurm-opt", dest="slurm_opt", action="append", metavar="KEY=VALUE",
        help="any other sbatch option, e.g. mail-type=END (repeatable)")
    add("--array", type=int, metavar="N", help="a job array of N tasks ({index} in the script's arguments)")
    add("--sweep", action="append", metavar="KEY=V1,V2",
        help="one array task per combination (repeatable; cartesian); values go to the script as --KEY V "
             "unless its arguments hold {KEY}")
    add("--array-parallelism", dest="array_parallelism", type=int, metavar="K", help="at most K tasks at once")
    add("--signal", default="USR2", help="early signal before the time limit / on preemption (default USR2)")
    add("--signal-delay", dest="signal_delay", type=int, default=90,
        help="seconds before the time limit that the signal comes (default 90)")
    add("--max-requeues", dest="max_requeues", type=int, default=3,
        help="requeue after preemption or timeout at most this many times (default 3)")
    add("--wait", action="store_true", help="follow rank 0's log until the job ends; exit with its code")
    add("--job-dir", dest="job_dir", default="runs", help="job folders go below it (default ./runs)")


def config_from_args(ns: argparse.Namespace, role: str = "local", **overrides: object) -> LaunchConfig:
    """A validated LaunchConfig from the parsed command line.

    Args:
        role: ``node`` when ``--node-rank`` (or the caller) names this node, see LaunchConfig.
    """
    if role == "local" and ns.node_rank is not None:
        role = "node"
    # the job token is the agents' secret: read here and removed, so no worker inherits it
    overrides.setdefault("job_token", os.environ.pop(contract.JOB_TOKEN, ""))
    return launch_config(vars(ns), target=ns.target, args=ns.args, module=ns.module, role=role, **overrides)


def build_parser(prog: str = "launch") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description="Start a training script on local workers.")
    add_launch_arguments(parser)
    add_cluster_arguments(parser)
    return parser


_SWITCHES = {"-m", "--module", "--exclusive", "--wait", "-h", "--help"}  # flags that take no value


def attach_dash_values(argv: list[str]) -> list[str]:
    """``--ssh-opt -p2222`` as ``--ssh-opt=-p2222``: argparse reads a value that starts with '-'
    as a flag of its own, but ssh options always do. Only before the script (its own arguments
    are left alone)."""
    ssh = set(FLAGS_BY_DEST["ssh_opt"].names)
    switches = _SWITCHES | {name for flag in LAUNCH_FLAGS if flag.action == "store_true" for name in flag.names}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):  # the script: the rest is its own
            return out + argv[i:]
        takes_value = "=" not in arg and arg not in switches and i + 1 < len(argv)
        if takes_value and arg in ssh:
            out.append(f"{arg}={argv[i + 1]}")
        else:
            out.extend(argv[i:i + 2] if takes_value else [arg])
        i += 2 if takes_value else 1
    return out
