"""Checkpoint benchmarks on a ~100 MB state (6 x 2048x2048 float32), interleaved rounds:

- ckpt_save_vs_torch_save: engine.save MB/s against torch.save + fsync (target >= 0.95);
- ckpt_async_blocking: time an asynchronous save blocks against a synchronous save (target <= 0.2);
- ckpt_load_vs_torch_load: engine.load into a model (CRC verified, the check on a second thread
  while the file loads) against torch.load + load_state_dict (target <= 1.1), and the same
  with verify=False (no target);
- safetensors_load_vs_load_file: engine.load of a .safetensors file into a model against
  safetensors.torch.load_file + load_state_dict (target <= 1.05).

(A comparison of loading a single file written by 2 workers against one written by 1 was dropped:
a replicated ddp state makes the same file either way, so its ratio was ~1 by construction.
Loading across world sizes where the files do differ is fsdp_bench's fsdp_reshard_load_vs_same_world.)

Loads are short, so they run 3x the rounds; each comparison with pairs also prints the ratio
of every pair, and a verdict only when their quartiles lie on one side of the target.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import Comparison, cleans_up, interleave, rounds_from_args, scratch
from benchmarks.probes.big_model import build
from trainfleet.engine.engine import Engine


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _torch_save(model: torch.nn.Module, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(model.state_dict(), handle)
        handle.flush()
        os.fsync(handle.fileno())


def measure(rounds: int, folder: Path) -> list[Comparison]:
    engine = Engine(strategy="single")
    model = build()
    size_mb = sum(p.numel() * p.element_size() for p in model.state_dict().values()) / 2**20
    ours_path, peer_path = folder / "ours.pt", folder / "peer.pt"
    save = interleave(rounds, lambda: size_mb / _timed(lambda: engine.save(ours_path, model=model)),
                      lambda: size_mb / _timed(lambda: _torch_save(model, peer_path)),
                      Comparison("ckpt_save_vs_torch_save (MB/s)", target=0.95, lower_is_better=False))

    def async_block() -> float:
        blocked = _timed(lambda: engine.save(folder / "async.pt", model=model, asynchronous=True))
        engine.wait_for_checkpoint()
        return blocked

    blocking = interleave(rounds, async_block, lambda: _timed(lambda: engine.save(folder / "sync.pt", model=model)),
                          Comparison("ckpt_async_blocking (s)", target=0.2))
    target = build()

    def torch_load() -> None:
        target.load_state_dict(torch.load(peer_path, map_location="cpu", weights_only=True))

    load_rounds = rounds * 3
    load = interleave(load_rounds, lambda: _timed(lambda: engine.load(ours_path, model=target)),
                      lambda: _timed(torch_load), Comparison("ckpt_load_vs_torch_load (s)", target=1.1))
    unverified = interleave(load_rounds, lambda: _timed(lambda: engine.load(ours_path, model=target, verify=False)),
                            lambda: _timed(torch_load),
                            Comparison("ckpt_load_unverified_vs_torch_load (s)", target=None))
    safetensors_path = folder / "model.safetensors"
    engine.save(safetensors_path, model=model, format="safetensors")

    def load_file() -> None:
        from safetensors.torch import load_file as read

        target.load_state_dict(read(safetensors_path))

    safetensors = interleave(load_rounds, lambda: _timed(lambda: engine.load(safetensors_path, model=target)),
                             lambda: _timed(load_file),
                             Comparison("safetensors_load_vs_load_file (s)", target=1.05))
    engine.close()
    print(f"  (state {size_mb:.0f} MB; files in the page cache; load includes the CRC check, "
          f"which plain torch.load skips)")
    return [save, blocking, load, unverified, safetensors]


@cleans_up
def main(argv: list[str] | None = None) -> None:
    rounds = rounds_from_args(__doc__, argv, rounds=7, quick=2)
    folder = scratch()
    try:
        for comparison in measure(rounds, folder):
            print(comparison.line(), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
