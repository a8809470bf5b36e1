"""Builders behind the dataset registry, on torchvision's own dataset classes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from trainfleet.datasets.cifar import cifar10_class
from trainfleet.datasets.synthetic import SyntheticClassification
from trainfleet.utils.errors import UsageError

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _root(data_dir: str | os.PathLike[str] | None) -> str:
    return str(Path(data_dir or os.environ.get("TRAINFLEET_DATA_DIR", "./data")).expanduser())


def _annotate(dataset: Dataset, num_classes: int, input_shape: tuple[int, ...] | None) -> Dataset:
    """Record what a matching model needs: classes and the shape of one input (None: varies)."""
    dataset.num_classes, dataset.input_shape = num_classes, input_shape  # type: ignore[attr-defined]
    return dataset


def synthetic(split: str = "train", num_samples: int = 1024, shape: Sequence[int] = (3, 32, 32),
              num_classes: int = 10, seed: int = 0, **cfg: Any) -> Dataset:
    """Generated data (see :class:`SyntheticClassification`); ``data_dir`` is ignored."""
    cfg.pop("data_dir", None), cfg.pop("download", None), cfg.pop("augment", None)
    dataset = SyntheticClassification(num_samples, shape, num_classes, seed, split, **cfg)
    return _annotate(dataset, num_classes, tuple(int(s) for s in shape))


def _missing(name: str, root: str, expected: str) -> UsageError:
    return UsageError(f"{name} was not found under {root!r} (expected {expected}).",
                      "point --data-dir at it, or pass --download to fetch it.")


def mnist(split: str = "train", data_dir: str | None = None, download: bool = False,
          augment: bool = False, **cfg: Any) -> Dataset:
    """MNIST from ``data_dir/MNIST/raw`` idx files (gzipped or not)."""
    from torchvision import datasets, transforms

    root = _root(data_dir)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)])
    try:
        dataset = datasets.MNIST(root, train=split == "train", download=download, transform=transform, **cfg)
    except RuntimeError as err:
        raise _missing("MNIST", root, "MNIST/raw/train-images-idx3-ubyte and friends") from err
    return _annotate(dataset, 10, (1, 28, 28))


def cifar10(split: str = "train", data_dir: str | None = None, download: bool = False,
            augment: bool | None = None, verify: bool = False, **cfg: Any) -> Dataset:
    """CIFAR-10 from the python pickle batches in ``data_dir/cifar-10-batches-py``."""
    from torchvision import transforms

    root = _root(data_dir)
    augment = split == "train" if augment is None else augment
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    transform = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    try:
        dataset = cifar10_class()(root, train=split == "train", download=download, transform=transform,
                                   verify=verify, **cfg)
    except RuntimeError as err:
        raise _missing("CIFAR-10", root, "cifar-10-batches-py/data_batch_1..5 and test_batch") from err
    return _annotate(dataset, 10, (3, 32, 32))


def imagefolder(split: str = "train", data_dir: str | None = None, image_size: int | None = 224,
                augment: bool | None = None, **cfg: Any) -> Dataset:
    """Images in ``data_dir/<split>/<class>/*.png|jpg`` (or ``data_dir/<class>/...``).

    Args:
        image_size: side of the square crop; None keeps the files' own sizes (they
            must then agree, or batching fails with the offending index).
        augment: random resized crops and flips; defaults to True for ``train``.
    """
    from torchvision import datasets, transforms

    root = Path(_root(data_dir))
    folder = root / split if (root / split).is_dir() else root
    if not folder.is_dir():
        raise UsageError(f"image folder {str(folder)!r} does not exist.",
                         "expected DATA_DIR/<split>/<class>/<image> files.")
    augment = split == "train" if augment is None else augment
    steps: list[Any] = []
    if image_size and augment:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    elif image_size:
        steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    transform = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transform, **cfg)
    except (FileNotFoundError, RuntimeError) as err:
        raise UsageError(f"no images found under {str(folder)!r} ({err}).",
                         "expected DATA_DIR/<split>/<class>/<image> files.") from err
    return _annotate(dataset, len(dataset.classes), (3, image_size, image_size) if image_size else None)
