"""Generated classification data: learnable, deterministic, nothing on disk."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _class_patterns(num_classes: int, shape: tuple[int, ...], signal: float, seed: int) -> torch.Tensor:
    """One pattern per class with per-element standard deviation ``signal``.

    Image shapes ``(C, H, W)`` get smooth patterns (4x4 noise upsampled), like the
    low-frequency content of real images: i.i.d. pixels would be averaged away by
    the pooling of a CNN and the task would barely be learnable.
    """
    generator = torch.Generator().manual_seed(seed)
    if len(shape) == 3:
        coarse = torch.randn((num_classes, shape[0], 4, 4), generator=generator)
        patterns = F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    else:
        patterns = torch.randn((num_classes, *shape), generator=generator)
    std = patterns.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, *([1] * len(shape)))
    return patterns / std * signal


class SyntheticClassification(Dataset):
    """Samples ``x = pattern[y] + N(0, 1)``; the same (seed, split, index) gives the same sample.

    The class patterns depend only on ``seed``, so the train and test splits share
    the task while holding different samples.

    Args:
        num_samples: dataset length.
        shape: shape of one input, e.g. ``(3, 32, 32)``.
        num_classes: number of labels.
        seed: seeds the patterns and every sample.
        split: ``train``, ``val`` or ``test``.
        signal: standard deviation of a class pattern against unit noise; 0.5 takes
            LeNet about two epochs of 1024 samples, resnet18 about one.
    """

    def __init__(self, num_samples: int = 1024, shape: Sequence[int] = (3, 32, 32),
                 num_classes: int = 10, seed: int = 0, split: str = "train", signal: float = 0.5):
        self.num_samples, self.shape = int(num_samples), tuple(int(s) for s in shape)
        self.num_classes, self.seed = num_classes, seed
        self.offset = _SPLIT_OFFSET.get(split, 0)
        self.patterns = _class_patterns(num_classes, self.shape, signal, seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        generator = torch.Generator().manual_seed(self.seed * 7_919 + self.offset + index)
        label = int(torch.randint(self.num_classes, (1,), generator=generator))
        return self.patterns[label] + torch.randn(self.shape, generator=generator), label
