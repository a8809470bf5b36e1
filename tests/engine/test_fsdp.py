"""The fsdp strategy: wrap policies, mesh shapes, precision under FSDP2, options and bad input.

Parity with single/ddp is in test_parity.py, resharding resume in test_resume.py.
"""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import SCRIPTS, run_cli
from trainfleet.engine.checkpoint.tools import read_checkpoint
from trainfleet.engine.engine import Engine
from trainfleet.engine.fsdp import FSDPMixedPrecision, fsdp_precision, select_blocks
from trainfleet.engine.precision import build_precision
from trainfleet.engine.options import check_strategy_options, mesh_shape, parse_strategy_option
from trainfleet.utils.errors import UsageError

SCRIPT = str(SCRIPTS / "parity_train.py")


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(width, width), torch.nn.Linear(width, width)


class Tower(torch.nn.Module):
    def __init__(self, width=64, depth=3):
        super().__init__()
        self.embed = torch.nn.Linear(8, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 2)


def test_wrap_by_class_name_class_and_callable():
    tower = Tower()
    assert select_blocks(tower, "Block") == list(tower.blocks)
    assert select_blocks(tower, [Block]) == list(tower.blocks)
    assert select_blocks(tower, lambda m: m is tower.head) == [tower.head]
    assert select_blocks(tower, "none") == [] and select_blocks(tower, None) == []


def test_wrap_by_parameter_count_picks_the_smallest_modules_that_reach_it():
    tower = Tower(width=64)  # a Linear(64, 64) holds 4160 parameters, a Block 8320
    chosen = select_blocks(tower, 4000)
    assert chosen == [layer for b in tower.blocks for layer in (b.fc1, b.fc2)]
    chosen = select_blocks(tower, 8000)  # each Block, not its layers; the ModuleList of 3 is then empty
    assert chosen == list(tower.blocks)
    assert select_blocks(tower, "auto") == []  # 25k parameters: under 1M, the root alone


def test_wrap_naming_no_submodule_lists_what_there_is():
    with pytest.raises(UsageError, match=r"wrap='TransformerBlock' matches no submodule of Tower.*"
                                         r"\['Block', 'Linear', 'ModuleList'\]"):
        select_blocks(Tower(), "TransformerBlock")


def test_mesh_shapes():
    assert mesh_shape(4, "full", None, 4) == (4,)
    assert mesh_shape(8, "hybrid", None, 4) == (2, 4)  # shard inside a node of 4, replicate across 2
    assert mesh_shape(4, "hybrid", 2, 4) == (2, 2)
    with pytest.raises(UsageError, match=r"world size 6 does not divide into shard groups of 4.*\[1, 2, 3, 6\]"):
        mesh_shape(6, "hybrid", 4, 6)
    with pytest.raises(UsageError, match="shard_size=2 applies to sharding=hybrid only"):
        mesh_shape(4, "full", 2, 4)
    with pytest.raises(UsageError, match=r"Unknown fsdp sharding 'zero3'"):
        mesh_shape(4, "zero3", None, 4)


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("16-mixed", torch.float16),
                                         ("O1", torch.float16), ("O2", torch.float16)])
def test_mixed_precision_becomes_fsdp2_policy(name, dtype):
    precision = fsdp_precision(build_precision(name))
    assert isinstance(precision, FSDPMixedPrecision) and precision.dtype == dtype
    root, block = precision.policy(root=True), precision.policy(root=False)
    assert (root.param_dtype, root.reduce_dtype, root.output_dtype) == (dtype, torch.float32, torch.float32)
    assert block.output_dtype is None  # only the root casts its output back
    precision.attach(torch.device("cpu"))  # a GradScaler for fp16 only: bf16 needs no loss scaling
    assert (precision.scaler is not None) == (dtype == torch.float16)


def test_fp32_and_pure_fp16_stay_as_they_are():
    assert type(fsdp_precision(build_precision("32"))).__name__ == "Precision"
    assert fsdp_precision(build_precision("O3")).name == "O3"


def test_options_of_other_strategies_are_refused_naming_their_owner():
    with pytest.raises(UsageError, match=r"'find_unused_parameters' is a ddp option; fsdp takes \["):
        Engine(strategy="fsdp", find_unused_parameters=True)
    with pytest.raises(UsageError, match="'backward_passes_per_step' is a horovod option"):
        check_strategy_options("fsdp", ["backward_passes_per_step"])
    with pytest.raises(UsageError, match="'sharding' is a fsdp option; ddp takes"):
        check_strategy_options("ddp", ["sharding"])
    assert parse_strategy_option("reshard_after_forward=false") == ("reshard_after_forward", False)
    assert parse_strategy_option("shard_size=2") == ("shard_size", 2)
    assert parse_strategy_option("wrap=Block,Linear") == ("wrap", "Block,Linear")


