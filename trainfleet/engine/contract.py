"""The launcher -> worker contract, torch-free: every ``TRAINFLEET_*`` variable a process of the
job reads, named once, and what the launcher may check before a worker starts (strategy and
precision names, strategy options, a backend that must be importable). The launcher imports
this module and nothing else of the engine.

Who writes, who reads:

- ``launch`` (``launcher/workers.py``) writes the worker's variables with :func:`worker_variables`,
  beside torchrun's own (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...);
- a job submitted with ``launch --cluster`` adds the job's folders (:func:`job_variables`, handed
  to ``slurm/job.py`` as a template by the submitter, since slurm never imports the engine); the
  batch step's ``srun`` tells node 0 where to report its exit code (:data:`EXIT_FILE`);
- ``trainfleet bench`` switches the engine's step timer on with :func:`bench_variables`;
- the engine, the strategies and the built-in recipe read them through :class:`WorkerSettings`,
  :class:`JobSettings` and the readers below, never by their names.

The same ``TRAINFLEET_`` prefix also carries a user's defaults for ``launch`` flags
(``TRAINFLEET_GPUS=4``): those are derived from the flag table (``launcher/flags.py``), not
listed here. Where a name is both (``TRAINFLEET_STRATEGY``), it means the same thing in both
places: a worker started by ``launch`` sees what ``launch`` was told.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from trainfleet.engine import progress_record  # noqa: F401 - the launcher's door to the progress record
from trainfleet.engine.options import check_strategy_options, mesh_shape, parse_strategy_option
from trainfleet.engine.registry import PRECISIONS, STRATEGIES
from trainfleet.utils.errors import UsageError

# ----- written by launch for every worker -------------------------------------------------------
STRATEGY = "TRAINFLEET_STRATEGY"  # --strategy
PRECISION = "TRAINFLEET_PRECISION"  # --precision
STRATEGY_OPTIONS = "TRAINFLEET_STRATEGY_OPTIONS"  # --strategy-opt, as a JSON object
AMP_BACKEND = "TRAINFLEET_AMP_BACKEND"  # --amp-backend
ACCELERATOR = "TRAINFLEET_ACCELERATOR"  # cpu or cuda, as the launcher decided
RUN_ID = "TRAINFLEET_RUN_ID"  # set only under launch: the engine installs its stop-request handlers
NODE = "TRAINFLEET_NODE"  # this node's id
TTY = "TRAINFLEET_TTY"  # 1 when rank 0's echo lands on a terminal (progress bars)
COLLECTIVE_TIMEOUT = "TRAINFLEET_COLLECTIVE_TIMEOUT"  # --collective-timeout, seconds
PROGRESS_FILE = "TRAINFLEET_PROGRESS_FILE"  # this rank's progress record (engine/progress_record.py)
RECOVERY = "TRAINFLEET_RECOVERY"  # elastic ddp: the files a worker and its agent share after a lost node
AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"  # "True": node 0's agent hosts each attempt's store (torch's name)
JOINING = "TRAINFLEET_JOINING"  # 1: this worker joins a running job in place (resume takes the peers' state)
ON_NAN = "TRAINFLEET_ON_NAN"  # --on-nan and --max-rollbacks: "rollback:3" (engine/snapshot.py)
# elastic jobs (--nodes MIN:MAX) only
NODES = "TRAINFLEET_NODES"  # MIN:MAX
WORLD_CHANGED = "TRAINFLEET_WORLD_CHANGED"  # 1 when this attempt runs on other nodes than the last
RESUME_RECORD = "TRAINFLEET_RESUME_RECORD"  # where rank 0 notes what it resumed from
# ----- written by a submitted job (launch --cluster) --------------------------------------------
CHECKPOINT_DIR = "TRAINFLEET_CHECKPOINT_DIR"  # Engine.checkpoint_dir: what a requeued job resumes
JOB_DIR = "TRAINFLEET_JOB_DIR"  # the task's folder
REQUEUES = "TRAINFLEET_REQUEUES"  # times this job was requeued so far
TASK_INDEX = "TRAINFLEET_TASK_INDEX"  # the array task's index
EXIT_FILE = "TRAINFLEET_EXIT_FILE"  # an elastic batch step: node 0 writes its exit code here
# ----- read by launch itself, never passed on to workers -----------------------------------------
# the secret the agents sign the control store's values with (trainfleet.launcher.store_auth)
JOB_TOKEN = "TRAINFLEET_JOB_TOKEN"
# ----- written by trainfleet bench ---------------------------------------------------------------
BENCH_OUT = "TRAINFLEET_BENCH_OUT"  # where each rank writes its step timings
BENCH_WARMUP = "TRAINFLEET_BENCH_WARMUP"
BENCH_STEPS = "TRAINFLEET_BENCH_STEPS"

WORKER_VARIABLES = (STRATEGY, PRECISION, STRATEGY_OPTIONS, AMP_BACKEND, ACCELERATOR, RUN_ID, NODE, TTY,
                    COLLECTIVE_TIMEOUT, PROGRESS_FILE, NODES, WORLD_CHANGED, RESUME_RECORD)
JOB_VARIABLES = (CHECKPOINT_DIR, JOB_DIR, REQUEUES, TASK_INDEX, EXIT_FILE)
BENCH_VARIABLES = (BENCH_OUT, BENCH_WARMUP, BENCH_STEPS)
ALL = WORKER_VARIABLES + JOB_VARIABLES + BENCH_VARIABLES + (JOB_TOKEN,)

# Modules a worker imports first thing: the launcher imports them before it forks, so forked
# workers start with them loaded (the worker side names them; the launcher only preloads).
# torch._dynamo: every optimizer's constructor imports it (torch's _disable_dynamo), 1.5 s a
# process here; preloaded, a 4-worker CPU launch took 4.0 s instead of 6.4 s (3 pairs).
WORKER_PRELOAD = ("torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo", "trainfleet.engine.engine")


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def worker_variables(*, strategy: str, precision: str, strategy_options: Mapping[str, Any], amp_backend: str,
                     accelerator: str, run_id: str, node: int, tty: bool, collective_timeout: float | None = None,
                     nodes_spec: str | None = None, world_changed: bool = False,
                     resume_record: str | None = None, progress_file: str | None = None,
                     on_nan: str = "report", max_rollbacks: int = 3) -> dict[str, str]:
    """The ``TRAINFLEET_*`` variables ``launch`` gives one worker (``nodes_spec`` only for an
    elastic job)."""
    options = json.dumps(dict(strategy_options))
    env: dict[str, Any] = {STRATEGY: strategy, PRECISION: precision, STRATEGY_OPTIONS: options,
                           AMP_BACKEND: amp_backend, ACCELERATOR: accelerator, RUN_ID: run_id, NODE: node,
                           TTY: int(tty)}
    if collective_timeout:
        env[COLLECTIVE_TIMEOUT] = collective_timeout
    if progress_file:
        env[PROGRESS_FILE] = progress_file
    if on_nan != "report":
        env[ON_NAN] = f"{on_nan}:{max_rollbacks}"
    if nodes_spec is not None:
        env.update({NODES: nodes_spec, WORLD_CHANGED: int(world_changed), RESUME_RECORD: resume_record or ""})
    return {key: str(value) for key, value in env.items()}


def job_variables() -> dict[str, str]:
    """What a submitted job's ``launch`` passes on to its workers, as a template that the job
    fills in with ``str.format(task_dir=..., requeues=...)`` (``TASK_INDEX`` for array tasks)."""
    return {CHECKPOINT_DIR: os.path.join("{task_dir}", "checkpoints"), JOB_DIR: "{task_dir}",
            REQUEUES: "{requeues}", TASK_INDEX: "{index}"}


def bench_variables(out: str, steps: int, warmup: int) -> dict[str, str]:
    """Switch the engine's step timer on (``trainfleet bench``)."""
    return {BENCH_OUT: out, BENCH_STEPS: str(steps), BENCH_WARMUP: str(warmup)}


