"""FSDP measurements inside one launched job; rank 0 writes OUT/<mode>.json.

    launch --gpus N fsdp_probe.py OUT MODE [--width W] [--depth D] [--rounds R] [--steps K]

MODE:
  step     the engine's fsdp step against a hand-written FSDP2 loop (fully_shard per block, then the
           root; Adam built on the sharded parameters), alternating K-step rounds in this process
  memory   each rank's peak memory while it trains 3 steps under TRAINFLEET_STRATEGY, above what the
           process held before the model existed: on CPU the peak resident set (VmHWM, reset after
           setup), on CUDA the allocator's peak; so gathered blocks, gradients, optimizer state and
           activations all count (the shard bytes alone would be 1/N by construction)
  save     engine.save (sharded) against dcp.save by hand on the same state, alternating; and the
           time an asynchronous save blocks
  load     (needs --ckpt-a/--ckpt-b) the time to load folder A and folder B into this world, alternating
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import trainfleet  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(width, width), torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Tower(torch.nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.blocks = torch.nn.Sequential(*(Block(width) for _ in range(depth)))
        self.head = torch.nn.Linear(width, 8)

    def forward(self, x):
        return self.head(self.blocks(x))


def local_bytes(tensors):
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def batch(args, step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(args.batch, args.width, generator=g), torch.randint(0, 8, (args.batch,), generator=g)


def train_steps(model, optimizer, args, backward, step_fn, count):
    times = []
    for i in range(count):
        x, y = batch(args, i)
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        backward(loss)
        step_fn()
        times.append(time.perf_counter() - start)
    return times


def hand_written(args):
    """What a user writes with FSDP2 directly: the peer of the engine's step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Tower(args.width, args.depth)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, lambda loss: loss.backward(), step


def through_engine(engine, args):
    torch.manual_seed(0)
    model = Tower(args.width, args.depth)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model, optimizer = engine.setup(model, optimizer)
    return model, optimizer, engine.backward, lambda: engine.step(optimizer)


def mode_step(engine, args):
    ours, peer = through_engine(engine, args), hand_written(args)
    samples = {"ours": [], "peer": []}
    for index in range(args.rounds + 1):  # the first pair warms up
        order = [("ours", ours), ("peer", peer)] if index % 2 == 0 else [("peer", peer), ("ours", ours)]
        for name, (model, optimizer, backward, step) in order:
            dist.barrier()
            times = train_steps(model, optimizer, args, backward, step, args.steps)
            if index:
                samples[name].append(statistics.median(times))
    return samples


def _rss_kb(field="VmRSS"):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim():
    """Give freed heap back to the system, so the resident set is what is in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def mode_memory(engine, args):
    cuda = engine.device.type == "cuda"
    _trim()
    before = torch.cuda.memory_allocated() if cuda else _rss_kb() * 1024  # the runtime, no model yet
    model, optimizer, backward, step = through_engine(engine, args)
    _trim()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    train_steps(model, optimizer, args, backward, step, 3)  # Adam's state exists from the first step
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM") * 1024
    params = local_bytes(engine.unwrap(model).parameters())
    states = local_bytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    per_rank = engine.strategy.all_gather_object({"peak": peak - before, "params": params, "optimizer": states,
                                                  "measured": "cuda allocator" if cuda else "resident set"})
    return {"per_rank": per_rank, "parameters": sum(p.numel() for p in Tower(args.width, args.depth).parameters())}


def mode_save(engine, args):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, optimizer, backward, step = through_engine(engine, args)
    train_steps(model, optimizer, args, backward, step, 1)
    folder = Path(args.scratch)

    def ours(i):
        engine.save(folder / f"ours{i}", model=model, optimizer=optimizer, sharded=True)

    def peer(i):
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(folder / f"peer{i}"))
        dist.barrier()

    samples = {"ours": [], "peer": [], "async_blocking": []}
    for index in range(args.rounds + 1):
        order = [("ours", ours), ("peer", peer)] if index % 2 == 0 else [("peer", peer), ("ours", ours)]
        for name, fn in order:
            dist.barrier()
            start = time.perf_counter()
            fn(index)
            elapsed = time.perf_counter() - start
            if index:
                samples[name].append(elapsed)
        dist.barrier()
        start = time.perf_counter()
        engine.save(folder / f"async{index}", model=model, optimizer=optimizer, sharded=True, asynchronous=True)
        blocking = time.perf_counter() - start
        # the parameters and Adam state are copied during the next forward and backward: what that step's
        # optimizer step waited for the copies blocked training too
        train_steps(model, optimizer, args, backward, step, 1)
        blocking += engine._saver.waited
        engine.wait_for_checkpoint()
        if index:
            samples["async_blocking"].append(blocking)
        if engine.is_main:
            for name in ("ours", "peer", "async"):
                shutil.rmtree(folder / f"{name}{index}", ignore_errors=True)
    return samples


def mode_load(engine, args):
    model, optimizer, _, _ = through_engine(engine, args)
    samples = {"a": [], "b": []}
    for index in range(args.rounds + 1):
        order = ["a", "b"] if index % 2 == 0 else ["b", "a"]
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            engine.load(getattr(args, f"ckpt_{name}"), model=model, optimizer=optimizer)
            dist.barrier()
            if index:
                samples[name].append(time.perf_counter() - start)
    return samples


def mode_write(engine, args):
    model, optimizer, backward, step = through_engine(engine, args)
    train_steps(model, optimizer, args, backward, step, 1)
    engine.save(args.write_to, model=model, optimizer=optimizer, sharded=True)
    return {}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("modes", help="comma-separated, run in turn in the same workers: "
                        "step, memory, save, load, write")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--scratch")
    parser.add_argument("--ckpt-a")
    parser.add_argument("--ckpt-b")
    parser.add_argument("--write-to", help="write: the sharded checkpoint's folder")
    args = parser.parse_args()
    torch.set_num_threads(1)  # both sides alike: 2 cores shared by the workers
    strategy = os.environ.get("TRAINFLEET_STRATEGY", "fsdp")
    options = {"wrap": "Block"} if strategy == "fsdp" else {}
    engine = trainfleet.Engine(strategy=strategy, seed=0, **options)
    modes = {"step": lambda: mode_step(engine, args), "memory": lambda: mode_memory(engine, args),
             "save": lambda: mode_save(engine, args), "load": lambda: mode_load(engine, args),
             "write": lambda: mode_write(engine, args)}
    for mode in args.modes.split(","):
        result = modes[mode]()
        if engine.is_main:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{mode}.json").write_text(json.dumps(result))
    engine.close()


if __name__ == "__main__":
    main()
