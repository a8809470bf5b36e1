"""In-place recovery: when a node of an elastic ddp, fsdp or Horovod job is lost, the survivors keep their processes.

The engine of every survivor meets the loss as an error in a collective (gloo: "Connection closed
by peer" the moment the dead host's sockets close). Instead of exiting, it:

1. tells its agent, through a file beside its log (``<base>.lost``: the attempt, the steps it
   completed, where the error came), and waits for the agent's answer (``<base>.next``);
2. node 0's agent calls the roll (``launcher/in_place.py``): the nodes whose agents answer within
   a second are the new members; every survivor's agent writes each worker's new place (rank,
   world size, the new rendezvous port);
3. the engine leaves the old process group, joins the new one, re-wraps the model (the user's
   DDP object is rebuilt in place, so the script's ``model`` keeps working), and every rank
   takes the state of the latest step any survivor completed: from its own snapshot in host
   memory (:mod:`trainfleet.engine.snapshot`), or, for a rank one step behind (its gradient
   all-reduce failed while a peer's succeeded), broadcast from a rank that holds it;
4. the loaders continue from that step's position, re-sharded for the new world size, with the
   same global batch: no sample is skipped or seen twice, and no step is computed again.

Under **fsdp** (one shard per rank) a rank's parameters and optimizer state exist only in its
shard: after each step the engine copies it to a rank of the next node (engine/replicas.py), and
in step 3 the survivors put the step together from their own shards and those copies
(``Engine._agree_shards``) and shard it again over the new group in the same processes
(``FSDPStrategy.reshard_in_place``: FSDP2 is taken off the script's module objects and applied
again on a new mesh). Most ranks meet the loss in the next forward's all-gathers: the forward
returns zeros shaped as the last output, and its backward and step do nothing (the batch comes
again). When a rank's shards and their copy are both gone (two adjacent nodes), or the survivors
are at different steps, :class:`InPlaceImpossible` ends the workers and every node restarts from
the last checkpoint, the report counting the steps computed again. So does a survivor whose GPU
cannot be used again after the failure (:func:`device_fault`: a sticky CUDA error, or queued work
that never finishes): its process is not reused, and the report says so. Under **hybrid** fsdp
no copy is sent: every shard group holds a whole replica, and the step is put together from one
surviving group's shards.

Under **Horovod** the lost peer stops Horovod's background loop; each survivor shuts Horovod down
and calls ``hvd.init()`` again with its new place's ``HOROVOD_*`` variables (and the attempt's
rendezvous server on node 0), as Horovod's elastic mode does, forgets the interrupted step's
pending all-reduces (``engine/horovod.py``) and goes on as under ddp. The loss can surface in the
step (``synchronize``) as well: ``engine.step`` recovers there too.

A node that **joins** (launcher/in_place.py, ``--join in-place``) is the same path without a loss:
the survivors' agents answer with ``"join": true``, every rank agrees it at ``should_stop`` and
moves at the next ``backward`` (``_recover(None, ...)``); the joining ranks make the group in
their ``setup`` (``TRAINFLEET_JOINING``), receive the newest step's state there from a survivor
(``Engine._agree_state``, shared with the recovery) and put it in place in ``resume``.

What the script sees: the ``engine.backward``/``engine.step`` of the interrupted iteration return
as usual, and ``engine.step`` returns False when the iteration's batch is to be trained again
(count steps with ``if engine.step(optimizer): step += 1``); ``engine.should_stop()`` returns
False. A rank that cannot be brought to that step, an error in another collective, or a strategy
without this path (dp) raises the original error: the agent then restarts the workers from the
last checkpoint, as before, and says why. Under fsdp a joining rank makes
the same exchange (``Engine._agree_shards``), holding nothing: it receives every shard and the rest
of the step from the survivors.

Where the agent and the engine meet is this module's :class:`Handshake` (the agent writes with
:func:`write_next`).
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from trainfleet.engine.contract import (
    IN_PLACE_IMPOSSIBLE,
    lost_path,
    next_path,
    read_json,
    ready_path,
    resumes_path,
    write_json,
)

PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
             "NCCL communicator was aborted", "remote process exited", "Socket closed", "Connection timed out",
             "Connection was likely closed",  # the group's store, its socket closed
             "Horovod has been shut down")  # Horovod's ring, its background loop stopped by a peer's closed socket
WAIT_FOR_AGENT = 30.0  # seconds a worker waits for its agent's answer before it gives up (and exits)


class InPlaceImpossible(RuntimeError):
    """The survivors cannot go on in place (a rank's shards and their copy both lost, ranks at
    steps no peer can bring together): the workers exit and every node restarts from the last
    checkpoint (the agent reads this class's name in the log: launcher/elastic.py)."""

    def __init__(self, why: str):
        super().__init__(f"{IN_PLACE_IMPOSSIBLE} {why}; restarting from the last checkpoint instead")


DEVICE_PROBE_TIMEOUT = 10.0  # seconds a survivor's GPU gets to finish its queued work after the group is aborted


def device_fault(device: torch.device, timeout: float = DEVICE_PROBE_TIMEOUT) -> str | None:
    """Why this process's device cannot be used again after a failure, or None where it can (the
    CPU, always). On CUDA: the queued work must finish (``synchronize``) and a kernel and a copy
    back must run, within ``timeout``: a sticky error (an illegal access or a device-side assert
    leaves the context failing every call until the process exits) or a kernel that never ends
    means the process must be started again. The probe runs on a thread of its own, so a hung
    device costs ``timeout``, not the job (the idea of NVIDIA resiliency-ext's CUDA health check)."""
    if device.type != "cuda":
        return None
    failure: list[BaseException] = []

    def probe() -> None:
        try:
            torch.cuda.synchronize(device)
            if torch.ones(1, device=device).add_(1).item() != 2.0:
                raise RuntimeError("1 + 1 came back wrong")
        except Exception as err:  # noqa: BLE001 - any error: the context is not usable
            failure.append(err)

    thread = threading.Thread(target=probe, name="trainfleet-device-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"its GPU ({device}) did not finish its queued work within {timeout:g}s"
    if failure:
        first = (str(failure[0]).strip().splitlines() or [type(failure[0]).__name__])[0]
        return f"its CUDA context is unusable ({first})"
    return None


def lost_a_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because a peer process went away."""
    text = str(err)
    return isinstance(err, RuntimeError) and not isinstance(err, InPlaceImpossible) \
        and any(marker in text for marker in PEER_LOST)


@dataclass
class Handshake:
    """The worker's side of the files its agent reads and writes (``base`` from the launcher)."""

    base: str

    def say_lost(self, attempt: int, steps: int, where: str) -> None:
        write_json(lost_path(self.base), {"attempt": attempt, "steps": steps, "where": where,
                                           "pid": os.getpid()})

    def say_resumes(self) -> None:
        """The script calls ``engine.resume`` and ``engine.should_stop``: a node can join in place
        (the ranks agree it in should_stop, the joining ones take the peers' state in resume);
        without them, a join restarts every worker from a checkpoint."""
        write_json(resumes_path(self.base), {"pid": os.getpid()})

    def say_ready(self) -> None:
        """A joining worker: about to join the new group (its agent tells node 0 once all are)."""
        write_json(ready_path(self.base), {"pid": os.getpid()})

    def wait_next(self, attempt: int, timeout: float = WAIT_FOR_AGENT) -> dict | None:
        """The agent's answer for an attempt after ``attempt`` (None after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            place = self.newer(attempt)
            if place is not None:
                return place
            time.sleep(0.005)
        return None

    def newer(self, attempt: int) -> dict | None:
        """The agent's answer now, if it is for an attempt after ``attempt``."""
        place = read_json(next_path(self.base))
        if place is not None and isinstance(place.get("attempt"), int) and place["attempt"] > attempt \
                and isinstance(place.get("env"), dict):
            return place
        return None


def rebuild_ddp_in_place(wrapped: Any, make: Any) -> None:
    """Give the user's DDP object a fresh reducer over the current default process group: a new
    DDP is built around the same module and its attributes moved into the old object (the script
    and the optimizer keep their references; the parameters are the same tensors)."""
    fresh = make(wrapped.module)
    wrapped.__dict__.update(fresh.__dict__)


def socket_inodes() -> dict[str, int]:
    """This process's sockets: inode -> file descriptor (Linux; empty elsewhere)."""
    found: dict[str, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found[link] = int(name)
    return found


def cut(inodes: set[str]) -> int:
    """Shut down the sockets among ``inodes`` (a process group's, recorded when it was made): a
    collective waiting on them fails at once, here and in every peer waiting on this process
    (gloo's abort does not wake a waiting collective). Returns how many were cut."""
    count = 0
    for inode, fd in socket_inodes().items():
        if inode not in inodes:
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):  # gloo's listener must live on
                sock.shutdown(socket.SHUT_RDWR)
                count += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the fd stays the group's: it closes it
    return count


class GroupSockets:
    """The sockets a process group (DDP's default group, Horovod's gloo ring) opened, recorded
    around its making, so in-place recovery can cut them (:func:`cut`)."""

    def __init__(self) -> None:
        self.inodes: set[str] = set()
        self._before: set[str] | None = None  # while a group is being made: the sockets there were before

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Around the making of a group: its sockets are the ones that are new after it (kept only
        when it was made)."""
        before = set(socket_inodes())
        self._before = before
        try:
            yield
        finally:
            self._before = None
        self.inodes = set(socket_inodes()) - before

    def live(self) -> set[str]:
        """The sockets a cut must close for this rank's collectives to fail now: the group's, or
        while a group is being made (in-place recovery waiting for a member), every socket made
        since (its store's)."""
        before = self._before
        return set(socket_inodes()) - before if before is not None else set(self.inodes)

    def cut(self) -> int:
        """Shut the group's sockets down and forget them (closed by their owner now: their inode
        numbers may be a later socket's)."""
        count = cut(self.inodes)
        self.inodes = set()
        return count


class Watcher(threading.Thread):
    """Watches for the agent's answer while the script trains: an answer this process did not ask
    for (its node's agent learnt of a lost or frozen node first, or a peer's error never reached
    this rank, or a node joins) makes ``on_answer(place)`` cut the old group's sockets, so the
    collective this rank waits in fails now and the engine recovers. ``on_answer`` returns False
    to be asked again (a join waits for the step's own collectives)."""

    def __init__(self, handshake: Handshake, current: Any, on_answer: Any, interval: float = 0.05):
        super().__init__(name="trainfleet-recovery", daemon=True)
        self.handshake, self.current, self.on_answer, self.interval = handshake, current, on_answer, interval
        self.stopped = threading.Event()
        self._seen = -1

    def run(self) -> None:
        path = next_path(self.handshake.base)
        while not self.stopped.wait(self.interval):
            if not path.exists():
                continue
            place = read_json(path)
            attempt = place.get("attempt") if place else None
            if isinstance(attempt, int) and attempt > self.current() and attempt != self._seen \
                    and self.on_answer(place):
                self._seen = attempt