PLAIN_SCRIPT = """
import sys, torch, trainfleet
engine = trainfleet.Engine(strategy="fsdp", seed=0)  # no launcher: a world of one, same code path as N
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
model, optimizer = engine.setup(model, optimizer)
# the optimizer was built on the unsharded parameters and now steps the sharded ones
assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
assert all(type(p).__name__ == "DTensor" for p in model.parameters())
before = [p.full_tensor().clone() for p in model.parameters()]
engine.backward(model(torch.randn(4, 4)).sum())
engine.step(optimizer)
assert all(not torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
engine.save(sys.argv[1], model=model, optimizer=optimizer, step=1)
"""


def test_plain_python_script_with_fsdp_trains_and_saves_a_folder(tmp_path):
    # In its own process: DTensor's caches keep a gloo socket open until the process exits.
    result = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT, str(tmp_path / "c")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c" / ".metadata").is_file() and (tmp_path / "c" / "trainfleet.pt").is_file()
    assert read_checkpoint(tmp_path / "c")["extra"] == {"step": 1}


def test_optimizer_that_already_stepped_is_refused():
    engine = Engine(strategy="fsdp")
    try:
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.Adam(model.parameters())
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        with pytest.raises(UsageError, match="optimizer has state from steps taken before engine.setup"):
            engine.setup(model, optimizer)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def precision_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_precision")
    runs = {}
    for name, args in {"fp32": ["--strategy", "single"], "bf16": ["--precision", "bf16"],
                       "16-mixed": ["--precision", "16-mixed"], "O2": ["--precision", "O2"],
                       "O3": ["--precision", "O3"]}.items():
        out = tmp / name
        out.mkdir()
        strategy = [] if name == "fp32" else ["--strategy", "fsdp", "--gpus", "2", "--strategy-opt", "wrap=Linear"]
        result = run_cli("launch", "--log-dir", str(tmp / "logs"), *strategy, *args, SCRIPT, str(out),
                         "--steps", "6", timeout=180)
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads((out / "losses.json").read_text())
    return runs


@pytest.mark.parametrize("name, compute", [("bf16", "torch.bfloat16"), ("16-mixed", "torch.float16"),
                                           ("O2", "torch.float16"), ("O3", "torch.float16")])
def test_precision_under_fsdp(precision_runs, name, compute):
    run, fp32 = precision_runs[name], precision_runs["fp32"]
    assert run["compute_dtype"] == compute  # what the gathered Linear weight is during forward
    # mixed: fp32 sharded masters; O3: the model itself is fp16, sharded as fp16
    assert run["param_dtype"] == ("torch.float16" if name == "O3" else "torch.float32")
    assert run["losses"][-1] < run["losses"][0]
    for a, b in zip(run["losses"], fp32["losses"]):
        assert abs(a - b) < 0.02, (name, run["losses"], fp32["losses"])


def test_bad_fsdp_input_is_one_line_and_exit_2(tmp_path):
    cases = [
        (["--strategy-opt", "find_unused_parameters=true"], "is a ddp option; fsdp takes"),
        (["--gpus", "3", "--strategy-opt", "sharding=hybrid", "--strategy-opt", "shard_size=2"],
         "world size 3 does not divide into shard groups of 2"),
        (["--amp-backend", "apex", "--precision", "O2"], "--amp-backend apex does not work with --strategy fsdp"),
        (["--strategy-opt", "sharding=zero3"], "Unknown fsdp sharding 'zero3'"),
    ]
    for extra, expected in cases:
        result = run_cli("launch", "--log-dir", str(tmp_path / "logs"), "--strategy", "fsdp", *extra,
                         SCRIPT, str(tmp_path), timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not list(tmp_path.glob("final*"))


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_every_rank_starts_from_rank_0s_weights(tmp_path, strategy):
    """A script that seeds ranks apart (or loads pretrained weights on rank 0 only): after setup
    every rank holds rank 0's weights, under fsdp as under ddp. On the old code fsdp cut each rank's
    shard from its own start and trained a mix."""
    result = run_cli("launch", "--log-dir", str(tmp_path / "logs"), "--strategy", strategy, "--gpus", "2",
                     str(SCRIPTS / "rank_apart_init.py"), str(tmp_path), timeout=180)
    assert result.returncode == 0, result.stderr
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["equal_to_rank0"] for r in records), records
    assert records[0]["equal_to_own_start"] and not records[1]["equal_to_own_start"]
