"""``LaunchConfig``: what to run and where, validated on construction; and the small facts every
part of the launcher shares about a job: ``--nodes N|MIN:MAX``, where a node sits in an attempt
(:class:`Placement`) and where the logs go (:func:`log_dir`).

No torch import here: bad input must be answered before anything heavy loads. The flags that
build a LaunchConfig are in :mod:`trainfleet.launcher.flags`.
"""
from __future__ import annotations

import getpass
import importlib.util
import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainfleet.engine import contract
from trainfleet.launcher.devices import visible_cuda_devices
from trainfleet.utils.errors import UsageError

START_METHODS = ("fork", "spawn", "forkserver")
# What this launch is: the whole job on this host (one node, or N simulated nodes), one node of a
# job whose nodes are separate machines (--node-rank, --hosts, SLURM), or a request validated for
# submission (its devices are the job's nodes', not this machine's).
ROLES = ("local", "node", "submit")


def parse_nodes(text: str | int) -> tuple[int, int]:
    """``"3"`` -> (3, 3); ``"2:3"`` -> (2, 3) (torchrun's ``--nnodes MIN:MAX``)."""
    raw = str(text).strip()
    parts = raw.split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
    except ValueError:
        low = high = None
    if low is None or high is None:
        raise UsageError(f"--nodes {raw!r}: expected a number of nodes or a range MIN:MAX (e.g. 2 or 2:4).")
    if len(parts) == 1 and low < 1:
        raise UsageError(f"--nodes {raw}: expected at least 1 node.")
    if low < 1 or high < low:
        raise UsageError(f"--nodes {raw}: expected 1 <= MIN <= MAX.",
                         "e.g. --nodes 2:4 runs on 4 nodes and keeps going down to 2.")
    return low, high


@dataclass(frozen=True)
class Placement:
    """Where one node sits in one attempt.

    Attributes:
        node: the node's id (on simulated nodes also its slice of this host's GPUs).
        index: its position among the attempt's members (torchrun's GROUP_RANK).
        nodes: members in this attempt (GROUP_WORLD_SIZE).
        changed: the members differ from the previous attempt's.
    """

    node: int
    index: int
    nodes: int
    changed: bool = False


def placement(members: list[int], node: int, previous: list[int] | None) -> Placement:
    return Placement(node, members.index(node), len(members), previous is not None and previous != members)


def default_log_root(base: str | None = None) -> Path:
    """``<tmp>/trainfleet-<user>``: one per user (a shared ``<tmp>/trainfleet`` made by one user
    broke every other user's launch)."""
    return Path(base or tempfile.gettempdir()) / f"trainfleet-{getpass.getuser()}"


def log_dir(cfg: "LaunchConfig") -> Path:
    """The job's log folder: --log-dir, or ``<tmp>/trainfleet-<user>/<run id>``."""
    return Path(cfg.log_dir) if cfg.log_dir else default_log_root() / cfg.run_id