@dataclass(frozen=True)
class WorkerSettings:
    """What ``launch`` told this worker; every field None/empty when it was not started by launch."""

    strategy: str | None = None
    precision: str | None = None
    strategy_options: dict = field(default_factory=dict)
    amp_backend: str | None = None
    accelerator: str | None = None
    run_id: str | None = None
    collective_timeout: float | None = None
    tty: bool | None = None
    progress_file: str | None = None
    on_nan: str | None = None  # --on-nan
    max_rollbacks: int | None = None  # --max-rollbacks
    recovery: str | None = None  # the in-place recovery files' base path (engine/recovery.py)
    joining: bool = False  # this worker's node joins a running job in place (engine/recovery.py)

    @property
    def under_launch(self) -> bool:
        """True in a worker that ``launch`` started (it installs signal handlers, relays stops)."""
        return bool(self.run_id)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "WorkerSettings":
        env = _env(env)
        options = json.loads(env[STRATEGY_OPTIONS]) if env.get(STRATEGY_OPTIONS) else {}
        timeout = env.get(COLLECTIVE_TIMEOUT)
        tty = env.get(TTY)
        on_nan, _, limit = (env.get(ON_NAN) or "").partition(":")
        return cls(recovery=env.get(RECOVERY) or None, joining=env.get(JOINING) == "1", on_nan=on_nan or None,
                   max_rollbacks=int(limit) if limit.isdigit() else None,
                   strategy=env.get(STRATEGY) or None, precision=env.get(PRECISION) or None, strategy_options=options,
                   amp_backend=env.get(AMP_BACKEND) or None, accelerator=env.get(ACCELERATOR) or None,
                   run_id=env.get(RUN_ID) or None, collective_timeout=float(timeout) if timeout else None,
                   tty=None if tty is None else tty == "1", progress_file=env.get(PROGRESS_FILE) or None)


