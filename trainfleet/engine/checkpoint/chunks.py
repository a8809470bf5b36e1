"""Reading a DCP folder's tensor chunks straight from its shard files.

DCP's ``FileSystemWriter`` stores every chunk as its own ``torch.save`` archive, and its load runs
a planner pass and a weights-only ``torch.load`` for each: about 0.2 ms a chunk whatever its
size. A folder written by 4 ranks gives each of 2 readers twice the chunks of one written by 2,
so resharding cost 1.36x a same-world load (run.txt at 6614828).

Here :func:`plan` finds, for each tensor of this rank (a DTensor's shard or a whole tensor), the
stored chunks that overlap it and the part of each; :func:`read_chunks` reads chunks lying
together with one call into a reused buffer and copies each part into place.

:class:`ChunkDecoder` decodes a chunk's archive. The first chunk of a kind goes through
``torch.load(weights_only=True)``, and the decoder learns its archive: its length, its bytes up
to the end of its pickle, where its byte-order record and storage record lie, and the tensor's
layout. It keeps that only for a plain CPU tensor over exactly one storage record, in this
machine's byte order. A later chunk of the same length, starting with the same bytes (so the same
pickle), with the same byte-order record and storage header in the same places, is that kind:
its storage bytes are viewed (or copied as bytes) with that layout, without a zip walk or a
pickle. The view never reaches outside the chunk's storage record (the layout came from a tensor
torch.load built over that many bytes). Anything else goes through ``torch.load``: nothing is
read that the weights-only path would refuse.
"""
from __future__ import annotations

import io
import math
import struct
import sys
from typing import Any

import torch

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # a zip local file header, 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # a central directory entry, 46 bytes
_END = struct.Struct("<IHHHHIIH")  # the end of central directory record, 22 bytes
_LOCAL_SIGNATURE, _CENTRAL_SIGNATURE, _END_SIGNATURE = 0x04034B50, 0x02014B50, 0x06054B50
_STORED, _ZIP64 = 0, 0xFFFFFFFF
_NATIVE = sys.byteorder.encode()  # torch.load swaps the bytes of an archive of the other order


def _records(raw: memoryview) -> dict[str, tuple[int, int, int]] | None:
    """``{name below the archive's folder: (start, size, its local header's offset)}`` of an
    uncompressed torch archive, from its central directory (torch writes the sizes there, after
    the data), or None where the layout is not the plain one torch writes (a comment, zip64,
    compression, anything out of bounds)."""
    end = len(raw)
    if end < _END.size:
        return None
    signature, _, _, _, count, size, offset, comment = _END.unpack_from(raw, end - _END.size)
    if signature != _END_SIGNATURE or comment or offset + size > end - _END.size or _ZIP64 in (size, offset):
        return None
    records: dict[str, tuple[int, int, int]] = {}
    pos = offset
    for _ in range(count):
        if pos + _CENTRAL.size > end:
            return None
        fields = _CENTRAL.unpack_from(raw, pos)
        method, stored, length, name_length, extra_length, note_length, local = (
            fields[4], fields[8], fields[9], fields[10], fields[11], fields[12], fields[16])
        if fields[0] != _CENTRAL_SIGNATURE or method != _STORED or stored != length or _ZIP64 in (stored, local):
            return None
        name = bytes(raw[pos + _CENTRAL.size:pos + _CENTRAL.size + name_length]).decode("utf-8", "replace")
        pos += _CENTRAL.size + name_length + extra_length + note_length
        if local + _LOCAL.size > offset:
            return None
        header = _LOCAL.unpack_from(raw, local)
        start = local + _LOCAL.size + header[9] + header[10]
        if header[0] != _LOCAL_SIGNATURE or start + length > offset:
            return None
        records[name.partition("/")[2]] = (start, length, local)
    return records


class ChunkError(Exception):
    """A chunk that does not decode: its file, its byte offset there and why."""

    def __init__(self, name: str, offset: int, cause: BaseException):
        first = (str(cause).strip().splitlines() or [""])[0].split(". ")[0][:160]  # not torch's advice after it
        super().__init__(f"the chunk at byte {offset}: {type(cause).__name__}: {first}")
        self.name, self.offset = name, offset


