"""The job token: every value in the control store signed, so that a process that merely reaches
the master's port cannot stop, signal or join the job.

``launch`` generates a token for every job it starts from one place (local and simulated nodes,
``--hosts``: sent to each agent on its stdin, SLURM: in the job's environment); agents started
by hand with ``--node-rank`` use ``contract.JOB_TOKEN`` when it is exported (the same value on
every node), and sign nothing without it.

A value is stored as ``<mac>:<value>``, the mac an HMAC-SHA256 of the key and the value under
the token, so a signed value cannot be moved to another key. What a token does not prevent (said
in the README's trust model): a process that reaches the port can still delete or overwrite keys
(denial of service: the job then fails, it is not steered), replay a value it saw at the same key,
and reach the workers' own store (torch's, one per attempt). Keep the ports inside the cluster.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from typing import Any, Iterable

from trainfleet.engine import contract
from trainfleet.launcher.store_values import printable

MAC_CHARS = 32
UNSIGNED = b"<not signed with this job's token>"  # what get() answers for a forged value; no parser takes it
SIGNED_SHAPE = re.compile(rb"[0-9a-f]{%d}:" % MAC_CHARS)


def new_token() -> str:
    return secrets.token_hex(16)


def looks_signed(raw: bytes) -> bool:
    """True for a value written by an agent that signs (read by one that does not)."""
    return SIGNED_SHAPE.match(raw) is not None


class SignedStore:
    """A control-store client that signs what it writes and checks what it reads.

    A value that does not carry the token's signature reads as absent (``check``) or as
    :data:`UNSIGNED` (``get``), and is said once per key. Every other method passes through.

    Args:
        store: a TCPStore client.
        token: the job's token.
        who: how this agent names itself in the line it prints (``node 1``).
    """

    def __init__(self, store: Any, token: str, who: str):
        self.store, self.who = store, who
        self._key = token.encode()
        self.rejected: dict[str, bytes] = {}  # key -> the unsigned value last seen there

    def _mac(self, key: str, value: bytes) -> bytes:
        digest = hmac.new(self._key, key.encode() + b"\0" + value, hashlib.sha256).hexdigest()
        return digest[:MAC_CHARS].encode()

    def sign(self, key: str, value: str | bytes) -> bytes:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return self._mac(key, data) + b":" + data

    def open(self, key: str, raw: bytes) -> bytes | None:
        """The value inside ``raw`` when its signature is this job's, else None (said once)."""
        mac, sep, value = raw.partition(b":")
        if sep and hmac.compare_digest(mac, self._mac(key, value)):
            return value
        if key not in self.rejected:
            print(f"launch: {self.who}: ignoring {key} in the control store: its value "
                  f"{printable(raw.decode(errors='replace'), 60)!r} is not signed with this job's token "
                  f"(written by a process outside the job, or a node started with another {contract.JOB_TOKEN})",
                  file=sys.stderr, flush=True)
        self.rejected[key] = raw
        return None

    def set(self, key: str, value: str | bytes) -> None:
        self.store.set(key, self.sign(key, value))

    def get(self, key: str) -> bytes:
        value = self.open(key, self.store.get(key))
        return UNSIGNED if value is None else value

    def check(self, keys: Iterable[str]) -> bool:
        keys = list(keys)
        return self.store.check(keys) and all(self.open(key, self.store.get(key)) is not None for key in keys)

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        """Set ``key`` to ``desired`` if it holds ``expected`` ("": absent or empty); returns what it holds."""
        want = self.sign(key, desired)
        current = b""
        for old in ([b""] if expected == "" else []) + [self.sign(key, expected)]:
            current = self.store.compare_set(key, old, want)
            if current == want:
                return desired.encode()
        value = self.open(key, current)
        return UNSIGNED if value is None else value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def with_token(store: Any, token: str, who: str) -> Any:
    """``store`` signing with ``token``; the plain store when the job has none."""
    return SignedStore(store, token, who) if token else store
