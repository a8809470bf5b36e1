"""A dataset wrapper for the test scripts: each sample comes with its dataset index."""
from torch.utils.data import Dataset


class WithIndex(Dataset):
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        x, y = self.inner[index]
        return x, y, index