class ChunkDecoder:
    """Decodes chunk archives read into memory; one per load, as what it learns (the module's
    docstring) holds for one folder."""

    def __init__(self) -> None:
        self._known: dict[int, list[tuple[bytes, tuple[tuple[int, bytes], ...], Any]]] = {}
        self.fast = self.slow = 0  # chunks viewed from a known archive / read with torch.load

    def _match(self, raw: torch.Tensor) -> tuple[memoryview, Any]:
        view = memoryview(raw.numpy())
        for prefix, marks, layout in self._known.get(len(view), ()):
            if view[:len(prefix)] == prefix and all(view[at:at + len(mark)] == mark for at, mark in marks):
                return view, layout
        return view, None

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """The tensor stored in ``raw`` (a uint8 CPU tensor holding one chunk's whole archive)."""
        view, layout = self._match(raw)
        if layout is None:
            self.slow += 1
            tensor = torch.load(io.BytesIO(view), map_location="cpu", weights_only=True)
            self._learn(view, tensor)
            return tensor
        self.fast += 1
        dtype, shape, stride, offset, begin, nbytes = layout[:6]
        stored = raw[begin:begin + nbytes]
        if stored.storage_offset() % dtype.itemsize:
            stored = stored.clone()  # a chunk that starts at an odd place in its file: align it
        flat = stored.view(dtype)  # its storage offset counts in dtype's items
        return flat.as_strided(shape, stride, flat.storage_offset() + offset)

    def copy_into(self, raw: torch.Tensor, target: torch.Tensor, spans: list[tuple[int, int, int]]) -> None:
        """Copy the part ``spans`` ((dim, start, length) each) of the chunk in ``raw`` into ``target``.

        A known, contiguous chunk cut along its first dimension only, into a contiguous target of its
        dtype, is copied as bytes straight from ``raw`` (no tensor built, any alignment)."""
        view, layout = self._match(raw)
        if layout is not None and layout[6] and target.dtype == layout[0] and target.is_contiguous() and all(
                at == 0 and length == layout[1][dim] for dim, at, length in spans[1:]):
            dtype, shape, _, _, begin, _, _ = layout
            row = dtype.itemsize * math.prod(shape[1:])
            first, count = (spans[0][1], spans[0][2]) if spans else (0, 1)
            start = begin + first * row
            if target.numel() * dtype.itemsize == count * row:
                self.fast += 1
                target.view(-1).view(torch.uint8).copy_(raw[start:start + count * row])
                return
        source = self.decode(raw)
        for dim, at, length in spans:
            source = source.narrow(dim, at, length)
        if source.shape != target.shape:
            raise ValueError(f"a chunk of {tuple(source.shape)} where {tuple(target.shape)} was expected")
        target.copy_(source)

    def _learn(self, view: memoryview, tensor: Any) -> None:
        records = _records(view)
        if records is None or type(tensor) is not torch.Tensor or tensor.is_quantized:
            return
        pickled, order, storage = records.get("data.pkl"), records.get("byteorder"), records.get("data/0")
        nbytes = tensor.untyped_storage().nbytes()
        if (pickled is None or order is None or storage is None or storage[1] != nbytes
                or [name for name in records if name.startswith("data/")] != ["data/0"]
                or view[order[0]:order[0] + order[1]] != _NATIVE or storage[0] % tensor.element_size()):
            return
        marks = ((order[0], _NATIVE), (storage[2], bytes(view[storage[2]:storage[0]])))  # + storage's header
        dense = (tensor.is_contiguous() and tensor.storage_offset() == 0
                 and tensor.numel() * tensor.element_size() == nbytes)
        layout = (tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset(), storage[0],
                  nbytes, dense)
        self._known.setdefault(len(view), []).append((bytes(view[:pickled[0] + pickled[1]]), marks, layout))


