"""Writers of tiny real dataset files in the formats torchvision reads."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def write_mnist(root: Path, train: int = 64, test: int = 32, seed: int = 0) -> Path:
    """idx files under ``root/MNIST/raw``; labels follow a learnable pattern (mean brightness)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
        images[:, 4:24, 4:24] += (labels * 19)[:, None, None].astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, count) + labels.tobytes())
    return root


def write_cifar10(root: Path, per_batch: int = 8, test: int = 16, seed: int = 0) -> Path:
    """The python pickle batches under ``root/cifar-10-batches-py``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test if name == "test_batch" else per_batch
        batch = {"batch_label": name, "labels": rng.integers(0, 10, count).tolist(),
                 "data": rng.integers(0, 256, (count, 3072)).astype(np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(count)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    label_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": label_names, "num_cases_per_batch": per_batch, "num_vis": 3072}, handle)
    return root


def write_imagefolder(root: Path, classes=("cat", "dog"), per_class: int = 4, size=(20, 20),
                      odd_size: tuple[int, int] | None = None) -> Path:
    """PNGs in ``root/<split>/<class>/``; ``odd_size`` makes one train image differ in size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape = odd_size if (odd_size and split == "train" and c == 1 and i == 2) else size
                pixels = rng.integers(0, 256, (shape[1], shape[0], 3)).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
