"""The one table of ``launch`` flags. Everything about a flag is said here once:

- the command line (``cli/launch.py`` builds argparse from :data:`LAUNCH_FLAGS`; argparse
  itself lives only in ``cli/``), with torchrun's spellings as aliases;
- its environment default (``TRAINFLEET_<DEST>``, e.g. ``TRAINFLEET_GPUS=4``);
- how it becomes a :class:`LaunchConfig` field (:func:`launch_config`);
- whether and how it reaches a submitted job's own ``launch`` line (:func:`job_launch_args`,
  derived from the LaunchConfig's fields), or why it does not.

A new flag is one row here; ``tests/launcher/test_flags.py`` fails for a row whose value does
not survive ``launch --cluster``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from trainfleet.engine import contract
from trainfleet.launcher.config import LaunchConfig, parse_nodes

ENV_PREFIX = "TRAINFLEET_"


@dataclass(frozen=True)
class Flag:
    """One ``launch`` flag.

    Attributes:
        dest: the argparse destination, the ``TRAINFLEET_<DEST>`` name and (usually) the
            LaunchConfig field.
        names: the spellings, first the canonical one.
        help: the ``--help`` line.
        type: converts the command line's (or the environment's) text.
        default: the value when neither the command line nor the environment gives one.
        action: ``store_true`` (a switch), ``append`` (repeatable) or None (a value).
        job: how a submitted job receives it: ``"forward"`` (from the LaunchConfig field of the
            same name), ``"derived"`` (computed by :func:`job_launch_args`), or a sentence
            saying why it does not.
        metavar: argparse's placeholder.
    """

    dest: str
    names: tuple[str, ...]
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    action: str | None = None
    job: str = "forward"
    metavar: str | None = None

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    def env_default(self, env: Mapping[str, str] | None = None) -> Any:
        """The default, taken from ``TRAINFLEET_<DEST>`` when set."""
        env = os.environ if env is None else env
        raw = env.get(self.env_name)
        if raw is None:
            return self.default
        if self.action == "store_true":
            return raw.lower() in ("1", "true", "yes", "on")
        if self.action == "append":  # several values: ';'-separated (TRAINFLEET_STRATEGY_OPT=a=1;b=2)
            return [part for part in raw.split(";") if part]
        return self.type(raw) if self.type is not None else raw


NOT_FOR_JOBS_SSH = "--hosts starts nodes over ssh; a submitted job's nodes are SLURM's"
LAUNCH_FLAGS: tuple[Flag, ...] = (
    Flag("nodes", ("--nodes", "--nnodes"), "number of nodes (torchrun --nnodes); MIN:MAX keeps going on the "
         "survivors when nodes are lost, down to MIN, and takes nodes that (re)join up to MAX", default="1",
         job="derived", metavar="N|MIN:MAX"),
    Flag("gpus", ("--gpus", "--nproc-per-node", "--nproc_per_node"), "workers per node; default: every visible "
         "GPU, or 1 CPU worker", type=int, job="derived"),
    Flag("node_rank", ("--node-rank", "--node_rank"), "index of this node (multi-node)", type=int,
         job="each node of a submitted job takes its rank from SLURM"),
    Flag("master_addr", ("--master-addr", "--master_addr"), "rendezvous host (default 127.0.0.1)",
         default="127.0.0.1", job="a submitted job's master is its first node"),
    Flag("master_port", ("--master-port", "--master_port"), "rendezvous port (default: a free port)", type=int,
         job="a submitted job's port derives from its job id"),
    Flag("strategy", ("--strategy",), "single, dp, ddp, fsdp or horovod (default ddp)", default="ddp"),
    Flag("strategy_opt", ("--strategy-opt",), "an option of the strategy, repeatable: e.g. fsdp's wrap=Block, "
         "sharding=hybrid, shard_size=N, reshard_after_forward=false, cpu_offload=true, "
         "activation_checkpointing=true", action="append", job="derived", metavar="KEY=VALUE"),
    Flag("precision", ("--precision",), "32, 16-mixed (fp16), bf16-mixed (bf16), or Apex levels O0-O3 "
         "(default 32)", default="32"),
    Flag("amp_backend", ("--amp-backend",), "native (torch.amp, default) or apex (needs an apex that still "
         "ships apex.amp)", default="native"),
    Flag("cpu", ("--cpu",), "CPU workers even if GPUs exist", action="store_true", default=False),
    Flag("debug", ("--debug",), "run the script in this process (world size 1) so a debugger works",
         action="store_true", default=False, job="--cluster debug runs the job in this process"),
    Flag("log_dir", ("--log-dir", "--log_dir"), "per-rank logs go to LOG_DIR/node<N>/rank<R>.log (default: a "
         "temporary folder)", job="a submitted job's logs go to its folder's logs/"),
    Flag("start_method", ("--start-method",), "fork (default, reuses the launcher's torch import), spawn or "
         "forkserver", default="fork"),
    Flag("grace_period", ("--grace-period",), "seconds a worker stopped by a signal (SIGTERM/SIGINT to the "
         "launcher, a preemption) gets to finish, e.g. save a checkpoint, before SIGKILL (default 30, as "
         "torchrun); workers stopped because another failed get 1 s", type=float, default=30.0),
    Flag("max_restarts", ("--max-restarts", "--max_restarts"), "restart the whole job after a worker failure, "
         "up to this many times (default 0)", type=int, default=0),
    Flag("heartbeat_timeout", ("--heartbeat-timeout",), "seconds without a sign of life before a node, the "
         "master or a frozen worker fails the job (default 2: four missed beats)", type=float, default=2.0),
    Flag("rendezvous_timeout", ("--rendezvous-timeout",), "seconds to wait for every node (default 120)",
         type=float, default=120.0),
    Flag("collective_timeout", ("--collective-timeout",), "seconds before a collective some rank never joins "
         "fails, naming rank and call site (default: torch's, 10 min on NCCL, 30 on gloo)", type=float),
    Flag("hang_timeout", ("--hang-timeout",), "seconds without progress on any rank before the job is called "
         "hung: every rank's stack is taken, the culprit named, and the job fails (default: adapts to the "
         "step time, at least 10; 0 turns it off)", type=float),
    Flag("on_nan", ("--on-nan",), "what a non-finite (NaN/inf) loss on any rank does: report (default: named "
         "by rank, training goes on) or rollback (every rank returns to the last step, held in memory, and "
         "drops that batch exactly; engine scripts)", default="report", metavar="{report,rollback}"),
    Flag("join", ("--join",), "how a node joins a running elastic ddp or fsdp job: in-place (default: its workers take "
         "the newest step's state from their peers' memory while the others keep their processes; the script "
         "calls engine.resume) or restart (every worker checkpoints, stops and restarts with it)",
         default="in-place", metavar="{in-place,restart}"),
    Flag("console", ("--console",), "what the console shows of the workers' output: merged (default: rank 0 as "
         "it prints, every other rank's lines once, with the ranks that printed them, e.g. '[ranks 1,3-7] ...') "
         "or rank0 (rank 0 only); every rank's full log is kept in --log-dir either way", default="merged",
         metavar="{merged,rank0}"),
    Flag("max_rollbacks", ("--max-rollbacks",), "with --on-nan rollback: rollbacks allowed before a non-finite "
         "loss fails the job (default 3)", type=int, default=3),
    Flag("hosts", ("--hosts",), "start one node on each host over ssh (node 0 on the first; here when it is "
         "this machine)", job=NOT_FOR_JOBS_SSH, metavar="A,B[:SLOTS]"),
    Flag("hostfile", ("--hostfile",), "hosts, one 'host slots=N' per line", job=NOT_FOR_JOBS_SSH),
    Flag("ssh_opt", ("--ssh-opt",), "extra ssh options for --hosts, e.g. '-i ~/.ssh/id_cluster -p 2222' "
         "(repeatable)", action="append", job=NOT_FOR_JOBS_SSH, metavar="OPTS"),
    Flag("env", ("--env",), "with --hosts: forward this variable to every host (TRAINFLEET_*, NCCL_*, GLOO_*, "
         "TORCH_*, PYTHONPATH, OMP_NUM_THREADS are forwarded anyway)", action="append", job=NOT_FOR_JOBS_SSH,
         metavar="NAME"),
)
FLAGS_BY_DEST = {flag.dest: flag for flag in LAUNCH_FLAGS}
_CONFIG_FIELDS = {f.name for f in fields(LaunchConfig)}
# Flags whose value is not a LaunchConfig field of the same name (they are turned into one here,
# or belong to --hosts' plan).
_NOT_FIELDS = {"nodes", "strategy_opt", "hosts", "hostfile", "ssh_opt", "env"}


def launch_config(values: Mapping[str, Any], *, target: str | None, args: list[str] = (), module: bool = False,
                  role: str = "local", cuda_devices: int | None = None, **overrides: Any) -> LaunchConfig:
    """A validated LaunchConfig from flag values (``vars()`` of the parsed command line).

    Args:
        role: what this launch is (see :data:`trainfleet.launcher.config.ROLES`).
        overrides: LaunchConfig fields that the caller decided (``nodes``, ``node_rank``, ...).
    """
    kwargs = {dest: values[dest] for dest in FLAGS_BY_DEST if dest not in _NOT_FIELDS and dest in values}
    low, high = parse_nodes(values.get("nodes", "1"))
    kwargs.update(min_nodes=low, nodes=high, strategy_options=contract.strategy_options(values.get("strategy_opt")))
    kwargs.update(overrides)
    unknown = set(kwargs) - _CONFIG_FIELDS
    if unknown:
        raise TypeError(f"launch_config: {sorted(unknown)} are not LaunchConfig fields")
    return LaunchConfig(target=target, args=list(args), module=module, role=role, cuda_devices=cuda_devices,
                        **kwargs)


def job_launch_args(cfg: LaunchConfig, workers: int) -> list[str]:
    """The ``launch`` flags a submitted job runs with, from ``cfg``'s fields and the table.

    Args:
        workers: workers per node (the submission's ``--gpus``, or 1).
    """
    argv = ["--nodes", cfg.nodes_spec, "--gpus", str(workers)]
    for key, value in cfg.strategy_options.items():
        argv += ["--strategy-opt", contract.format_strategy_option(key, value)]
    for flag in LAUNCH_FLAGS:
        if flag.job != "forward":
            continue
        value = getattr(cfg, flag.dest)
        if flag.action == "store_true":
            argv += [flag.names[0]] if value else []
        elif value is not None:
            argv += [flag.names[0], str(value)]
    return argv
