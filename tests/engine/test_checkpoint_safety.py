"""Checkpoints against hostile folders, kills at the worst moment, and other writers (issue 22, items 1-5).

- a ``latest.json`` naming anything outside its folder is refused before it can delete or read it;
- a save killed at any of its renames leaves a checkpoint that resumes (file, sharded folder,
  safetensors shards; with the atomic exchange and with the two-rename fallback);
- temporaries are deleted only when their writer is provably dead (host, boot, pid, start time),
  or when nothing touched them for a day;
- two saves committing one name get a clear error, and two savers never share a temporary;
- a DCP index whose chunks point outside the folder, or that declares more tensor bytes than its
  files hold, is refused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from trainfleet.engine.checkpoint import files, temporaries
from trainfleet.engine.checkpoint.layout import resolve
from trainfleet.engine.checkpoint.sharded import ShardedCheckpointer
from trainfleet.engine.checkpoint.sharded_load import read_index
from trainfleet.engine.engine import Engine
from trainfleet.utils.errors import UsageError


def net(value: float = 0.0):
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    torch.nn.init.constant_(model.bias, value)
    return model


@pytest.fixture
def engine():
    engine = Engine(strategy="single", seed=0)
    yield engine
    engine.close()


# ----- 1. latest.json is untrusted ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["../victim", "ABSOLUTE", ".hidden", "a/b"])
def test_a_manifest_naming_outside_its_folder_deletes_nothing(engine, tmp_path, name):
    """On the old code ``keep_last=1`` rmtree'd whatever the manifest listed: here ``../victim``."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    name = str(victim) if name == "ABSOLUTE" else name
    (run / "latest.json").write_text(json.dumps({"latest": name, "checkpoints": [name]}))
    with pytest.raises(UsageError, match=r"latest.json' names .*expected the name of a checkpoint in"):
        engine.save(run / "step1.pt", model=net(), keep_last=1)
    with pytest.raises(UsageError, match=r"latest.json' names"):
        resolve(run)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_manifest_that_is_not_one_is_a_clear_error(tmp_path):
    (tmp_path / "latest.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="is not a manifest"):
        resolve(tmp_path)
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(UsageError, match="is not a readable manifest"):
        resolve(tmp_path)


# ----- 2. a kill at every rename ------------------------------------------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from trainfleet.engine.checkpoint import files
    from trainfleet.engine.engine import Engine

    folder, kind, exchange, kill_at = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    files.USE_EXCHANGE = exchange
    calls = [0]

    def counted(real):
        def rename(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return rename

    os.replace, os.rename = counted(os.replace), counted(os.rename)
    if hasattr(files, "_exchange"):
        files._exchange = counted(files._exchange)
    engine = Engine(strategy="single", seed=0)
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, 2.0)
    torch.nn.init.constant_(model.bias, 2.0)
    name = {"file": "ckpt.pt", "sharded": "ckpt", "safetensors": "weights"}[kind]
    if kind == "safetensors":  # shards of at most 16 bytes and an index, as `ckpt convert` writes them
        from trainfleet.engine.checkpoint.foreign import save_safetensors
        save_safetensors(model.state_dict(), os.path.join(folder, name), max_shard_size=16)
    else:
        engine.save(os.path.join(folder, name), model=model, keep_last=1, sharded=kind == "sharded", step=2)
    engine.close()
    print("renames", calls[0])
""")


def _first_save(folder, kind):
    engine = Engine(strategy="single", seed=0)
    name = {"file": "ckpt.pt", "sharded": "ckpt", "safetensors": "weights"}[kind]
    if kind == "safetensors":
        from trainfleet.engine.checkpoint.foreign import save_safetensors

        save_safetensors(net(1.0).state_dict(), folder / name, max_shard_size=16)
    else:
        engine.save(folder / name, model=net(1.0), keep_last=1, sharded=kind == "sharded", step=1)
    engine.close()


def _killed_save(folder, kind, exchange, kill_at):
    return subprocess.run([sys.executable, "-c", KILLER, str(folder), kind, str(int(exchange)), str(kill_at)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("kind", ["file", "sharded"])
def test_a_save_killed_at_any_rename_leaves_a_checkpoint_that_resumes(tmp_path, kind, exchange):
    """The same name saved again (weights 1 -> 2), SIGKILL before each rename in turn: what
    ``resume`` finds is always a whole checkpoint, the previous one or the new one. On the old
    code a kill between the sharded commit's two renames left no ``ckpt`` at all, and the next
    save deleted both hidden copies."""
    probe = tmp_path / "count"
    probe.mkdir()
    _first_save(probe, kind)
    renames = int(_killed_save(probe, kind, exchange, 0).stdout.split()[-1])
    assert renames >= 2
    for kill_at in range(1, renames + 1):
        folder = tmp_path / f"kill{kill_at}"
        folder.mkdir()
        _first_save(folder, kind)
        result = _killed_save(folder, kind, exchange, kill_at)
        assert result.returncode == -9, result.stderr
        engine = Engine(strategy="single", seed=0)
        model = net(0.0)
        engine.resume(model=model, path=folder)
        engine.close()
        assert model.weight.flatten().tolist() in ([1.0] * 6, [2.0] * 6), (kill_at, sorted(os.listdir(folder)))
        _first_save(folder, kind)  # the next save cleans up and works
        assert not [p for p in os.listdir(folder) if p.startswith(".")]


def test_safetensors_shards_killed_at_any_rename_leave_whole_weights(tmp_path):
    """``ckpt convert --to safetensors --max-shard-size``: a folder of shards, committed whole."""
    from trainfleet.engine.checkpoint.tools import load_state_dict

    probe = tmp_path / "count"
    probe.mkdir()
    _first_save(probe, "safetensors")
    renames = int(_killed_save(probe, "safetensors", False, 0).stdout.split()[-1])
    for kill_at in range(1, renames + 1):
        folder = tmp_path / f"kill{kill_at}"
        folder.mkdir()
        _first_save(folder, "safetensors")
        assert _killed_save(folder, "safetensors", False, kill_at).returncode == -9
        state = load_state_dict(resolve(folder / "weights"))
        assert state["weight"].flatten().tolist() in ([1.0] * 6, [2.0] * 6)


# ----- 3. stale temporaries -----------------------------------------------------------------------
def _dead_process_owner() -> str:
    """The owner id of a process of this machine that has exited (its pid may be reused later:
    the start time tells the two apart)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = temporaries.start_time(child.pid)
    child.kill()
    child.wait()
    return f"{temporaries.machine_id()}.{child.pid}.{started}"


def test_only_provably_dead_writers_lose_their_temporaries(tmp_path, caplog):
    dead = tmp_path / f".a.pt.tmp-{_dead_process_owner()}-1"
    reused = tmp_path / f".b.pt.tmp-{temporaries.machine_id()}.{os.getpid()}.1-1"  # my pid, another start
    mine = tmp_path / f".c.pt.tmp-{temporaries.owner()}-1"
    other_host = tmp_path / f".d.pt.tmp-{'f' * 12}.{os.getpid() + 1}.5-1"
    legacy = tmp_path / ".e.pt.tmp-999999-1"  # the old naming: a pid of some host
    abandoned = tmp_path / f".f.pt.tmp-{'e' * 12}.7.7-1"
    for path in (dead, reused, mine, other_host, legacy, abandoned):
        path.write_bytes(b"partial")
    day_ago = time.time() - temporaries.STALE_AFTER_S - 60
    os.utime(abandoned, (day_ago, day_ago))
    with caplog.at_level(logging.WARNING, logger="trainfleet.engine.checkpoint.temporaries"):
        removed = files.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(p.name for p in (dead, reused, abandoned))
    assert mine.exists() and other_host.exists() and legacy.exists()
    assert any("written by another host or process, untouched for 24 h" in r.getMessage() for r in caplog.records)


def test_a_live_writer_elsewhere_keeps_its_temporary_through_a_save(engine, tmp_path):
    """The old code judged ``.NAME.tmp-PID-...`` by the pid on this host: another host's live
    writer (a shared file system) lost its temporary whenever its pid was not alive here."""
    writer = tmp_path / ".other.pt.tmp-999999-140000000000"
    writer.write_bytes(b"being written elsewhere")
    engine.save(tmp_path / "mine.pt", model=net())
    assert writer.exists()


# ----- 4. two writers -----------------------------------------------------------------------------
def test_two_savers_in_one_process_never_share_a_temporary(tmp_path):
    one, two = Engine(strategy="single"), Engine(strategy="single")
    try:
        names = {ShardedCheckpointer(e.strategy, e._saver)._temporary(tmp_path / "ckpt").name for e in (one, two)}
    finally:
        one.close()
        two.close()
    assert len(names) == 2


def test_two_saves_committing_one_name_get_a_clear_error(tmp_path, monkeypatch):
    tmp = tmp_path / ".ckpt.tmp-x"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"mine")
    target = tmp_path / "ckpt"
    real_rename = os.rename

    def other_job_first(src, dst):  # the other job's commit lands between our check and our rename
        if str(dst) == str(target) and not target.exists():
            target.mkdir()
            (target / "__0_0.distcp").write_bytes(b"theirs")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", other_job_first)
    monkeypatch.setattr(os, "replace", other_job_first)
    with pytest.raises(UsageError, match="written by another save at the same moment .two jobs writing one folder"):
        files.commit_folder(tmp, target)
    assert (target / "__0_0.distcp").read_bytes() == b"theirs"


