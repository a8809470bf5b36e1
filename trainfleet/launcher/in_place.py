"""The agents' side of in-place recovery (the engine's is :mod:`trainfleet.engine.recovery`).

An elastic ddp job loses a node: the survivors' workers do not exit, they say so in a file beside
their log and wait. Then:

1. each agent whose worker said so posts ``inplace/<attempt>/<node>``;
2. node 0 calls the roll (``rollcall/<attempt>``): every agent whose workers are all alive answers
   ``here/<attempt>/<node>`` within one poll; the nodes that answered are the members of the next
   attempt. Node 0 stops waiting once every node whose agent is still connected answered
   (:mod:`trainfleet.launcher.presence`: a killed agent's connection closes at once), at
   :data:`ROLL_WAIT` for the others, and at ``--heartbeat-timeout`` for one still beating (a
   frozen or cut-off agent answers nothing);
3. node 0 opens the next attempt's worker store, posts ``inplace/<attempt + 1>``, the members and
   ``job/attempt``; every member's agent writes each worker's new place (rank, world size, the
   store's port) and watches the same processes under the new attempt.

Anything else (node 0 lost, fewer than MIN nodes answer, a member that is no longer one, the
workers' own refusal) ends the attempt as before: the workers are stopped and restarted from
the last checkpoint.

A node that joins takes the same road the other way (``NodeAgent._prepare_join``): node 0 hosts the
next attempt's store beside the running one and posts ``members/<N>`` and ``joining/<node>``; the
joiner starts its workers in attempt N; once they said they are ready (:func:`all_ready`: they
are about to make the group, in ``engine.setup``) its agent posts ``joinready/<N>/<node>``, node 0
calls the roll and posts ``inplace/<N>``, and every member writes its workers' places with
``"join": true``. Only where the workers said their script resumes through the engine
(:func:`can_take_joiners`); otherwise, and with ``--join restart``, the workers checkpoint and stop.
"""
from __future__ import annotations

import time
from typing import Any

from trainfleet.engine import contract
from trainfleet.engine.contract import lost_path, next_path, read_lost, ready_path, resumes_path, write_next

ROLL_WAIT = 1.0  # seconds node 0 waits for an answer (longer only for an agent still connected and beating)
# the variables a worker takes from its new place (the rest of its environment is unchanged)
PLACE_VARIABLES = ("RANK", "WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE",
                   "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", contract.WORLD_CHANGED,
                   contract.RESUME_RECORD)


def clear(specs: list[Any]) -> None:
    """Before a group of new workers starts: no answer of an earlier attempt's may remain."""
    for spec in specs:
        if spec.recovery:
            for path in (lost_path(spec.recovery), next_path(spec.recovery), ready_path(spec.recovery),
                         resumes_path(spec.recovery)):
                path.unlink(missing_ok=True)


def waiting(specs: list[Any], attempt: int) -> list[Any]:
    """This node's workers that lost a peer in ``attempt`` and wait for their agent."""
    found = []
    for spec in specs:
        said = read_lost(spec.recovery) if spec.recovery else None
        if said is not None and said.get("attempt") == attempt:
            found.append(spec)
    return found


def roll_call(store: Any, attempt: int, members: list[int], lost: dict[int, str], gone: Any = None,
              longest: float = ROLL_WAIT) -> list[int]:
    """Node 0: the members whose agents answer (node 0 itself included) within :data:`ROLL_WAIT`,
    or, while ``gone()`` does not name them (their agent is connected and beating), within
    ``longest``: on a loaded machine a live agent may answer late, and dropping it would take a
    healthy node out of the job; a frozen or cut-off one stops beating and is given up then."""
    store.set(f"rollcall/{attempt}", "1")
    answered = {0}
    started = time.monotonic()
    candidates = [node for node in members if node != 0 and node not in lost]
    waiting_for = candidates
    while waiting_for:
        for node in waiting_for:
            if store.check([f"here/{attempt}/{node}"]):
                answered.add(node)
        waiting_for = [node for node in candidates if node not in answered]
        waited = time.monotonic() - started
        if waiting_for and waited >= ROLL_WAIT:
            if gone is None or waited >= longest:
                break
            silent = gone()
            waiting_for = [node for node in waiting_for if node not in silent]
        time.sleep(0.01 if waited < ROLL_WAIT else 0.05)
    return sorted(answered)


def place_workers(specs: list[Any], env_for: Any, attempt: int, join: bool = False) -> None:
    """Every worker of this node: its place in ``attempt`` (``env_for(local_rank)`` is its full
    worker environment in that attempt); ``join``: a node joins, nobody was lost (the workers
    move at their next step's collective, not in a save)."""
    for spec in specs:
        env = env_for(spec.local_rank)
        place = {key: env[key] for key in env if key in PLACE_VARIABLES or key.startswith("HOROVOD_")}
        spec.rank = int(env["RANK"])
        spec.env.update(place)
        write_next(spec.recovery, {"attempt": attempt, "env": place, "join": join})


def _all_said(specs: list[Any], path_of: Any) -> bool:
    return bool(specs) and all(spec.recovery and path_of(spec.recovery).exists() for spec in specs)


def all_ready(specs: list[Any]) -> bool:
    """A joining node: every worker said it is about to join the running job's new group."""
    return _all_said(specs, ready_path)


def can_take_joiners(specs: list[Any]) -> bool:
    """Node 0: its workers' script calls ``engine.resume`` and ``engine.should_stop`` (where the
    ranks agree a join and a joining rank takes the peers' state), so a node can join without
    stopping them."""
    return _all_said(specs, resumes_path)