@dataclass(frozen=True)
class ElasticSettings:
    """An elastic job's variables: ``nodes`` is ``MIN:MAX`` ("" outside an elastic job)."""

    nodes: str = ""
    world_changed: bool = False
    resume_record: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ElasticSettings":
        env = _env(env)
        return cls(env.get(NODES, ""), env.get(WORLD_CHANGED) == "1", env.get(RESUME_RECORD) or None)


@dataclass(frozen=True)
class JobSettings:
    """A submitted job's folders (None outside ``launch --cluster``)."""

    checkpoint_dir: str | None = None
    job_dir: str | None = None
    requeues: int = 0
    task_index: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "JobSettings":
        env = _env(env)
        index = env.get(TASK_INDEX)
        return cls(env.get(CHECKPOINT_DIR) or None, env.get(JOB_DIR) or None, int(env.get(REQUEUES) or 0),
                   int(index) if index else None)


@dataclass(frozen=True)
class BenchSettings:
    """``trainfleet bench``'s request to time steps; ``out`` None when not benchmarking."""

    out: str | None = None
    warmup: int = 3
    steps: int = 20

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "BenchSettings":
        env = _env(env)
        return cls(env.get(BENCH_OUT) or None, int(env.get(BENCH_WARMUP, 3)), int(env.get(BENCH_STEPS, 20)))


def exit_file(env: Mapping[str, str] | None = None) -> str | None:
    """Where node 0 of an elastic SLURM step writes its exit code, if it should."""
    return _env(env).get(EXIT_FILE) or None



# ----- what the launcher checks before any worker starts ------------------------------------------
def check_request(strategy: str, precision: str, amp_backend: str, options: Mapping[str, Any],
                  layouts: Iterable[tuple[int, int]] = ()) -> None:
    """Refuse, in one line, a request no worker could run.

    Args:
        layouts: ``(world_size, procs_per_node)`` for every size the job may run at (fsdp's
            mesh must divide each).

    Raises:
        UsageError: an unknown name, an option of another strategy, an impossible mesh.
    """
    if strategy not in STRATEGIES:
        raise UsageError(STRATEGIES.unknown_message(strategy, STRATEGIES.names()))
    if precision not in PRECISIONS:
        raise UsageError(PRECISIONS.unknown_message(precision, PRECISIONS.names()))
    if amp_backend not in ("native", "apex"):
        raise UsageError(f"Unknown amp backend {amp_backend!r}. Available: ['apex', 'native']")
    check_strategy_options(strategy, options)
    if strategy != "fsdp":
        return
    if amp_backend == "apex":
        raise UsageError("--amp-backend apex does not work with --strategy fsdp (apex.amp cannot see "
                         "sharded parameters).", "drop --amp-backend: fsdp runs bf16/fp16/O2 through "
                         "FSDP2's MixedPrecisionPolicy.")
    for world, per_node in layouts:
        mesh_shape(world, options.get("sharding", "full"), options.get("shard_size"), per_node)


def strategy_options(texts: Iterable[str] | None) -> dict[str, Any]:
    """``--strategy-opt KEY=VALUE`` texts as the keyword options the strategy receives."""
    return dict(parse_strategy_option(text) for text in texts or ())


def format_strategy_option(key: str, value: Any) -> str:
    """The ``KEY=VALUE`` text that :func:`strategy_options` reads back as ``value``."""
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


HOROVOD_INSTALL_HINT = "run scripts/build-horovod.sh (builds Horovod 0.28.1 with gloo into .venv)."


def import_horovod() -> Any:
    """``horovod.torch`` (imported only when the horovod strategy is selected), or a UsageError
    that says how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as err:
        raise UsageError(f"strategy 'horovod' needs Horovod, which is not importable ({err}).",
                         HOROVOD_INSTALL_HINT) from err
    return hvd


def require_backend(strategy: str) -> None:
    """Import the optional backend ``strategy`` needs (Horovod), or say how to install it.

    Raises:
        UsageError: the backend is missing.
    """
    if strategy == "horovod":
        import_horovod()


# ----- in-place recovery: where a worker and its agent meet (engine/recovery.py, launcher/in_place.py) -----
IN_PLACE_IMPOSSIBLE = "the survivors could not go on in place:"  # a worker's last error line (InPlaceImpossible)
def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def lost_path(base: str | os.PathLike[str]) -> Path:
    return Path(f"{base}.lost")


def next_path(base: str | os.PathLike[str]) -> Path:
    return Path(f"{base}.next")


def ready_path(base: str | os.PathLike[str]) -> Path:
    """A joining worker's word that it is about to join the running job's new group."""
    return Path(f"{base}.ready")


def resumes_path(base: str | os.PathLike[str]) -> Path:
    """A worker's word that its script calls ``engine.resume`` (so a node can join in place)."""
    return Path(f"{base}.resumes")


def read_lost(base: str | os.PathLike[str]) -> dict | None:
    """The agent's side: what a worker said when it lost a peer (None: nothing)."""
    return read_json(lost_path(base))


def write_next(base: str | os.PathLike[str], place: dict) -> None:
    """The agent's side: the worker's place in the next attempt (``attempt``, ``env``)."""
    write_json(next_path(base), place)
