"""Rank layout, device and backend selection: the CUDA/NCCL logic, tested without a GPU."""
import pytest

from trainfleet.engine.environment import ClusterEnvironment, backend_for, device_index, resolve_accelerator
from trainfleet.launcher.devices import visible_cuda_devices, visible_devices_for
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