def _local(tensor: torch.Tensor, seen: dict[Any, Any]) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """This rank's part of ``tensor`` and its offset in the whole tensor (zeros for a plain one), or
    None for a DTensor whose shard is not the one contiguous block its placements give. ``seen``
    keeps the placements' answer per global shape (the same for every tensor of that shape)."""
    spec = getattr(tensor, "_spec", None)
    if spec is None:
        return tensor.detach(), (0,) * tensor.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    key = (tuple(tensor.shape), id(tensor.device_mesh), tuple(tensor.placements))
    if key not in seen:
        seen[key] = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    shape, offset = seen[key]
    local = tensor._local_tensor.detach()
    return (local, tuple(offset)) if tuple(local.shape) == tuple(shape) else None


def _overlap(start: tuple[int, ...], size: tuple[int, ...], chunk_start: Any,
             chunk_size: Any) -> list[tuple[int, int, int]] | None:
    """Per dimension (the overlap's start in the local part, in the chunk, its length), or None."""
    spans = []
    for a, n, b, m in zip(start, size, chunk_start, chunk_size):
        low, high = max(a, b), min(a + n, b + m)
        if high <= low:
            return None
        spans.append((low - a, low - b, high - low))
    return spans


def plan(template: dict[str, torch.Tensor], entries: dict[str, Any],
         storage_data: dict[Any, Any]) -> list[tuple] | None:
    """``(file, offset, length, target view, [(dim, start in chunk, length)])`` for every stored chunk
    that overlaps this rank's part of a template tensor, or None where a tensor's part is not a plain
    block (DCP's own planner then reads it)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    reads, seen = [], {}
    for key, tensor in template.items():
        local = _local(tensor, seen)
        if local is None:
            return None
        part, start = local
        size = tuple(part.shape)
        for chunk in entries[key].chunks:
            spans = _overlap(start, size, tuple(chunk.offsets), tuple(chunk.sizes))
            if spans is None:
                continue
            info = storage_data.get(MetadataIndex(key, chunk.offsets))
            if info is None:
                return None
            target = part
            for dim, (at, _, length) in enumerate(spans):
                target = target.narrow(dim, at, length)
            reads.append((info.relative_path, info.offset, info.length, target,
                          [(dim, at, length) for dim, (_, at, length) in enumerate(spans)]))
    return reads


def read_chunks(folder: Any, reads: list[tuple], gap: int = 1 << 16, run: int = 8 << 20) -> ChunkDecoder:
    """Do :func:`plan`'s reads: each shard file opened once; chunks that lie together (less than
    ``gap`` bytes apart, up to ``run`` bytes in all) read with one call into one reused buffer, each
    then copied out of it (a fresh buffer per file cost more in page faults than it saved)."""
    decoder = ChunkDecoder()
    per_file: dict[str, list[tuple]] = {}
    for read in reads:
        per_file.setdefault(read[0], []).append(read)
    runs: list[tuple[str, list[tuple]]] = []
    for name, wanted in per_file.items():
        wanted.sort(key=lambda r: r[1])
        for read in wanted:
            last = runs[-1][1] if runs and runs[-1][0] == name else None
            if last is not None and read[1] - (last[-1][1] + last[-1][2]) < gap and \
                    read[1] + read[2] - last[0][1] <= run:
                last.append(read)
            else:
                runs.append((name, [read]))
    spans = [(name, chunk[0][1], max(offset + size for _, offset, size, _, _ in chunk) - chunk[0][1], chunk)
             for name, chunk in runs]
    buffer = torch.empty(max((length for _, _, length, _ in spans), default=0), dtype=torch.uint8)
    stream, current = None, None
    try:
        for name, start, length, chunk in spans:
            if name != current:
                if stream is not None:
                    stream.close()
                stream, current = open(folder / name, "rb"), name
            stream.seek(start)
            if stream.readinto(memoryview(buffer[:length].numpy())) != length:
                raise OSError(f"{name}: short read at {start}")
            for _, offset, size, target, cut in chunk:
                try:
                    decoder.copy_into(buffer[offset - start:offset - start + size], target, cut)
                except Exception as err:  # torch.load's errors on damaged bytes are of many kinds
                    raise ChunkError(name, offset, err) from err
    finally:
        if stream is not None:
            stream.close()
    return decoder
