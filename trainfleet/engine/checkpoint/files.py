"""Checkpoint files: written atomically (and in the background), CRC-checked and loaded weights-only;
``latest.json`` and ``keep_last``.

Saving writes a temporary file beside the target, fsyncs it, renames it over the
target and fsyncs the folder, so a crash at any moment leaves the previous file
intact (fvcore ``Checkpointer``). Loading uses ``weights_only=True``: a file that
needs arbitrary unpickling is refused unless the caller trusts it.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import mmap
import os
import pickle
import queue
import re
import threading
import time
import zipfile
import zlib
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any, Callable, Mapping

import torch

from trainfleet.engine.checkpoint.layout import MANIFEST, read_manifest, resolve
from trainfleet.engine.checkpoint.temporaries import aside_name, new_tag, owner, remove_path, temporary_name
from trainfleet.engine.checkpoint.temporaries import remove_stale as remove_stale_temporaries  # the old public name
from trainfleet.utils.errors import UsageError


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor detached and on the CPU (CPU tensors are not copied)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return type(obj)((key, to_cpu(value)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


def fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic(obj: Any, path: str | os.PathLike[str], writer: Any = None) -> Path:
    """Write ``obj`` to ``path`` through a temporary file, fsync and rename.

    Args:
        obj: what to write.
        path: the target file.
        writer: ``writer(obj, handle)``; ``torch.save`` when None.

    Returns:
        The final path. On any error the temporary file is removed and the previous
        content of ``path`` is untouched; a temporary file left by a killed process is
        removed by the next save into the same folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = path.parent / temporary_name(path, owner(), new_tag())
    try:
        with open(tmp, "xb") as handle:
            (writer or torch.save)(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _corrupt(path: Path, problem: str) -> UsageError:
    return UsageError(f"checkpoint {str(path)!r} is {problem}.", "re-save it, or load an earlier checkpoint.")


def _first_bad_record(path: Path) -> str | None:
    """None when every record's CRC32 matches (the checksums torch's zip writer stores and
    ``torch.load`` never checks), else what is wrong ("truncated ...", "corrupt: ...").

    Reads the records through one memory map, with zlib (which releases the GIL), so it can run
    on a thread beside ``torch.load`` reading the same pages: a verified load then costs about
    what a plain one does when a second core is free.
    """
    if not zipfile.is_zipfile(path):
        return None  # the legacy (pre-1.6) format carries no checksums; a cut zip fails in torch.load
    try:
        with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
            records = archive.infolist()
            if not records:
                return None
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    return _check_records(archive, records, view)
                finally:
                    view.release()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"truncated or corrupt ({err})"


def _check_records(archive: zipfile.ZipFile, records: list[zipfile.ZipInfo], view: memoryview) -> str | None:
    for info in records:
        if info.compress_type != zipfile.ZIP_STORED:  # torch stores; anything else goes through zipfile
            with archive.open(info) as member:
                while member.read(1 << 20):
                    pass
            continue
        header = bytes(view[info.header_offset:info.header_offset + 30])
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            return f"truncated or corrupt (no local header for record {info.filename!r})"
        start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
            int.from_bytes(header[28:30], "little")
        end = start + info.compress_size
        if end > len(view):
            return f"truncated or corrupt (record {info.filename!r} ends past the end of the file)"
        if zlib.crc32(view[start:end]) != info.CRC:
            return f"corrupt: record {info.filename!r} fails its CRC32 check"
    return None


USE_EXCHANGE = True  # renameat2(RENAME_EXCHANGE) where the file system has it (tests turn it off)
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step (Linux renameat2); False where that is not possible."""
    if not USE_EXCHANGE:
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def commit_folder(tmp: Path, path: Path) -> Path:
    """Make the finished folder ``tmp`` visible as ``path`` (replacing an older one) and fsync.

    ``path`` never disappears: an older one is exchanged with ``tmp`` in one atomic rename and
    deleted afterwards. Where the file system cannot exchange, the older one is moved aside first;
    a process killed between those two renames leaves it aside, and the next save into the folder
    (or a load of its ``latest.json``) puts it back (:func:`.temporaries.restore_orphans`).

    Raises:
        UsageError: another save committed ``path`` at the same moment (two jobs, one folder).
    """
    fsync_dir(tmp)
    if path.exists() and _exchange(tmp, path):
        fsync_dir(path.parent)
        remove_path(tmp)  # now the older folder
        return path
    aside = path.parent / aside_name(path) if path.exists() else None
    if aside is not None:
        os.replace(path, aside)
    try:
        os.rename(tmp, path)
    except OSError as err:
        if aside is not None:
            os.replace(aside, path)
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise UsageError(f"{str(path)!r} was written by another save at the same moment (two jobs writing one "
                             "folder?); this save was not committed.",
                             "give each job its own checkpoint folder.") from err
        raise
    fsync_dir(path.parent)
    if aside is not None:
        remove_path(aside)
    return path


def record_latest(path: Path, keep_last: int) -> list[Path]:
    """Point ``latest.json`` beside ``path`` at it and delete checkpoints beyond the last K.

    Only files this manifest recorded are ever deleted. Returns the deleted paths.
    """
    if keep_last < 1:
        raise UsageError(f"keep_last={keep_last}: expected at least 1.")
    manifest = path.parent / MANIFEST
    history = read_manifest(path.parent)["checkpoints"] if manifest.is_file() else []
    history = [name for name in history if name != path.name] + [path.name]
    doomed, history = history[:-keep_last], history[-keep_last:]
    payload = json.dumps({"latest": path.name, "checkpoints": history}, indent=1).encode()
    save_atomic(payload, manifest, writer=lambda data, handle: handle.write(data))
    removed = []
    for name in doomed:  # plain names of this folder's entries (read_manifest checked them)
        remove_path(path.parent / name)
        removed.append(path.parent / name)
    return removed


class AsyncSaver:
    """Writes checkpoints on one background thread, one at a time.

    :meth:`stage` copies the state into CPU buffers that are reused from save to save
    (pinned when the source is on CUDA), so the caller blocks only for one memory copy,
    without page faults on fresh allocations. The writer is a persistent thread fed by
    a queue: starting a thread per save would hand the GIL to it for a switch interval
    before the caller could return. An error in the background is raised by the next
    :meth:`submit` or :meth:`wait`.

    Tensors only an optimizer step writes (the parameters and optimizer state of optimizers
    whose steps call :meth:`wait_staged` first: ``stage(..., later=...)``) are copied on the
    writer thread instead, before it writes, while the next step's forward and backward run
    (CheckFreq's pipelined snapshot; on CUDA on a stream of its own after the save's point in
    the caller's stream). The caller then blocks only for the rest (buffers, RNG, side state).
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._later: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, source): the writer copies them
        self._staged = threading.Event()  # every copy of the pending save has landed
        self._staged.set()
        self.waited = 0.0  # seconds the last wait_staged() blocked (the optimizer step a save held back)

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException as err:  # surfaced by wait()
                self._error = err
            finally:
                self._idle.set()

    def stage(self, obj: Any, later: set[int] | None = None) -> Any:
        """A CPU copy of ``obj`` in reused buffers, each of its tensor's exact size. Call only after
        :meth:`wait`. Buffers the previous save had and this one does not use (a tensor that
        changed shape or went away) are freed: what stays pinned is one copy of the last state.
        ``later``: storage addresses (:func:`storage_address`) of tensors nothing writes before the
        caller's next :meth:`wait_staged`; those are copied by the writer (:meth:`submit`)."""
        used: set[tuple[Any, ...]] = set()
        self._later = []
        with torch.no_grad():
            staged = self._stage(obj, (), used, later or set())
        for key in set(self._buffers) - used:
            del self._buffers[key]
        return staged

    def _stage(self, obj: Any, path: tuple[Any, ...], used: set[tuple[Any, ...]], later: set[int]) -> Any:
        spec = getattr(obj, "_spec", None)
        if spec is not None and isinstance(obj, torch.Tensor):  # a DTensor: stage its shard, keep its layout
            from torch.distributed.tensor import DTensor

            return DTensor(self._stage(obj._local_tensor, path, used, later), spec, requires_grad=False)
        if isinstance(obj, torch.Tensor):
            key = (path, tuple(obj.shape), obj.dtype)
            buffer = self._buffers.get(key)
            if buffer is None:
                buffer = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
                self._buffers[key] = buffer
            used.add(key)
            if later and storage_address(obj) in later:
                self._later.append((buffer, obj))
                return buffer
            return buffer.copy_(obj, non_blocking=obj.is_cuda)
        if isinstance(obj, Mapping):
            return type(obj)((k, self._stage(v, path + (k,), used, later)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(self._stage(v, path + (i,), used, later) for i, v in enumerate(obj))
        return obj

    def _copy_later(self, copies: list[tuple[torch.Tensor, torch.Tensor]], after: Any) -> None:
        """The writer thread: the deferred copies, then :meth:`wait_staged` returns."""
        try:
            with torch.no_grad():
                if after is not None:  # CUDA: from the caller's stream at the save, on a stream of our own
                    event, device = after
                    stream = torch.cuda.Stream(device=device)
                    with torch.cuda.stream(stream):
                        stream.wait_event(event)
                        for buffer, source in copies:
                            buffer.copy_(source, non_blocking=True)
                    stream.synchronize()
                else:
                    for buffer, source in copies:
                        buffer.copy_(source)
        finally:
            self._staged.set()

    def staging(self) -> bool:
        """Whether the pending save's deferred copies are still running."""
        return not self._staged.is_set()

    def wait_staged(self) -> float:
        """Block until the pending save's deferred copies landed (call before anything writes the
        tensors staged ``later``: the optimizer's step); returns the seconds it blocked."""
        if self._staged.is_set():
            self.waited = 0.0
            return 0.0
        began = time.perf_counter()
        self._staged.wait()
        self.waited = time.perf_counter() - began
        return self.waited

    def submit(self, job: Callable[[], Any]) -> None:
        """Wait for the previous save, then run ``job`` in the background (after the copies
        :meth:`stage` left for later)."""
        copies, self._later = self._later, []
        self.wait()
        after = None
        if torch.cuda.is_initialized() and torch.cuda.is_available():  # (is_available() asks NVML each call)
            torch.cuda.synchronize()  # the non-blocking copies of stage() must have landed
            if any(source.is_cuda for _, source in copies):
                after = (torch.cuda.Event(), torch.cuda.current_device())
                after[0].record()
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="trainfleet-checkpoint", daemon=True)
            self._thread.start()
        self._idle.clear()
        if copies:
            self._staged.clear()

            def run() -> None:
                self._copy_later(copies, after)
                job()

            self._jobs.put(run)
        else:
            self._jobs.put(job)

    def wait(self) -> None:
        """Block until the pending save is on disk; re-raise its error if it failed."""
        self._idle.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Finish the pending save and stop the writer thread."""
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None
            self._buffers.clear()


def storage_address(tensor: torch.Tensor) -> int:
    """Where ``tensor``'s data starts (a DTensor's: its local shard's), to tell a state dict's
    entries that are an optimizer's own parameters and state (AsyncSaver.stage's ``later``)."""
    local = getattr(tensor, "_local_tensor", None)
    return (local if local is not None else tensor).data_ptr()


# Harmless globals that real checkpoints pickle beside their tensors, allowed under weights_only:
# timm's train.py stores its argparse.Namespace under "args"; paths appear in such namespaces.
SAFE_GLOBALS: list[Any] = [argparse.Namespace, PosixPath, PurePosixPath]


class _BackgroundCheck(threading.Thread):
    """:func:`_first_bad_record` on a thread, so the CRC check overlaps ``torch.load``."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="trainfleet-crc", daemon=True)
        self.path, self.problem = path, None

    def run(self) -> None:
        self.problem = _first_bad_record(self.path)

    def result(self) -> str | None:
        self.join()
        return self.problem


def load_file(path: str | os.PathLike[str], map_location: Any = "cpu", trust: bool = False,
              verify: bool = True) -> Any:
    """Load a checkpoint file (or a folder's latest), weights-only unless ``trust`` is set.

    Args:
        map_location: where tensors land, whatever device they were saved from.
        trust: allow full unpickling (only for files you trust: it can run code).
        verify: check the file's CRC32 records, on a second thread while the file loads.

    Raises:
        UsageError: the file is missing, truncated or corrupt, or needs full unpickling
            and ``trust`` is False.
    """
    path = resolve(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist.", "check the path.")
    check = _BackgroundCheck(path) if verify else None
    if check is not None:
        check.start()
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            payload = torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as err:
        problem = check.result() if check is not None else None
        # the CRC check names the cause better than the unpickler's error
        raise (_corrupt(path, problem) if problem else _load_error(path, err)) from err
    problem = check.result() if check is not None else None
    if problem is not None:
        raise _corrupt(path, problem)
    return payload


def _load_error(path: Path, err: Exception) -> Exception:
    """The one-line error for what ``torch.load`` raised."""
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it pickles {found.group(1)}" if found else "it contains pickled objects"
        return UsageError(f"refusing to load {str(path)!r}: it is not a weights-only checkpoint ({what}, "
                          "which could run code on load).",
                          "if you trust this file, pass trust=True (--trust-pickle).")
    if isinstance(err, pickle.UnpicklingError):
        return UsageError(f"checkpoint {str(path)!r} is corrupt: {err}")
    if isinstance(err, (AttributeError, ModuleNotFoundError)):  # trusted pickle of a class not importable here
        return UsageError(f"cannot unpickle {str(path)!r}: {err}.",
                          "run where the model's code is importable, or save a state_dict instead.")
    if isinstance(err, (RuntimeError, EOFError, OSError)):
        return UsageError(f"checkpoint {str(path)!r} is truncated or corrupt ({type(err).__name__}: {err}).",
                          "re-save it, or load an earlier checkpoint.")
    return err
