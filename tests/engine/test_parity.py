"""Strategy parity: single, dp, ddp, fsdp and horovod give the same losses and weights for the same global batch.

dp is compared only on 2+ GPUs: on CPU nn.DataParallel is a pass-through, and comparing it with
single would compare single with itself (test_dp_on_cpu_is_single_and_says_so checks that instead).
"""
import json

import pytest

from tests.conftest import SCRIPTS, horovod_available
from trainfleet.engine.checkpoint.tools import read_checkpoint

SCRIPT = str(SCRIPTS / "parity_train.py")
FSDP = ["--strategy", "fsdp"]
RUNS = {
    "single": (["--strategy", "single"], []),
    "ddp": (["--gpus", "2", "--strategy", "ddp"], []),
    "fsdp2": ([*FSDP, "--gpus", "2"], []),  # LeNet is below the auto policy's 1M: the root only
    "fsdp4": ([*FSDP, "--gpus", "4", "--strategy-opt", "wrap=Conv2d,Linear"], []),  # every layer a block
    "fsdp4_hybrid": ([*FSDP, "--gpus", "4", "--strategy-opt", "sharding=hybrid", "--strategy-opt", "shard_size=2",
                      "--strategy-opt", "wrap=Linear"], []),
    "fsdp_hybrid_2nodes": ([*FSDP, "--nodes", "2", "--gpus", "2", "--strategy-opt", "sharding=hybrid",
                            "--strategy-opt", "wrap=Linear"], []),  # shard within a node, replicate across
    "fsdp2_options": ([*FSDP, "--gpus", "2", "--strategy-opt", "wrap=Linear",
                       "--strategy-opt", "reshard_after_forward=false", "--strategy-opt", "cpu_offload=true",
                       "--strategy-opt", "activation_checkpointing=true"], []),
    "fsdp2_wrap": ([*FSDP, "--gpus", "2", "--strategy-opt", "wrap=Linear"], []),
    "fsdp2_accumulate": ([*FSDP, "--gpus", "2", "--strategy-opt", "wrap=Linear"], ["--accumulate", "4"]),
    "ddp2_accumulate": (["--gpus", "2"], ["--accumulate", "4"]),  # micro-batches of 2 under no_sync
    "horovod": (["--gpus", "2", "--strategy", "horovod"], []),
    # BatchNorm: per-worker statistics differ from one process's; sync_batchnorm makes them global
    "single_bn": (["--strategy", "single"], ["--batchnorm"]),
    "ddp2_bn": (["--gpus", "2"], ["--batchnorm"]),
    "ddp4_syncbn": (["--gpus", "4", "--strategy-opt", "sync_batchnorm=true"], ["--batchnorm"]),
    "fsdp2_syncbn": ([*FSDP, "--gpus", "2", "--strategy-opt", "sync_batchnorm=true", "--strategy-opt", "wrap=Linear"],
                     ["--batchnorm"]),
    # fp16 autocast + GradScaler: horovod's scaler path (synchronize, unscale, step) against ddp's
    "horovod_16mixed": (["--gpus", "2", "--strategy", "horovod", "--precision", "16-mixed"], []),
    "ddp_16mixed": (["--gpus", "2", "--strategy", "ddp", "--precision", "16-mixed"], []),
    # gradients all-reduced in fp16: close to fp32, not equal
    "horovod_fp16_compression": (["--gpus", "2", "--strategy", "horovod", "--strategy-opt", "compression=fp16"], []),
}


def _run(launch, tmp_path, name):
    launch_args, script_args = RUNS[name]
    out = tmp_path / name
    out.mkdir()
    result = launch(name, *launch_args, SCRIPT, str(out), "--steps", "6", "--global-batch-size", "16", *script_args)
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "losses.json").read_text())
    return info, read_checkpoint(out / "final.pt")["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.conftest import run_cli

    tmp = tmp_path_factory.mktemp("parity")

    def launch(name, *args):
        return run_cli("launch", "--log-dir", str(tmp / "logs" / name), *args, timeout=180)

    # two jobs at a time: much of a short job is its start-up's waits (the suite's longest set-up)
    from concurrent.futures import ThreadPoolExecutor

    names = [name for name in RUNS if not name.startswith("horovod") or horovod_available()]
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(names, pool.map(lambda name: _run(launch, tmp, name), names)))
    return done


