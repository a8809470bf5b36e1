"""Exact resume at any world size and across strategies, through `launch`.

An uninterrupted single-process run is the reference; each case trains to a mid-epoch
step under one layout, saves, and resumes under another. The final weights must match
the reference to 1e-5, and in the interrupted epoch no sample is seen twice or skipped.
"""
import json

import pytest

from tests.conftest import SCRIPTS, run_cli
from trainfleet.engine.checkpoint.tools import read_checkpoint

SCRIPT = str(SCRIPTS / "resume_train.py")
TOTAL, STOP = 10, 8  # 6 global batches an epoch: the stop falls 2 batches into epoch 1
LAYOUTS = {
    "single": ["--strategy", "single"],
    "dp": ["--strategy", "dp", "--gpus", "2"],
    "ddp1": ["--gpus", "1"],
    "ddp2": ["--gpus", "2"],
    "ddp4": ["--gpus", "4"],
    "fsdp1": ["--strategy", "fsdp", "--gpus", "1"],
    "fsdp2": ["--strategy", "fsdp", "--gpus", "2"],
    "fsdp4": ["--strategy", "fsdp", "--gpus", "4"],
}
WORLD = {"ddp1": 1, "ddp2": 2, "single": 1, "dp": 1, "fsdp2": 2, "fsdp4": 4}


def train(out, layout, tag, *args):
    result = run_cli("launch", "--log-dir", str(out / "logs" / tag), *LAYOUTS[layout], SCRIPT, str(out),
                     "--tag", tag, "--total-steps", str(TOTAL), *args, timeout=180)
    assert result.returncode == 0, result.stderr


def seen(out, tag):
    merged: dict[str, list[int]] = {}
    for path in sorted(out.glob(f"seen.{tag}.rank*.json")):
        for epoch, indices in json.loads(path.read_text()).items():
            merged.setdefault(epoch, []).extend(indices)
    return merged


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    train(out, "single", "ref")
    return out


@pytest.mark.parametrize("before, after", [
    ("ddp2", "ddp1"), ("ddp1", "ddp2"), ("ddp4", "ddp2"),   # world sizes 2->1, 1->2, 4->2
    ("ddp2", "single"), ("single", "ddp2"),  # across strategies
    # dp only where it is DataParallel: on CPU it is single under another name
    pytest.param("ddp2", "dp", marks=pytest.mark.gpu(devices=2)),
    # fsdp writes sharded folders: they reshard into any world size and strategy, and back
    ("fsdp4", "fsdp2"), ("fsdp2", "fsdp4"), ("fsdp2", "single"), ("ddp2", "fsdp2"), ("fsdp2", "ddp1"),
])
def test_resume_matches_uninterrupted_run(reference, before, after):
    out = reference
    tag = f"{before}-{after}"
    train(out, before, f"{tag}.a", "--stop-at", str(STOP))
    train(out, after, f"{tag}.b", "--resume-from", str(out / f"ckpt.{tag}.a.pt"))

    ref = read_checkpoint(out / "final.ref.pt")["model"]
    final = read_checkpoint(out / f"final.{tag}.b.pt")
    assert final["meta"]["world_size"] == WORLD[after]
    assert final["meta"]["strategy"] == after.rstrip("0123456789")
    assert (out / f"ckpt.{tag}.a.pt").is_dir() == before.startswith("fsdp")  # fsdp saves shard folders
    diff = max((ref[k] - final["model"][k]).abs().max().item() for k in ref)
    assert diff < 1e-5, f"final weights differ by {diff}"

    first, second, whole = seen(out, f"{tag}.a"), seen(out, f"{tag}.b"), seen(out, "ref")
    interrupted = first["1"] + second["1"]
    assert len(interrupted) == len(set(interrupted)) == (TOTAL - 6) * 8  # nothing twice
    assert sorted(interrupted) == sorted(whole["1"])                      # nothing skipped
    assert sorted(first["0"]) == list(range(48))


def test_global_batch_must_divide_at_the_new_world_size(reference):
    out = reference
    train(out, "ddp2", "odd.a", "--stop-at", "2", "--global-batch-size", "6")
    result = run_cli("launch", "--log-dir", str(out / "logs" / "odd"), "--gpus", "4", SCRIPT, str(out),
                     "--tag", "odd.b", "--global-batch-size", "6", "--resume-from", str(out / "ckpt.odd.a.pt"))
    assert result.returncode != 0
    assert "global batch size 6 does not divide over 4 workers" in result.stderr
    assert "HINT: use a multiple of 4" in result.stderr


def _max_weight_diff(out, tag_a, tag_b):
    a, b = (read_checkpoint(out / f"final.{t}.pt")["model"] for t in (tag_a, tag_b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("layout", ["ddp2", "fsdp2"])
def test_resume_restores_every_ranks_rng(tmp_path, layout):
    """With dropout, the masks after the resume are the ones the uninterrupted run drew.

    Each rank draws its own masks, so the reference is the same layout uninterrupted. Resuming
    without the saved RNG states must differ: it shows the check can see a wrong RNG.
    """
    drop = ["--dropout", "0.5"]
    train(tmp_path, layout, "ref", *drop)
    train(tmp_path, layout, "a", *drop, "--stop-at", str(STOP))
    ckpt = str(tmp_path / "ckpt.a.pt")
    train(tmp_path, layout, "b", *drop, "--resume-from", ckpt)
    train(tmp_path, layout, "fresh-rng", *drop, "--resume-from", ckpt, "--no-restore-rng")
    assert _max_weight_diff(tmp_path, "ref", "b") < 1e-5
    assert _max_weight_diff(tmp_path, "ref", "fresh-rng") > 1e-4
