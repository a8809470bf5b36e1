"""Command lines: ``launch`` and ``trainfleet``. The only module that uses argparse.

Every ``launch`` flag can also come from the environment as ``TRAINFLEET_<FLAG>``
(``TRAINFLEET_GPUS=4``); torchrun's spellings are accepted as aliases. Bad input
exits 2 with one line and no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from trainfleet.utils.errors import UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as one line (what, expected, hint) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}. HINT: see `{self.prog} --help`.", file=sys.stderr)
        raise SystemExit(2)


def _env_default(dest: str, default: Any = None) -> Any:
    return os.environ.get(f"TRAINFLEET_{dest.upper()}", default)


def _env_flag(dest: str) -> bool:
    return os.environ.get(f"TRAINFLEET_{dest.upper()}", "").lower() in ("1", "true", "yes", "on")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``launch`` flags (shared by ``launch`` and ``trainfleet launch``)."""
    add = parser.add_argument
    add("--nodes", "--nnodes", dest="nodes", default=_env_default("nodes", "1"), metavar="N|MIN:MAX",
        help="number of nodes (torchrun --nnodes); MIN:MAX keeps going on the survivors when nodes are lost, "
             "down to MIN, and takes nodes that (re)join up to MAX")
    add("--gpus", "--nproc-per-node", "--nproc_per_node", dest="gpus", type=int,
        default=_env_default("gpus"), help="workers per node; default: every visible GPU, or 1 CPU worker")
    add("--node-rank", "--node_rank", dest="node_rank", type=int, default=_env_default("node_rank"),
        help="index of this node (multi-node)")
    add("--master-addr", "--master_addr", dest="master_addr", default=_env_default("master_addr", "127.0.0.1"),
        help="rendezvous host (default 127.0.0.1)")
    add("--master-port", "--master_port", dest="master_port", type=int, default=_env_default("master_port"),
        help="rendezvous port (default: a free port)")
    add("--strategy", default=_env_default("strategy", "ddp"), help="single, dp, ddp, fsdp or horovod (default ddp)")
    add("--strategy-opt", dest="strategy_opt", action="append", metavar="KEY=VALUE",
        help="an option of the strategy, repeatable: e.g. fsdp's wrap=Block, sharding=hybrid, "
             "shard_size=N, reshard_after_forward=false, cpu_offload=true, activation_checkpointing=true")
    add("--precision", default=_env_default("precision", "32"),
        help="32, 16-mixed (fp16), bf16-mixed (bf16), or Apex levels O0-O3 (default 32)")
    add("--amp-backend", dest="amp_backend", default=_env_default("amp_backend", "native"),
        help="native (torch.amp, default) or apex (needs an apex that still ships apex.amp)")
    add("--cpu", action="store_true", default=_env_flag("cpu"), help="CPU workers even if GPUs exist")
    add("--debug", action="store_true", default=_env_flag("debug"),
        help="run the script in this process (world size 1) so a debugger works")
    add("--log-dir", "--log_dir", dest="log_dir", default=_env_default("log_dir"),
        help="per-rank logs go to LOG_DIR/node<N>/rank<R>.log (default: a temporary folder)")
    add("--start-method", dest="start_method", default=_env_default("start_method", "fork"),
        help="fork (default, reuses the launcher's torch import), spawn or forkserver")
    add("--grace-period", dest="grace_period", type=float, default=_env_default("grace_period", 3.0),
        help="seconds a signalled worker gets to finish (e.g. checkpoint) before SIGKILL (default 3)")
    add("--max-restarts", "--max_restarts", dest="max_restarts", type=int, default=_env_default("max_restarts", 0),
        help="restart the whole job after a worker failure, up to this many times (default 0)")
    add("--heartbeat-timeout", dest="heartbeat_timeout", type=float, default=_env_default("heartbeat_timeout", 6.0),
        help="seconds without a sign of life before a node, the master or a frozen worker fails the job "
             "(default 6)")
    add("--rendezvous-timeout", dest="rendezvous_timeout", type=float,
        default=_env_default("rendezvous_timeout", 120.0), help="seconds to wait for every node (default 120)")
    add("--collective-timeout", dest="collective_timeout", type=float, default=_env_default("collective_timeout"),
        help="seconds before a collective some rank never joins fails, naming rank and call site "
             "(default: torch's 30 min)")
    add("--hosts", default=_env_default("hosts"), metavar="A,B[:SLOTS]",
        help="start one node on each host over ssh (node 0 on the first; here when it is this machine)")
    add("--hostfile", default=_env_default("hostfile"), help="hosts, one 'host slots=N' per line")
    add("--ssh-opt", dest="ssh_opt", action="append", metavar="OPTS",
        help="extra ssh options for --hosts, e.g. '-i ~/.ssh/id_cluster -p 2222' (repeatable)")
    add("--env", dest="env", action="append", metavar="NAME",
        help="with --hosts: forward this variable to every host (TRAINFLEET_*, NCCL_*, GLOO_*, TORCH_*, "
             "PYTHONPATH, OMP_NUM_THREADS are forwarded anyway)")
    add("-m", "--module", action="store_true", help="run TARGET as a module, like python -m")
    add("target", nargs="?", help="the training script (or module with -m)")
    add("args", nargs=argparse.REMAINDER, help="arguments for the script")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``launch --cluster slurm|local|debug`` and its resources, arrays and sweeps."""
    group = parser.add_argument_group("submitting (--cluster)")
    add = group.add_argument
    add("--cluster", default=_env_default("cluster"),
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


def _strategy_options(given: list[str] | None) -> dict[str, Any]:
    """``--strategy-opt`` flags (or TRAINFLEET_STRATEGY_OPT, ``;``-separated) as a dict."""
    from trainfleet.engine.options import parse_strategy_option

    texts = given or [t for t in os.environ.get("TRAINFLEET_STRATEGY_OPT", "").split(";") if t]
    return dict(parse_strategy_option(text) for text in texts)


def split_nodes(ns: argparse.Namespace) -> None:
    """``--nodes N`` or ``MIN:MAX`` -> ``ns.nodes`` (the most) and ``ns.min_nodes``."""
    from trainfleet.launcher.elastic import parse_nodes

    if not isinstance(ns.nodes, int):
        ns.min_nodes, ns.nodes = parse_nodes(ns.nodes)
    elif getattr(ns, "min_nodes", None) is None:
        ns.min_nodes = ns.nodes


def launch_config_from_args(ns: argparse.Namespace, cuda_devices: int | None = None):
    """Turn parsed arguments into a validated LaunchConfig."""
    from trainfleet.launcher.config import LaunchConfig

    split_nodes(ns)
    return LaunchConfig(cuda_devices=cuda_devices,
        target=ns.target, args=list(ns.args), module=ns.module, nodes=ns.nodes, min_nodes=ns.min_nodes, gpus=ns.gpus,
        node_rank=ns.node_rank, master_addr=ns.master_addr, master_port=ns.master_port,
        strategy=ns.strategy, strategy_options=_strategy_options(ns.strategy_opt), precision=ns.precision,
        amp_backend=ns.amp_backend, debug=ns.debug, cpu=ns.cpu,
        log_dir=ns.log_dir, start_method=ns.start_method, grace_period=ns.grace_period,
        max_restarts=ns.max_restarts, heartbeat_timeout=ns.heartbeat_timeout,
        rendezvous_timeout=ns.rendezvous_timeout, collective_timeout=ns.collective_timeout)


def _apply_slurm(ns: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """Inside a SLURM allocation: re-run through srun (batch shell), or take this task's
    node rank and master from SLURM (inside srun). Returns an exit code when done here."""
    from trainfleet.slurm.allocation import allocation, check_geometry, job_port, node_address, run_srun

    split_nodes(ns)
    found = allocation(os.environ)
    if found is None or ns.node_rank is not None or ns.debug:
        return None
    where, task = found
    if where == "batch" and task.nnodes == 1 and ns.nodes == 1:
        return None  # one node: run right here
    if ns.min_nodes <= task.nnodes < ns.nodes:  # an elastic job on an allocation of MIN..MAX nodes
        ns.nodes = task.nnodes
    check_geometry(task, ns.nodes, os.environ)
    if where == "batch":
        return run_srun(task, sys.executable, argv, elastic=ns.min_nodes < ns.nodes)
    ns.node_rank = task.node_rank
    if ns.master_addr in ("127.0.0.1", "localhost") and "TRAINFLEET_MASTER_ADDR" not in os.environ:
        ns.master_addr = node_address(task.master_addr)
    ns.master_port = ns.master_port or job_port(task.job_id)
    return None


def _run_launch(ns: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    split_nodes(ns)
    if ns.cluster:
        from trainfleet.launcher.submit import submit

        return submit(ns, list(argv))
    given = [flag for flag, value in (("--array", ns.array), ("--sweep", ns.sweep), ("--wait", ns.wait),
                                      ("--partition", ns.partition), ("--slurm-opt", ns.slurm_opt)) if value]
    if given:
        raise UsageError(f"{given[0]} is for submitted jobs, but no --cluster was given.",
                         f"add --cluster slurm (or local) to submit, or drop {given[0]}.")
    if ns.hosts or ns.hostfile:
        return _run_hosts(ns)
    from trainfleet.launcher.local import launch

    code = _apply_slurm(ns, argv)
    if code is not None:
        return code
    code = launch(launch_config_from_args(ns))
    if ns.node_rank == 0 and os.environ.get("TRAINFLEET_EXIT_FILE"):  # the batch step's launch reports it
        Path(os.environ["TRAINFLEET_EXIT_FILE"]).write_text(str(code))
    return code


def _run_hosts(ns: argparse.Namespace) -> int:
    """``--hosts``/``--hostfile``: every node started from here over ssh."""
    from trainfleet.launcher.hosts import plan_from_args, run_hosts, workers_per_host

    plan = plan_from_args(ns.hosts, ns.hostfile, ns.ssh_opt, ns.env)
    if ns.node_rank is not None:
        raise UsageError(f"--node-rank {ns.node_rank} with --hosts: the hosts' order gives the node ranks.",
                         "drop --node-rank.")
    if ns.nodes not in (1, len(plan.hosts)):
        raise UsageError(f"--nodes {ns.nodes} but {len(plan.hosts)} hosts were given.",
                         f"drop --nodes, or give --nodes MIN:{len(plan.hosts)} for an elastic job.")
    ns.min_nodes = ns.min_nodes if ns.nodes == len(plan.hosts) else len(plan.hosts)
    ns.nodes, ns.gpus = len(plan.hosts), workers_per_host(plan, ns.gpus)
    ns.node_rank = 0  # validated as node 0 of a real multi-node job (not as nodes simulated on this host)
    return run_hosts(launch_config_from_args(ns), plan)


def _run_doctor(ns: argparse.Namespace) -> int:
    from trainfleet.launcher.doctor import doctor

    ns.target, ns.args, ns.module = "trainfleet.launcher.doctor_probe", [], True
    return doctor(launch_config_from_args(ns))


def _list_models(ns: argparse.Namespace) -> int:
    from trainfleet.models import list_models

    print("\n".join(list_models()))
    return 0


def _list_datasets(ns: argparse.Namespace) -> int:
    from trainfleet.datasets import list_datasets

    print("\n".join(list_datasets()))
    return 0


def _run_train(ns: argparse.Namespace) -> int:
    from trainfleet.train import run

    run(parse_train_args(ns.train_args))
    return 0


def _ckpt_inspect(ns: argparse.Namespace) -> int:
    from trainfleet.engine.ckpt_tools import format_inspection, inspect_checkpoint

    print(format_inspection(inspect_checkpoint(ns.path, trust=ns.trust_pickle)))
    return 0


def _ckpt_convert(ns: argparse.Namespace) -> int:
    from trainfleet.engine.ckpt_tools import convert_checkpoint

    from trainfleet.engine.formats import parse_size

    size = parse_size(ns.max_shard_size) if ns.max_shard_size is not None else None
    out = convert_checkpoint(ns.src, ns.dst, to_state_dict=ns.to_state_dict, trust=ns.trust_pickle, to=ns.to,
                             ema=ns.ema, prefix=ns.prefix, max_shard_size=size)
    kind = {"state_dict": "plain state_dict", "sharded": "sharded trainfleet checkpoint",
            "safetensors": "safetensors, a folder of shards with model.safetensors.index.json" if out.is_dir()
            else "safetensors"}.get("state_dict" if ns.to_state_dict else ns.to, "trainfleet checkpoint")
    print(f"wrote {out} ({kind})")
    return 0


def add_ckpt_commands(sub: Any) -> None:
    """``trainfleet ckpt inspect PATH`` and ``trainfleet ckpt convert IN OUT``."""
    ckpt_parser = sub.add_parser("ckpt", help="inspect or convert checkpoints")
    ckpt_sub = ckpt_parser.add_subparsers(dest="ckpt_command", required=True, parser_class=OneLineParser)
    inspect = ckpt_sub.add_parser("inspect", help="metadata and a table of tensors")
    inspect.add_argument("path", help="a checkpoint file, a sharded folder, or a folder with latest.json")
    inspect.set_defaults(func=_ckpt_inspect)
    convert = ckpt_sub.add_parser("convert", help="between a file, a sharded folder, a plain state_dict and "
                                                  "safetensors (timm, Lightning, HF, Accelerate checkpoints too)")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to-state-dict", action="store_true", help="write a plain state_dict for other tools")
    convert.add_argument("--to", choices=["file", "sharded", "state_dict", "safetensors"],
                         help="file (one trainfleet file, default), sharded (a folder for "
                              "torch.distributed.checkpoint, loads into any world size), state_dict, or "
                              "safetensors (weights only)")
    convert.add_argument("--max-shard-size", help="with --to safetensors: shards of at most this size "
                                                  "(5GB, 500MB, bytes) and a model.safetensors.index.json")
    convert.add_argument("--ema", action="store_true", help="take a timm checkpoint's EMA weights")
    convert.add_argument("--prefix", help="keep only the weights under this attribute, without it "
                                          "(e.g. model. for a LightningModule's self.model)")
    convert.set_defaults(func=_ckpt_convert)
    for command in (inspect, convert):
        command.add_argument("--trust-pickle", action="store_true",
                             help="allow files that need full unpickling (only files you trust)")


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(part) for part in text.split(",") if part]

    return parse


def _run_bench(ns: argparse.Namespace) -> int:
    from trainfleet.bench.command import bench

    script_args = ns.script_args[1:] if ns.script_args[:1] == ["--"] else ns.script_args
    bench(ns.strategies, ns.precisions, ns.gpus, ns.out, ns.steps, ns.warmup, ns.rounds, ns.model, ns.dataset,
          ns.batch_size, ns.script, script_args, progress=not ns.no_progress)
    return 0


def add_bench_command(sub: Any) -> None:
    """``trainfleet bench``: strategies x precisions x worker counts on your model or script."""
    bench = sub.add_parser("bench", help="compare the parallel strategies and precisions")
    add = bench.add_argument
    add("--model", default="resnet18", help="a registry model (default resnet18)")
    add("--dataset", default="synthetic", help="a registry dataset (default synthetic)")
    add("--script", help="benchmark your own training script (it must use trainfleet.Engine) instead")
    add("--strategies", type=_csv(str), default=["single", "ddp"],
        help="comma list of single, dp, ddp, fsdp, horovod (default single,ddp)")
    add("--precisions", type=_csv(str), default=["32"], help="comma list, e.g. 32,bf16 (default 32)")
    add("--gpus", type=_csv(int), default=[1, 2], help="worker counts, comma list (default 1,2)")
    add("--steps", type=int, default=20, help="timed steps per run (default 20)")
    add("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    add("--rounds", type=int, default=3, help="interleaved repetitions (default 3)")
    add("--batch-size", type=int, default=32, help="per worker (built-in model only; default 32)")
    add("--out", default="bench", help="folder for results.md/csv and the plots (default ./bench)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("script_args", nargs=argparse.REMAINDER, help="arguments for --script (after --)")
    bench.set_defaults(func=_run_bench)


def _job_status(ns: argparse.Namespace) -> int:
    from trainfleet.slurm import records, status

    folder, record = records.find_job(ns.job)
    print(status.format_status(folder, record, status.job_status(folder, record), tail=ns.lines))
    return 0


def _job_logs(ns: argparse.Namespace) -> int:
    from trainfleet.slurm import records, status

    folder, record = records.find_job(ns.job)
    task = ns.task if ns.task is not None else (int(ns.job.split("_")[1]) if "_" in ns.job else None)
    if record.get("array") and task is None:
        task = record["tasks"][0]["index"]
    if task is not None and task not in [t["index"] for t in record["tasks"]]:
        raise UsageError(f"--task {task}: job {record['job_id']} has tasks 0-{len(record['tasks']) - 1}.")
    if not ns.follow and records.rank_log(records.task_dir(folder, task), ns.rank) is None:
        raise UsageError(f"no log of rank {ns.rank} yet in {records.task_dir(folder, task) / 'logs'}.",
                         "the job may still be pending: see `trainfleet status`, or use --follow.")
    status.follow(folder, record, rank=ns.rank, task=task, until_done=ns.follow)
    return 0


def _job_cancel(ns: argparse.Namespace) -> int:
    from trainfleet.slurm import records, status

    folder, record = records.find_job(ns.job)
    status.cancel(record)
    print(f"cancelled job {record['job_id']}")
    return 0


def add_job_commands(sub: Any) -> None:
    """``trainfleet status|logs|cancel JOB`` for jobs submitted with ``launch --cluster``."""
    show = sub.add_parser("status", help="state of a submitted job or array (table of tasks)")
    show.add_argument("job", help="job id (or job folder)")
    show.add_argument("--lines", type=int, default=5, help="last lines of rank 0's log (default 5)")
    show.set_defaults(func=_job_status)
    logs = sub.add_parser("logs", help="a rank's log of a submitted job")
    logs.add_argument("job", help="job id, JOB_TASK for an array task, or job folder")
    logs.add_argument("--rank", type=int, default=0, help="global rank (default 0)")
    logs.add_argument("--task", type=int, help="array task index")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=_job_logs)
    cancel = sub.add_parser("cancel", help="cancel a submitted job (every task of an array)")
    cancel.add_argument("job", help="job id (or job folder)")
    cancel.set_defaults(func=_job_cancel)


def build_trainfleet_parser() -> argparse.ArgumentParser:
    """``trainfleet`` with its subcommands."""
    parser = OneLineParser(prog="trainfleet", description="Run PyTorch training from a laptop to many nodes.")
    parser.add_argument("--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    launch_parser = sub.add_parser("launch", help="start workers for a training script")
    add_launch_arguments(launch_parser)
    add_cluster_arguments(launch_parser)
    launch_parser.set_defaults(func=lambda ns: _run_launch(ns, ns.raw_argv))
    train_parser = sub.add_parser("train", help="the built-in recipe (python -m trainfleet.train)",
                                  add_help=False)
    train_parser.add_argument("train_args", nargs=argparse.REMAINDER)
    train_parser.set_defaults(func=_run_train)
    add_ckpt_commands(sub)
    add_bench_command(sub)
    add_job_commands(sub)
    doctor = sub.add_parser("doctor", help="pre-flight checks and a test all-reduce for a launch layout")
    add_launch_arguments(doctor)
    doctor.set_defaults(func=_run_doctor)
    sub.add_parser("models", help="list registered models").set_defaults(func=_list_models)
    sub.add_parser("datasets", help="list registered datasets").set_defaults(func=_list_datasets)
    return parser


def _guarded(run: Callable[[], int]) -> int:
    """Run a command; a UsageError becomes one line on stderr and exit status 2."""
    try:
        return run()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, like a shell tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def launch_main(argv: Sequence[str] | None = None) -> int:
    """Console script ``launch``."""
    parser = OneLineParser(prog="launch", description="Start a training script on local workers.")
    add_launch_arguments(parser)
    add_cluster_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    return _guarded(lambda: _run_launch(ns, argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``trainfleet``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the recipe parses its own options
        return _guarded(lambda: _run_train(argparse.Namespace(train_args=argv[1:])))
    parser = build_trainfleet_parser()
    ns = parser.parse_args(argv)
    ns.raw_argv = argv[1:] if argv[:1] == ["launch"] else []
    if ns.version:
        from trainfleet import __version__

        print(f"trainfleet {__version__}")
        return 0
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    return _guarded(lambda: ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())


def build_train_parser() -> argparse.ArgumentParser:
    """Options of the built-in recipe ``python -m trainfleet.train``."""
    from trainfleet.train import TrainConfig

    d = TrainConfig.__dataclass_fields__
    parser = OneLineParser(prog="python -m trainfleet.train", description="Train a registry model on a registry dataset.")
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
    from trainfleet.train import TrainConfig

    return TrainConfig(**vars(build_train_parser().parse_args(argv)))