OTHERS = ["ddp", "fsdp2", "fsdp2_wrap", "fsdp4", "fsdp4_hybrid", "fsdp_hybrid_2nodes", "fsdp2_options",
          "fsdp2_accumulate", "ddp2_accumulate", pytest.param("horovod", marks=pytest.mark.horovod)]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_runs_report_their_strategy_and_world(runs):
    expected = {"single": ("single", 1), "ddp": ("ddp", 2), "fsdp2": ("fsdp", 2),
                "fsdp4": ("fsdp", 4), "fsdp4_hybrid": ("fsdp", 4), "horovod": ("horovod", 2)}
    for name, (strategy, world) in expected.items():
        if name in runs:
            assert (runs[name][0]["strategy"], runs[name][0]["world_size"]) == (strategy, world), name


def test_fsdp_options_take_effect(runs):
    info = {name: runs[name][0] for name in runs}
    assert info["single"]["param_type"] == "Parameter" and info["fsdp2"]["param_type"] == "DTensor"
    assert info["fsdp2"]["sharded_blocks"] == 0  # 61k parameters: below the auto policy's 1M
    assert info["fsdp4"]["sharded_blocks"] == 5  # 2 Conv2d + 3 Linear
    assert info["fsdp4_hybrid"]["sharded_blocks"] == 3
    # Activation checkpointing runs each wrapped block's forward again in backward.
    assert info["single"]["forward_calls_per_step"] == 1
    assert info["fsdp2_options"]["forward_calls_per_step"] == 2
    assert info["fsdp2_accumulate"]["forward_calls_per_step"] == 4  # four micro-batches
    assert info["ddp2_accumulate"]["forward_calls_per_step"] == 4
    assert info["ddp2_accumulate"]["synced_backwards_per_step"] == 1  # three of the four under no_sync
    assert info["ddp"]["synced_backwards_per_step"] == 1


def test_no_sync_skips_the_gradient_reduction(runs):
    """Under ``engine.no_sync`` the first three of four micro-batches communicate no gradients: the
    Flight Recorder's count of reductions per step is the same as without accumulation (fsdp's
    reduce-scatter runs as an all-reduce on gloo), while the parameter all-gathers run for every
    micro-batch. Equal losses alone could not show this: syncing every micro-batch gives the same
    numbers, four times the traffic."""
    plain = runs["fsdp2_wrap"][0]["collectives_per_step"]
    accumulated = runs["fsdp2_accumulate"][0]["collectives_per_step"]
    assert plain["all_reduce"] >= 2  # each block's gradients, and the loss's mean
    assert accumulated["all_reduce"] == plain["all_reduce"], (plain, accumulated)
    assert accumulated["all_gather"] == 4 * plain["all_gather"], (plain, accumulated)
    ddp, ddp_accumulated = runs["ddp"][0]["collectives_per_step"], runs["ddp2_accumulate"][0]["collectives_per_step"]
    assert ddp_accumulated.get("all_reduce") == ddp.get("all_reduce") >= 2, (ddp, ddp_accumulated)


@pytest.mark.parametrize("other", OTHERS)
def test_same_losses_every_step(runs, other):
    single, theirs = runs["single"][0]["losses"], runs[other][0]["losses"]
    assert len(single) == len(theirs) == 6
    assert single[-1] < single[0]  # it trains
    for step, (a, b) in enumerate(zip(single, theirs)):
        assert abs(a - b) < 1e-5, f"step {step}: single {a} vs {other} {b}"


@pytest.mark.parametrize("other", OTHERS)
def test_same_final_weights(runs, other):
    assert _max_diff(runs["single"][1], runs[other][1]) < 1e-5