def check_log_root(folder: Path) -> None:
    """Create the per-user log root (mode 0700), or check that the one there is ours and private:
    a folder of another user (or a link) there could read, redirect or plant our logs.

    Raises:
        UsageError: the folder belongs to someone else, is open to others, or is not a folder.
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError as err:
        raise UsageError(f"cannot create the log folder {str(folder)!r} ({err.strerror}).",
                         "pass --log-dir to a folder of yours.") from err
    problem = ("is a link" if stat.S_ISLNK(info.st_mode) else "is not a folder" if not stat.S_ISDIR(info.st_mode)
               else f"belongs to uid {info.st_uid}" if info.st_uid != os.getuid()
               else f"is open to others (mode {stat.S_IMODE(info.st_mode):o})" if info.st_mode & 0o077 else None)
    if problem:
        raise UsageError(f"the log folder {str(folder)!r} {problem}, not private to you (uid {os.getuid()}).",
                         "remove it, or pass --log-dir to a folder of yours.")


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-PID-RANDOM``: sortable, and not guessable by another user."""
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class LaunchConfig:
    """A validated launch request.

    Args:
        target: the script path, or a module name when ``module`` is set.
        args: arguments passed to the script.
        module: run ``target`` as ``python -m target``.
        nodes: number of nodes (torchrun ``--nnodes``); with ``min_nodes`` the most.
        min_nodes: an elastic job (``--nodes MIN:MAX``) keeps going on the survivors down to
            this many nodes; None: ``nodes`` (every node is needed).
        gpus: workers per node (torchrun ``--nproc-per-node``); defaults to the
            visible CUDA devices, or 1 CPU worker without any.
        node_rank: this node's index; None for a local job (one node or simulated nodes).
        role: ``local`` (this host runs every node), ``node`` (this is node ``node_rank`` of a
            job on separate machines) or ``submit`` (validated for a submitted job).
        master_addr, master_port: rendezvous endpoint; a free port is chosen when None.
        strategy, precision: names from the engine's registries.
        strategy_options: keyword options for the strategy (``--strategy-opt sharding=hybrid``);
            an option of another strategy is refused before any worker starts.
        amp_backend: ``native`` (torch.amp) or ``apex``.
        debug: run the script inside the launcher's own process (world size 1).
        cpu: run CPU workers even when CUDA devices exist.
        log_dir: per-rank log files go below it (a temporary folder when None).
        start_method: how workers start (``fork`` reuses the launcher's imported torch).
        grace_period: seconds a worker stopped by a signal gets to finish (a checkpoint) before
            SIGKILL; 30 as torchrun (workers stopped because a peer failed get FAILURE_GRACE).
        max_restarts: restart the whole job (every node) after a worker failure, this many times.
        heartbeat_timeout: a node, the master or a worker that shows no sign of life (no
            heartbeat; stopped) for this long fails the job. Heartbeats come from each
            agent's control thread every 0.5 s whatever the workers do, so a long step
            cannot trip it; 2 s is four missed beats (benchmarks/heartbeat_soak.py: the longest
            silence of a live node with every core busy), and keeps the detection of a frozen
            worker or agent, or of a cut link, under 3 s.
        rendezvous_timeout: how long a node waits for the master and the master for the nodes.
        collective_timeout: seconds before a collective that some rank never joins fails,
            naming the rank and the call site (torch's default is 30 minutes).
        hang_timeout: seconds in which no rank of the job made progress before it is called hung
            (launcher/diagnosis.py); None adapts it to the step time, 0 turns detection off.
        on_nan, max_rollbacks: what a non-finite loss does in engine scripts (engine/snapshot.py).
        join: how a node joins a running elastic ddp job (``in-place`` or ``restart``).
        console: "merged" (every rank's lines once, with their rank set: launcher/console.py) or
            "rank0" (global rank 0's output only).
        horovod_port: port of Horovod's rendezvous server on the master; MASTER_PORT + 1
            when None and the master port is fixed (multi-node), else a free port.
        cuda_devices: CUDA devices on this node; probed without torch when None.
        job_token: the secret every control-store value is signed with (see
            :mod:`trainfleet.launcher.store_auth`); "" signs nothing. Not shown in the repr.
    """

    target: str | None
    args: list[str] = field(default_factory=list)
    module: bool = False
    nodes: int = 1
    min_nodes: int | None = None
    gpus: int | None = None
    node_rank: int | None = None
    role: str = "local"
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    strategy: str = "ddp"
    strategy_options: dict = field(default_factory=dict)
    precision: str = "32"
    amp_backend: str = "native"
    debug: bool = False
    cpu: bool = False
    log_dir: str | None = None
    start_method: str = "fork"
    grace_period: float = 30.0
    max_restarts: int = 0
    heartbeat_timeout: float = 2.0
    rendezvous_timeout: float = 120.0
    collective_timeout: float | None = None
    hang_timeout: float | None = None
    on_nan: str = "report"
    max_rollbacks: int = 3
    console: str = "merged"
    join: str = "in-place"
    horovod_port: int | None = None
    cuda_devices: int | None = None
    run_id: str = field(default_factory=new_run_id)
    job_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"LaunchConfig(role={self.role!r}): expected one of {ROLES}")
        if (self.role == "local") != (self.node_rank is None):
            raise ValueError(f"LaunchConfig(role={self.role!r}, node_rank={self.node_rank}): a local job has no "
                             "node rank, one node of a multi-machine job (or a submission) has one")
        if self.cuda_devices is None:
            self.cuda_devices = 0 if self.cpu else visible_cuda_devices()
        self._check_target()
        self._check_topology()
        self._check_names()
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise UsageError(f"--master-port {self.master_port} is out of range: expected 1-65535.",
                             "omit it to pick a free port.")
        if len(self.job_token) > 256 or not self.job_token.isprintable():
            raise UsageError(f"{contract.JOB_TOKEN}: expected up to 256 printable characters, got "
                             f"{len(self.job_token)} characters.", "e.g. export it from `openssl rand -hex 16`.")
        if self.hang_timeout is not None and self.hang_timeout < 0:
            raise UsageError(f"--hang-timeout {self.hang_timeout} must be >= 0 seconds.",
                             "0 turns hang detection off; omit it to let it adapt to the step time.")
        if self.on_nan not in ("report", "rollback"):
            raise UsageError(f"--on-nan {self.on_nan!r}: expected report or rollback.",
                             "rollback returns every rank to the last step on a NaN/inf loss and drops that batch.")
        if self.join not in ("in-place", "restart"):
            raise UsageError(f"--join {self.join!r}: expected in-place or restart.",
                             "in-place keeps the running workers; restart checkpoints and restarts them all.")
        if self.console not in ("merged", "rank0"):
            raise UsageError(f"--console {self.console!r}: expected merged or rank0.",
                             "merged shows every rank's lines once, with the ranks that printed them.")
        if self.max_rollbacks < 0:
            raise UsageError(f"--max-rollbacks {self.max_rollbacks} must be >= 0.")
        if self.grace_period < 0:
            raise UsageError(f"--grace-period {self.grace_period} must be >= 0 seconds.")
        if self.max_restarts < 0:
            raise UsageError(f"--max-restarts {self.max_restarts} must be >= 0.")
        for flag, value in (("--heartbeat-timeout", self.heartbeat_timeout),
                            ("--rendezvous-timeout", self.rendezvous_timeout),
                            ("--collective-timeout", self.collective_timeout)):
            if value is not None and value <= 0:
                raise UsageError(f"{flag} {value} must be a positive number of seconds.")

    # ----- checks ---------------------------------------------------------------------
    def _check_target(self) -> None:
        if not self.target:
            raise UsageError("no training script given: expected `launch [options] script.py [args]`.",
                             "or `launch -m package.module [args]`.")
        if self.module:
            try:
                found = importlib.util.find_spec(self.target) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise UsageError(f"module {self.target!r} was not found on sys.path.",
                                 "check the name, or install its package into this environment.")
        elif not Path(self.target).is_file():
            raise UsageError(f"script {self.target!r} was not found (looked in {os.getcwd()}).",
                             "check the path, or pass -m to run a module.")

    def _check_topology(self) -> None:
        if self.nodes < 1:
            raise UsageError(f"--nodes {self.nodes}: expected at least 1 node.")
        if self.min_nodes is None:
            self.min_nodes = self.nodes
        if not 1 <= self.min_nodes <= self.nodes:
            raise UsageError(f"--nodes {self.min_nodes}:{self.nodes}: expected 1 <= MIN <= MAX.")
        if self.gpus is not None and self.gpus < 1:
            raise UsageError(f"--gpus {self.gpus}: expected at least 1 worker per node.",
                             "omit --gpus to use every visible GPU (or 1 CPU worker).")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nodes:
            raise UsageError(f"--node-rank {self.node_rank} is outside --nodes {self.nodes}: "
                             f"expected 0-{self.nodes - 1}.")
        if self.gpus is not None and self.cuda_devices and self.gpus > self.cuda_devices:
            raise UsageError(f"--gpus {self.gpus} but this node has {self.cuda_devices} CUDA devices.",
                             f"use --gpus {self.cuda_devices}, or --cpu to run {self.gpus} CPU workers.")
        if self.simulated_nodes and self.accelerator == "cuda" and \
                self.nodes * self.devices_per_node > self.cuda_devices:
            per_node = self.cuda_devices // self.nodes
            fits = f"--gpus {per_node} (each simulated node gets its own GPUs), " if per_node else ""
            raise UsageError(f"--nodes {self.nodes} x {self.devices_per_node} GPUs on this one host needs "
                             f"{self.nodes * self.devices_per_node} CUDA devices, it has {self.cuda_devices}.",
                             f"use {fits}--cpu, or one agent per machine (--node-rank, --hosts, SLURM).")
        if self.debug and self.nodes > 1:
            raise UsageError(f"--debug runs one process in-process, but --nodes {self.nodes} was given.",
                             "drop --nodes to debug.")

    def _check_names(self) -> None:
        if self.start_method not in START_METHODS:
            raise UsageError(f"Unknown start method {self.start_method!r}. Available: {list(START_METHODS)}")
        if self.strategy == "dp" and self.nodes > 1:
            raise UsageError(f"strategy 'dp' runs one process on one node, but --nodes {self.nodes} was given.",
                             "use --strategy ddp for several nodes.")
        per_node = self.procs_per_node  # every size an elastic job may run at
        contract.check_request(self.strategy, self.precision, self.amp_backend, self.strategy_options,
                               [(nodes * per_node, per_node) for nodes in range(self.min_nodes, self.nodes + 1)])

    # ----- derived --------------------------------------------------------------------
    @property
    def accelerator(self) -> str:
        """``cuda`` when this node has visible CUDA devices and --cpu is off, else ``cpu``."""
        return "cuda" if self.cuda_devices and not self.cpu else "cpu"

    @property
    def devices_per_node(self) -> int:
        """Devices each node uses: --gpus, or every visible GPU, or one CPU worker."""
        if self.gpus is not None:
            return self.gpus
        return self.cuda_devices if self.accelerator == "cuda" else 1

    @property
    def simulated_nodes(self) -> bool:
        """``--nodes N`` without ``--node-rank``: N agents on this host, sharing its devices."""
        return self.role == "local" and self.nodes > 1 and not self.debug

    @property
    def procs_per_node(self) -> int:
        """Worker processes per node: one for the single-process strategies."""
        if self.debug or self.strategy in ("dp", "single"):
            return 1
        return self.devices_per_node

    @property
    def elastic(self) -> bool:
        """``--nodes MIN:MAX`` with MIN < MAX: the job goes on when nodes are lost."""
        return self.min_nodes is not None and self.min_nodes < self.nodes

    @property
    def nodes_spec(self) -> str:
        return f"{self.min_nodes}:{self.nodes}" if self.elastic else str(self.nodes)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node
