"""Dataset registry: ``build_dataset(name, split, **cfg)``.

``synthetic`` is generated in memory; ``mnist``, ``cifar10`` and ``imagefolder``
read files with torchvision's own loaders and never download unless asked to
(``download=True``).
"""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from trainfleet.utils.errors import UsageError
from trainfleet.utils.registry import Registry

DATASETS: Registry[Any] = Registry("dataset")
DATASETS.register("synthetic", "trainfleet.datasets.vision:synthetic")
DATASETS.register("mnist", "trainfleet.datasets.vision:mnist")
DATASETS.register("cifar10", "trainfleet.datasets.vision:cifar10")
DATASETS.register("imagefolder", "trainfleet.datasets.vision:imagefolder")
SPLITS = ("train", "val", "test")


def list_datasets() -> list[str]:
    """Every name :func:`build_dataset` accepts."""
    return DATASETS.names()


def build_dataset(name: str, split: str = "train", **cfg: Any) -> Dataset:
    """Build a dataset by name.

    Args:
        name: ``synthetic``, ``mnist``, ``cifar10`` or ``imagefolder``.
        split: ``train``, ``val`` or ``test``.
        **cfg: ``data_dir``, ``download``, ``augment``, ``image_size`` and the
            dataset's own options (``num_samples``, ``shape`` for synthetic).

    Raises:
        UsageError: unknown name or split, or files missing under ``data_dir``.
    """
    if split not in SPLITS:
        raise UsageError(f"Unknown split {split!r}. Available: {list(SPLITS)}")
    return DATASETS.get(name)(split=split, **cfg)


def dataset_info(dataset: Dataset) -> dict[str, Any]:
    """``num_classes`` and ``input_shape`` of a built dataset, for building a matching model."""
    return {"num_classes": getattr(dataset, "num_classes", None),
            "input_shape": getattr(dataset, "input_shape", None)}