# ----- 5. a crafted DCP index ---------------------------------------------------------------------
def _rewrite_index(folder, change):
    index = read_index(folder)
    change(index)
    (folder / ".metadata").write_bytes(pickle.dumps(index))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_chunk_pointing_outside_the_folder_is_refused(engine, tmp_path, where):
    other = engine.save(tmp_path / "other", model=net(5.0), sharded=True)
    mine = engine.save(tmp_path / "mine", model=net(1.0), sharded=True)
    shard = next(other.glob("*.distcp"))
    target = f"../other/{shard.name}" if where == "parent" else str(shard)

    def point_away(index):
        index.storage_data = {key: dataclasses.replace(info, relative_path=target)
                              for key, info in index.storage_data.items()}

    _rewrite_index(mine, point_away)
    with pytest.raises(UsageError, match=r"points a chunk at .*outside the folder") as caught:
        engine.load(mine, model=net())
    assert str(shard.stat().st_size) not in str(caught.value)


def test_an_index_declaring_more_bytes_than_its_files_hold_is_refused(engine, tmp_path):
    path = engine.save(tmp_path / "ckpt", model=net(), sharded=True)

    def inflate(index):
        key = next(iter(index.state_dict_metadata))
        meta = index.state_dict_metadata[key]
        index.state_dict_metadata[key] = dataclasses.replace(meta, size=torch.Size([1 << 20, 1 << 20]))

    _rewrite_index(path, inflate)
    with pytest.raises(UsageError, match=r"declares \d+ bytes of tensors but its shard files hold \d+"):
        engine.load(path, model=net())


@pytest.mark.parametrize("offset, length", [(-(1 << 40), (1 << 40) + 8), (0, -5), (0.5, 10)])
def test_a_chunk_with_a_negative_or_odd_place_is_refused_before_anything_is_read(engine, tmp_path, offset, length):
    """A negative offset with a huge length passes "offset + length <= the file's size"; the chunk
    reader would have sized its buffer from the length (1 TiB here)."""
    path = engine.save(tmp_path / "ckpt", model=net(), sharded=True)

    def misplace(index):
        key = next(iter(index.storage_data))
        index.storage_data[key] = dataclasses.replace(index.storage_data[key], offset=offset, length=length)

    _rewrite_index(path, misplace)
    with pytest.raises(UsageError, match=r"gives a chunk of __0_0.distcp at byte"):
        engine.load(path, model=net())
