"""Reading a sharded folder's chunks without a torch.load per chunk (engine/checkpoint/chunks.py):
the same tensors as torch.load, any alignment, parts of chunks, hostile and damaged chunks."""
import io
import os

import pytest
import torch

from trainfleet.engine.checkpoint.chunks import ChunkDecoder, read_chunks
from trainfleet.engine.checkpoint.sharded_load import read_index
from trainfleet.engine.checkpoint.tools import read_checkpoint
from trainfleet.engine.engine import Engine
from trainfleet.utils.errors import UsageError

CASES = {
    "matrix": torch.randn(64, 32),
    "transposed": torch.randn(8, 5).t(),
    "scalar": torch.tensor(3.5),
    "view into a larger storage": torch.randn(100)[10:30],
    "bf16": torch.randn(7, 3, dtype=torch.bfloat16),
    "int64": torch.arange(12).reshape(3, 4),
    "bool": torch.tensor([True, False, True]),
    "3-d": torch.randn(6, 4, 3),
}


def archive(tensor, skew=0):
    """``tensor`` as DCP stores a chunk (its own torch.save archive), ``skew`` bytes into a buffer."""
    stream = io.BytesIO()
    torch.save(tensor, stream)
    data = bytearray(b"x" * skew + stream.getvalue())
    return torch.frombuffer(data, dtype=torch.uint8)[skew:]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("skew", [0, 3])
def test_the_decoder_gives_what_torch_load_gives(name, skew):
    tensor = CASES[name]
    decoder = ChunkDecoder()
    for _ in range(3):  # the first through torch.load, the others from what it learnt
        raw = archive(tensor, skew)
        decoded = decoder.decode(raw)
        assert decoded.dtype == tensor.dtype and decoded.shape == tensor.shape and decoded.stride() == tensor.stride()
        assert torch.equal(decoded, tensor)
        if tensor.dim():
            rows = min(2, tensor.shape[0] - 1)
            target = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
            decoder.copy_into(raw, target, [(0, 1, rows)] + [(d, 0, tensor.shape[d]) for d in range(1, tensor.dim())])
            assert torch.equal(target, tensor[1:1 + rows])
    assert decoder.slow == 1 and decoder.fast >= 2


def test_a_chunk_like_a_known_one_but_not_the_same_goes_through_torch_load():
    decoder = ChunkDecoder()
    decoder.decode(archive(torch.zeros(16, 16)))
    raw = archive(torch.ones(16, 16))
    assert torch.equal(decoder.decode(raw), torch.ones(16, 16)) and decoder.slow == 1  # same kind: viewed
    odd = raw.clone()
    odd[100:104] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)  # inside the pickle's record
    with pytest.raises(Exception):
        decoder.decode(odd)
    assert decoder.slow == 2  # not taken for the known kind


class _Exploit:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_chunk_that_pickles_code_is_refused_and_never_runs(tmp_path):
    _Exploit.marker = tmp_path / "ran"
    stream = io.BytesIO()
    torch.save({"x": _Exploit()}, stream)
    raw = torch.frombuffer(bytearray(stream.getvalue()), dtype=torch.uint8)
    decoder = ChunkDecoder()
    decoder.decode(archive(torch.zeros(4)))
    with pytest.raises(Exception, match="Weights only load failed"):
        decoder.decode(raw)
    assert not _Exploit.marker.exists()


def _model_chunk(folder):
    index = read_index(folder)
    return next(info for key, info in index.storage_data.items() if key.fqn.startswith("model/"))


def test_a_damaged_chunk_is_one_line_naming_the_file_and_its_rank(tmp_path):
    """On the old code DCP's reader raised torch.load's UnpicklingError, with its advice to load with
    weights_only=False."""
    engine = Engine(strategy="single", seed=0)
    try:
        model = torch.nn.Linear(6, 3)
        path = engine.save(tmp_path / "ckpt", model=model, sharded=True)
        info = _model_chunk(path)
        shard = path / info.relative_path
        data = bytearray(shard.read_bytes())
        data[info.offset:info.offset + 64] = b"\0" * 64
        shard.write_bytes(bytes(data))
        with pytest.raises(UsageError, match=r"is damaged: __0_0.distcp \(written by rank 0\) holds a chunk that "
                                             r"does not decode \(the chunk at byte \d+") as caught:
            engine.load(path, model=torch.nn.Linear(6, 3))
        assert "weights_only" not in str(caught.value)
    finally:
        engine.close()


def test_chunks_next_to_each_other_are_read_in_runs_and_land_in_place(tmp_path):
    """Several chunks of one file read with one call, into parts of targets, in any order given."""
    tensors = [torch.randn(5, 4), torch.arange(6.0), torch.randn(3, 3)]
    blobs = [archive(t).numpy().tobytes() for t in tensors]
    (tmp_path / "f").write_bytes(b"".join(blobs))
    offsets = [sum(len(b) for b in blobs[:i]) for i in range(len(blobs))]
    targets = [torch.zeros(2, 4), torch.zeros(6), torch.zeros(3, 3)]
    reads = [("f", offsets[2], len(blobs[2]), targets[2], [(0, 0, 3), (1, 0, 3)]),
             ("f", offsets[0], len(blobs[0]), targets[0], [(0, 3, 2), (1, 0, 4)]),
             ("f", offsets[1], len(blobs[1]), targets[1], [(0, 0, 6)])]
    read_chunks(tmp_path, reads, run=len(blobs[0]) + len(blobs[1]))  # two runs
    assert torch.equal(targets[0], tensors[0][3:5]) and torch.equal(targets[1], tensors[1])
    assert torch.equal(targets[2], tensors[2])


def test_a_folder_reads_the_same_through_dcp_and_through_the_chunks(tmp_path):
    import torch.distributed.checkpoint as dcp

    engine = Engine(strategy="single", seed=0)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
        optimizer = torch.optim.Adam(model.parameters())
        model(torch.randn(3, 6)).sum().backward()
        optimizer.step()
        path = engine.save(tmp_path / "ckpt", model=model, optimizer=optimizer, sharded=True)
    finally:
        engine.close()
    ours = read_checkpoint(path)
    index = read_index(path)
    theirs = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in index.state_dict_metadata.items()}
    dcp.load(theirs, checkpoint_id=str(path), no_dist=True)
    for name, value in ours["model"].items():
        assert torch.equal(value, theirs[f"model/{name}"]), name
