"""The hidden names a checkpoint is written under, and what may be done with one later; torch-free.

A save writes ``.NAME.tmp-OWNER-TAG`` beside ``NAME`` and renames it into place (a folder that
replaces another is exchanged with it, so ``NAME`` never disappears). OWNER says who wrote it:
``MACHINE.PID.START``, where MACHINE hashes the host name and the kernel's boot id (two
containers on one host differ by host name; a reboot changes the boot id) and START is the
process's start time in clock ticks since boot (a pid is reused; a pid and its start time are
not). TAG is unique per save (a random token and a count).

Cleanup (:func:`remove_stale`) deletes a temporary only when its writer is provably dead: it ran
on this machine since this boot and no process with that pid and start time exists. A temporary
of another host or container (a shared file system) is left alone unless nothing touched it for
:data:`STALE_AFTER_S`, and removing it is logged. A folder moved aside by a commit that died
half-way (``.NAME.old-OWNER-TAG`` with ``NAME`` gone) is put back, never deleted.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_S = 24 * 3600.0  # a temporary of an unknown writer untouched this long is abandoned
_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<machine>[0-9a-f]{12})\.(?P<pid>\d+)\.(?P<start>\d+)-")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-")  # before the owner id


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def machine_id() -> str:
    """12 hex digits for this host name and this boot."""
    return hashlib.sha1(f"{socket.gethostname()}\0{_boot_id()}".encode()).hexdigest()[:12]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None
    when no such process exists here."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner() -> str:
    """``MACHINE.PID.START`` of this process."""
    pid = os.getpid()
    return f"{machine_id()}.{pid}.{start_time(pid) or 0}"


def new_tag() -> str:
    """A tag no other save shares (random), for the ``TAG`` part of a name."""
    return secrets.token_hex(4)


def temporary_name(path: Path, writer: str, tag: object) -> str:
    """The hidden name ``path`` is written under by ``writer`` (an :func:`owner`)."""
    return f".{path.name}.tmp-{writer}-{tag}"


def aside_name(path: Path) -> str:
    """The hidden name an older ``path`` is moved to while a new one takes its place."""
    return f".{path.name}.old-{owner()}-{new_tag()}"


def _writer_alive(machine: str, pid: int, start: int) -> bool | None:
    """True/False when the writer ran on this machine since this boot; None when it did not."""
    if machine != machine_id():
        return None
    return start_time(pid) == start


def remove_path(path: Path) -> None:
    """Delete a checkpoint file or a sharded checkpoint folder; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def restore_orphans(folder: Path) -> list[Path]:
    """Put back checkpoints that a commit moved aside and never replaced (it died between its two
    renames): ``.NAME.old-*`` whose ``NAME`` is missing and whose writer is gone becomes ``NAME``
    again (a live writer is about to put its new ``NAME`` there). Returns them."""
    restored, now = [], time.time()
    for aside in sorted(folder.glob(".*.old-*")):
        found = _NAME.match(aside.name) or _LEGACY.match(aside.name)
        if found is None:
            continue
        visible = folder / found.group("name")
        gone = _verdict(found, aside, now) is not None or "machine" not in found.groupdict()
        if gone and not visible.exists():
            try:
                os.rename(aside, visible)
            except OSError:  # another process restored it first
                continue
            log.warning("restored %s: a save that replaced it died half-way", visible)
            restored.append(visible)
    return restored


def _verdict(found: re.Match, path: Path, now: float) -> str | None:
    """Why ``path`` may go ("dead", "old"), or None to keep it."""
    if "machine" in found.groupdict():
        alive = _writer_alive(found.group("machine"), int(found.group("pid")), int(found.group("start")))
        if alive is not None:
            return None if alive else "dead"
    try:
        age = now - path.lstat().st_mtime
    except OSError:
        return None
    return "old" if age > STALE_AFTER_S else None


def remove_stale(folder: Path, now: float | None = None) -> list[Path]:
    """Delete temporaries of saves whose writer died mid-write (``kill -9``, OOM), after putting
    back what a dead commit moved aside (:func:`restore_orphans`). Returns the deleted paths."""
    restore_orphans(folder)
    now = time.time() if now is None else now
    removed = []
    for tmp in [*folder.glob(".*.tmp-*"), *folder.glob(".*.old-*")]:
        found = _NAME.match(tmp.name) or _LEGACY.match(tmp.name)
        verdict = _verdict(found, tmp, now) if found else None
        if verdict is None:
            continue
        if verdict == "old":
            log.warning("removing %s: written by another host or process, untouched for %.0f h", tmp,
                        (now - tmp.lstat().st_mtime) / 3600)
        remove_path(tmp)
        removed.append(tmp)
    return removed
