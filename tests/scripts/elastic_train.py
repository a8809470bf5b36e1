"""An elastic-ready script: resumes from its checkpoint folder, checkpoints every few steps and
when ``engine.should_stop()``, and records what every rank trained on.

    elastic_train.py OUT [--steps N] [--save-every K] [--step-sleep S] [--global-batch-size G]

Checkpoints go to OUT/ckpt. Each rank appends one JSON line per step to
OUT/trace/a<attempt>.r<rank>.jsonl (step, epoch, dataset indices, world size, the attempt it was
trained in: in place, a worker's attempt moves on under the same file); it writes
``<pid> <agent pid>`` to OUT/pids/node<N>.r<rank> when it starts. Rank 0 writes
OUT/progress (``attempt step``) every step and OUT/final.pt at the end.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from indexed import WithIndex  # tests/scripts, next to this script
from slow_payload import Slow

import trainfleet
from trainfleet.datasets import build_dataset
from trainfleet.models import build_model

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=24)
parser.add_argument("--save-every", type=int, default=4)
parser.add_argument("--step-sleep", type=float, default=0.0)
parser.add_argument("--forward-sleep", type=float, default=0.0, help="... or sleep this long before each forward")
parser.add_argument("--global-batch-size", type=int, default=6)
parser.add_argument("--slow-save-at", type=int, default=0, help="the save after this step takes --slow-save s")
parser.add_argument("--slow-save", type=float, default=3.0)
parser.add_argument("--joiner-delay", type=float, default=0.0, help="a node joining in place waits this long first")
parser.add_argument("--joiner-stall", type=float, default=0.0,
                    help="... or waits this long after it said it is ready, before it joins the group")
parser.add_argument("--unusable-gpu-on-node", type=int, default=-1,
                    help="this node's workers find their GPU unusable after a loss (as a device-side assert leaves it)")
parser.add_argument("--finish-as-one-joins", action="store_true",
                    help="a worker that ran every step stays until its agent says a node joins in place, then finishes")
parser.add_argument("--finish-as-one-starts-joining", action="store_true",
                    help="... or stays until a joining node's worker started (before it is ready), then finishes")
parser.add_argument("--hold-for-join-at", type=int, default=0,
                    help="after a loss, the survivors stop before this step's should_stop until their agent says a "
                         "node joins in place (a test's join then lands before the end, on any machine's load)")
parser.add_argument("--hold-for-joiner-at", type=int, default=0,
                    help="... or only until a joining node's worker started (one that goes away before it is ready)")
args = parser.parse_args()
out = Path(args.out)
for folder in ("trace", "pids", "ckpt"):
    (out / folder).mkdir(parents=True, exist_ok=True)

if os.environ.get("TRAINFLEET_JOINING") == "1":  # (a test's joiner that goes away before it is ready)
    (out / "joiner-waits").write_text(str(os.getpid()))
    time.sleep(args.joiner_delay)
    if args.joiner_stall:
        import torch.distributed as dist

        make_group = dist.init_process_group

        def stalled(*a, **k):
            time.sleep(args.joiner_stall)
            return make_group(*a, **k)

        dist.init_process_group = stalled
if int(os.environ.get("TRAINFLEET_NODE", "0")) == args.unusable_gpu_on_node:
    import trainfleet.engine.engine as engine_module  # the probe's answer on a poisoned or hung GPU

    engine_module.device_fault = lambda device: ("its CUDA context is unusable (CUDA error: device-side assert "
                                                 "triggered)")
engine = trainfleet.Engine(seed=11)
attempt = engine.restart_count
(out / "pids" / f"node{os.environ.get('TRAINFLEET_NODE', '0')}.r{engine.rank}").write_text(
    f"{os.getpid()} {os.getppid()}")
dataset = WithIndex(build_dataset("synthetic", num_samples=36, shape=(1, 12, 12), num_classes=4))
model = build_model("lenet", num_classes=4, in_channels=1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
model, optimizer = engine.setup(model, optimizer)
loader = engine.dataloader(dataset, global_batch_size=args.global_batch_size)
step = engine.resume(model, optimizer, dataloader=loader, path=out / "ckpt").get("step", 0)
engine.print(f"attempt {attempt}: world size {engine.world_size}, from step {step}, "
             f"world changed: {engine.world_changed}")
trace = open(out / "trace" / f"a{attempt}.r{engine.rank}.jsonl", "a")


def told_to_join() -> bool:
    """Whether this worker's agent placed it in an attempt a node joins in place (launcher/in_place.py)."""
    from trainfleet.engine.contract import RECOVERY, next_path

    told = next_path(os.environ[RECOVERY])
    return '"join": true' in (told.read_text() if told.exists() else "")


def wait_for_join(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not told_to_join():
        time.sleep(0.05)


def wait_for_joiner(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (out / "joiner-waits").exists():
        time.sleep(0.05)


def save() -> None:
    stall = {"stall": Slow(args.slow_save)} if step == args.slow_save_at else {}  # pickled by rank 0, in the save
    engine.save(out / "ckpt" / f"step{step}.pt", model=model, optimizer=optimizer, dataloader=loader,
                keep_last=2, step=step, **stall)


while step < args.steps:
    for x, y, index in loader:
        if args.forward_sleep:  # (a peer lost meanwhile is met in the forward's collectives under fsdp)
            (out / "asleep").mkdir(exist_ok=True)
            (out / "asleep" / f"r{engine.rank}").write_text(f"{engine.restart_count} {step}")  # (for the test)
            time.sleep(args.forward_sleep)
        loss = F.cross_entropy(model(x), y)
        engine.backward(loss)
        if not engine.step(optimizer):
            continue  # the step a lost node interrupted: its batch comes again (in-place recovery)
        step += 1
        trace.write(json.dumps({"step": step, "epoch": loader.epoch, "idx": index.tolist(),
                                "world": engine.world_size, "attempt": engine.restart_count}) + "\n")
        trace.flush()
        if engine.is_main:
            (out / "progress").write_text(f"{engine.restart_count} {step}")  # in place, the attempt moves on
        time.sleep(args.step_sleep)
        if step == args.steps:
            break
        survivor = engine.restart_count == 1 and os.environ.get("TRAINFLEET_JOINING") != "1"  # (of the first loss)
        if step == args.hold_for_join_at and survivor:
            wait_for_join()
        if step == args.hold_for_joiner_at and survivor:
            wait_for_joiner()
        if engine.should_stop():
            save()
            engine.print(f"stopped at step {step} (signal {engine.stop_signal}): checkpoint saved")
            raise SystemExit(0)
        if step % args.save_every == 0:
            save()

if (args.finish_as_one_joins or args.finish_as_one_starts_joining) and os.environ.get("TRAINFLEET_JOINING") != "1":
    (out / "lingering").write_text(str(step))  # (the join comes too late)
    if args.finish_as_one_joins:
        wait_for_join()
    else:
        wait_for_joiner()
engine.save(out / "final.pt", model=model)
