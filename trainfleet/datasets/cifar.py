"""CIFAR-10's python batches, read without unpickling arbitrary objects.

The batches are Python pickles (``pickle.load`` can run any code a file names). torchvision
guards them with published md5 sums, which a CIFAR-format subset made by a user never matches,
and which cost a 170 MB read on every rank at every start. Here the sums are checked on request
(``verify=True``) and the pickles are always read through an unpickler that admits the few
globals a batch needs (numpy's array reconstruction) and refuses everything else, so an
unverified file can be wrong but cannot run code.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from trainfleet.utils.errors import UsageError

# What CIFAR batches pickle: numpy arrays (Python 2's and 3's numpy, protocols 2-5) and bytes.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("builtins", "bytearray"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_batch(path: Path) -> dict[str, Any]:
    """One batch (or ``batches.meta``) as a dict, refusing any pickled global but numpy's arrays.

    Raises:
        UsageError: the file pickles something else (it could run code), or is not a batch.
    """
    try:
        with open(path, "rb") as handle:
            entry = _BatchUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise UsageError(f"refusing to read {str(path)!r}: it pickles {err}, which a CIFAR-10 batch never does "
                         "(it could run code on load).", "replace the file with the real batch "
                         "(or pass --download to fetch it, md5-checked).") from err
    except (EOFError, ValueError, TypeError, AttributeError) as err:
        raise UsageError(f"{str(path)!r} is not a CIFAR-10 batch ({type(err).__name__}: {err}).",
                         "replace the file, or pass --download.") from err
    if not isinstance(entry, dict):
        raise UsageError(f"{str(path)!r} is not a CIFAR-10 batch (it holds a {type(entry).__name__}).")
    return entry


def cifar10_class() -> type:
    """torchvision's CIFAR10, with its files read by :func:`read_batch` and md5-checked only
    when ``verify`` is set (``download`` fetches and checks the archive as torchvision does)."""
    from torchvision import datasets
    from torchvision.datasets.vision import VisionDataset

    class CIFAR10(datasets.CIFAR10):
        def __init__(self, root: str, train: bool = True, transform: Any = None, target_transform: Any = None,
                     download: bool = False, verify: bool = False):
            VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
            self.train = train
            if download:
                self.download()
            if verify and not self._check_integrity():
                raise RuntimeError("Dataset not found or corrupted (md5)")
            folder = Path(self.root, self.base_folder)
            data, targets = [], []
            for name, _ in self.train_list if train else self.test_list:
                if not (folder / name).is_file():
                    raise RuntimeError(f"{name} not found")
                entry = read_batch(folder / name)
                data.append(entry["data"])
                targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
            self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC
            self.targets = targets
            meta = read_batch(folder / self.meta["filename"])
            self.classes = meta[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return CIFAR10
