"""Rank layout, device and backend selection: the CUDA/NCCL logic, tested without a GPU."""
import pytest

from trainfleet.engine.environment import ClusterEnvironment, backend_for, device_index, resolve_accelerator
from trainfleet.launcher.devices import physical_cuda_devices, visible_cuda_devices, visible_devices_for
from trainfleet.utils.errors import UsageError


def test_plain_process_is_a_world_of_one():
    env = ClusterEnvironment.from_env({})
    assert (env.rank, env.world_size, env.launched) == (0, 1, False)


def test_torchrun_variables():
    env = ClusterEnvironment.from_env({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                                       "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == (5, 1, 8, 4, 1)
    assert env.launched


@pytest.mark.parametrize("env, match", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "outside WORLD_SIZE"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=3"),
])
def test_inconsistent_variables(env, match):
    with pytest.raises(UsageError, match=match):
        ClusterEnvironment.from_env(env)


def test_accelerator_choice():
    assert resolve_accelerator(None, 0) == "cpu"
    assert resolve_accelerator("auto", 2) == "cuda"
    assert resolve_accelerator("cpu", 8) == "cpu"
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_accelerator("cuda", 0)
    with pytest.raises(UsageError, match="Unknown accelerator"):
        resolve_accelerator("tpu", 0)


def test_one_device_per_local_rank():
    assert device_index(3, 4, 4) == 3
    with pytest.raises(UsageError, match="4 workers on this node but only 2 CUDA devices"):
        device_index(0, 4, 2)


def test_backend_follows_the_device():
    assert backend_for("cuda") == "nccl"
    assert backend_for("cpu") == "gloo"


@pytest.mark.parametrize("mask, physical, expected", [
    (None, 4, 4), ("", 4, 0), ("0,1", 4, 2), ("2", 4, 1), ("-1", 4, 0), ("0,7,1", 4, 1),
    ("0,1", 0, 0), ("GPU-8a7c,GPU-1b2d", 2, 2),
])
def test_cuda_visible_devices(mask, physical, expected):
    env = {} if mask is None else {"CUDA_VISIBLE_DEVICES": mask}
    assert visible_cuda_devices(env, physical=physical) == expected


def test_visible_devices_for_dp():
    assert visible_devices_for(2, {}) == "0,1"
    assert visible_devices_for(2, {"CUDA_VISIBLE_DEVICES": "3,5,6"}) == "3,5"


def test_gpus_a_container_cannot_open_are_not_counted(tmp_path):
    # The driver's /proc lists all four GPUs of the host; the container was given /dev/nvidia1
    # and /dev/nvidia3 only (as `docker --gpus '"device=1,3"'` does).
    proc, dev = tmp_path / "proc", tmp_path / "dev"
    dev.mkdir()
    for minor in range(4):
        gpu = proc / f"0000:{minor + 0x17:02x}:00.0"
        gpu.mkdir(parents=True)
        (gpu / "information").write_text(f"Model: \t\t NVIDIA H100\nIRQ:   \t\t 100\nDevice Minor: \t {minor}\n")
    for minor in (1, 3):
        (dev / f"nvidia{minor}").write_bytes(b"")
    assert physical_cuda_devices(proc, dev) == 2
    (proc / "0000:17:00.0" / "information").unlink()  # nothing to check: the driver's word stands
    assert physical_cuda_devices(proc, dev) == 3


def test_nccl_group_is_bound_to_the_rank_gpu_and_aborted_after_a_failure():
    import datetime

    import torch
    import torch.distributed as dist

    from trainfleet.engine.ddp import group_options, release_by, release_group

    gpu = torch.device("cuda", 3)
    assert group_options("nccl", gpu, 60) == {"backend": "nccl", "timeout": datetime.timedelta(seconds=60),
                                              "device_id": gpu}
    assert "device_id" not in group_options("gloo", torch.device("cpu"), 60)  # gloo takes no device
    assert release_by("nccl", failed=True) == "abort"
    assert release_by("nccl", failed=False) == release_by("gloo", failed=True) == "destroy"
    dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1,
                            **group_options("gloo", torch.device("cpu"), 60))
    release_group("gloo", failed=True)
    assert not dist.is_initialized()


def test_collective_timeouts_default_to_torchs_own(monkeypatch):
    """NCCL 10 minutes, gloo 30, unless --collective-timeout or timeout_s says (issue 22 item 17;
    the old code gave NCCL 30 minutes)."""
    from trainfleet.engine.ddp import default_timeout_s

    assert (default_timeout_s("nccl"), default_timeout_s("gloo")) == (600.0, 1800.0)
