"""The real loaders on the data this machine has (set up by scripts/setup.sh)."""
from pathlib import Path

import pytest
import torch

from fl_core.data import load_dataset, resolve_data_root

ROOT = resolve_data_root()


@pytest.mark.skipif(not (ROOT / "cifar10" / "train").is_dir(), reason="CIFAR-10 not unpacked under the data root")
def test_cifar10_from_the_jpeg_imagefolder(tmp_path):
    ds = load_dataset("cifar10", ROOT)
    assert ds.train.images.shape == (50000, 3, 32, 32) and ds.test.images.shape == (10000, 3, 32, 32)
    assert ds.train.classes[0] == "airplane" and ds.train.classes[-1] == "truck"
    assert torch.equal(torch.bincount(ds.test.labels), torch.full((10,), 1000))
    assert 0.45 < ds.mean[0] < 0.52  # CIFAR-10 red-channel mean is about 0.49


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    ds = load_dataset("fashion_mnist", tmp_path / "empty-root", tmp_path / "cache")
    assert ds.source == "idx:/usr/share/datasets/fashion-mnist"
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.train.labels), torch.full((10,), 6000))
