"""Datasets read real files with torchvision's loaders; nothing downloads."""
from pathlib import Path

import pytest
import torch

from tests.filedata import write_cifar10, write_imagefolder, write_mnist
from trainfleet.datasets import build_dataset, dataset_info, list_datasets
from trainfleet.engine.data import DatasetShapeError
from trainfleet.engine.engine import Engine
from trainfleet.utils.errors import UsageError


def test_registry_lists_and_rejects():
    assert list_datasets() == ["cifar10", "imagefolder", "mnist", "synthetic"]
    with pytest.raises(UsageError, match=r"Unknown dataset 'cifar'. Available: \[.*'cifar10'.*HINT: did you mean 'cifar10'"):
        build_dataset("cifar")
    with pytest.raises(UsageError, match="Unknown split 'valid'"):
        build_dataset("synthetic", "valid")


def test_synthetic_is_deterministic_and_splits_differ():
    a = build_dataset("synthetic", "train", num_samples=8, shape=(3, 8, 8))
    b = build_dataset("synthetic", "train", num_samples=8, shape=(3, 8, 8))
    test = build_dataset("synthetic", "test", num_samples=8, shape=(3, 8, 8))
    assert torch.equal(a[3][0], b[3][0]) and a[3][1] == b[3][1]
    assert not torch.equal(a[3][0], test[3][0])
    assert torch.equal(a.patterns, test.patterns)  # same task
    assert dataset_info(a) == {"num_classes": 10, "input_shape": (3, 8, 8)}
    with pytest.raises(IndexError):
        a[8]


def test_mnist_idx_files(tmp_path):
    write_mnist(tmp_path, train=12, test=5)
    train = build_dataset("mnist", "train", data_dir=tmp_path)
    test = build_dataset("mnist", "test", data_dir=tmp_path)
    assert (len(train), len(test)) == (12, 5)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert dataset_info(train) == {"num_classes": 10, "input_shape": (1, 28, 28)}


def test_cifar10_pickle_batches(tmp_path):
    write_cifar10(tmp_path, per_batch=3, test=4)
    train = build_dataset("cifar10", "train", data_dir=tmp_path)
    test = build_dataset("cifar10", "test", data_dir=tmp_path)
    assert (len(train), len(test)) == (15, 4)
    assert train[0][0].shape == test[0][0].shape == (3, 32, 32)
    assert train.classes[3] == "cat"
    with pytest.raises(UsageError, match="CIFAR-10 was not found"):  # md5 check on request
        build_dataset("cifar10", "train", data_dir=tmp_path, verify=True)


def test_imagefolder_pngs(tmp_path):
    write_imagefolder(tmp_path, per_class=3)
    train = build_dataset("imagefolder", "train", data_dir=tmp_path, image_size=16)
    assert len(train) == 6 and train.classes == ["cat", "dog"]
    assert train[0][0].shape == (3, 16, 16)
    assert dataset_info(train)["num_classes"] == 2


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="MNIST was not found under .*--download"):
        build_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(UsageError, match="CIFAR-10 was not found"):
        build_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        build_dataset("imagefolder", data_dir=tmp_path / "nope")


def test_inconsistent_shapes_name_the_sample(tmp_path):
    write_imagefolder(tmp_path, per_class=3, odd_size=(24, 20))
    dataset = build_dataset("imagefolder", "train", data_dir=tmp_path, image_size=None)
    odd = next(i for i, (path, _) in enumerate(dataset.samples) if path.endswith("dog/2.png"))
    engine = Engine(strategy="single")
    loader = engine.dataloader(dataset, batch_size=6, shuffle=False)
    with pytest.raises(DatasetShapeError, match=rf"dataset sample {odd} has shape \(3, 20, 24\) in field 0, "
                                                r"but sample 0 of the same batch has \(3, 20, 20\)"):
        next(iter(loader))
    engine.close()


class _RunsCode:
    """What a hostile batch file pickles: a call that runs when the file is unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_cifar_batch_that_pickles_code_is_refused_unrun(tmp_path):
    """Without the md5 check (a user's subset never matches the published sums) the batches are
    still never unpickled freely: a file that pickles a call is refused in one line, the call not
    made (on the old code, which switched torchvision's md5 check off, the marker was written)."""
    import pickle

    write_cifar10(tmp_path, per_batch=3, test=4)
    marker = tmp_path / "ran.txt"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as handle:
        pickle.dump({"labels": [0], "data": _RunsCode(marker)}, handle)
    with pytest.raises(UsageError, match=r"refusing to read .*data_batch_2.*pickles pathlib.*Path.write_text"):
        build_dataset("cifar10", "train", data_dir=tmp_path)
    assert not marker.exists()
    assert len(build_dataset("cifar10", "test", data_dir=tmp_path)) == 4  # the other split is untouched


def test_cifar_batches_pickled_by_python2_numpy_load(tmp_path):
    """The published batches were pickled by Python 2 (protocol 2, latin1 strings)."""
    import pickle

    write_cifar10(tmp_path, per_batch=2, test=2)
    folder = tmp_path / "cifar-10-batches-py"
    for name in ["data_batch_1", "test_batch"]:
        with open(folder / name, "rb") as handle:
            batch = pickle.load(handle)
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    assert len(build_dataset("cifar10", "test", data_dir=tmp_path)) == 2
