"""Model registry: ``build_model(name, **cfg)``.

Small nets (lenet, mlp, unet) are registered here; every torchvision
classification model (resnet18, resnet50, densenet121, ...) is available by its
torchvision name. Weights are never downloaded unless ``weights=`` asks for them.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

from torch import nn

from trainfleet.utils.errors import UsageError
from trainfleet.utils.registry import Registry

MODELS: Registry[Any] = Registry("model")
MODELS.register("lenet", "trainfleet.models.small:LeNet")
MODELS.register("mlp", "trainfleet.models.small:MLP")
MODELS.register("unet", "trainfleet.models.small:SmallUNet")


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """Every name :func:`build_model` accepts."""
    return sorted(set(MODELS.names()) | set(_torchvision_names()))


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, child_name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, child.dilation, child.groups, child.bias is not None))
                return


def build_model(name: str, num_classes: int = 10, in_channels: int = 3,
                input_shape: Sequence[int] | None = None, **cfg: Any) -> nn.Module:
    """Build a model by name.

    Args:
        name: a registered small net or a torchvision classification model name.
        num_classes: size of the classifier output.
        in_channels: input channels; torchvision models get their first conv replaced
            when this is not 3.
        input_shape: ``(C, H, W)`` of one input; sets ``in_channels`` and sizes the nets
            that depend on it (mlp). Convolutional nets accept any size.
        **cfg: passed to the constructor (``weights=`` for torchvision, ``hidden=`` for mlp).

    Raises:
        UsageError: unknown name (the message lists the valid ones).
    """
    if input_shape is not None:
        in_channels = int(input_shape[0])
    if name in MODELS:
        factory = MODELS.get(name)
        if input_shape is not None and "input_shape" in inspect.signature(factory).parameters:
            cfg["input_shape"] = tuple(input_shape[1:])
        return factory(num_classes=num_classes, in_channels=in_channels, **cfg)
    names = _torchvision_names()
    if name not in names:
        raise UsageError(MODELS.unknown_message(name, sorted(set(MODELS.names()) | set(names))))
    import torchvision

    cfg.setdefault("weights", None)
    if cfg["weights"] is None:
        cfg["num_classes"] = num_classes
    model = torchvision.models.get_model(name, **cfg)
    if cfg["weights"] is not None and num_classes is not None:
        _replace_head(model, num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer for one with ``num_classes`` outputs (fine-tuning)."""
    last = None
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, child_name, child)
    if last and last[2].out_features != num_classes:
        parent, child_name, child = last
        setattr(parent, child_name, nn.Linear(child.in_features, num_classes, child.bias is not None))
