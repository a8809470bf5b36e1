"""What goes into a checkpoint and how it comes back: state keyed so it survives a change
of wrapper, strategy, device or world size.

Optimizer state is keyed by parameter *name* (``layer.weight``), not by position, so a
checkpoint saved from a DDP-wrapped model loads into a bare one and vice versa. RNG states
are kept per rank; at another world size each rank takes the state of ``rank % saved_world``.
"""
from __future__ import annotations

import random
import sys
from typing import Any

import torch

from trainfleet.utils.errors import UsageError


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter indices replaced by parameter names.

    Parameters the model does not own (an optimizer over extra tensors) keep a
    positional name ``param.<index>``.
    """
    names = _param_names(model) if model is not None else {}
    index_to_name: dict[int, str] = {}
    position = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            index_to_name[position] = names.get(id(param), f"param.{position}")
            position += 1
    state = optimizer.state_dict()
    return {
        "state": {index_to_name[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in state["param_groups"]],
        "keyed_by": "name",
    }


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None,
                                 saved: dict[str, Any], path: str = "<checkpoint>") -> None:
    """Restore what :func:`optimizer_state_by_name` produced (or a plain positional state_dict)."""
    if saved.get("keyed_by") != "name":
        try:
            optimizer.load_state_dict(saved)  # positional: another tool's optimizer.state_dict()
        except (ValueError, KeyError) as err:
            raise UsageError(f"optimizer state in {path!r} does not fit this optimizer ({err}).",
                             "load the model only, or build the optimizer as the checkpoint's was.") from err
        return
    current = optimizer_state_by_name(optimizer, model)
    wanted = check_optimizer_names(optimizer, model, saved, path, current)
    position = {name: i for i, name in enumerate(wanted)}
    groups = []
    for saved_group, current_group in zip(saved["param_groups"], current["param_groups"]):
        groups.append({**saved_group, "params": [position[n] for n in current_group["params"]]})
    state = {position[name]: value for name, value in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def check_optimizer_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None,
                          saved: dict[str, Any], path: str = "<checkpoint>",
                          current: dict[str, Any] | None = None) -> list[str]:
    """The optimizer's parameter names, after checking that ``saved`` (keyed by name) has the same.

    Raises:
        UsageError: the saved state is for other parameters (names both ways in the message).
    """
    current = current or optimizer_state_by_name(optimizer, model)
    wanted = [name for group in current["param_groups"] for name in group["params"]]
    saved_names = [name for group in saved["param_groups"] for name in group["params"]]
    if sorted(wanted) != sorted(saved_names):
        missing = sorted(set(wanted) - set(saved_names))[:3]
        extra = sorted(set(saved_names) - set(wanted))[:3]
        raise UsageError(f"optimizer state in {path!r} is for other parameters "
                         f"(not saved: {missing}; not in this model: {extra}).",
                         "load the model only, or build the optimizer over the same parameters.")
    return wanted


def capture_rng(device: torch.device | None = None, every_gpu: bool = False) -> dict[str, Any]:
    """This process's RNG states in weights-only loadable types (tensors, ints, tuples). On CUDA,
    ``cuda_own`` is the generator of ``device`` (the rank's GPU, whatever its index here) and
    ``cuda`` every visible GPU's; ``every_gpu``: the process computes on all of them (dp)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    # is_initialized() first: is_available() asks NVML through ctypes on every call (50 us, a third of the
    # state copy kept after each step), and no CUDA generator has a state before CUDA is initialised
    if torch.cuda.is_initialized() and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        state["cuda_every_gpu"] = every_gpu
        if device is not None and device.type == "cuda":
            state["cuda_own"] = torch.cuda.get_rng_state(device)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def cuda_states_for(state: dict[str, Any], device: torch.device | None, count: int) -> dict[int, torch.Tensor]:
    """Which saved CUDA generator state goes to which device index of this process. A rank's own
    GPU gets the state of the GPU it computed on (its index may differ between layouts: cuda:3 of
    8 visible then, cuda:0 of 1 now); every visible GPU gets its own only when the process drives
    several (dp) and sees as many as were saved."""
    saved_all, own = state.get("cuda") or [], state.get("cuda_own")
    if state.get("cuda_every_gpu") and len(saved_all) == count:
        return dict(enumerate(saved_all))
    if own is not None and device is not None and device.type == "cuda":
        return {device.index or 0: own}
    if "cuda_every_gpu" not in state:  # written before trainfleet kept the rank's own: by index, as then
        return dict(enumerate(saved_all[:count]))
    return {}


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Put back what :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if torch.cuda.is_available():
        for index, generator in cuda_states_for(state, device, torch.cuda.device_count()).items():
            torch.cuda.set_rng_state(generator, index)
    numpy = sys.modules.get("numpy")
    if numpy is not None and "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint (those that are imported)."""
    import platform

    from trainfleet import __version__

    versions = {"trainfleet": __version__, "torch": str(torch.__version__), "python": platform.python_version()}
    for name in ("torchvision", "horovod", "numpy"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            versions[name] = str(module.__version__)
    return versions
