"""Generic resources -> submitit/sbatch parameters, validated before anything is submitted.

The launcher asks in generic terms (nodes, workers per node, minutes); this module
translates them for SLURM and rejects what sbatch would refuse later, with the list
of valid names (submitit ``_equivalence_dict`` style).
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from trainfleet.utils.errors import UsageError

# sbatch long options a user may pass through --slurm-opt (sbatch 23-25). Those that
# trainfleet sets itself (nodes, time, output, array, signal ...) are not in it: each has
# its own flag, or would break the job's layout.
SBATCH_OPTIONS = frozenset("""
bb bbf begin chdir cluster-constraint clusters comment container contiguous core-spec cores-per-socket
cpu-freq cpus-per-gpu deadline delay-boot dependency distribution exclude export extra-node-info
get-user-env gpu-bind gpu-freq gpus gpus-per-socket gpus-per-task gres gres-flags hint hold licenses
mail-type mail-user mcs-label mem-per-cpu mem-per-gpu mincpus network nice no-kill nodefile nodelist
ntasks-per-core ntasks-per-socket overcommit oversubscribe power priority profile propagate reboot
reservation sockets-per-node spread-job switches thread-spec threads-per-core time-min tmp
use-min-nodes wckey
""".split())
# sbatch options that have a trainfleet flag of their own.
OWN_FLAGS = {"nodes": "--nodes", "partition": "--partition", "time": "--time", "account": "--account",
             "qos": "--qos", "constraint": "--constraint", "exclusive": "--exclusive",
             "cpus-per-task": "--cpus-per-task", "mem": "--mem-gb", "gpus-per-node": "--gpus",
             "array": "--array/--sweep", "signal": "--signal/--signal-delay", "job-name": "--job-name",
             "output": "--job-dir", "error": "--job-dir", "ntasks": "(one task per node)",
             "ntasks-per-node": "(one task per node)", "requeue": "(always on)", "no-requeue": "--max-requeues 0",
             "open-mode": "(append)", "wait": "--wait"}


def parse_slurm_opts(specs: Sequence[str]) -> dict[str, str | bool]:
    """``["mail-type=END", "hold"]`` -> ``{"mail-type": "END", "hold": True}``.

    Raises:
        UsageError: an unknown key (with the valid ones), or one trainfleet sets itself.
    """
    opts: dict[str, str | bool] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if key in OWN_FLAGS:
            raise UsageError(f"--slurm-opt {spec!r}: {key!r} is set by trainfleet.",
                             f"use {OWN_FLAGS[key]} instead.")
        if key not in SBATCH_OPTIONS:
            raise UsageError(f"--slurm-opt {spec!r}: unknown sbatch option {key!r}. "
                             f"Valid: {sorted(SBATCH_OPTIONS)}")
        opts[key] = value if sep else True
    return opts


@dataclass
class ClusterResources:
    """What one job asks SLURM for.

    Args:
        nodes: nodes; one trainfleet agent runs on each.
        workers: worker processes per node (``--gpus``).
        gpus: GPUs per node to request (0 for CPU workers).
        cpus_per_task: CPUs of each node's agent task; default one per worker.
        mem_gb: memory per node in GB.
        time_min: time limit in minutes.
        partition, account, qos, constraint: passed to sbatch as they are.
        exclusive: whole nodes.
        job_name: SLURM job name.
        signal: the early-warning signal SLURM sends before the time limit (and that
            preemption uses), without ``SIG``; USR2 by default, as NCCL may use USR1.
        signal_delay_s: seconds before the time limit that the signal comes.
        array_parallelism: at most this many array tasks at once (``%K``).
        extra: further sbatch options (from ``--slurm-opt``).
    """

    nodes: int = 1
    workers: int = 1
    gpus: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    job_name: str = "trainfleet"
    signal: str = "USR2"
    signal_delay_s: int = 90
    array_parallelism: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for flag, value in (("--nodes", self.nodes), ("--gpus", self.workers), ("--time", self.time_min),
                            ("--cpus-per-task", self.cpus_per_task), ("--array-parallelism", self.array_parallelism)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UsageError(f"{flag} {value}: expected a whole number of at least 1"
                                 + (" (minutes)." if flag == "--time" else "."))
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise UsageError(f"--mem-gb {self.mem_gb}: expected a positive number of GB.")
        name = self.signal.upper().removeprefix("SIG")
        if not hasattr(signal, f"SIG{name}") or name in ("KILL", "STOP"):
            raise UsageError(f"--signal {self.signal}: not a signal a job can catch.",
                             "use USR2 (the default), USR1 or TERM.")
        self.signal = name
        if self.signal_delay_s < 1 or self.signal_delay_s >= self.time_min * 60:
            raise UsageError(f"--signal-delay {self.signal_delay_s}s must be positive and less than "
                             f"--time {self.time_min} min.", "lower --signal-delay or raise --time.")

    @property
    def cpus(self) -> int:
        """CPUs per node-task: --cpus-per-task, else one per worker."""
        return self.cpus_per_task or self.workers

    def slurm_parameters(self) -> dict[str, Any]:
        """Parameters for ``submitit.SlurmExecutor.update_parameters``."""
        params: dict[str, Any] = {
            "job_name": self.job_name, "nodes": self.nodes, "ntasks_per_node": 1, "cpus_per_task": self.cpus,
            "time": self.time_min, "signal_delay_s": self.signal_delay_s,
            # One agent per node; it kills the others' workers itself, and srun must not
            # kill a node whose agent is still checkpointing.
            "srun_args": ["--kill-on-bad-exit=0"],
            "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={self.signal}"],
            # submitit writes --signal=USR2@delay itself; this entry replaces it with ours
            "additional_parameters": {"signal": f"{self.signal}@{self.signal_delay_s}", "requeue": True,
                                      **self.extra},
        }
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.mem_gb is not None:
            params["mem"] = f"{int(self.mem_gb * 1024)}MB"
        if self.array_parallelism:
            params["array_parallelism"] = self.array_parallelism
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[key] = getattr(self, key)
        if self.exclusive:
            params["exclusive"] = True
        return params

    def local_parameters(self) -> dict[str, Any]:
        """Parameters for ``submitit.LocalExecutor.update_parameters`` (one process per job)."""
        return {"timeout_min": self.time_min, "gpus_per_node": self.gpus, "signal_delay_s": self.signal_delay_s}