@pytest.mark.horovod
def test_horovod_16_mixed_equals_ddp_16_mixed(runs):
    hvd, ddp = runs["horovod_16mixed"][0], runs["ddp_16mixed"][0]
    assert hvd["precision"] == ddp["precision"] == "16-mixed" and hvd["param_dtype"] == "torch.float32"  # fp32 masters
    assert hvd["loss_scale"] == ddp["loss_scale"] and hvd["loss_scale"] is not None  # the scaler ran
    for step, (a, b) in enumerate(zip(ddp["losses"], hvd["losses"])):
        assert abs(a - b) < 1e-5, f"step {step}: ddp {a} vs horovod {b}"
    assert _max_diff(runs["ddp_16mixed"][1], runs["horovod_16mixed"][1]) < 1e-5
    # and fp16 is not fp32 under another name
    assert _max_diff(runs["single"][1], runs["horovod_16mixed"][1]) > 1e-6


@pytest.mark.horovod
def test_horovod_fp16_compression_is_close_to_fp32_but_not_equal(runs):
    diff = _max_diff(runs["horovod"][1], runs["horovod_fp16_compression"][1])
    assert 0 < diff < 1e-3, diff  # gradients rounded to fp16 on the wire
    for a, b in zip(runs["horovod"][0]["losses"], runs["horovod_fp16_compression"][0]["losses"]):
        assert abs(a - b) < 1e-3


@pytest.mark.parametrize("other", ["ddp4_syncbn", "fsdp2_syncbn"])
def test_sync_batchnorm_matches_one_process(runs, other):
    """Losses, weights and running statistics equal single's at the same global batch."""
    assert runs[other][0]["synced_batchnorms"] == 1
    for step, (a, b) in enumerate(zip(runs["single_bn"][0]["losses"], runs[other][0]["losses"])):
        assert abs(a - b) < 1e-5, f"step {step}: single {a} vs {other} {b}"
    single, theirs = runs["single_bn"][1], runs[other][1]
    assert "features.1.running_var" in theirs  # BatchNorm's own names: checkpoints move either way
    assert _max_diff(single, theirs) < 1e-5


def test_without_sync_batchnorm_workers_normalise_their_own_slice(runs):
    """The limit the option removes, shown: per-worker statistics train another model."""
    assert runs["ddp2_bn"][0]["synced_batchnorms"] == 0
    assert _max_diff(runs["single_bn"][1], runs["ddp2_bn"][1]) > 1e-4


def test_dp_on_cpu_is_single_and_says_so(tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "dp"
    out.mkdir()
    result = run_cli("launch", "--log-dir", str(tmp_path / "logs"), "--gpus", "2", "--strategy", "dp", SCRIPT,
                     str(out), "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert "strategy dp runs one CPU process (DataParallel passes through)" in result.stderr
    info = json.loads((out / "losses.json").read_text())
    assert (info["strategy"], info["world_size"], info["model_type"]) == ("dp", 1, "LeNet")  # not wrapped


@pytest.mark.gpu(devices=2)
def test_dp_on_gpus_matches_single(tmp_path):
    """nn.DataParallel over 2 GPUs against one GPU (TF32 off in the script: both sides compute in fp32)."""
    from tests.conftest import run_cli

    results = {}
    for name, args in (("single", ["--strategy", "single"]), ("dp", ["--gpus", "2", "--strategy", "dp"])):
        out = tmp_path / name
        out.mkdir()
        result = run_cli("launch", "--log-dir", str(tmp_path / "logs"), *args, SCRIPT, str(out), "--steps", "6",
                         "--global-batch-size", "16", timeout=300)
        assert result.returncode == 0, result.stderr
        results[name] = json.loads((out / "losses.json").read_text()), read_checkpoint(out / "final.pt")["model"]
    info = results["dp"][0]
    assert (info["strategy"], info["model_type"], info["device"]) == ("dp", "DataParallel", "cuda:0")
    for step, (a, b) in enumerate(zip(results["single"][0]["losses"], info["losses"])):
        assert abs(a - b) < 1e-5, f"step {step}: single {a} vs dp {b}"
    assert _max_diff(results["single"][1], results["dp"][1]) < 1e-5
