"""recovery.device_fault: whether a survivor's process may be reused after a failure (in-place
recovery). The CUDA side, a context poisoned by a device-side assert, is tests/gpu/test_cuda.py."""
import torch

from trainfleet.engine.recovery import device_fault


def test_the_cpu_is_always_reusable():
    assert device_fault(torch.device("cpu")) is None
